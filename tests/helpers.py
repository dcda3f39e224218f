"""Test helpers: drive an ASGI app's lifespan, wait for conditions with a deadline."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import redis.asyncio
from starlette.types import ASGIApp, Message

from cachemw.core.entry import PASS_MARKER
from cachemw.store import Store
from cachemw.store.base import StoreCapabilities

if TYPE_CHECKING:
    from cachemw import CacheMiddleware

try:  # tests/ is a package
    from tests.budgets import current_budgets
except ImportError:  # tests/ as a plain directory (see conftest.py)
    from budgets import current_budgets  # type: ignore[no-redef,import-not-found]


async def eventually(condition: Callable[[], Awaitable[bool]], *, within: float | None = None,
                     what: str = "condition") -> None:
    """Poll ``condition`` until true; fail after ``within`` seconds (default: the condition budget)."""
    if within is None:
        within = current_budgets().condition
    with anyio.move_on_after(within):
        while True:
            if await condition():
                return
            await anyio.sleep(0.005)
    raise AssertionError(f"{what} did not hold within {within}s")


class Gate:
    """What a handler waits on until the test opens it; counts the calls, and how many wait at once.

    Opened from the app's loop or from another thread (a TestClient test's), so a plain flag
    polled briefly rather than an anyio Event, which belongs to one loop. As a context
    manager it opens on the way out: a failing test leaves no handler waiting.
    """

    def __init__(self) -> None:
        self._open = threading.Event()
        self.calls = 0
        self.running = 0
        self.most = 0

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    async def wait(self) -> None:
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            while not self._open.is_set():  # noqa: ASYNC110  (opened from another thread: see the docstring)
                await anyio.sleep(0.005)
        finally:
            self.running -= 1

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.open()


class LifespanFailed(Exception):
    pass


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's lifespan around the block, as a server would."""
    to_app_send, to_app_receive = anyio.create_memory_object_stream[Message](4)
    from_app_send, from_app_receive = anyio.create_memory_object_stream[Message](4)
    scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}

    failure: str | None = None
    async with anyio.create_task_group() as tg, to_app_send, from_app_receive:
        async def run() -> None:
            async with to_app_receive, from_app_send:
                await app(scope, to_app_receive.receive, from_app_send.send)

        tg.start_soon(run)
        await to_app_send.send({"type": "lifespan.startup"})
        reply = await from_app_receive.receive()
        if reply["type"] != "lifespan.startup.complete":
            failure = reply.get("message", reply["type"])
        else:
            try:
                yield
            finally:
                await to_app_send.send({"type": "lifespan.shutdown"})
                with anyio.fail_after(15):
                    reply = await from_app_receive.receive()
                assert reply["type"] == "lifespan.shutdown.complete", reply
    if failure is not None:
        raise LifespanFailed(failure)


def client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


