"""Minimal reproductions of what the third-party suites found (see bench/results/thirdparty.md).

``python bench/thirdparty/repros.py [name ...]``: each prints ``REPRODUCED`` with what it saw, or
``ok`` once the defect is fixed. Every one builds its app and client the way the failing
third-party test does, with nothing but Starlette or FastAPI and ``CacheMiddleware``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cachemw import CacheMiddleware, Settings
from cachemw.core.settings import settings_from_table

REPROS: dict[str, Callable[[], str | None]] = {}


def repro(function: Callable[[], str | None]) -> Callable[[], str | None]:
    REPROS[function.__name__] = function
    return function


def catch_all(ttl: str = "2s") -> Settings:
    return settings_from_table({"rules": [{"route": "/*", "ttl": ttl}]}, source="repro", where="repro")


def server_as_tuple(app: Any) -> Any:
    """The app with TestClient's list scope["server"] made a tuple: keeps #14 item 6 out of the way."""

    async def shim(scope: Any, receive: Any, send: Any) -> None:
        if isinstance(scope.get("server"), list):
            scope["server"] = tuple(scope["server"])
        await app(scope, receive, send)

    return shim


@repro
def lifespan_exception_group() -> str | None:
    """#14 item 11: with no policy, an exception of the app's lifespan comes out as an ExceptionGroup."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        raise RuntimeError("Startup error")
        yield

    app = Starlette(lifespan=lifespan)
    app.add_middleware(CacheMiddleware)
    try:
        with TestClient(app):
            pass
    except RuntimeError:
        return None
    except BaseException as exc:
        return f"with TestClient(app) raised {type(exc).__name__}: {exc!r}, not the RuntimeError"
    return "no exception at all"


@repro
def testclient_server_list() -> str | None:
    """#14 item 6: TestClient's scope["server"] is a list; a cached GET raises TypeError (unhashable)."""

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(CacheMiddleware, settings=catch_all())
    try:
        response = TestClient(app).get("/")
    except TypeError as exc:
        return f"GET / raised TypeError: {exc}"
    return None if response.status_code == 200 else f"GET / answered {response.status_code}"


@repro
def streaming_start_held() -> str | None:
    """New: on a cached route, the response start is held until the first body chunk.

    A StreamingResponse whose first chunk waits (server-sent events, a long poll, here an event
    the client sets once it has the headers) shows the client nothing: no status, no headers.
    """
    import threading

    import anyio
    from starlette.responses import StreamingResponse

    release = threading.Event()
    released_in_time: list[bool] = []

    async def stream() -> Any:
        released_in_time.append(await anyio.to_thread.run_sync(release.wait, 2))
        yield b"hello"

    async def homepage(request: Any) -> StreamingResponse:
        return StreamingResponse(stream())

    app = Starlette(routes=[Route("/", homepage)])
    app.add_middleware(CacheMiddleware, settings=catch_all())
    client = TestClient(server_as_tuple(app))
    with client.stream("GET", "/") as response:
        release.set()
        response.read()
    if released_in_time == [True]:
        return None
    return "the response headers reached the client only after the first body chunk (2 s later)"


@repro
def scope_without_headers() -> str | None:
    """New (minor): a cached route raises KeyError on an http scope without "headers".

    ASGI lists ``headers`` without a default; servers always send it, Starlette's own tests
    do not (their hand-made scopes); the app below never reads headers and answers fine alone.
    """
    import anyio

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(CacheMiddleware, settings=catch_all())
    messages: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        messages.append(message)

    async def call() -> None:
        await app({"type": "http", "version": "3", "method": "GET", "path": "/"}, receive, send)

    try:
        anyio.run(call)
    except KeyError as exc:
        return f"KeyError {exc} from the middleware"
    return None


