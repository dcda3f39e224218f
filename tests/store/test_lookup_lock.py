"""A route that keeps missing: its lookup also tries the fill lock, so a miss costs one round trip.

After a miss on a route, its next lookup is one script that answers the value when
there is one and otherwise tries the lock (and reads the generations) in the same
round trip. A hit on that route turns it back to a plain GET. Everything a miss
promises still holds: one fill per key across processes, invalidations racing a
fill keep it out, a store fault is the app's answer.
"""

from __future__ import annotations

import collections
import functools
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, RedisStore, Settings, cache, invalidate
from cachemw.store.pipeline import PipelinedRedis
from tests.helpers import eventually, find_middleware, lifespan

pytestmark = pytest.mark.anyio


class Origin:
    """``/p/{id}``: counts its runs per id and, at each start, how many commands the store had sent."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.sent_at_start: list[int] = []
        self.sent: list[bytes] = []
        self.release = anyio.Event()
        self.release.set()

    async def item(self, request: Request) -> Response:
        product = request.path_params["id"]
        self.calls[product] += 1
        self.sent_at_start.append(len(self.sent))
        await self.release.wait()
        return JSONResponse({"id": product, "run": self.calls[product]})


def make_app(origin: Origin, store: Any, *, lock_timeout: float = 5.0) -> Starlette:
    @cache(ttl="5m", tags=["p:{id}"])
    async def item(request: Request) -> Response:
        return await origin.item(request)

    app = Starlette(routes=[Route("/p/{id}", item),
                            Route("/purge/{id}", purge, methods=["POST"])])
    app.add_middleware(CacheMiddleware, store=store,
                       settings=Settings(lock_timeout=lock_timeout, store_timeout=2.0))
    return app


async def purge(request: Request) -> Response:
    return JSONResponse({"dropped": await invalidate(tags=[f"p:{request.path_params['id']}"])})


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def record_commands(store: RedisStore, origin: Origin, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command the request path sends over the store's pipelined connection, in order."""
    pipelined = store._pipelined  # the connection under test
    assert isinstance(pipelined, PipelinedRedis)
    execute = pipelined.execute

    async def recording(command: bytes, within: float | None = None) -> Any:
        origin.sent.append(command.split(b"\r\n")[2])  # the command's name
        return await execute(command, within)

    monkeypatch.setattr(pipelined, "execute", recording)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_url, timeout=2.0)
    await store.client.flushdb()
    yield store
    await store.aclose()


async def fills_done(app: Starlette, count: int) -> bool:
    return find_middleware(app).supervisor.counters_for("fill").done >= count


