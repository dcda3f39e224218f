"""cachemw for Django: ``@cache`` on views (functions or class-based), rules naming the URLconf's routes.

ASGI, in the project's ``asgi.py``::

    from django.core.asgi import get_asgi_application
    from cachemw.django import asgi_application

    application = asgi_application(get_asgi_application())

WSGI, in the project's ``wsgi.py`` (gunicorn, uWSGI, mod_wsgi)::

    from django.core.wsgi import get_wsgi_application
    from cachemw.django import wsgi_application

    application = wsgi_application(get_wsgi_application())

``settings.CACHEMW`` (a dict of ``CacheMiddleware``'s keywords: ``config``,
``redis_url``, ``key_prefix``, ...) gives the defaults; keywords given here win.
``cachemw routes --django mysite.settings`` shows the table this builds.

Data changes invalidate the cache: in an ``AppConfig.ready()``,
``invalidate_on_commit({Product: ["product:{id}"]})`` (or ``settings.CACHEMW_MODEL_TAGS``)
purges the tags of the rows each transaction saved or deleted, after it commits
(``cachemw.orm.django``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp

from cachemw.asgi.lifespan import AnswersLifespan
from cachemw.asgi.middleware import CacheMiddleware
from cachemw.core.policy import ConfigError
from cachemw.frameworks.django import route_table
from cachemw.orm.django import DjangoHook, PurgingQuerySet, invalidate_on_commit, serve_purges_through
from cachemw.orm.purger import Purger
from cachemw.wsgi import CacheMiddleware as WSGICacheMiddleware

__all__ = ["DjangoHook", "Purger", "PurgingQuerySet", "asgi_application", "invalidate_on_commit",
           "middleware_options", "route_table", "wsgi_application"]



def middleware_options(**given: Any) -> dict[str, Any]:
    """``settings.CACHEMW`` under the keywords ``given``; a key ``CacheMiddleware`` does not take is a ConfigError."""
    from django.conf import settings  # type: ignore[import-untyped]

    configured = getattr(settings, "CACHEMW", None) or {}
    if not isinstance(configured, Mapping):
        raise ConfigError(f"Django setting CACHEMW: expected a dict of CacheMiddleware keywords, got "
                          f"{type(configured).__name__}")
    known = sorted(set(inspect.signature(CacheMiddleware).parameters) - {"app", "route_table"})
    unknown = sorted(str(key) for key in configured if key not in known)
    if unknown:
        raise ConfigError(f"Django setting CACHEMW: unknown key {unknown[0]!r}; the keys are: {', '.join(known)}")
    return {**configured, **given}


def asgi_application(app: ASGIApp, *, urlconf: str | None = None, **options: Any) -> CacheMiddleware:
    """Django's ASGI application behind the cache, its policies from the URLconf (default ``ROOT_URLCONF``)."""
    from django.core.handlers.asgi import ASGIHandler  # type: ignore[import-untyped]

    inner = AnswersLifespan(app) if isinstance(app, ASGIHandler) else app
    middleware = CacheMiddleware(inner, route_table=lambda settings: route_table(settings, urlconf),
                                 **middleware_options(**options))
    serve_purges_through(middleware)  # invalidate_on_commit() hooks purge through this process's cache
    return middleware


def wsgi_application(app: Any, *, urlconf: str | None = None, **options: Any) -> WSGICacheMiddleware:
    """Django's WSGI application behind the cache (``get_wsgi_application()``), as ``asgi_application``."""
    middleware = WSGICacheMiddleware(app, route_table=lambda settings: route_table(settings, urlconf, wsgi=True),
                                     **middleware_options(**options))
    serve_purges_through(middleware)
    return middleware
