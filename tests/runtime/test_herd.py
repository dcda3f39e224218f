"""A herd of misses on one key calls the origin once, also when that one call fails."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache
from cachemw.runtime.supervisor import JobCounters
from tests.budgets import Budgets
from tests.helpers import SpyStore, assert_counted, eventually, find_middleware, lifespan
from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio

HERD = 60


class Origin:
    def __init__(self, failure: str) -> None:
        self.failure = failure
        self.calls = 0
        self.gate = anyio.Event()


def make_app(origin: Origin, store: SpyStore, lock_timeout: float) -> Starlette:
    @cache(ttl="5m")
    async def hot(request: Request) -> Response:
        origin.calls += 1
        await origin.gate.wait()  # the herd gathers behind this first call
        if origin.failure == "raise":
            raise RuntimeError("the database went away")
        return PlainTextResponse("the database went away", status_code=500)

    app = Starlette(routes=[Route("/hot", hot)])
    app.add_middleware(CacheMiddleware, store=store, settings=Settings(lock_timeout=lock_timeout, store_timeout=2.0))
    return app


@pytest.mark.parametrize("failure", ["raise", "500"])
async def test_a_failing_leader_does_not_release_its_herd_onto_the_origin(store: SpyStore, budgets: Budgets,
                                                                         failure: str) -> None:
    origin = Origin(failure)
    # A waiter that gave up on the leader (after lock_timeout) would call the origin itself.
    app = make_app(origin, store, budgets.lock_timeout)
    statuses: collections.Counter[int] = collections.Counter()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://testserver") as http, \
            anyio.create_task_group() as tg:
        async def one() -> None:
            statuses[(await http.get("/hot")).status_code] += 1

        for _ in range(HERD):
            tg.start_soon(one)
        await eventually(lambda: _true(find_middleware(app).metrics.waiting_on_fills == HERD - 1),
                         within=budgets.condition, what="the herd waiting on the leader")
        origin.gate.set()
    assert statuses == {500: HERD}
    assert origin.calls == 1


async def _true(value: bool) -> bool:
    return value


def _busy_worker_app(redis_url: str, budgets: Budgets, release_worker: anyio.Event, **settings: Any
                     ) -> tuple[Starlette, Any]:
    """``/busy`` holds the only background worker and fills its queue of one until ``release_worker``;
    ``/items/{n}`` is cached. The app and its RedisStore."""
    from cachemw import RedisStore, detach

    async def hold_the_worker() -> None:
        await release_worker.wait()

    async def busy(request: Request) -> Response:
        detach(hold_the_worker)  # takes the only worker
        detach(hold_the_worker)  # fills the queue of one
        return PlainTextResponse("busy")

    @cache(ttl="5m")
    async def item(request: Request) -> Response:
        return PlainTextResponse(f"item {request.path_params['n']}")

    app = Starlette(routes=[Route("/busy", busy), Route("/items/{n}", item)])
    store = RedisStore.from_url(redis_url, timeout=2.0)
    app.add_middleware(CacheMiddleware, store=store,
                       settings=Settings(queue_size=1, concurrency=1, lock_timeout=budgets.lock_timeout,
                                         store_timeout=2.0, **settings))
    return app, store


@contextlib.asynccontextmanager
async def _twenty_misses_behind_a_busy_worker(app: Starlette) -> AsyncIterator[tuple[httpx.AsyncClient, JobCounters]]:
    """The app served, ``/busy`` asked (its worker held), then 20 misses answered; the client and the fill
    counters."""
    async with lifespan(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                base_url="http://testserver") as http:
        assert (await http.get("/busy")).status_code == 200
        fills = find_middleware(app).supervisor.counters_for("fill")
        for n in range(20):
            assert (await http.get(f"/items/{n}")).text == f"item {n}"
        yield http, fills


async def test_a_full_background_queue_leaves_no_fill_lock_behind(redis_url: str, budgets: Budgets) -> None:
    """Fills shed by a full queue are lost (and counted), but their locks are released at once.

    The queue holds the two jobs that keep its only worker busy and no more bytes: a fill
    sent to Redis at once is bounded by the same bytes as one queued for a worker."""
    release_worker = anyio.Event()
    app, store = _busy_worker_app(redis_url, budgets, release_worker, queue_max_bytes=1024)
    raw = store.client
    try:
        async with _twenty_misses_behind_a_busy_worker(app) as (_, fills):
            assert fills.shed >= 19  # the queue really was full
            # Per route, where the operator looks: the entries a full queue cost.
            assert_counted(app, "/items/{n}", "fills_shed", fills.shed, lambda n: (
                f"fills shed    {n} answered but not stored: the background queue was full (/items/{{n}} {n})"))

            # Only a fill still queued (if the queue took one) holds its lock; the shed ones released
            # theirs, well before lock_timeout.
            async def only_the_queued_fill_locked() -> bool:
                return len(await raw.keys("*:lock")) == fills.queued <= 1

            await eventually(only_the_queued_fill_locked, within=budgets.condition,
                             what="the shed fills' locks released")
            release_worker.set()

            async def no_locks() -> bool:
                return not await raw.keys("*:lock")

            await eventually(no_locks, within=budgets.condition, what="every fill lock released")
    finally:
        await store.aclose()


async def test_fills_are_stored_while_every_background_worker_is_busy(redis_url: str, budgets: Budgets) -> None:
    """A miss's fill is written to Redis at once, not queued behind the workers: with the only worker
    held by a slow job and its queue full, every miss is still stored, and no lock is left behind."""
    release_worker = anyio.Event()
    app, store = _busy_worker_app(redis_url, budgets, release_worker)
    raw = store.client
    try:
        async with _twenty_misses_behind_a_busy_worker(app) as (http, fills):
            async def all_stored() -> bool:
                return fills.done == 20 and not await raw.keys("*:lock")

            await eventually(all_stored, within=budgets.condition, what="every fill stored, every lock released")
            assert fills.shed == 0
            for n in range(20):
                assert (await http.get(f"/items/{n}")).headers["x-cache"] == "HIT"
            release_worker.set()
    finally:
        await store.aclose()


async def test_a_fill_in_flight_at_shutdown_is_stored_before_the_app_stops(redis_url: str, budgets: Budgets) -> None:
    """Shutdown waits (within the grace period) for fills already written to Redis, not only for the
    jobs in the queue: Redis pauses writes, a miss is answered, the app stops, the entry is there."""
    @cache(ttl="5m")
    async def item(request: Request) -> Response:
        return PlainTextResponse("item")

    app = Starlette(routes=[Route("/item", item)])
    # The middleware's own store (from the URL), which it closes on the way out.
    app.add_middleware(CacheMiddleware, redis_url=redis_url,
                       settings=Settings(lock_timeout=budgets.lock_timeout, store_timeout=2.0,
                                         background_timeout=5.0))
    raw = redis.Redis.from_url(redis_url)
    try:
        async with lifespan(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                    base_url="http://testserver") as http:
            assert (await http.get("/item")).text == "item"  # the route is known to miss: one round trip
            await eventually(lambda: _true(find_middleware(app).supervisor.counters_for("fill").done == 1),
                             what="the first fill")
            raw.client_pause(500, all=False)  # writes wait half a second; this fill is sent into the pause
            assert (await http.get("/item?v=2")).text == "item"
            supervisor = find_middleware(app).supervisor
            assert supervisor.detached == 1
        assert supervisor.counters_for("fill").done == 2 and supervisor.detached == 0  # waited for, not abandoned
        assert len(raw.keys("cachemw:e:*}")) == 2
    finally:
        raw.close()


async def test_a_fill_the_store_refuses_still_releases_its_lock(redis_url: str, budgets: Budgets) -> None:
    from cachemw import RedisStore, StoreError

    class LosingFills(SpyStore):
        async def fill(self, *args: object, **kwargs: object) -> bool:
            raise StoreError("NOSCRIPT, and the EVAL fallback timed out")

        def fill_nowait(self, *args: object) -> asyncio.Future[bool]:
            lost: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            lost.set_exception(StoreError("the connection dropped before the reply"))
            return lost  # then the fill is retried in a job, which fails too

    @cache(ttl="5m")
    async def item(request: Request) -> Response:
        return PlainTextResponse("item")

    inner = RedisStore.from_url(redis_url, timeout=2.0)
    app = Starlette(routes=[Route("/item", item)])
    app.add_middleware(CacheMiddleware, store=LosingFills(inner),
                       settings=Settings(lock_timeout=budgets.lock_timeout, store_timeout=2.0))
    try:
        async with lifespan(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                    base_url="http://testserver") as http:
            assert (await http.get("/item")).text == "item"
            fills = find_middleware(app).supervisor.counters_for("fill")
            await eventually(lambda: _true(fills.done == 1), within=budgets.condition, what="the fill job ending")

            async def no_locks() -> bool:
                return not await inner.client.keys("*:lock")

            await eventually(no_locks, within=budgets.condition, what="the lost fill's lock released")
    finally:
        await inner.aclose()


async def test_a_fill_that_cannot_be_sent_at_once_is_stored_by_its_job_not_raised(redis_url: str,
                                                                                   budgets: Budgets) -> None:
    """Sending a fill at once runs in the request's task: whatever goes wrong there (here a driver bug)
    never reaches the client or the server; the fill job stores it instead."""
    from cachemw import RedisStore

    class BrokenSend(SpyStore):
        def fill_nowait(self, *args: object) -> asyncio.Future[bool]:
            raise RuntimeError("a bug in the driver")

    @cache(ttl="5m")
    async def item(request: Request) -> Response:
        return PlainTextResponse("item")

    inner = RedisStore.from_url(redis_url, timeout=2.0)
    store = BrokenSend(inner)
    app = Starlette(routes=[Route("/item", item)])
    app.add_middleware(CacheMiddleware, store=store,
                       settings=Settings(lock_timeout=budgets.lock_timeout, store_timeout=2.0))
    try:
        async with lifespan(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                    base_url="http://testserver") as http:
            assert (await http.get("/item")).text == "item"
            await eventually(lambda: _true(store.keys_set != []), within=budgets.condition,
                             what="the fill stored by its job")
            assert (await http.get("/item")).headers["x-cache"] == "HIT"
    finally:
        await inner.aclose()


async def test_waiters_are_answered_when_the_response_is_complete_not_after_its_background_task(
        store: SpyStore, budgets: Budgets) -> None:
    from starlette.background import BackgroundTask

    handler_gate, task_gate, task_done = anyio.Event(), anyio.Event(), anyio.Event()
    calls = 0

    async def slow_task() -> None:
        await task_gate.wait()  # the e-mail the handler sends after its response
        task_done.set()

    @cache(ttl="5m")
    async def page(request: Request) -> Response:
        nonlocal calls
        calls += 1
        await handler_gate.wait()
        return PlainTextResponse("page", background=BackgroundTask(slow_task))

    app = Starlette(routes=[Route("/page", page)])
    app.add_middleware(CacheMiddleware, store=store, settings=Settings(store_timeout=2.0))
    async with lifespan(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                base_url="http://testserver") as http, \
            anyio.create_task_group() as tg:
        tg.start_soon(http.get, "/page")
        await eventually(lambda: _true(calls == 1), within=budgets.condition, what="the leader in the handler")
        waiter: list[httpx.Response] = []

        async def wait_on_it() -> None:
            waiter.append(await http.get("/page"))

        tg.start_soon(wait_on_it)
        await eventually(lambda: _true(find_middleware(app).metrics.waiting_on_fills == 1),
                         within=budgets.condition, what="the second request waiting on the first")
        handler_gate.set()
        await eventually(lambda: _true(bool(waiter)), within=budgets.condition, what="the waiter answered")
        assert not task_done.is_set()  # answered while the leader's background task still runs
        task_gate.set()
    assert waiter[0].text == "page" and "collapsed" in waiter[0].headers["cache-status"]
    assert calls == 1


async def test_a_poll_lost_while_another_server_fills_does_not_send_the_waiter_to_the_origin(
        redis_server: RedisServer, redis_url: str, budgets: Budgets) -> None:
    """Server B waits on A's fill; Redis stops answering for a moment; B keeps waiting instead of calling the app."""
    from cachemw import RedisStore

    calls: collections.Counter[str] = collections.Counter()
    gate = anyio.Event()

    def server(name: str) -> tuple[Starlette, RedisStore]:
        @cache(ttl="5m")
        async def item(request: Request) -> Response:
            calls[name] += 1
            await gate.wait()  # A's database read, held while B waits and Redis stalls
            return PlainTextResponse(f"item from {name}")

        store = RedisStore.from_url(redis_url, timeout=0.2 * budgets.scale)
        app = Starlette(routes=[Route("/item", item)])
        app.add_middleware(CacheMiddleware, store=store, settings=Settings(
            lock_timeout=budgets.lock_timeout, store_timeout=0.2 * budgets.scale,
            background_timeout=budgets.condition))
        return app, store

    (app_a, store_a), (app_b, store_b) = server("a"), server("b")
    db = redis_server.client()
    answers: dict[str, httpx.Response] = {}
    try:
        async with lifespan(app_a), lifespan(app_b), \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app_a), base_url="http://testserver") as a, \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app_b), base_url="http://testserver") as b, \
                anyio.create_task_group() as tg:
            async def get(name: str, http: httpx.AsyncClient) -> None:
                answers[name] = await http.get("/item")

            tg.start_soon(get, "a", a)
            await eventually(lambda: _true(calls["a"] == 1), within=budgets.condition, what="A in the handler")
            tg.start_soon(get, "b", b)
            await eventually(lambda: _true(bool(db.keys("*:wait"))), within=budgets.condition,
                             what="B waiting on A's fill")
            errors_before = find_middleware(app_b).metrics.store_errors
            redis_server.pause()
            try:
                await eventually(lambda: _true(find_middleware(app_b).metrics.store_errors > errors_before),
                                 within=budgets.condition, what="one of B's polls lost")
            finally:
                redis_server.resume()
            gate.set()
            await eventually(lambda: _true("b" in answers), within=budgets.condition, what="B answered")
    finally:
        db.close()
        await store_a.aclose()
        await store_b.aclose()
    assert calls == {"a": 1}, "B called the app although A was filling the key"
    assert answers["a"].text == answers["b"].text == "item from a"
