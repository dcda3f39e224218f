"""On the request path, any exception a store call raises is a store failure: the app answers."""

from __future__ import annotations

import logging
import socket
from typing import Any

import anyio
import pytest
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, MemoryStore, Settings, cache
from tests.helpers import LifespanFailed, SpyStore, client, eventually, lifespan

pytestmark = pytest.mark.anyio


class ForeignLoopStore(SpyStore):
    """Fails as a driver bound to another event loop does: not with StoreError."""

    async def get(self, key: str) -> bytes | None:
        raise RuntimeError("Task got Future attached to a different loop")

    async def lock(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Event loop is closed")

    async def fill(self, *args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("Event loop is closed")

    async def invalidate(self, *args: Any, **kwargs: Any) -> int:
        raise RuntimeError("Event loop is closed")


@cache(ttl="5m", invalidates=["page"], tags=["page"])
async def page(request: Request) -> Response:
    return PlainTextResponse(f"page {request.method}")


async def test_a_store_raising_anything_fails_open() -> None:
    store = ForeignLoopStore(MemoryStore())
    app = Starlette(routes=[Route("/page", page, methods=["GET", "POST"])])
    app.add_middleware(CacheMiddleware, store=store, settings=Settings(store_timeout=1.0))
    async with lifespan(app), client(app) as http:
        gets = [await http.get("/page") for _ in range(3)]
        post = await http.post("/page")
    assert [r.status_code for r in gets] == [200, 200, 200]
    assert {r.text for r in gets} == {"page GET"}
    assert post.status_code == 200 and post.text == "page POST"


async def test_an_unreachable_store_is_named_once_at_startup(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = CacheMiddleware(Starlette(routes=[Route("/page", page)]),
                          redis_url=f"redis://shop:hunter2@127.0.0.1:{port}/0")
    with caplog.at_level(logging.WARNING, logger="cachemw"):
        async with lifespan(app), client(app) as http:
            await eventually(lambda: _true(app.store_problem is not None), what="the startup probe failing")
            assert (await http.get("/page")).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "cannot reach the store" in r.getMessage()]
    assert len(warnings) == 1
    assert f"redis://shop:***@127.0.0.1:{port}/0" in warnings[0] and "hunter2" not in warnings[0]
    assert "Connect" in warnings[0] or "refused" in warnings[0].lower()  # the cause, not just "failed"


async def test_startup_opens_the_store_connection_and_loads_its_scripts(redis_url: str) -> None:
    """A fresh process's first burst must not spend its 50 ms budgets on connecting and on NOSCRIPT
    replies (under load those expire, and every request of the burst goes to the app)."""
    admin = redis.asyncio.Redis.from_url(redis_url)
    await admin.script_flush()
    clients_before = len(await admin.client_list())
    app = CacheMiddleware(Starlette(routes=[Route("/page", page)]), redis_url=redis_url)
    try:
        async with lifespan(app):  # no request yet: startup alone
            assert (await admin.info("memory"))["number_of_cached_scripts"] >= 3
            assert len(await admin.client_list()) > clients_before
            assert app.store_problem is None
    finally:
        await admin.aclose()


async def _true(value: bool) -> bool:
    return value


def test_on_trio_the_redis_store_is_refused_at_startup_with_a_clear_message(redis_url: str) -> None:
    app = CacheMiddleware(Starlette(routes=[Route("/page", page)]), redis_url=redis_url)

    async def start() -> None:
        async with lifespan(app):
            pass  # pragma: no cover

    with pytest.raises(LifespanFailed, match=r"cachemw: .*needs an asyncio event loop.*trio"):
        anyio.run(start, backend="trio")


async def test_garbage_on_our_channel_is_counted_in_the_snapshot(redis_url: str) -> None:
    import redis.asyncio

    from cachemw.observe import snapshot

    app = CacheMiddleware(Starlette(routes=[Route("/page", page)]), redis_url=redis_url)
    async with lifespan(app), redis.asyncio.Redis.from_url(redis_url) as raw:
        await eventually(lambda: _true(app.store is not None and app.store.listening), what="the subscription")
        await raw.publish("cachemw:invalidations", b"[" * 100_000)  # a RecursionError for a naive json.loads
        await eventually(lambda: _true(snapshot(app)["store"]["rejected_messages"] >= 1),
                         what="the garbage counted")
        store = app.store
        assert snapshot(app)["store"]["problem"] is None and store is not None and store.listening


async def test_startup_loads_the_scripts_on_every_primary_of_a_cluster(cluster_url: str, redis_cluster: Any) -> None:
    """On redis-py's client too (Cluster, TLS, Sentinel): a fresh process's first lock attempts must
    not each meet NOSCRIPT and load the script within their 50 ms budget."""
    primaries = redis_cluster.primaries()
    for node in primaries:
        with node.client() as raw:
            raw.script_flush()
    app = CacheMiddleware(Starlette(routes=[Route("/page", page)]), redis_url=cluster_url)
    async with lifespan(app):  # no request yet: startup alone
        assert app.store_problem is None
        for node in primaries:
            with node.client() as raw:
                assert raw.info("memory")["number_of_cached_scripts"] >= 3, node.port
