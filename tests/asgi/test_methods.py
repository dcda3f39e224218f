"""Which methods may invalidate (POST, PUT, PATCH and DELETE only), and what a replay of a bodiless status carries."""

from __future__ import annotations

import collections
import threading
from collections.abc import AsyncIterator

import anyio
import pytest
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from cachemw import CacheMiddleware, RedisStore, cache
from tests.budgets import Budgets
from tests.helpers import SpyStore, client, eventually

pytestmark = pytest.mark.anyio


def make_app(store: SpyStore, reads: collections.Counter[str]) -> Starlette:
    # A class-based endpoint has no method list: its rule covers every method. CORS answers
    # with "Vary: Origin", which the key must cover for the entry to be stored.
    @cache(ttl="5m", tags=["items"], invalidates=["items"], vary=["origin"])
    class Items(HTTPEndpoint):
        async def get(self, request: Request) -> Response:
            reads["get"] += 1
            return JSONResponse({"read": reads["get"]})

        async def post(self, request: Request) -> Response:
            return JSONResponse({"written": True})

        async def trace(self, request: Request) -> Response:
            return JSONResponse({"traced": True})

    # A plain ASGI endpoint answers every method itself, as a proxy or a WebDAV app would.
    class Raw:
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["method"] == "GET":
                reads["get"] += 1
            await JSONResponse({"read": reads["get"], "method": scope["method"]})(scope, receive, send)

    raw = cache(ttl="5m", tags=["items"], invalidates=["items"], vary=["origin"])(Raw())
    app = Starlette(routes=[Route("/items", Items), Route("/raw", raw)])
    # CORS inside the cache answers preflights with 200, as in a real app.
    app.add_middleware(CORSMiddleware, allow_origins=["https://shop.example"], allow_methods=["*"])
    app.add_middleware(CacheMiddleware, store=store)
    return app


async def test_a_cors_preflight_does_not_purge(store: SpyStore) -> None:
    reads: collections.Counter[str] = collections.Counter()
    async with client(make_app(store, reads)) as http:
        assert (await http.get("/items")).headers["x-cache"] == "MISS"
        preflight = await http.options("/items", headers={"origin": "https://shop.example",
                                                          "access-control-request-method": "POST"})
        assert preflight.status_code == 200
        assert preflight.headers["x-cache"] == "BYPASS"
        after = await http.get("/items")
    assert after.headers["x-cache"] == "HIT" and after.json() == {"read": 1}


@pytest.mark.parametrize("method", ["TRACE", "PURGE", "OPTIONS"])
async def test_other_methods_neither_purge_nor_are_cached(store: SpyStore, method: str) -> None:
    reads: collections.Counter[str] = collections.Counter()
    async with client(make_app(store, reads)) as http:
        await http.get("/raw")
        first = await http.request(method, "/raw")
        second = await http.request(method, "/raw")
        after = await http.get("/raw")
    assert first.status_code == second.status_code == 200
    assert first.headers["x-cache"] == second.headers["x-cache"] == "BYPASS"
    assert after.headers["x-cache"] == "HIT" and after.json() == {"read": 1, "method": "GET"}


async def test_a_post_still_purges(store: SpyStore) -> None:
    reads: collections.Counter[str] = collections.Counter()
    async with client(make_app(store, reads)) as http:
        await http.get("/items")
        assert (await http.post("/items")).status_code == 200
        after = await http.get("/items")
    assert after.headers["x-cache"] == "MISS" and after.json() == {"read": 2}


async def test_a_cached_204_is_replayed_without_content_length(store: SpyStore) -> None:
    @cache(ttl="5m", statuses=[200, 204])
    async def nothing(request: Request) -> Response:
        return Response(status_code=204)

    app = Starlette(routes=[Route("/nothing", nothing)])
    app.add_middleware(CacheMiddleware, store=store)
    async with client(app) as http:
        first = await http.get("/nothing")
        hit = await http.get("/nothing")
    assert first.status_code == hit.status_code == 204
    assert hit.headers["x-cache"] == "HIT"
    assert "content-length" not in first.headers and "content-length" not in hit.headers


async def test_a_streamed_miss_sends_its_start_before_its_first_chunk(store: SpyStore) -> None:
    """Events, long polls: the client sees the status and headers while the stream has nothing to say yet."""
    first_chunk = anyio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        await first_chunk.wait()
        yield b"data: 1\n\n"

    @cache(ttl="5m")
    async def events(request: Request) -> Response:
        return StreamingResponse(chunks(), media_type="text/plain")

    app = CacheMiddleware(Starlette(routes=[Route("/events", events)]), store=store)
    sent: list[Message] = []

    async def receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/events", "raw_path": b"/events", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    async with anyio.create_task_group() as tg:
        tg.start_soon(app, scope, receive, send)
        await eventually(lambda: _true(bool(sent)), what="the response start")
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
        first_chunk.set()
        await eventually(lambda: _true(any(not m.get("more_body", True) for m in sent[1:])),
                         what="the end of the stream")
        tg.cancel_scope.cancel()


