"""Invalidation and the cross-server staleness bound, on two app instances sharing one Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from cachemw import CacheMiddleware, MemoryStore, RedisStore, Settings, cache, invalidate
from cachemw.core.keys import mounted_at
from cachemw.runtime.invalidation import targets_for_unsafe_request
from tests.budgets import Budgets
from tests.helpers import TRANSPORTS, SpyStore, eventually, find_middleware, lifespan, requests_to, serving, store_of

pytestmark = pytest.mark.anyio

SYNC = 1.0


class Database:
    def __init__(self) -> None:
        self.versions: dict[int, int] = {}
        self.reads = 0
        self.gate = anyio.Event()
        self.gate.set()


def make_app(db: Database, store: Any, *, sync: float = SYNC, lock_timeout: float = 2.0) -> Starlette:
    @cache(ttl="5m", sync=sync, tags=["product:{id}"])
    async def product(request: Request) -> Response:
        product_id = request.path_params["id"]
        version = db.versions.get(product_id, 1)
        db.reads += 1
        await db.gate.wait()
        return JSONResponse({"id": product_id, "version": version})

    @cache("realtime", invalidates=["product:{id}"])
    async def update(request: Request) -> Response:
        product_id = request.path_params["id"]
        db.versions[product_id] = db.versions.get(product_id, 1) + 1
        return JSONResponse({"id": product_id, "version": db.versions[product_id]})

    @cache(ttl="5m")
    async def stats(request: Request) -> Response:
        db.reads += 1
        return PlainTextResponse(f"stats {request.query_params.get('x')}", headers={"cache-tag": "reports daily"})

    async def reset(request: Request) -> Response:
        dropped = await invalidate(tags=["reports"])
        return JSONResponse({"dropped": dropped})

    app = Starlette(routes=[
        Route("/products/{id:int}", product, methods=["GET"]),
        Route("/products/{id:int}", update, methods=["POST"]),
        Route("/stats", stats),
        Route("/reset", reset, methods=["POST"]),
    ])
    app.add_middleware(CacheMiddleware, store=store, settings=Settings(lock_timeout=lock_timeout, store_timeout=2.0))
    return app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@asynccontextmanager
async def servers(redis_url: str, count: int = 2, *, sync: float = SYNC, lock_timeout: float = 2.0,
                  tracking: bool = True
                  ) -> AsyncIterator[tuple[Database, list[Starlette], list[httpx.AsyncClient], list[SpyStore]]]:
    """``count`` app instances with their own Redis connections and lifespans, like separate servers.

    ``tracking``: Redis reports changed entry keys to each server's L1 (False: the ``sync`` bound alone)."""
    db = Database()
    stores = [SpyStore(RedisStore.from_url(redis_url, timeout=1.0)) for _ in range(count)]
    for spy in stores:
        if not tracking and isinstance(spy.inner, RedisStore):
            spy.inner.track(None)
    apps = [make_app(db, store, sync=sync, lock_timeout=lock_timeout) for store in stores]
    async with serving(apps, stores) as clients:
        yield db, apps, clients, stores


async def _true(value: bool) -> bool:
    return value


async def version(http: httpx.AsyncClient, path: str = "/products/1") -> tuple[str, int]:
    response = await http.get(path)
    return response.headers["x-cache"], response.json()["version"]


async def warm(http: httpx.AsyncClient, store: SpyStore, path: str = "/products/1") -> None:
    """Fill the entry and read it once more, so it sits in this server's L1."""
    await http.get(path)
    await eventually(lambda: _true(bool(store.keys_set)), what="the fill being stored")
    assert (await http.get(path)).headers["x-cache"] == "HIT"


async def test_invalidation_on_one_server_reaches_the_other_by_pubsub(shared_url: str) -> None:
    async with servers(shared_url, sync=60) as (db, apps, (_a, b), (_, store_b)):
        await warm(b, store_b)
        db.versions[1] = 2
        dropped = await find_middleware(apps[0]).invalidator.tags("product:1")  # type: ignore[union-attr]
        assert dropped == 1

        async def b_sees_new() -> bool:
            return (await version(b)) == ("MISS", 2)

        # sync is 60 s: only the broadcast can make B drop its L1 copy this fast.
        await eventually(b_sees_new, what="server B dropping its L1 copy")


