"""Responses first: stale-while-revalidate, stale-if-error, one fill and one refresh per key.

Entries are aged by rewriting their ``stored_at`` in the store, and handlers
block on events the test sets: no test waits on the clock to pass.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import replace
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, MemoryStore, RedisStore, Settings, cache, detach
from cachemw.core.entry import decode_entry, encode_entry
from tests.budgets import Budgets
from tests.helpers import SpyStore, eventually, find_middleware, lifespan

pytestmark = pytest.mark.anyio


class Origin:
    """A handler the test steers: what it answers, and when."""

    def __init__(self) -> None:
        self.calls = 0
        self.mode = "ok"
        self.release = anyio.Event()
        self.release.set()

    def hold(self) -> None:
        self.release = anyio.Event()

    async def __call__(self, request: Request) -> Response:
        self.calls += 1
        version = self.calls
        await self.release.wait()
        if self.mode == "raise":
            raise RuntimeError("the database is on fire")
        if self.mode == "503":
            return PlainTextResponse("unavailable", status_code=503)
        if self.mode == "hang":
            await anyio.sleep_forever()
        return JSONResponse({"version": version})


@pytest.fixture
def origin() -> Origin:
    return Origin()


POLICY: dict[str, Any] = {"ttl": "1m", "stale_while_revalidate": "1m", "stale_if_error": "1h",
                          "origin_timeout": "300ms"}


def make_app(origin: Origin, store: Any, *, lock_timeout: float = 5.0, **policy: Any) -> Starlette:
    async def item(request: Request) -> Response:
        return await origin(request)

    app = Starlette(routes=[Route("/item", cache(**{**POLICY, **policy})(item))])
    app.add_middleware(CacheMiddleware, store=store, settings=Settings(lock_timeout=lock_timeout, store_timeout=2.0))
    return app


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def age_entry(store: SpyStore, seconds: float) -> None:
    """Make the stored entry ``seconds`` older, as if time had passed."""
    key = store.keys_set[-1]
    data = await store.inner.get(key)
    assert data is not None
    entry = decode_entry(data)
    await store.inner.set(key, encode_entry(replace(entry, stored_at=entry.stored_at - seconds)), 3600)


async def filled(store: SpyStore, count: int = 1) -> bool:
    return len(store.keys_set) >= count


async def test_stale_is_answered_while_the_refresh_is_still_running(origin: Origin, store: SpyStore) -> None:
    app = make_app(origin, store)
    async with lifespan(app), client(app) as http:
        await http.get("/item")
        await eventually(lambda: filled(store), what="first fill")
        await age_entry(store, 90)  # past ttl, inside stale_while_revalidate
        origin.hold()
        with anyio.fail_after(5):  # the handler is blocked: only a stale answer can arrive
            stale = await http.get("/item")
        assert stale.headers["x-cache"] == "STALE" and stale.json() == {"version": 1}
        assert stale.headers["cache-status"].startswith("cachemw; hit; ttl=-")
        await eventually(lambda: _true(origin.calls == 2), what="the refresh starting")
        origin.release.set()
        await eventually(lambda: filled(store, 2), what="the refresh being stored")
        fresh = await http.get("/item")
    assert fresh.headers["x-cache"] == "HIT" and fresh.json() == {"version": 2}


async def _true(value: bool) -> bool:
    return value


async def test_a_thousand_requests_on_a_stale_key_make_one_refresh(origin: Origin, store: SpyStore,
                                                                   budgets: Budgets) -> None:
    # The refresh waits on the held origin while the thousand are answered: as long as that takes.
    app = make_app(origin, store, origin_timeout=f"{budgets.lock_timeout}s")
    async with lifespan(app), client(app) as http:
        await http.get("/item")
        await eventually(lambda: filled(store), what="first fill")
        await age_entry(store, 90)
        origin.hold()
        states: collections.Counter[str] = collections.Counter()

        async def one() -> None:
            states[(await http.get("/item")).headers["x-cache"]] += 1

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(1000):
                    tg.start_soon(one)
        assert states == {"STALE": 1000}
        origin.release.set()
        await eventually(lambda: filled(store, 2), what="the refresh being stored")
    assert origin.calls == 2  # the first fill and one refresh


async def test_two_hundred_concurrent_misses_run_the_handler_once(origin: Origin, store: SpyStore) -> None:
    app = make_app(origin, store)
    origin.hold()
    async with lifespan(app), client(app) as http:
        bodies: list[Any] = []

        async def one() -> None:
            bodies.append((await http.get("/item")).json())

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(one)
                await eventually(lambda: _true(origin.calls == 1), what="the handler starting")
                await anyio.wait_all_tasks_blocked()
                origin.release.set()
    assert origin.calls == 1
    assert bodies == [{"version": 1}] * 200


async def test_two_app_instances_on_one_redis_fill_a_cold_key_once(origin: Origin, shared_url: str) -> None:
    stores = [RedisStore.from_url(shared_url, timeout=1.0) for _ in range(2)]
    apps = [make_app(origin, store) for store in stores]
    origin.hold()
    bodies: list[Any] = []
    try:
        async with lifespan(apps[0]), lifespan(apps[1]), client(apps[0]) as a, client(apps[1]) as b:

            async def one(http: httpx.AsyncClient) -> None:
                bodies.append((await http.get("/item")).json())

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for i in range(200):
                        tg.start_soon(one, a if i % 2 else b)
                    await eventually(lambda: _true(origin.calls >= 1), what="the handler starting")
                    await anyio.wait_all_tasks_blocked()
                    origin.release.set()
    finally:
        for store in stores:
            await store.aclose()
    assert origin.calls == 1
    assert bodies == [{"version": 1}] * 200


@pytest.mark.parametrize("mode", ["raise", "503", "hang"])
async def test_stale_if_error_serves_the_old_entry(origin: Origin, store: SpyStore, mode: str) -> None:
    app = make_app(origin, store)
    async with lifespan(app), client(app) as http:
        await http.get("/item")
        await eventually(lambda: filled(store), what="first fill")
        await age_entry(store, 600)  # past ttl and stale_while_revalidate, inside stale_if_error
        origin.mode = mode
        with anyio.fail_after(5):
            response = await http.get("/item")
    assert response.status_code == 200 and response.json() == {"version": 1}
    assert response.headers["x-cache"] == "STALE"
    assert "detail=stale-if-error" in response.headers["cache-status"]
    if mode == "503":
        assert "fwd-status=503" in response.headers["cache-status"]


@pytest.mark.parametrize(("mode", "status"), [("raise", 500), ("503", 503)])
async def test_without_an_entry_the_apps_own_error_is_returned(origin: Origin, store: SpyStore, mode: str,
                                                               status: int) -> None:
    origin.mode = mode
    app = make_app(origin, store)
    async with lifespan(app), client(app) as http:
        response = await http.get("/item")
    assert response.status_code == status


async def test_past_stale_if_error_the_error_goes_through(origin: Origin, store: SpyStore) -> None:
    app = make_app(origin, store)
    async with lifespan(app), client(app) as http:
        await http.get("/item")
        await eventually(lambda: filled(store), what="first fill")
        await age_entry(store, 7200)
        origin.mode = "503"
        response = await http.get("/item")
    assert response.status_code == 503


async def test_a_failed_refresh_keeps_the_old_entry(origin: Origin, store: SpyStore) -> None:
    app = make_app(origin, store)
    middleware = None
    async with lifespan(app), client(app) as http:
        await http.get("/item")
        await eventually(lambda: filled(store), what="first fill")
        await age_entry(store, 90)
        origin.mode = "raise"
        first = await http.get("/item")
        middleware = find_middleware(app)
        await eventually(lambda: _true(middleware.supervisor.counters_for("refresh").failed == 1),
                         what="the refresh failing")
        second = await http.get("/item")
    assert first.headers["x-cache"] == second.headers["x-cache"] == "STALE"
    assert second.json() == {"version": 1}


async def test_a_dead_lock_owner_blocks_refreshes_only_until_the_lock_expires(origin: Origin,
                                                                             redis_url: str) -> None:
    store = SpyStore(RedisStore.from_url(redis_url, timeout=1.0))
    app = make_app(origin, store, lock_timeout=0.5)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with lifespan(app), client(app) as http:
            await http.get("/item")
            await eventually(lambda: filled(store), what="first fill")
            await age_entry(store, 90)
            # A process that took the refresh lock and was killed leaves it behind.
            await raw.set(store.keys_set[-1] + ":lock", "dead-owner", px=500)
            assert (await http.get("/item")).headers["x-cache"] == "STALE"
            assert origin.calls == 1  # the dead owner's lock holds back the refresh

            async def refreshed() -> bool:
                return (await http.get("/item")).headers["x-cache"] == "HIT"

            await eventually(refreshed, what="a refresh after the lock expired")
    finally:
        await raw.aclose()
        await store.aclose()
    assert origin.calls == 2


async def test_a_dead_fill_lock_owner_delays_a_miss_only_until_the_lock_expires(origin: Origin,
                                                                               redis_url: str) -> None:
    store = SpyStore(RedisStore.from_url(redis_url, timeout=1.0))
    app = make_app(origin, store, lock_timeout=0.3)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with lifespan(app), client(app) as http:
            # Learn the key, then empty it and leave a dead owner's lock on it.
            await http.get("/item")
            await eventually(lambda: filled(store), what="first fill")
            key = store.keys_set[-1]
            await raw.delete(key)
            await raw.set(key + ":lock", "dead-owner", px=60_000)
            with anyio.fail_after(5):
                response = await http.get("/item")
    finally:
        await raw.aclose()
        await store.aclose()
    assert response.status_code == 200 and response.json() == {"version": 2}


async def test_each_request_logs_one_access_event(origin: Origin, store: SpyStore,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cachemw.access")
    app = make_app(origin, store)
    async with lifespan(app), client(app) as http:
        await http.get("/item")
        await eventually(lambda: filled(store), what="first fill")
        await http.get("/item")

        async def logged() -> bool:
            return len([r for r in caplog.records if r.name == "cachemw.access"]) == 2

        await eventually(logged, what="two access events")
    lines = [r.getMessage() for r in caplog.records if r.name == "cachemw.access"]
    assert "route=/item" in lines[0] and "cache=MISS" in lines[0] and "status=200" in lines[0]
    assert "cache=HIT" in lines[1]


async def test_handlers_detach_work_that_runs_after_the_response() -> None:
    done = anyio.Event()
    sent: list[int] = []

    async def send_receipt(order_id: int) -> None:
        sent.append(order_id)
        done.set()

    async def order(request: Request) -> Response:
        detach(send_receipt, 42)
        return PlainTextResponse("ordered")

    for with_lifespan in (True, False):
        done = anyio.Event()
        app = Starlette(routes=[Route("/order", order, methods=["POST"])])
        app.add_middleware(CacheMiddleware, store=MemoryStore())
        async with client(app) as http:
            if with_lifespan:
                async with lifespan(app):
                    assert (await http.post("/order")).text == "ordered"
                    with anyio.fail_after(5):
                        await done.wait()
            else:
                assert (await http.post("/order")).text == "ordered"
                assert done.is_set()  # without a lifespan it ran once the response was sent
    assert sent == [42, 42]


async def test_without_a_lifespan_a_waiter_on_another_instance_picks_up_the_fill(origin: Origin,
                                                                                redis_url: str) -> None:
    """No subscription to wake it: it looks now and then, well before the lock timeout."""
    stores = [RedisStore.from_url(redis_url, timeout=1.0) for _ in range(2)]
    apps = [make_app(origin, store, lock_timeout=30) for store in stores]
    origin.hold()
    bodies: list[Any] = []
    try:
        async with client(apps[0]) as a, client(apps[1]) as b:

            async def one(http: httpx.AsyncClient) -> None:
                bodies.append((await http.get("/item")).json())

            with anyio.fail_after(5):  # far below the 30 s lock timeout
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one, a)
                    await eventually(lambda: _true(origin.calls == 1), what="A's handler starting")
                    tg.start_soon(one, b)
                    await anyio.wait_all_tasks_blocked()
                    origin.release.set()
    finally:
        for store in stores:
            await store.aclose()
    assert origin.calls == 1 and bodies == [{"version": 1}] * 2


async def test_a_lock_released_without_a_word_is_taken_over_at_once(origin: Origin, redis_url: str) -> None:
    """No announcement comes (the holder gave up, or it was lost): the waiter looks again by itself."""
    store = SpyStore(RedisStore.from_url(redis_url, timeout=1.0))
    app = make_app(origin, store, lock_timeout=30)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with lifespan(app), client(app) as http:
            await http.get("/item")
            await eventually(lambda: filled(store), what="first fill")
            key = store.keys_set[-1]
            await raw.delete(key)
            await raw.set(key + ":lock", "vanished-owner", px=60_000)
            responses: list[httpx.Response] = []
            with anyio.fail_after(5):  # far below the 30 s lock timeout
                async with anyio.create_task_group() as tg:
                    async def one() -> None:
                        responses.append(await http.get("/item"))

                    tg.start_soon(one)
                    await anyio.wait_all_tasks_blocked()
                    await raw.delete(key + ":lock")  # released, but nobody says so
    finally:
        await raw.aclose()
        await store.aclose()
    assert responses[0].status_code == 200 and responses[0].json() == {"version": 2}