async def test_after_a_miss_each_miss_is_one_round_trip_before_the_handler(
        store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    origin = Origin()
    record_commands(store, origin, monkeypatch)
    app = make_app(origin, store)
    before_handler: list[list[bytes]] = []
    async with lifespan(app), client(app) as http:
        await store.client.script_flush()  # the first lock attempt then falls back from EVALSHA to EVAL
        for n, product in enumerate(["1", "2", "3"], start=1):
            before = len(origin.sent)
            response = await http.get(f"/p/{product}")
            assert response.headers["x-cache"] == "MISS" and response.json() == {"id": product, "run": 1}
            before_handler.append(origin.sent[before : origin.sent_at_start[-1]])
            await eventually(functools.partial(fills_done, app, n), what=f"fill {n}")
    # The route's first miss: a GET, then the lock attempt. After that, one command each.
    assert before_handler == [[b"GET", b"EVALSHA", b"EVAL"], [b"EVALSHA"], [b"EVALSHA"]]


async def test_a_hit_on_a_missing_route_takes_no_lock_and_turns_it_back_to_a_plain_get(
        store: RedisStore, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    origin = Origin()
    record_commands(store, origin, monkeypatch)
    app = make_app(origin, store)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with lifespan(app), client(app) as http:
            await http.get("/p/1")
            await eventually(lambda: fills_done(app, 1), what="fill of /p/1")
            await http.get("/p/2")  # a second miss: the route now looks up with the lock script
            await eventually(lambda: fills_done(app, 2), what="fill of /p/2")
            before = len(origin.sent)
            hit = await http.get("/p/1")
            assert hit.headers["x-cache"] == "HIT" and hit.json() == {"id": "1", "run": 1}
            assert origin.sent[before:] == [b"EVALSHA"]
            assert [key async for key in raw.scan_iter(match="*:lock")] == []  # the hit took no lock
            before = len(origin.sent)
            again = await http.get("/p/2")
            assert again.headers["x-cache"] == "HIT"
            assert origin.sent[before:] == [b"GET"]  # a hit turned the route back
    finally:
        await raw.aclose()
    assert origin.calls == {"1": 1, "2": 1}


async def test_one_handler_run_for_a_cold_key_across_two_processes_on_missing_routes(redis_url: str) -> None:
    origin = Origin()
    stores = [RedisStore.from_url(redis_url, timeout=2.0) for _ in range(2)]
    await stores[0].client.flushdb()
    apps = [make_app(origin, store, lock_timeout=30) for store in stores]
    bodies: list[Any] = []
    try:
        async with lifespan(apps[0]), lifespan(apps[1]), client(apps[0]) as a, client(apps[1]) as b:
            # One miss each on other keys: both processes now look up /p/... with the lock script.
            await a.get("/p/warm-a")
            await b.get("/p/warm-b")
            origin.release = anyio.Event()

            async def one(http: httpx.AsyncClient) -> None:
                bodies.append((await http.get("/p/cold")).json())

            with anyio.fail_after(5):  # far below the 30 s lock timeout: the waiter is woken
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one, a)
                    await eventually(lambda: _true(origin.calls["cold"] == 1), what="A's handler starting")
                    tg.start_soon(one, b)
                    await anyio.wait_all_tasks_blocked()
                    origin.release.set()
    finally:
        for store in stores:
            await store.aclose()
    assert origin.calls["cold"] == 1 and bodies == [{"id": "cold", "run": 1}] * 2


async def test_an_invalidation_while_the_handler_runs_keeps_the_fill_out(store: RedisStore) -> None:
    origin = Origin()
    app = make_app(origin, store)
    async with lifespan(app), client(app) as http:
        await http.get("/p/1")  # the route now looks up with the lock script
        await eventually(lambda: fills_done(app, 1), what="fill of /p/1")
        origin.release = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(http.get, "/p/2")
            await eventually(lambda: _true(origin.calls["2"] == 1), what="the handler of /p/2 starting")
            await http.post("/purge/2")  # the handler has read the database before this write
            origin.release.set()
        # The purge detached the fill of /p/2: it is not stored, and its lock is released.
        unlocks = find_middleware(app).supervisor.counters_for("unlock")
        await eventually(lambda: _true(unlocks.done == 1), what="the detached fill's lock being released")
        after = await http.get("/p/2")
    assert after.headers["x-cache"] == "MISS" and after.json() == {"id": "2", "run": 2}


async def test_a_store_that_is_down_on_a_missing_route_is_the_apps_answer() -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    origin = Origin()
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    app = make_app(origin, store)
    try:
        async with client(app) as http:
            responses = [await http.get(f"/p/{n}") for n in range(3)]
    finally:
        await store.aclose()
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [r.json()["id"] for r in responses] == ["0", "1", "2"]


async def _true(value: bool) -> bool:
    return value


async def test_get_or_lock_answers_a_value_or_takes_the_lock_once(shared_url: str) -> None:
    """The store's side, on one server (one script) and on a cluster (GET, then the lock's pipeline)."""
    store = RedisStore.from_url(shared_url, timeout=2.0)
    raw = store.client
    generation = "lookup-test:g:{lookup}"
    try:
        await raw.delete("lookup-test:e:{held}", "lookup-test:e:{held}:lock", "lookup-test:e:{cold}",
                         "lookup-test:e:{cold}:lock", "lookup-test:e:{cold}:wait")
        await raw.set(generation, 7)
        await store.set("lookup-test:e:{held}", b"entry", 60)
        held = await store.get_or_lock("lookup-test:e:{held}", 5, [generation], "t0")
        first = await store.get_or_lock("lookup-test:e:{cold}", 5, [generation], "t1")
        second = await store.get_or_lock("lookup-test:e:{cold}", 5, [generation], "t2")
        lock_holder = await raw.get("lookup-test:e:{cold}:lock")
        held_lock = await raw.get("lookup-test:e:{held}:lock")
    finally:
        await raw.delete(generation)
        await store.aclose()
    assert held == (None, b"entry", ()) and held_lock is None  # a value: no lock attempted
    assert first == ("t1", None, (7,)) and second == (None, None, (7,)) and lock_holder == b"t1"
