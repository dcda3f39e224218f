"""Hostile requests and misbehaving apps: nothing a client sends leaks to others, nothing partial is stored."""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message

from cachemw import CacheMiddleware, MemoryStore, cache
from tests.helpers import SpyStore, eventually, lifespan

pytestmark = pytest.mark.anyio

calls: collections.Counter[str] = collections.Counter()


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()


@cache(ttl="5m", query=["page"])
async def echo(request: Request) -> Response:
    calls["echo"] += 1
    return JSONResponse({
        "url": str(request.url),
        "method": request.method,
        "host": request.headers.get("x-forwarded-host"),
        "override": request.headers.get("x-http-method-override"),
        "original": request.headers.get("x-original-url"),
        "params": request.query_params.multi_items(),
        "n": calls["echo"],
    })


@cache(ttl="5m", vary=["x-forwarded-host"])
async def by_forwarded_host(request: Request) -> Response:
    calls["forwarded"] += 1
    return PlainTextResponse(f"for {request.headers.get('x-forwarded-host')}")


@cache(ttl="5m", max_body=1000)
async def huge(request: Request) -> Response:
    calls["huge"] += 1

    async def body() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 1000

    return StreamingResponse(body(), media_type="text/plain")


@cache(ttl="5m")
async def raises_midway(request: Request) -> Response:
    calls["midway"] += 1

    async def body() -> AsyncIterator[bytes]:
        yield b"partial"
        raise RuntimeError("the database went away mid-response")

    return StreamingResponse(body(), media_type="text/plain")


@cache(ttl="5m")
async def raises_early(request: Request) -> Response:
    calls["early"] += 1
    raise RuntimeError("boom")


