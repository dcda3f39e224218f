"""cachemw on the master a Redis Sentinel names: redis+sentinel://host:port/SERVICE (``sentinel_url``: conftest.py)."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, cache
from tests.helpers import eventually, lifespan

pytestmark = pytest.mark.anyio


async def test_caching_through_sentinel(sentinel_url: str) -> None:
    calls = 0

    @cache(ttl="5m", tags=["greeting"])
    async def hello(request: Request) -> Response:
        nonlocal calls
        calls += 1
        return PlainTextResponse(f"hello {calls}")

    app = Starlette(routes=[Route("/hello", hello)])
    app.add_middleware(CacheMiddleware, redis_url=sentinel_url)

    async def hit() -> bool:
        return (await http.get("/hello")).headers["x-cache"] == "HIT"

    async with lifespan(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                base_url="http://testserver") as http:
        assert (await http.get("/hello")).headers["x-cache"] == "MISS"
        await eventually(hit, what="the entry being stored on the sentinel's master")
        layer = app.middleware_stack
        while not isinstance(layer, CacheMiddleware):
            layer = layer.app  # type: ignore[union-attr]
        assert layer.invalidator is not None and await layer.invalidator.tags("greeting") == 1
        assert (await http.get("/hello")).text == "hello 2"