class _ThroughTestClient:
    """Starlette's TestClient behind ``client``'s async interface. Each request runs in a worker thread;
    TestClient runs the app, its lifespan included, on a loop of its own in another thread."""

    def __init__(self, test_client: Any, app: Any) -> None:
        self._client = test_client
        self._app = app

    async def request(self, method: str, url: str, **kwargs: Any) -> Any:
        response = await anyio.to_thread.run_sync(functools.partial(self._client.request, method, url, **kwargs))
        await eventually(self._settled, what="the background jobs of the request (its fill) being done")
        return response

    async def _settled(self) -> bool:
        layer = self._app
        from cachemw import CacheMiddleware

        for _ in range(64):  # the app's middleware stack, down to the cache
            if isinstance(layer, CacheMiddleware):
                return all(c.queued == c.running == 0 for c in list(layer.supervisor.counters.values()))
            layer = getattr(layer, "middleware_stack", None) or getattr(layer, "app", None)
        return True

    async def get(self, url: str, **kwargs: Any) -> Any:
        return await self.request("GET", url, **kwargs)

    async def head(self, url: str, **kwargs: Any) -> Any:
        return await self.request("HEAD", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> Any:
        return await self.request("POST", url, **kwargs)


TRANSPORTS = ("asgi", "testclient")


@asynccontextmanager
async def requests_to(app: ASGIApp, transport: str, *, root_path: str = "") -> AsyncIterator[Any]:
    """Requests to ``app`` through httpx's ASGITransport ("asgi", no lifespan) or Starlette's TestClient
    ("testclient", lifespan included), behind one interface: get, head, post, request.

    Each request returns once what it left to do is done (a fill stored), so a HIT right after a
    MISS is certain: without a lifespan the middleware does that before its call returns; through
    TestClient, the request waits for the background jobs. ``root_path`` is the scope's, as a
    server's ``--root-path`` gives it (the request's path includes it).
    """
    if transport == "asgi":
        asgi = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=asgi, base_url="http://testserver") as http:
            yield http
        return
    from starlette.testclient import TestClient

    test_client = TestClient(app, root_path=root_path)
    await anyio.to_thread.run_sync(test_client.__enter__)
    through = _ThroughTestClient(test_client, app)
    try:
        # Started (startup connects the store on TestClient's loop), and its startup jobs done too.
        await eventually(through._settled, what="the startup jobs being done")
        yield through
    finally:
        await anyio.to_thread.run_sync(test_client.__exit__, None, None, None)


async def credentials_stay_off_shared_entries(http: Any, path: str, first: dict[str, str], second: dict[str, str],
                                              stored: Callable[[], Awaitable[object]] | None = None
                                              ) -> tuple[Any, Any, Any, Any]:
    """A request with a credential, two without, one with another credential, to a shared route.

    Neither credentialed request is answered from, nor stored into, the shared entry: both
    bypass, and the second anonymous request is the first's HIT (``stored``, if given, is
    awaited between them: until the first's fill is in the store). The four responses are
    returned for the caller's own checks (what each body says).
    """
    keyed = await http.get(path, headers=first)
    anonymous = await http.get(path)
    if stored is not None:
        await stored()
    anonymous_again = await http.get(path)
    other = await http.get(path, headers=second)
    assert keyed.headers["x-cache"] == "BYPASS", keyed.headers
    assert anonymous_again.headers["x-cache"] == "HIT", anonymous_again.headers
    assert anonymous_again.content == anonymous.content
    assert other.headers["x-cache"] == "BYPASS", other.headers
    return keyed, anonymous, anonymous_again, other


class SpyStore:
    """Wraps a store and remembers the keys written, so tests can reach an entry.

    ``keys_set``: entries stored; ``keys_passed``: keys marked as not storable for a while (hit-for-pass).
    """

    def __init__(self, inner: Store, *, keeps_budget: bool | None = None) -> None:
        self.inner = inner
        self.keys_set: list[str] = []
        self.keys_passed: list[str] = []
        self._keeps_budget = keeps_budget  # None: as the inner store says

    async def get(self, key: str) -> bytes | None:
        return await self.inner.get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self.keys_set.append(key)
        await self.inner.set(key, value, ttl)

    async def delete(self, *keys: str) -> int:
        return await self.inner.delete(*keys)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def fill(self, key: str, value: bytes, ttl: float, token: str | None, *args: Any, **kwargs: Any) -> bool:
        stored: bool = await self.inner.fill(key, value, ttl, token, *args, **kwargs)
        # Once done: a test that waits for it then finds the entry.
        (self.keys_passed if value == PASS_MARKER else self.keys_set).append(key)
        return stored

    def fill_nowait(self, key: str, value: bytes, ttl: float, token: str | None, *args: Any) -> Any:
        """The inner store's (a Redis fill sent without a job), remembered once its reply is in, as ``fill``."""
        sent = self.inner.fill_nowait(key, value, ttl, token, *args)  # type: ignore[attr-defined]
        if sent is not None:
            sent.add_done_callback(lambda _: (self.keys_passed if value == PASS_MARKER else self.keys_set).append(key))
        return sent

    @property
    def capabilities(self) -> StoreCapabilities:
        """The inner store's, but remote: a wrapper stands for a store across a network (budget, breaker)."""
        capabilities = replace(self.inner.capabilities, remote=True)
        if self._keeps_budget is not None:
            capabilities = replace(capabilities, keeps_budget=self._keeps_budget)
        return capabilities

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # lock, unlock, waiter, listen