@cache(ttl="5m")
async def slow_stream(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"first,"
        await anyio.sleep_forever()
        yield b"never"

    return StreamingResponse(body(), media_type="text/plain")


@cache(ttl="5m", private=True)
async def sets_cookie_privately(request: Request) -> Response:
    calls["private"] += 1
    response = PlainTextResponse(f"for {request.cookies.get('session')}")
    response.set_cookie("csrf", f"token-{calls['private']}")
    return response


def make_app(store: Any) -> Starlette:
    app = Starlette(routes=[
        Route("/echo", echo),
        Route("/by-host", by_forwarded_host),
        Route("/huge", huge),
        Route("/midway", raises_midway),
        Route("/early", raises_early),
        Route("/slow", slow_stream),
        Route("/private", sets_cookie_privately),
        Route("/account/{name}", echo),
    ])
    app.add_middleware(CacheMiddleware, store=store)
    return app


@pytest.fixture
def store() -> SpyStore:
    return SpyStore(MemoryStore())


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://testserver")


@pytest.mark.parametrize("header", ["x-forwarded-host", "x-http-method-override", "x-original-url"])
async def test_override_headers_never_reach_the_app_on_cached_routes(store: SpyStore, header: str) -> None:
    async with client(make_app(store)) as http:
        poisoned = await http.get("/echo", headers={header: "evil.example"})
        clean = await http.get("/echo")
    assert "evil.example" not in poisoned.text
    assert clean.headers["x-cache"] == "HIT" and "evil.example" not in clean.text


async def test_a_header_the_rule_keys_on_reaches_the_app_and_the_key(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        a = await http.get("/by-host", headers={"x-forwarded-host": "a.example"})
        b = await http.get("/by-host", headers={"x-forwarded-host": "b.example"})
        a_again = await http.get("/by-host", headers={"x-forwarded-host": "a.example"})
    assert a.text == "for a.example" and b.text == "for b.example"
    assert a_again.headers["x-cache"] == "HIT" and a_again.text == "for a.example"


async def test_a_get_with_a_body_bypasses(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        with_body = await http.request("GET", "/echo", content=b"page=9")
        plain = await http.get("/echo")
    assert with_body.headers["x-cache"] == "BYPASS"
    assert plain.headers["x-cache"] == "MISS"


@pytest.mark.parametrize(("first", "second"), [
    ("/echo?page=1&utm=a", "/echo?page=1&utm=b"),  # unkeyed params are removed before the app
    ("/echo?page=1", "/echo?page=%31"),  # percent-encoding decodes to the same value
])
async def test_variants_that_mean_the_same_share_an_entry(store: SpyStore, first: str, second: str) -> None:
    async with client(make_app(store)) as http:
        one = await http.get(first)
        two = await http.get(second)
    assert two.headers["x-cache"] == "HIT" and two.content == one.content
    assert "utm" not in one.text


@pytest.mark.parametrize(("first", "second"), [
    ("/echo?page=1", "/echo?page=1;page=2"),  # ";" is not a separator, for us as for Starlette
    ("/echo?page=1&page=2", "/echo?page=2&page=1"),  # Starlette reads the last one
    ("/account/a", "/account/\u0430"),  # a Cyrillic look-alike is another path
])
async def test_variants_that_differ_do_not_share(store: SpyStore, first: str, second: str) -> None:
    async with client(make_app(store)) as http:
        await http.get(first)
        two = await http.get(second)
    assert two.headers["x-cache"] == "MISS"


@pytest.mark.parametrize("path", ["/ECHO", "/echo/", "/echo.css", "/account/x.css/"])
async def test_paths_that_match_no_cached_route_are_never_cached(store: SpyStore, path: str) -> None:
    async with client(make_app(store)) as http:
        response = await http.get(path)
    assert "x-cache" not in response.headers and store.keys_set == []


async def test_very_long_urls_and_headers_keep_keys_bounded(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        response = await http.get("/echo?page=" + "9" * 20_000, headers={"x-long": "y" * 20_000})
    assert response.status_code == 200
    assert all(len(key) < 200 for key in store.keys_set)


async def test_an_oversized_streamed_body_goes_through_whole_and_is_not_stored(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        response = await http.get("/huge")
        again = await http.get("/huge")
    assert len(response.content) == 100_000 and again.headers["x-cache"] == "MISS"
    assert store.keys_set == [] and calls["huge"] == 2


@pytest.mark.parametrize("path", ["/midway", "/early"])
async def test_a_handler_that_raises_stores_nothing(store: SpyStore, path: str) -> None:
    app = make_app(store)
    async with lifespan(app), client(app) as http:
        await http.get(path)
        await http.get(path)
    assert store.keys_set == []
    assert calls[path.strip("/")] == 2


async def test_a_client_that_disconnects_mid_response_leaves_nothing_stored(store: SpyStore) -> None:
    app = make_app(store)
    got_first = anyio.Event()
    disconnect = anyio.Event()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/slow", "raw_path": b"/slow", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver")], "server": ("testserver", 80), "client": ("127.0.0.1", 1)}
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            got_first.set()

    async with lifespan(app):
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(app, scope, receive, send)
                await got_first.wait()
                disconnect.set()
    assert store.keys_set == []


async def test_coalesced_requests_never_share_a_private_or_cookie_setting_response(store: SpyStore) -> None:
    app = make_app(store)
    async with lifespan(app), client(app) as http:
        responses: dict[str, httpx.Response] = {}

        async def one(user: str) -> None:
            responses[user] = await http.get("/private", headers={"cookie": f"session={user}"})

        async with anyio.create_task_group() as tg:
            for user in ("alice", "bob", "carol"):
                tg.start_soon(one, user)
    for user, response in responses.items():
        assert response.text == f"for {user}"
    cookies = {response.headers["set-cookie"] for response in responses.values()}
    assert len(cookies) == 3 and store.keys_set == []


async def test_a_private_rule_without_identity_bypasses(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        response = await http.get("/private")
    assert response.headers["x-cache"] == "BYPASS" and store.keys_set == []


async def test_background_queue_that_cannot_keep_up_sheds_and_stays_bounded() -> None:
    store = SpyStore(MemoryStore())
    app = Starlette(routes=[Route("/echo", echo)])
    from cachemw import Supervisor

    supervisor = Supervisor(queue_size=10, concurrency=1)
    app.add_middleware(CacheMiddleware, store=store, supervisor=supervisor)
    gate = anyio.Event()

    async def stuck() -> None:
        await gate.wait()

    async with lifespan(app), client(app) as http:
        await http.get("/echo")  # start the app so the supervisor runs
        supervisor.submit("task", stuck)  # the only worker is busy from now on
        for page in range(200):
            assert (await http.get(f"/echo?page={page}")).status_code == 200
        counters = supervisor.counters_for("fill")
        assert counters.queued <= 10 and counters.shed >= 180
        gate.set()
        await eventually(lambda: _true(supervisor.counters_for("fill").queued == 0), what="the queue draining")


async def _true(value: bool) -> bool:
    return value


class _SlowStore(SpyStore):
    """A store that never answers in time."""

    async def get(self, key: str) -> bytes | None:
        await anyio.sleep(10)
        return None

    async def lock(self, *args: Any, **kwargs: Any) -> Any:
        await anyio.sleep(10)


@pytest.mark.parametrize("loop_stalls", [False, True])
async def test_only_a_slow_store_opens_the_breaker_not_a_saturated_loop(loop_stalls: bool) -> None:
    from cachemw import Settings
    from tests.helpers import find_middleware

    app = Starlette(routes=[Route("/echo", echo)])
    app.add_middleware(CacheMiddleware, store=_SlowStore(MemoryStore()), settings=Settings(store_timeout=0.05))
    statuses: list[int] = []

    async def request() -> None:
        statuses.append((await http.get("/echo")).status_code)

    async with client(app) as http:
        for _ in range(6):
            async with anyio.create_task_group() as tg:
                tg.start_soon(request)
                if loop_stalls:
                    for _ in range(3):  # the event loop is busy elsewhere: deadlines fire late
                        await anyio.sleep(0.01)
                        time.sleep(0.15)  # noqa: ASYNC251  (stalls the event loop on purpose)
        cache_layer = find_middleware(app)
    assert statuses == [200] * 6  # every request went to the app either way
    assert cache_layer.breaker.state == ("closed" if loop_stalls else "open")


async def test_timeouts_while_the_loop_lags_are_not_the_stores_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    """Deadlines that fire a little late (well under twice the budget) while the loop is busy: the lag
    monitor tells, the breaker stays closed, and the log, the snapshot and ``cachemw stats`` say which."""
    from cachemw import Settings
    from cachemw.cli import render_stats
    from cachemw.observe import aggregate, snapshot
    from tests.helpers import find_middleware

    app = Starlette(routes=[Route("/echo", echo)])
    budget = 0.2
    app.add_middleware(CacheMiddleware, store=_SlowStore(MemoryStore()), settings=Settings(store_timeout=budget))
    busy = True

    async def saturate() -> None:  # other requests' CPU work, in slices: timers fire up to 1.5 budgets late
        while busy:
            await anyio.lowlevel.checkpoint()
            time.sleep(0.3 * budget)  # noqa: ASYNC251  (stalls the event loop on purpose)

    async with lifespan(app), client(app) as http, anyio.create_task_group() as tg:
        cache_layer = find_middleware(app)
        tg.start_soon(saturate)
        await eventually(lambda: _true(cache_layer.loop_lag.recent >= budget / 2), what="the lag monitor seeing it")
        statuses = [(await http.get("/echo")).status_code for _ in range(8)]
        busy = False
        await eventually(lambda: _true("event loop lagging" in caplog.text), what="the loop-lag warning")
    assert statuses == [200] * 8  # each went to the app
    assert cache_layer.breaker.state == "closed"  # one slow store would have opened it after 5
    lagged = cache_layer.loop_lag_timeouts
    assert lagged == cache_layer.store_errors >= 8  # every timeout was the loop's (a lookup, then a lock, each)
    store = snapshot(cache_layer)["store"]
    assert store["loop_lag_timeouts"] == lagged and store["loop_lag"]["count"] > 0
    document = {**snapshot(cache_layer), "process": {"host": "h", "pid": 1}, "time": 0.0}
    [line] = [line for line in render_stats(aggregate([document], now=0.0), "cachemw").splitlines()
              if line.startswith("loop lag")]
    assert f"{lagged} of the store errors were timeouts of this lag" in line
