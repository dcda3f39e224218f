"""Redis faults injected for real: the user only ever sees the app's answers, and the cache comes back by itself."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache
from tests.budgets import Budgets
from tests.faults.proxy import FaultProxy
from tests.helpers import eventually, find_middleware, lifespan
from tests.redis_server import RedisServer, started

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of this module's own: these tests kill, freeze and restart it."""
    with started(lambda: RedisServer(tmp_path_factory.mktemp("faulty-redis"))) as server:
        yield server


@pytest.fixture
def healthy(server: RedisServer) -> RedisServer:
    server.ensure_healthy()
    server.flushall()
    return server


@pytest.fixture
def proxy(healthy: RedisServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(healthy.port)
    try:
        yield proxy
    finally:
        proxy.close()


class Counter:
    calls = 0


def make_app(url: str, counter: Counter, settings: Settings | None = None, **policy: Any) -> Starlette:
    @cache(**{"ttl": "5m", **policy})
    async def item(request: Request) -> Response:
        counter.calls += 1
        return JSONResponse({"item": 1})

    app = Starlette(routes=[Route("/item", item)])
    app.add_middleware(CacheMiddleware, redis_url=url, settings=settings or Settings(store_timeout=0.05))
    return app


@pytest.fixture
async def served(proxy: FaultProxy) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient, Counter]]:
    counter = Counter()
    app = make_app(proxy.url, counter)
    async with lifespan(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                base_url="http://testserver") as http:
        yield app, http, counter


async def _hit(http: httpx.AsyncClient) -> bool:
    state: str | None = (await http.get("/item")).headers.get("x-cache")
    return state == "HIT"


async def _all_answered(http: httpx.AsyncClient, count: int = 20) -> None:
    """Every request answers 2xx with the app's body, each within a bound far below any hang."""
    for _ in range(count):
        with anyio.fail_after(2):
            response = await http.get("/item")
        assert response.status_code == 200 and response.json() == {"item": 1}


def _client_of(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=5)


FAULTS = ["stopped", "paused", "blackhole", "delay", "reset", "client-pause"]


def inject(fault: str, server: RedisServer, proxy: FaultProxy) -> None:
    if fault == "stopped":
        server.stop()
    elif fault == "paused":
        server.pause()
    elif fault == "client-pause":
        with _client_of(server) as raw:
            raw.execute_command("CLIENT", "PAUSE", "2000", "ALL")  # ends by itself: UNPAUSE would wait too
    else:
        proxy.set(fault, delay=0.3)


def heal(fault: str, server: RedisServer, proxy: FaultProxy) -> None:
    if fault == "stopped":
        server.start()
    elif fault == "paused":
        server.resume()
    elif fault == "client-pause":
        pass
    else:
        proxy.set("pass")


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_redis_fault_never_reaches_the_user_and_the_cache_recovers(
        fault: str, server: RedisServer, proxy: FaultProxy,
        served: tuple[Starlette, httpx.AsyncClient, Counter]) -> None:
    app, http, _counter = served
    await http.get("/item")
    await eventually(lambda: _hit(http), what="the entry being cached")
    inject(fault, server, proxy)
    try:
        await _all_answered(http)
        cache = find_middleware(app)
        assert cache.store_errors > 0
        assert cache.breaker.state in ("open", "half-open")  # it stopped hammering the dead server
    finally:
        heal(fault, server, proxy)
    await eventually(lambda: _hit(http), within=10, what="the cache working again without a restart")


async def test_a_restarted_empty_redis_refills_and_resubscribes(
        server: RedisServer, served: tuple[Starlette, httpx.AsyncClient, Counter]) -> None:
    app, http, _counter = served
    await http.get("/item")
    await eventually(lambda: _hit(http), what="the entry being cached")
    server.stop()
    await _all_answered(http, 5)
    server.start()  # empty: it keeps nothing on disk
    await eventually(lambda: _hit(http), within=10, what="refill after the restart")
    store = find_middleware(app).store
    assert store is not None
    await eventually(lambda: _true(store.listening), within=10, what="the subscription coming back")


async def _true(value: bool) -> bool:
    return value


async def test_the_l1_keeps_serving_within_stale_if_error_while_redis_is_down(
        server: RedisServer, healthy: RedisServer) -> None:
    counter = Counter()
    app = make_app(server.url, counter, sync="100ms", stale_if_error="1h")
    async with lifespan(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                base_url="http://testserver") as http:
        await http.get("/item")
        l1 = find_middleware(app).l1

        async def from_the_l1() -> bool:
            # A Redis hit whose read crossed the fill's own invalidation keeps no copy: wait for one kept.
            before = l1.hits
            await http.get("/item")
            return l1.hits > before

        await eventually(from_the_l1, what="the entry being cached and answered from the L1")
        calls_before = counter.calls
        server.stop()
        try:
            for _ in range(10):
                with anyio.fail_after(2):
                    response = await http.get("/item")
                assert response.status_code == 200 and response.json() == {"item": 1}
            assert "stale-if-error" in response.headers["cache-status"] or response.headers["x-cache"] == "HIT"
            assert counter.calls == calls_before  # the database was spared
        finally:
            server.start()


async def test_foreign_values_under_our_keys_are_misses_that_get_overwritten(
        healthy: RedisServer, served: tuple[Starlette, httpx.AsyncClient, Counter]) -> None:
    _app, http, _counter = served
    await http.get("/item")
    await eventually(lambda: _hit(http), what="the entry being cached")
    with _client_of(healthy) as raw:
        keys = [k for k in raw.scan_iter(match="cachemw:e:*")]
        for key in keys:
            raw.set(key, b"\x80\x04\x95 a pickle, or anything else")
    response = await http.get("/item")
    assert response.status_code == 200 and response.headers["x-cache"] == "MISS"
    await eventually(lambda: _hit(http), what="the foreign value being overwritten")


def _dead_port() -> int:
    """A loopback port nothing listens on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_a_cluster_none_of_whose_nodes_answers_is_the_apps_answer() -> None:
    """The cluster client raises RedisClusterException (no RedisError) then: still a store fault, not a 500."""
    counter = Counter()
    app = make_app(f"redis+cluster://127.0.0.1:{_dead_port()}", counter)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://testserver") as http:
        await _all_answered(http, 3)
    assert counter.calls == 3


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_without_a_lifespan_a_down_store_does_not_hold_requests_for_the_background_deadline(
        scheme: str, budgets: Budgets) -> None:
    """No lifespan: a request runs its own after-response jobs (a lock release) before its ASGI call ends.

    Those retry within ``background_timeout``; against a store that is down they must give
    up once its breaker opens, not hold every request (and its connection) for the deadline.
    """
    counter = Counter()
    settings = Settings(store_timeout=0.05, background_timeout=budgets.lock_timeout)
    app = make_app(f"{scheme}://127.0.0.1:{_dead_port()}", counter, settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://testserver") as http:
        with anyio.fail_after(budgets.condition):  # a sixth of the background deadline, for all five
            for _ in range(5):
                response = await http.get("/item")
                assert response.status_code == 200 and response.json() == {"item": 1}
    assert counter.calls == 5