@repro
def collapsed_wait_for_background_task() -> str | None:
    """New (latency): a request collapsed onto another's fill waits for that response's BackgroundTask too.

    The leader's flight finishes when ``self.app(...)`` returns (cachemw/middleware.py ``_miss``,
    ``flight.finish`` after ``_forward``), and Starlette runs a response's background task inside
    that call, after the last body message. Past ``lock_timeout`` the waiters call the app themselves.
    """
    import time

    import anyio
    from starlette.background import BackgroundTask

    async def slow_task() -> None:
        await anyio.sleep(1.0)

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi", background=BackgroundTask(slow_task))

    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(CacheMiddleware, settings=catch_all())
    done: list[float] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.append(time.monotonic() - began)

    scope = {"type": "http", "version": "1.1", "method": "GET", "path": "/", "headers": [(b"host", b"t")],
             "query_string": b"", "server": ("t", 80), "scheme": "http", "root_path": ""}
    began = time.monotonic()

    async def both() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(app, dict(scope), receive, send)
            group.start_soon(app, dict(scope), receive, send)

    anyio.run(both)
    if max(done) < 0.5:
        return None
    return (f"both responses complete at {', '.join(f'{t:.2f}' for t in sorted(done))} s: the collapsed one "
            "waited for the first one's 1 s background task")


@repro
def fastapi_api_key_replayed() -> str | None:
    """#14 item 8: under a shared catch-all rule, a FastAPI APIKeyHeader route's 200 is replayed to anyone."""
    from fastapi import Depends, FastAPI, Security
    from fastapi.security import APIKeyHeader

    api_key = APIKeyHeader(name="key")
    app = FastAPI()

    def current_user(key: str = Security(api_key)) -> dict[str, str]:
        return {"username": key}

    @app.get("/users/me")
    def me(user: dict[str, str] = Depends(current_user)) -> dict[str, str]:  # noqa: B008 (FastAPI style)
        return user

    app.add_middleware(CacheMiddleware, settings=catch_all())
    client = TestClient(app)
    first = client.get("/users/me", headers={"key": "secret"})
    second = client.get("/users/me")  # no key: FastAPI answers 401
    third = client.get("/users/me", headers={"key": "other"})
    leaks = [f"{label} got {r.status_code} {r.text} ({r.headers.get('x-cache')})"
             for label, r in (("no key", second), ("key 'other'", third)) if r.text == first.text]
    return "; ".join(leaks) or None


@repro
def head_own_handler() -> str | None:
    """#14 item 10: with @app.head routed to its own handler, HEAD is answered from the GET entry."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/items/{item_id}")
    def get_item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    @app.head("/items/{item_id}")
    def head_item(item_id: str) -> JSONResponse:  # as FastAPI's tests/test_extra_routes.py
        return JSONResponse(None, headers={"x-fastapi-item-id": item_id})

    app.add_middleware(CacheMiddleware, settings=catch_all())
    client = TestClient(app)
    client.get("/items/foo")
    head = client.head("/items/foo")
    if head.headers.get("x-fastapi-item-id") == "foo":
        return None
    return f"HEAD /items/foo answered without the HEAD handler's header ({head.headers.get('x-cache')})"


@repro
def custom_matches_404_cached() -> str | None:
    """#14 item 1: a route whose matches() Starlette calls but cachemw cannot reproduce; its 404 is cached."""
    from fastapi import APIRouter, FastAPI
    from fastapi.routing import APIRoute
    from starlette.routing import Match

    class HeaderRoute(APIRoute):
        def matches(self, scope: Any) -> Any:
            if dict(scope.get("headers", [])).get(b"x-match") != b"yes":
                return Match.NONE, {}
            return super().matches(scope)

    router = APIRouter(route_class=HeaderRoute)

    @router.get("/items")
    def read_items() -> list[int]:
        return [1]

    app = FastAPI()
    app.include_router(router, prefix="/api")
    app.add_middleware(CacheMiddleware, settings=catch_all())
    client = TestClient(app)
    first = client.get("/api/items")
    second = client.get("/api/items", headers={"x-match": "yes"})
    if second.status_code == 200:
        return None
    return (f"GET /api/items without x-match: {first.status_code} {first.headers.get('x-cache')}; with x-match: "
            f"{second.status_code} {second.headers.get('x-cache')} (the 404 replayed)")