async def test_l1_serves_at_most_sync_after_a_change_it_was_not_told_about(redis_url: str) -> None:
    """Without Redis's key tracking (an old Redis, or a Cluster), a change made behind cachemw's back is
    heard by nobody: the L1 copy answers, but never longer than ``sync``."""
    async with servers(redis_url, tracking=False) as (db, _, (_a, b), (_, store_b)):
        await warm(b, store_b)
        raw = redis.asyncio.Redis.from_url(redis_url)
        try:
            db.versions[1] = 2
            await raw.delete(store_b.keys_set[-1])  # behind cachemw's back: no broadcast
        finally:
            await raw.aclose()
        changed_at = time.monotonic()
        assert await version(b) == ("HIT", 1)  # the L1 copy still answers...
        await _assert_bound(b, changed_at)  # ...but never longer than sync


async def _assert_bound(http: httpx.AsyncClient, changed_at: float) -> None:
    seen_new = False
    while time.monotonic() < changed_at + 2 * SYNC:
        asked_at = time.monotonic()
        _, value = await version(http)
        if asked_at > changed_at + SYNC:
            assert value == 2, f"old entry served {asked_at - changed_at:.3f}s after the change"
        seen_new = seen_new or value == 2
        await anyio.sleep(0.02)
    assert seen_new


async def test_lost_subscription_keeps_the_bound(redis_url: str) -> None:
    async with servers(redis_url) as (db, apps, (_a, b), (_, store_b)):
        await warm(b, store_b)
        raw = redis.asyncio.Redis.from_url(redis_url)
        try:
            await raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
        finally:
            await raw.aclose()
        db.versions[1] = 2
        await find_middleware(apps[0]).invalidator.tags("product:1")  # type: ignore[union-attr]
        await _assert_bound(b, time.monotonic())


async def test_post_through_a_then_get_through_b_is_never_stale(shared_url: str) -> None:
    async with servers(shared_url, sync=0) as (_, _apps, (a, b), (_, store_b)):
        await b.get("/products/1")
        await eventually(lambda: _true(bool(store_b.keys_set)), what="the fill being stored")
        assert await version(b) == ("HIT", 1)
        assert (await a.post("/products/1")).json()["version"] == 2
        assert await version(b) == ("MISS", 2)


async def test_post_then_get_on_the_same_server_skips_its_l1(shared_url: str) -> None:
    async with servers(shared_url, count=1, sync=60) as (_, _apps, (a,), (store,)):
        await warm(a, store)
        await a.post("/products/1")
        assert await version(a) == ("MISS", 2)


async def test_a_fill_that_began_before_an_invalidation_is_not_stored(store: SpyStore, budgets: Budgets) -> None:
    db = Database()
    app = make_app(db, store)
    async with lifespan(app), client(app) as http:
        db.gate = anyio.Event()
        async with anyio.create_task_group() as tg:
            responses: list[httpx.Response] = []

            async def request() -> None:
                responses.append(await http.get("/products/1"))

            tg.start_soon(request)
            await eventually(lambda: _true(db.reads == 1), within=budgets.condition,
                             what="the handler reading the old row")
            db.versions[1] = 2
            await find_middleware(app).invalidator.tags("product:1")  # type: ignore[union-attr]
            db.gate.set()  # the handler answers with what it read before the change
        assert responses[0].json()["version"] == 1
        # The invalidation detached the fill: it is not stored, and its lock is released.
        unlocks = find_middleware(app).supervisor.counters_for("unlock")
        await eventually(lambda: _true(unlocks.done == 1), within=budgets.condition,
                         what="the detached fill's lock being released")
        after = await http.get("/products/1")
    assert after.headers["x-cache"] == "MISS" and after.json()["version"] == 2


async def test_purge_by_route_url_and_everything_counts_what_it_dropped(store: SpyStore) -> None:
    db = Database()
    app = make_app(db, store, sync=0)
    async with client(app) as http:  # no lifespan: fills are stored before each request returns
        for path in ("/products/1", "/products/2", "/stats?x=1", "/stats?x=2"):
            await http.get(path)
        invalidator = find_middleware(app).invalidator
        assert invalidator is not None
        assert await invalidator.urls("http://testserver/stats") == 2
        assert (await http.get("/products/2")).headers["x-cache"] == "HIT"
        assert await invalidator.routes("/products/{id}") == 2
        assert (await http.get("/products/2")).headers["x-cache"] == "MISS"
        await http.get("/stats?x=3")
        assert await invalidator.everything() == 2
        assert (await http.get("/stats?x=3")).headers["x-cache"] == "MISS"


async def test_handler_tags_are_stripped_and_purgeable_from_a_handler(store: SpyStore) -> None:
    db = Database()
    app = make_app(db, store, sync=0)
    async with client(app) as http:
        first = await http.get("/stats?x=1")
        assert "cache-tag" not in first.headers
        assert (await http.get("/stats?x=1")).headers["x-cache"] == "HIT"
        assert (await http.post("/reset")).json() == {"dropped": 1}
        assert (await http.get("/stats?x=1")).headers["x-cache"] == "MISS"
    assert db.reads == 2


