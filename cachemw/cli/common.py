"""What every ``cachemw`` command shares: the app named by ``--app`` and the settings its cache runs with.

The commands read the app's ``CacheMiddleware`` through its public ``options`` (or the
arguments ``add_middleware`` was given), never its internals, so they recompute what
the middleware computes at startup without starting it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import sysconfig
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeAlias

from cachemw.asgi.middleware import CacheMiddleware, MiddlewareOptions
from cachemw.asgi.routes import build_rule_table
from cachemw.core.rules import RuleTable
from cachemw.core.settings import REDIS_URL_ENV, Settings, load_settings, masked_url
from cachemw.frameworks.flask import find_flask_app
from cachemw.frameworks.flask import route_table as flask_route_table
from cachemw.store.base import Store
from cachemw.wsgi.middleware import CacheMiddleware as WsgiCacheMiddleware

__all__ = [
    "REDIS_URL_HELP",
    "CommandFailed",
    "Subcommands",
    "app_middleware_options",
    "app_routes",
    "app_rule_table",
    "app_store",
    "app_table",
    "app_write_behinds",
    "django_rule_table",
    "load_app",
    "one_line",
    "operator_settings",
    "store_description",
]

# What ``add_subparsers`` returns: each command module adds its commands to it (argparse names no public type).
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
REDIS_URL_HELP = ("the Redis holding the entries (default: CACHEMW_REDIS_URL, else the app's CacheMiddleware, "
                  "else the config file)")
_NO_OPTIONS = MiddlewareOptions(config=None, settings=None, key_prefix=None, redis_url=None, identity=None)


class CommandFailed(Exception):
    """A failure to report in one line (``cachemw: MESSAGE``) with an exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def one_line(exc: BaseException) -> str:
    """An exception's message on one line: drivers' messages span several, a report is one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def load_app(path: str) -> Any:
    """Import ``module:attribute`` (like uvicorn), from the current directory too."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise CommandFailed(f"{path!r} is not an app import path; expected MODULE:ATTRIBUTE, e.g. sample_app:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandFailed(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the app's own code failed at import: where, in one line, not our traceback
        where = _app_frame(traceback.extract_tb(exc.__traceback__))
        raise CommandFailed(f"cannot import {module_name!r}: it raised {type(exc).__name__}: {one_line(exc)} "
                            f"({where.filename}:{where.lineno})") from None
    app: Any = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise CommandFailed(f"module {module_name!r} has no attribute {attribute!r}") from None
    return app


def _app_frame(frames: traceback.StackSummary) -> traceback.FrameSummary:
    """The innermost frame of the app's own code: not the standard library's, nor an installed package's."""
    installed = tuple({sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")})
    own = [f for f in frames if not f.filename.startswith("<") and not f.filename.startswith(installed)]
    return (own or frames)[-1]


def _added_middleware_arguments(app: Any) -> dict[str, Any]:
    """The keyword arguments of the app's ``add_middleware(CacheMiddleware, ...)`` (empty if it has none)."""
    for middleware in getattr(app, "user_middleware", ()):
        if middleware.cls is CacheMiddleware:
            return dict(middleware.kwargs)
    return {}


def _cache_of(app: Any) -> CacheMiddleware | None:
    """The ASGI CacheMiddleware the app is, or the one a WSGI CacheMiddleware runs (the app itself, or a Flask
    app's ``wsgi_app``): it holds what the shell was given."""
    for candidate in (app, getattr(app, "wsgi_app", None)):
        if isinstance(candidate, WsgiCacheMiddleware):
            return candidate.cache
        if isinstance(candidate, CacheMiddleware):
            return candidate
    return None


def _options_from(given: Mapping[str, Any]) -> MiddlewareOptions:
    return MiddlewareOptions(config=given.get("config"), settings=given.get("settings"),
                             key_prefix=given.get("key_prefix"), redis_url=given.get("redis_url"),
                             identity=given.get("identity"))


def app_middleware_options(app: Any) -> MiddlewareOptions:
    """What the app's CacheMiddleware was given: the middleware itself, or the app it was added to."""
    cache = _cache_of(app)
    if cache is not None:
        return cache.options
    given = _added_middleware_arguments(app)
    return _options_from(given) if given else _NO_OPTIONS


def app_write_behinds(app: Any) -> list[str]:
    """The names of the write-behind queues the app's CacheMiddleware runs."""
    cache = _cache_of(app)
    if cache is not None:
        queues: Sequence[Any] = cache.write_behinds
    else:
        queues = _added_middleware_arguments(app).get("write_behind") or ()
    return [queue.name for queue in queues]


def app_routes(app: Any) -> Any:
    """The routes the rule table is built from: the app's, or those of the app a CacheMiddleware wraps."""
    routes = getattr(app.app if isinstance(app, CacheMiddleware) else app, "routes", None)
    if routes is None:
        raise CommandFailed("the app has no routes (is it a Starlette, FastAPI or Flask app, or one behind "
                            "cachemw's CacheMiddleware?)")
    return routes


def app_table(app: Any, settings: Settings) -> RuleTable:
    """The rule table the app's cache builds: its own ``route_table`` (Django, Flask behind the WSGI shell),
    a Flask app's ``url_map``, or Starlette's routes."""
    cache = _cache_of(app)
    if cache is not None and cache.route_table is not None:
        return cache.route_table(settings)
    flask_app = find_flask_app(app)
    if flask_app is not None:
        return flask_route_table(flask_app, settings)
    return build_rule_table(app_routes(app), settings)


def app_store(app: Any) -> Store | None:
    """The store object the app's CacheMiddleware was given (``store=``), if any."""
    cache = _cache_of(app)
    if cache is not None:
        return cache.store
    store: Store | None = _added_middleware_arguments(app).get("store")
    return store


def store_description(settings: Settings, store: Store | None) -> str:
    """The store a middleware with these settings (and this ``store=``) runs on: its URL, password masked."""
    if store is not None:
        return f"{type(store).__name__} (given as store=)"
    return masked_url(settings.redis_url) if settings.redis_url else "memory"


def app_rule_table(app: Any, config: str | None) -> tuple[RuleTable, Settings]:
    """The rule table the app's CacheMiddleware would build and the settings it runs with (``config``: that file
    instead of the one it names; its ``redis_url=`` and ``key_prefix=`` still win, as at its startup)."""
    settings = app_middleware_options(app).resolve(config)
    return app_table(app, settings), settings


def django_rule_table(settings_module: str, config: str | None) -> tuple[RuleTable, Settings, Store | None]:
    """The rule table ``cachemw.django`` builds for a Django project, the settings it runs with and the store it
    is given: ``settings.CACHEMW`` its options."""
    os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        import django  # type: ignore[import-untyped]
        from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
    except ImportError as exc:
        raise CommandFailed(f"--django needs Django: {exc}") from None
    try:
        django.setup()
    except (ImportError, ImproperlyConfigured) as exc:
        raise CommandFailed(f"cannot set up Django with settings {settings_module!r}: {one_line(exc)}") from None
    from cachemw.frameworks.django import route_table, settings_cachemw

    options = settings_cachemw()
    settings = _options_from(options).resolve(config)
    return route_table(settings), settings, options.get("store")


def operator_settings(args: argparse.Namespace) -> tuple[Any, RuleTable | None, Settings]:
    """The app (if named), its rule table and the settings its middleware runs with, then the overrides.

    Precedence of the store URL: ``--redis-url``, ``CACHEMW_REDIS_URL``, the
    app's ``CacheMiddleware(redis_url=...)``, the config file.
    """
    app: Any = None
    table: RuleTable | None = None
    if args.app:
        app = load_app(args.app)
        table, settings = app_rule_table(app, args.config)  # its redis_url= and key_prefix= applied
    else:
        settings = load_settings(args.config)
    env_url = os.environ.get(REDIS_URL_ENV)
    if env_url:
        settings = replace(settings, redis_url=env_url)
    if args.redis_url:
        settings = replace(settings, redis_url=args.redis_url)
    return app, table, settings
