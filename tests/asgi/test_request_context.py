"""What a handler reaches of its cache (``current_cache()``, ``detach()``) ends with its request.

An ASGI app called in the caller's own task (httpx's ASGITransport, a test, an
app embedding another) shares the caller's context: the cache that handled a
request must not remain the caller's ``current_cache()`` afterwards.
"""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from cachemw import CacheMiddleware, MemoryStore, cache
from cachemw.runtime.context import current_cache
from cachemw.runtime.supervisor import current_supervisor
from tests.helpers import client

pytestmark = pytest.mark.anyio


def cached_app(seen: list[object]) -> CacheMiddleware:

    @cache(ttl="1m")
    async def page(request: Request) -> PlainTextResponse:
        seen.append(current_cache())
        return PlainTextResponse("page")

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("plain")

    return CacheMiddleware(Starlette(routes=[Route("/page", page), Route("/plain", plain)]), store=MemoryStore())


@pytest.mark.parametrize("path", ["/page", "/plain"])
async def test_after_a_request_the_callers_context_has_no_cache(path: str) -> None:
    async with client(cached_app([])) as http:
        assert (await http.get(path)).status_code == 200
        with pytest.raises(RuntimeError, match="no CacheMiddleware is handling this request"):
            current_cache()
        with pytest.raises(RuntimeError):
            current_supervisor()


async def test_the_handler_still_reaches_its_cache() -> None:
    seen: list[object] = []
    app = cached_app(seen)
    async with client(app) as http:
        assert (await http.get("/page")).text == "page"
    assert seen == [app]