def find_middleware(app: Any) -> CacheMiddleware:
    """The CacheMiddleware inside a Starlette app's middleware stack (built by its first call)."""
    from cachemw import CacheMiddleware

    layer = app.middleware_stack
    while not isinstance(layer, CacheMiddleware):
        layer = layer.app
    return layer


def store_of(app: Any) -> Store:
    """The store of the CacheMiddleware in ``app``: there once the lifespan has started."""
    store = find_middleware(app).store
    assert store is not None, "the cache has not started"
    return store


@asynccontextmanager
async def serving(apps: list[Any], stores: list[Any]) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Apps with their own store connections and lifespans, like separate servers: a client each, once all
    are subscribed to the store's announcements. The stores are closed after the lifespans (their last
    fills are stored first)."""
    try:
        async with AsyncExitStack() as stack:
            for app in apps:
                await stack.enter_async_context(lifespan(app))
            clients = [await stack.enter_async_context(client(app)) for app in apps]
            for app in apps:
                async def subscribed(app: Any = app) -> bool:
                    return store_of(app).listening

                await eventually(subscribed, what="subscribed")
            yield clients
    finally:
        for store in stores:
            await store.aclose()


def eventually_sync(condition: Callable[[], bool], *, within: float | None = None, what: str = "condition") -> None:
    """``eventually`` for a test thread (Starlette's TestClient runs the app's loop in another thread)."""
    if within is None:
        within = current_budgets().condition
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {within}s")
        time.sleep(0.005)


def assert_counted(app: Any, route: str, counter: str, count: int, stats_line: Callable[[int], str]) -> None:
    """What the operator sees of a per-route counter: the snapshot, Prometheus, the fleet view, ``cachemw stats``.

    ``stats_line(n)``: the line ``cachemw stats`` shows for ``n`` (the fleet view adds two processes' counts).
    """
    from prometheus_client.parser import text_string_to_metric_families

    from cachemw.cli import render_stats
    from cachemw.observe import aggregate, find_cache, snapshot
    from cachemw.observe.prometheus import render

    data = snapshot(find_cache(app))
    [row] = [row for row in data["routes"] if row["route"] == route]
    assert row[counter] == count
    assert data["totals"][counter] == count
    body, _ = render(data)
    [family] = [f for f in text_string_to_metric_families(body.decode()) if f.name == f"cachemw_{counter}"]
    assert {s.labels["route"]: s.value for s in family.samples if s.name.endswith("_total")}[route] == count
    document = {**data, "process": {"host": "h", "pid": 1}, "time": 0.0}
    fleet = aggregate([document, document], now=0.0)
    assert fleet["totals"][counter] == 2 * count
    assert stats_line(2 * count) in render_stats(fleet, "cachemw").splitlines()


def node_urls(url: str) -> list[str]:
    """A test URL's nodes as plain ``redis://`` URLs: the server itself, or every seed of a cluster URL."""
    if url.startswith("redis+cluster://"):
        return [f"redis://{seed}" for seed in url.split("//", 1)[1].split(",")]
    return [url]


@asynccontextmanager
async def raw_redis(url: str) -> AsyncIterator[Any]:
    """A plain redis-py asyncio client on a test URL, to act behind cachemw's back: Redis, or RedisCluster."""
    client: Any
    if url.startswith("redis+cluster://"):
        seeds = [seed.rpartition(":") for seed in url.split("//", 1)[1].split(",")]
        client = redis.asyncio.RedisCluster(startup_nodes=[redis.asyncio.cluster.ClusterNode(host, int(port))
                                                           for host, _, port in seeds])
        await client.initialize()  # the slot map, for callers that ask which node holds a key
    else:
        client = redis.asyncio.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()