async def test_a_write_on_another_server_detaches_this_servers_fill_in_flight(shared_url: str, budgets: Budgets
                                                                              ) -> None:
    """Two servers behind one Host: a GET on A that starts after B's write never joins A's older fill."""
    # A long lock_timeout: a GET that joined the old fill would wait for it, far past the deadline below.
    async with servers(shared_url, lock_timeout=budgets.lock_timeout) as (db, apps, (a, b), _stores), \
            anyio.create_task_group() as tg:
        db.gate = anyio.Event()  # A's first read is still in the handler when B's write lands
        heard = anyio.Event()
        store_of(apps[0]).notifications.on_invalidate.append(lambda tags: heard.set())
        old: list[httpx.Response] = []

        async def slow_read() -> None:
            old.append(await a.get("/products/1"))

        tg.start_soon(slow_read)
        await eventually(lambda: _true(db.reads == 1), within=budgets.condition, what="A's first read in the handler")
        assert (await b.post("/products/1")).status_code == 200
        with anyio.fail_after(budgets.condition):
            await heard.wait()  # the broadcast reached A
        first_read, db.gate = db.gate, anyio.Event()
        db.gate.set()  # later reads do not wait; the first stays in its handler until after ours
        with anyio.fail_after(budgets.condition):
            after = await a.get("/products/1")
        first_read.set()
        assert after.json()["version"] == 2 and "collapsed" not in after.headers["cache-status"]
    assert old[0].json()["version"] == 1


# -- what an unsafe request invalidates, and under a root path --------------------------------------


def test_an_invalidated_path_names_that_path_or_else_the_whole_route() -> None:
    assert targets_for_unsafe_request(["/products/{id}", "product:{id}", "/lists/{list}", "list:{list}", "all"],
                                      {"id": "7"}) == ["path:/products/7", "product:7", "route:/lists/{list}", "all"]
    assert targets_for_unsafe_request(["/products/{id:int}"], {}) == ["route:/products/{id}"]


def test_an_invalidated_path_carries_where_the_app_is_mounted() -> None:
    """Entries are tagged with the request's whole path: the server's root path (or an outer mount's) first."""
    assert targets_for_unsafe_request(["/products/{id}", "product:{id}", "/lists/{list}"], {"id": "7"},
                                      "/shop") == ["path:/shop/products/7", "product:7", "route:/lists/{list}"]
    scope = {"type": "http", "path": "/shop/products/7", "root_path": "/shop"}
    assert mounted_at(scope) == "/shop"
    assert mounted_at({**scope, "path": "/products/7"}) == ""  # an old server's path, root path left out
    assert mounted_at({"type": "http", "path": "/products/7"}) == ""


def path_invalidating_app(store: Any) -> Starlette:
    versions = {"1": 0}

    @cache(ttl="5m")
    async def product(request: Request) -> Response:
        return JSONResponse({"version": versions[request.path_params["id"]]})

    @cache(invalidates=["/products/{id}"])
    async def update(request: Request) -> Response:
        versions[request.path_params["id"]] += 1
        return JSONResponse({"version": versions[request.path_params["id"]]})

    app = Starlette(routes=[Route("/products/{id}", product, methods=["GET"]),
                            Route("/products/{id}", update, methods=["POST"])])
    app.add_middleware(CacheMiddleware, store=store)
    return app


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_post_invalidates_the_path_it_names(store: SpyStore, transport: str) -> None:
    async with requests_to(path_invalidating_app(store), transport) as http:
        assert (await http.get("/products/1")).json() == {"version": 0}
        assert (await http.post("/products/1")).json() == {"version": 1}
        after = await http.get("/products/1")
    assert after.headers["x-cache"] == "MISS" and after.json() == {"version": 1}


@pytest.mark.parametrize("mounted", ["root_path", "mount"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_post_invalidates_the_path_it_names_under_a_root_path(transport: str, mounted: str) -> None:
    """Behind a proxy's prefix (uvicorn --root-path /shop), or an app mounted in another, the path the
    rule names is the app's own: "/products/{id}" is "/shop/products/1" in the request."""
    app: Any = path_invalidating_app(MemoryStore())
    root_path = "/shop" if mounted == "root_path" else ""
    if mounted == "mount":
        app = Starlette(routes=[Mount("/shop", app=app)])
    async with requests_to(app, transport, root_path=root_path) as http:
        assert (await http.get("/shop/products/1")).json() == {"version": 0}
        assert (await http.post("/shop/products/1")).json() == {"version": 1}
        after = await http.get("/shop/products/1")
    assert after.json() == {"version": 1}  # not the entry filled before the write