@repro
def custom_router_matches_404_cached() -> str | None:
    """#14 item 1, the case left: an included APIRouter subclass with its own matches() (FastAPI asks it too)."""
    from fastapi import APIRouter, FastAPI
    from starlette.routing import Match

    class HeaderRouter(APIRouter):
        def matches(self, scope: Any) -> Any:
            if dict(scope.get("headers", [])).get(b"x-router-match") != b"yes":
                return Match.NONE, {}
            return super().matches(scope)

    router = HeaderRouter()

    @router.get("/items")
    def read_items() -> list[int]:
        return [1]

    app = FastAPI()
    app.include_router(router, prefix="/api")
    app.add_middleware(CacheMiddleware, settings=catch_all())
    client = TestClient(app)
    first = client.get("/api/items")
    second = client.get("/api/items", headers={"x-router-match": "yes"})
    if second.status_code == 200:
        return None
    return (f"GET /api/items without x-router-match: {first.status_code} {first.headers.get('x-cache')}; with it: "
            f"{second.status_code} {second.headers.get('x-cache')} (the 404 replayed)")


@repro
def get_body_without_length() -> str | None:
    """New (minor): a GET whose body has no Content-Length nor Transfer-Encoding is answered from cache.

    Over HTTP/2 a request body needs neither; cachemw's ``http.has_body`` looks at headers only
    (cachemw/http.py ``has_body``), so an entry filled from one body answers a request with another.
    """
    import anyio
    import httpx
    from starlette.requests import Request

    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(await request.body())

    app = Starlette(routes=[Route("/", echo)])
    app.add_middleware(CacheMiddleware, settings=catch_all())

    class Body(httpx.AsyncByteStream):
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def __aiter__(self) -> Any:
            yield self.data

    async def two() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return [await client.send(httpx.Request("GET", "http://t/", stream=Body(data))) for data in (b"a", b"b")]

    _first, second = anyio.run(two)
    if second.text == "b":
        return None
    return f"GET / with body b'b' answered {second.text!r} ({second.headers.get('x-cache')}), the body of the first"


@repro
def fastapi_imported_in_the_loop() -> str | None:
    """New: the first request of a plain Starlette app imports FastAPI (and pydantic) inside the event loop.

    cachemw/rules.py ``_known_matchers`` imports fastapi at every rule-table build; Starlette's own suite
    runs blockbuster, which turns those file reads into BlockingError. Run in a fresh interpreter.
    """
    import subprocess

    code = (
        "import sys, time\n"
        "from starlette.applications import Starlette\n"
        "from starlette.responses import PlainTextResponse\n"
        "from starlette.routing import Route\n"
        "from starlette.testclient import TestClient\n"
        "from cachemw import CacheMiddleware\n"
        "app = Starlette(routes=[Route('/', lambda r: PlainTextResponse('hi'))])\n"
        "app.add_middleware(CacheMiddleware)\n"
        "before = 'fastapi' in sys.modules\n"
        "t = time.perf_counter(); TestClient(app).get('/'); took = time.perf_counter() - t\n"
        "print(before, 'fastapi' in sys.modules, round(took * 1000))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after, took_ms = out[0] == "True", out[1] == "True", out[2]
    if before or not after:
        return None
    return f"fastapi was imported by the first request (inside the event loop); that request took {took_ms} ms"


def main(names: list[str]) -> int:
    chosen = names or list(REPROS)
    reproduced = 0
    for name in chosen:
        outcome = REPROS[name]()
        reproduced += outcome is not None
        print(f"{name}: " + ("ok" if outcome is None else f"REPRODUCED: {outcome}"))
    return 1 if reproduced else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
