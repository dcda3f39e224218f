"""The Redis store across event loops (#14 items 9 and 12).

Apps do not always keep one loop: Starlette's ``TestClient`` used outside ``with``
runs each request on a loop of its own, test plugins make one per test, a script
calls ``asyncio.run`` twice. The store reconnects on each loop, closes what it
opened on a loop when that loop ends (nobody calls ``aclose`` without a lifespan),
and on trio fails fast with a ``StoreError`` that says why.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from cachemw import CacheMiddleware, MemoryStore, RedisStore, Settings, cache
from cachemw.store import StoreError
from cachemw.store.base import requires_asyncio, unsupported_event_loop
from cachemw.store.pipeline import PipelinedRedis
from tests.budgets import current_budgets
from tests.helpers import find_middleware
from tests.redis_server import RedisServer

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(main: Callable[[], Coroutine[Any, Any, Any]], loop: str) -> Any:
    """``asyncio.run`` on a new loop of the kind named (a loop of its own, closed at the end)."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            return runner.run(main())
    if loop == "uvloop":
        uvloop.install()
    try:
        return asyncio.run(main())
    finally:
        asyncio.set_event_loop_policy(None)


@contextmanager
def no_resource_warnings() -> Iterator[None]:
    """Fail on any ResourceWarning raised inside, also from ``__del__`` at the final collection."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, [str(w.message) for w in leaks]


def connections(server: RedisServer) -> int:
    with server.client() as admin:
        return len(admin.client_list())


def await_connections(server: RedisServer, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while connections(server) != count:
        assert time.monotonic() < deadline, f"{connections(server)} connections to redis, expected {count}"
        time.sleep(0.01)


def make_app(redis_url: str) -> Starlette:
    @cache(ttl="5m")
    async def product(request: Request) -> Response:
        return JSONResponse({"id": request.path_params["id"]})

    app = Starlette(routes=[Route("/products/{id:int}", product)])
    app.add_middleware(CacheMiddleware, settings=Settings(redis_url=redis_url, store_timeout=1.0))
    return app


# -- TestClient outside ``with``: a loop per request, no lifespan --------------------------------


def test_test_clients_outside_with_get_cache_behaviour_on_every_loop(redis_url: str, redis_server: RedisServer
                                                                       ) -> None:
    """Each request of a TestClient outside ``with`` runs on a new loop: every one after the first
    raised ``RuntimeError: Event loop is closed`` from the store (an error page)."""
    before = connections(redis_server)
    with no_resource_warnings():
        app = make_app(redis_url)
        first = TestClient(app)
        miss = first.get("/products/1")
        assert (miss.status_code, miss.headers["x-cache"]) == (200, "MISS")
        hit = first.get("/products/1")  # another loop already
        assert (hit.status_code, hit.headers["x-cache"]) == (200, "HIT")
        second = TestClient(app)
        for path, expected in (("/products/1", "HIT"), ("/products/2", "MISS"), ("/products/2", "HIT")):
            response = second.get(path)
            assert (response.status_code, response.headers["x-cache"]) == (200, expected), path
        middleware = find_middleware(app)
        assert middleware.store_errors == 0
        del first, second, app, middleware
    # Each loop's connections were closed as it ended (no lifespan, nobody called aclose).
    await_connections(redis_server, before)


def test_without_a_lifespan_nothing_is_left_open_when_the_loop_ends(redis_url: str, redis_server: RedisServer
                                                                    ) -> None:
    """#14 item 12: without a lifespan nobody closes the store: its sockets were left to the garbage
    collector, ``ResourceWarning: unclosed transport`` (an error under ``-W error``)."""
    before = connections(redis_server)
    with no_resource_warnings():
        app = make_app(redis_url)
        response = TestClient(app).get("/products/1")  # one request, one loop
        assert (response.status_code, response.headers["x-cache"]) == (200, "MISS")
        del app
    await_connections(redis_server, before)


def test_a_test_client_with_a_lifespan_then_without_one(redis_url: str) -> None:
    with no_resource_warnings():
        app = make_app(redis_url)
        with TestClient(app) as client:
            assert client.get("/products/3").headers["x-cache"] == "MISS"
        # The lifespan closed its store; requests without one open another, on their own loops.
        client = TestClient(app)
        assert client.get("/products/3").headers["x-cache"] == "HIT"
        assert client.get("/products/4").headers["x-cache"] == "MISS"
        assert find_middleware(app).store_errors == 0
        del client, app


# -- one store, two asyncio.run() ------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_store_used_from_two_event_loops_in_turn(shared_url: str, loop: str) -> None:
    """Pools, the pipelined connection, scripts and the subscription all reconnect on the new loop."""
    def scenario() -> None:
        store = RedisStore.from_url(shared_url, timeout=1.0)

        async def use(round_: int) -> None:
            key = f"{{t}}:e:{round_}"
            assert await store.get(key) is None
            await store.set(f"{{t}}:plain:{round_}", b"v", 60)
            assert await store.get(f"{{t}}:plain:{round_}") == b"v"
            token, value, generations = await store.lock(key, 5, ["{t}:g"])
            assert token is not None and value is None
            assert await store.fill(key, b"body", 60, token, ["{t}:tag"], ["{t}:g"], list(generations))
            assert await store.get(key) == b"body"
            heard = anyio.Event()  # this round's: an Event belongs to one loop

            def on_invalidate(tags: Sequence[str]) -> None:
                if list(tags) == [f"round {round_}"]:
                    heard.set()

            store.notifications.on_invalidate.append(on_invalidate)
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(store.listen)
                    with anyio.fail_after(current_budgets().condition):
                        while not store.listening:  # noqa: ASYNC110  (polls the subscription to Redis: no event)
                            await anyio.sleep(0.01)
                        await store.invalidate(["{t}:tag"], ["{t}:g"], json.dumps([f"round {round_}"]))
                        await heard.wait()
                    tg.cancel_scope.cancel()
            finally:
                store.notifications.on_invalidate.remove(on_invalidate)
            assert await store.get(key) is None
            assert await store.delete(f"{{t}}:plain:{round_}") == 1

        run(lambda: use(1), loop)
        run(lambda: use(2), loop)  # RuntimeError: Event loop is closed / attached to a different loop
        run(store.aclose, loop)

    with no_resource_warnings():
        scenario()


def test_a_store_closed_on_another_loop_than_its_connections_leaves_nothing_open(
        redis_url: str, redis_server: RedisServer) -> None:
    before = connections(redis_server)

    def scenario() -> None:
        store = RedisStore.from_url(redis_url, timeout=1.0)

        async def use() -> None:
            await store.set("k", b"v", 60)
            assert await store.get("k") == b"v"

        run(use, "asyncio")  # nobody closes the store on this loop: it is closed as the loop ends
        run(store.aclose, "asyncio")

    with no_resource_warnings():
        scenario()
    await_connections(redis_server, before)


def test_a_pipelined_connection_follows_the_running_loop(redis_url: str, redis_server: RedisServer) -> None:
    before = connections(redis_server)

    def scenario() -> None:
        client = PipelinedRedis(host="127.0.0.1", port=redis_server.port, timeout=1.0)
        for loop in ("asyncio", "uvloop", "asyncio"):
            assert run(lambda: client.get("missing"), loop) is None
        run(client.aclose, "asyncio")

    with no_resource_warnings():
        scenario()
    await_connections(redis_server, before)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_store_dropped_while_its_loop_runs_is_closed_on_that_loop(redis_url: str, redis_server: RedisServer,
                                                                    loop: str) -> None:
    before = connections(redis_server)

    async def main() -> None:
        store = RedisStore.from_url(redis_url, timeout=1.0)
        await store.set("k", b"v", 60)
        assert await store.get("k") == b"v"
        del store
        gc.collect()
        with anyio.fail_after(current_budgets().condition):
            # Closed while the loop still runs. noqa: polls the Redis server's client list.
            while connections(redis_server) != before:  # noqa: ASYNC110
                await anyio.sleep(0.01)

    with no_resource_warnings():
        run(main, loop)


@pytest.mark.anyio
async def test_connections_closed_under_a_loop_that_goes_on_are_opened_again(redis_url: str) -> None:
    """The guard closes a loop's connections at the loop's end; should it fire on a loop that
    goes on (a runner cancelling every task), the next call connects again instead of failing."""
    store = RedisStore.from_url(redis_url, timeout=1.0)
    try:
        await store.set("k", b"v", 60)
        bound = store._bound
        assert bound.guard is not None
        bound.guard.cancel()
        with anyio.fail_after(current_budgets().condition):
            while not bound.dropped:  # noqa: ASYNC110  (polls the store's state: it offers no event)
                await anyio.sleep(0.01)
        assert await store.get("k") == b"v"
        assert store._bound is not bound
    finally:
        await store.aclose()


def test_loops_closed_by_hand_without_cancelling_their_tasks_are_not_kept_for_ever(
        redis_url: str, redis_server: RedisServer) -> None:
    """``loop.run_until_complete(...)`` then ``loop.close()``: the runner never cancels the guard,
    and the set that keeps guards alive kept every such loop with its clients and sockets (two
    Redis connections per loop, for the life of the process)."""
    from cachemw.store import loops

    before = connections(redis_server)
    store = RedisStore.from_url(redis_url, timeout=1.0)

    async def use() -> None:
        await store.set("k", b"v", 60)
        assert await store.get("k") == b"v"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the sockets left open are ResourceWarnings when collected
        for _ in range(5):
            loop = asyncio.new_event_loop()
            loop.run_until_complete(use())
            loop.close()  # the guard never ran
        run(use, "asyncio")  # a loop whose runner cancels its tasks
        assert all(not task.get_loop().is_closed() for task in loops._GUARDS)
        gc.collect()
    assert all(issubclass(w.category, ResourceWarning) for w in caught), [str(w.message) for w in caught]
    await_connections(redis_server, before)


# -- any exception of the driver is a StoreError ---------------------------------------------------


def test_any_exception_of_the_driver_is_a_store_error(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RedisStore.from_url(redis_url, timeout=1.0)

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Task got Future attached to a different loop")

    async def use() -> None:
        monkeypatch.setattr(PipelinedRedis, "get", broken)
        monkeypatch.setattr(PipelinedRedis, "evalsha", broken)
        monkeypatch.setattr(store.client, "set", broken)
        with pytest.raises(StoreError, match="different loop"):
            await store.get("k")
        with pytest.raises(StoreError, match="different loop"):
            await store.lock("k", 1, [])
        with pytest.raises(StoreError, match="different loop"):
            await store.get_or_lock("k", 1, [], "t")
        with pytest.raises(StoreError, match="different loop"):
            await store.set("k", b"v", 1)
        monkeypatch.undo()
        await store.aclose()

    run(use, "asyncio")


# -- trio -----------------------------------------------------------------------------------------


def test_on_trio_the_redis_store_fails_fast_with_a_clear_store_error(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url, timeout=1.0)
    assert requires_asyncio(store) and not requires_asyncio(MemoryStore())

    async def on_trio() -> None:
        assert "runs on trio" in (unsupported_event_loop(store) or "")
        assert unsupported_event_loop(MemoryStore()) is None
        for call in (store.get("k"), store.set("k", b"v", 1), store.lock("k", 1, []), store.delete("k"),
                     store.get_or_lock("k", 1, [], "t"), store.publish_invalidation("[]")):
            with pytest.raises(StoreError, match=r"needs an asyncio event loop.*trio"):
                await call

    async def on_asyncio() -> None:
        assert unsupported_event_loop(store) is None
        await store.aclose()

    anyio.run(on_trio, backend="trio")
    anyio.run(on_asyncio)
