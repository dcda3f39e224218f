"""A Django project behind ``cachemw.django.asgi_application``, served by a real uvicorn on a test Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio
from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]
from django.test import override_settings  # type: ignore[import-untyped]

from cachemw.core.policy import ConfigError
from cachemw.django import asgi_application
from tests.budgets import Budgets
from tests.helpers import LifespanFailed, eventually, lifespan
from tests.redis_server import RedisServer
from tests.servers import uvicorns

pytestmark = pytest.mark.anyio

APP = "tests.apps.djangoproject.asgi:application"
PREFIX = "djangotest"  # settings.CACHEMW's key_prefix
Stored = Callable[[str], Awaitable[None]]


@pytest.fixture(scope="module")
def server(redis_server: RedisServer, budgets: Budgets) -> Iterator[str]:
    with uvicorns(APP, redis_server.url, count=1, start_timeout=budgets.process_start) as [base]:
        yield base


@pytest.fixture
async def http(server: str, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the server, on an empty Redis (``redis_url`` flushes it)."""
    async with httpx.AsyncClient(base_url=server, timeout=10) as client:
        yield client


@pytest.fixture
async def stored(redis_url: str, budgets: Budgets) -> AsyncIterator[Stored]:
    """``await stored("/api/items/<pk>/")``: until an entry of that route is in Redis, under the settings'
    prefix. The server stores a fill after its response: only then is the next request's HIT certain."""
    client = redis.asyncio.Redis.from_url(redis_url)

    async def wait(label: str) -> None:
        async def there() -> bool:
            return [key async for key in client.scan_iter(match=f"{PREFIX}:e:{label}:*}}")] != []

        await eventually(there, within=budgets.condition, what=f"an entry of {label} stored")

    yield wait
    await client.aclose()


async def calls(http: httpx.AsyncClient) -> dict[str, int]:
    counts: dict[str, int] = (await http.get("/calls/")).json()
    return counts


@pytest.mark.parametrize(("path", "label", "counter"), [
    ("/api/items/5/", "/api/items/<pk>/", "item:None:5"),  # @cache on a function view
    ("/shops/north/items/5/", "/shops/<shop>/items/<pk>/", "item:north:5"),  # the same view, another include()
    ("/api/articles/hello/", "/api/articles/<slug>/", "article:hello"),  # @cache on a class-based view
    ("/archive/2024/", "/archive/<year>/", "archive:2024"),  # a rule of the config that settings.CACHEMW names
])
async def test_a_cached_view_runs_once_then_hits(http: httpx.AsyncClient, stored: Stored, path: str, label: str,
                                                 counter: str) -> None:
    first = await http.get(path)
    await stored(label)
    second = await http.get(path)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert second.content == first.content
    assert (await calls(http))[counter] == 1


async def test_an_uncached_view_is_never_a_hit(http: httpx.AsyncClient) -> None:
    responses = [await http.get("/plain/") for _ in range(3)]
    assert [response.json()["call"] for response in responses] == [1, 2, 3]
    assert all(response.headers.get("x-cache") != "HIT" for response in responses)


async def test_what_django_does_not_route_is_passed_through(http: httpx.AsyncClient) -> None:
    redirect = await http.get("/api/items/5")  # APPEND_SLASH
    assert redirect.status_code == 301 and redirect.headers["location"] == "/api/items/5/"
    missing = await http.get("/api/items/five/")
    assert missing.status_code == 404
    assert "x-cache" not in redirect.headers and "x-cache" not in missing.headers


async def test_a_path_param_keys_the_entry(http: httpx.AsyncClient, stored: Stored) -> None:
    one = await http.get("/api/items/8/")
    await stored("/api/items/<pk>/")
    other = await http.get("/api/items/9/")
    assert one.headers["x-cache"] == other.headers["x-cache"] == "MISS"
    assert (one.json()["pk"], other.json()["pk"]) == (8, 9)


# -- in-process: the wrapper's configuration -------------------------------------------------


async def test_the_wrapper_answers_the_lifespan_for_django() -> None:
    app = asgi_application(get_asgi_application())
    async with lifespan(app):
        assert app.supervisor.running  # background work has a supervisor for the server's lifetime
        assert app.table is not None and [rule.template for rule in app.table.rules][:1] == ["/api/items/{pk}/"]


async def test_a_file_rule_naming_no_django_route_fails_the_startup(tmp_path: Any) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/archives/*"\npolicy = "hours"\n', encoding="utf-8")
    with pytest.raises(LifespanFailed, match=r"rule 1 \(route '/archives/\*'\).*matches no route.*/archive/\{year\}/"):
        async with lifespan(asgi_application(get_asgi_application(), config=str(config))):
            pass


def test_keywords_win_over_settings_cachemw() -> None:
    app = asgi_application(get_asgi_application(), key_prefix="mine")
    assert app.options.key_prefix == "mine"
    assert str(app.options.config).endswith("djangoproject/cachemw.toml")  # the rest from settings.CACHEMW


@pytest.mark.parametrize(("value", "message"), [
    ({"redis": "redis://x"}, "settings.CACHEMW: unknown key 'redis'; the keys are: "),
    ("redis://x", "settings.CACHEMW: expected a dict of CacheMiddleware keywords, got str"),
])
def test_a_bad_settings_cachemw_is_a_config_error(value: object, message: str) -> None:
    with override_settings(CACHEMW=value), pytest.raises(ConfigError) as failure:
        asgi_application(get_asgi_application())
    assert str(failure.value).startswith(message)
