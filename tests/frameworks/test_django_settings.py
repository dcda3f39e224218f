"""``settings.CACHEMW``: every key works the same under ASGI and WSGI, through ``cachemw.django``'s functions and
around Django's handler wrapped by hand in either middleware; explicit keywords win; any other key is a ConfigError.

The WSGI forms are driven in-process by Werkzeug's test client, the ASGI ones by httpx under a lifespan, on the
session's real Redis.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]
from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]
from django.test import override_settings  # type: ignore[import-untyped]
from starlette.requests import HTTPConnection
from werkzeug.test import Client

import cachemw.wsgi
from cachemw import CacheMiddleware, MemoryStore, Settings
from cachemw.core.policy import ConfigError
from cachemw.django import asgi_application, wsgi_application
from cachemw.runtime.supervisor import Supervisor
from cachemw.writebehind import WriteBehind
from tests.budgets import Budgets
from tests.helpers import client, eventually, eventually_sync, lifespan

CONFIG = str(Path(__file__).resolve().parents[1] / "apps" / "djangoproject" / "cachemw.toml")
PREFIX = "fromsettings"

# Django's handler behind the cache, each way a project may write it.
FORMS: dict[str, Callable[[], Any]] = {
    "wsgi_application": lambda: wsgi_application(get_wsgi_application()),
    "wsgi by hand": lambda: cachemw.wsgi.CacheMiddleware(get_wsgi_application()),
    "asgi_application": lambda: asgi_application(get_asgi_application()),
    "asgi by hand": lambda: CacheMiddleware(get_asgi_application()),
}


def _asgi_cache(app: Any) -> CacheMiddleware:
    """The ASGI shell that holds what the middleware was given (the WSGI shell runs one)."""
    cache: CacheMiddleware = app.cache if isinstance(app, cachemw.wsgi.CacheMiddleware) else app
    return cache


def _by_user(connection: HTTPConnection) -> str | None:
    user: str | None = connection.headers.get("x-user")
    return user


# One value per key of settings.CACHEMW, and what shows that the middleware took it.
STORE = MemoryStore()
SETTINGS = Settings(key_prefix="fromsettingsobject")
SUPERVISOR = Supervisor(queue_size=77)
WRITES: WriteBehind[Any] = WriteBehind("djangocart")
VALUES: dict[str, tuple[Any, Callable[[Any], bool]]] = {
    "config": (CONFIG, lambda app: _asgi_cache(app).options.config == CONFIG),
    "redis_url": ("redis://127.0.0.1:1/0", lambda app: _asgi_cache(app).options.redis_url == "redis://127.0.0.1:1/0"),
    "store": (STORE, lambda app: app.store is STORE),
    "key_prefix": (PREFIX, lambda app: _asgi_cache(app).options.key_prefix == PREFIX),
    "identity": (_by_user, lambda app: _asgi_cache(app).options.identity is _by_user),
    "settings": (SETTINGS, lambda app: _asgi_cache(app).options.settings is SETTINGS),
    "supervisor": (SUPERVISOR, lambda app: app.supervisor is SUPERVISOR),
    "access_log_json": (True, lambda app: app.access_log.json_lines is True),
    "write_behind": ([WRITES], lambda app: _asgi_cache(app).write_behinds == (WRITES,)),
}


def test_every_key_is_a_keyword_of_both_middlewares() -> None:
    from cachemw.frameworks.django import OPTIONS  # what settings.CACHEMW may hold

    assert sorted(OPTIONS) == sorted(VALUES)
    for shell in (CacheMiddleware, cachemw.wsgi.CacheMiddleware):
        assert set(inspect.signature(shell).parameters) == {"app", "route_table", *VALUES}, shell


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("key", sorted(VALUES))
def test_every_key_of_settings_cachemw_is_taken_by_every_form(form: str, key: str) -> None:
    value, taken = VALUES[key]
    with override_settings(CACHEMW={key: value}):
        app = FORMS[form]()
    assert taken(app), f"{form} did not take settings.CACHEMW[{key!r}]"


@pytest.mark.parametrize("form", FORMS)
def test_keywords_win_over_settings_cachemw_however_it_is_wrapped(form: str) -> None:
    make: Callable[[], Any] = {
        "wsgi_application": lambda: wsgi_application(get_wsgi_application(), key_prefix="mine"),
        "wsgi by hand": lambda: cachemw.wsgi.CacheMiddleware(get_wsgi_application(), key_prefix="mine"),
        "asgi_application": lambda: asgi_application(get_asgi_application(), key_prefix="mine"),
        "asgi by hand": lambda: CacheMiddleware(get_asgi_application(), key_prefix="mine"),
    }[form]
    with override_settings(CACHEMW={"config": CONFIG, "key_prefix": PREFIX, "access_log_json": True}):
        app = make()
    options = _asgi_cache(app).options
    assert options.key_prefix == "mine" and options.config == CONFIG and app.access_log.json_lines is True


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("value", "message"), [
    ({"redis": "redis://x"}, "settings.CACHEMW: unknown key 'redis'; the keys are: access_log_json, config, "),
    ({"store_timeout": "100ms"}, "settings.CACHEMW: unknown key 'store_timeout'; the keys are: "),
    ("redis://x", "settings.CACHEMW: expected a dict of CacheMiddleware keywords, got str"),
])
def test_another_key_is_a_config_error_naming_it(form: str, value: object, message: str) -> None:
    with override_settings(CACHEMW=value), pytest.raises(ConfigError) as failure:
        FORMS[form]()
    assert str(failure.value).startswith(message)
    if "store_timeout" in message:  # a setting of the config file: where it goes instead
        assert "put it under [cachemw] in the file that 'config' names" in str(failure.value)


# -- real requests on a real Redis -----------------------------------------------------------------


@pytest.fixture
def counts(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as connection:
        yield connection


def _stored(counts: redis.Redis, label: str) -> bool:
    return list(counts.scan_iter(match=f"{PREFIX}:e:{label}:*}}")) != []


@pytest.mark.parametrize("form", ["wsgi_application", "wsgi by hand"])
def test_wsgi_serves_with_settings_cachemw_its_supervisor_and_identity(form: str, redis_url: str,
                                                                      counts: redis.Redis) -> None:
    supervisor = Supervisor(queue_size=100, concurrency=4)
    configured = {"config": CONFIG, "redis_url": redis_url, "key_prefix": PREFIX, "supervisor": supervisor,
                  "identity": _by_user}
    with override_settings(CACHEMW=configured):
        app = FORMS[form]()
    # The WSGI shell makes itself current_cache() in the thread that calls it, as in a server's thread: the
    # requests run in a context of their own, so this test's thread does not keep it for the tests after it.
    contextvars.copy_context().run(_serve_with_settings, app, supervisor, counts)


def _serve_with_settings(app: Any, supervisor: Supervisor, counts: redis.Redis) -> None:
    http = Client(app)
    try:
        first = http.get("/archive/2024/")  # cached by the rule of the config settings.CACHEMW names
        assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"
        eventually_sync(lambda: _stored(counts, "/archive/<year>/"),
                        what="the entry stored in the settings' Redis, under the settings' prefix")
        assert http.get("/archive/2024/").headers["X-Cache"] == "HIT"
        eventually_sync(lambda: supervisor.counters_for("fill").done >= 1,
                        what="the fill counted as done by the settings' supervisor")
        # /me/ is private: the settings' identity (of an HTTPConnection, as under ASGI) keys it.
        assert http.get("/me/", headers={"X-User": "alice"}).headers["X-Cache"] == "MISS"
        eventually_sync(lambda: http.get("/me/", headers={"X-User": "alice"}).headers["X-Cache"] == "HIT",
                        what="alice's private entry stored")
        assert http.get("/me/", headers={"X-User": "bob"}).headers["X-Cache"] == "MISS"
    finally:
        app.close()


@pytest.mark.anyio
async def test_asgi_by_hand_serves_with_settings_cachemw(redis_url: str, counts: redis.Redis,
                                                         budgets: Budgets) -> None:
    with override_settings(CACHEMW={"config": CONFIG, "redis_url": redis_url, "key_prefix": PREFIX}):
        app = CacheMiddleware(get_asgi_application())
    async with lifespan(app):  # Django refuses the lifespan; wrapped by hand, it is answered for it
        assert app.supervisor.running
        async with client(app) as http:
            first = await http.get("/archive/2024/")
            assert first.status_code == 200 and first.headers["x-cache"] == "MISS"

            async def stored() -> bool:
                return _stored(counts, "/archive/<year>/")

            await eventually(stored, within=budgets.condition, what="the entry stored under the settings' prefix")
            second: httpx.Response = await http.get("/archive/2024/")
            assert second.headers["x-cache"] == "HIT" and second.content == first.content