def test_a_cluster_store_lets_uvloop_close_after_a_streamed_miss_was_cancelled(cluster_url: str,
                                                                                  budgets: Budgets) -> None:
    """The suite once hung after the test above on uvloop, whose ``close()`` waits for every socket
    still open. The cancelled request cut short redis-py's first CLUSTER SLOTS, and its clean-up
    too (anyio cancels every await in a cancelled scope): the client then had an open connection
    and no topology, and its ``aclose`` closed nothing. The store's close must close it anyway."""
    import uvloop

    async def cancelled_then_closed() -> None:
        store = SpyStore(RedisStore.from_url(cluster_url, timeout=budgets.store_timeout), keeps_budget=True)
        try:
            await test_a_streamed_miss_sends_its_start_before_its_first_chunk(store)
        finally:
            await store.aclose()

    failures: list[BaseException] = []
    closed = threading.Event()

    def run() -> None:
        loop = uvloop.new_event_loop()
        try:
            loop.run_until_complete(cancelled_then_closed())
        except BaseException as exc:  # reported by the test's thread below
            failures.append(exc)
        finally:
            loop.close()
            closed.set()

    threading.Thread(target=run, daemon=True, name="a uvloop of its own").start()
    assert closed.wait(budgets.condition), "uvloop's close() did not return: the store left a socket open"
    assert not failures, failures


async def _true(value: bool) -> bool:
    return value


async def test_a_scope_without_headers_is_answered_by_the_app(store: SpyStore) -> None:
    """ASGI servers always send headers; hand-made scopes (test suites) may not: no KeyError of ours."""
    class Raw:
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await Response(b"raw")(scope, receive, send)

    app = CacheMiddleware(Starlette(routes=[Route("/raw", cache(ttl="5m")(Raw()))]), store=store)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/raw", "root_path": "", "query_string": b"",
             "scheme": "http", "server": ("testserver", 80)}
    await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200


@pytest.mark.parametrize("http_version", ["2", "3"])
async def test_an_http2_get_with_an_unannounced_body_is_not_answered_from_the_cache(
        store: SpyStore, http_version: str) -> None:
    """HTTP/2 frames a body without Content-Length: the body, not the headers, says there is one."""
    @cache(ttl="5m")
    async def echo(request: Request) -> Response:
        return Response(b"body was " + await request.body())

    app = CacheMiddleware(Starlette(routes=[Route("/echo", echo)]), store=store)

    async def get(body: bytes) -> tuple[int, bytes, dict[bytes, bytes]]:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "http_version": http_version, "method": "GET", "scheme": "https",
                 "path": "/echo", "root_path": "", "query_string": b"", "headers": [(b"host", b"shop.example")],
                 "server": ("shop.example", 443)}
        await app(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), dict(sent[0]["headers"])

    assert (await get(b""))[1] == b"body was "
    assert (await get(b""))[2][b"x-cache"] == b"HIT"
    status, body, headers = await get(b"12345")
    assert (status, body, headers[b"x-cache"]) == (200, b"body was 12345", b"BYPASS")


async def test_a_lowercase_post_that_runs_the_write_still_purges(store: SpyStore) -> None:
    """A WSGI app behind a route (Werkzeug) or Django reads ``"post"`` as POST: a write all the same.
    httpx sends every method in capitals: the request is made by hand, as uvicorn's h11 passes it on."""
    versions = collections.Counter[str]()

    class Legacy:
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["method"].upper() == "POST":
                versions["v"] += 1
            await JSONResponse({"version": versions["v"]})(scope, receive, send)

    app = Starlette(routes=[Route("/legacy", cache(ttl="5m", invalidates=["/legacy"])(Legacy()))])
    app.add_middleware(CacheMiddleware, store=store)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async with client(app) as http:
        assert (await http.get("/legacy")).json() == {"version": 0}
        await app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "post",
                   "scheme": "http", "path": "/legacy", "raw_path": b"/legacy", "root_path": "", "query_string": b"",
                   "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 1), "server": ("testserver", 80)},
                  receive, send)
        after = await http.get("/legacy")
    assert sent[0]["status"] == 200 and versions["v"] == 1
    assert after.json() == {"version": 1}  # not the entry filled before the write
