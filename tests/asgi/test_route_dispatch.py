"""The rule table picks exactly the route Starlette's router runs, or gives no policy (#14 items 1 and 10).

Routes the table cannot model (``Host``, custom routes, a ``matches()`` of their own)
make every request that may reach them pass through uncached, and are named in
``table.warnings``. A property test runs generated route trees through Starlette's
own router and compares.
"""

from __future__ import annotations

import collections
import itertools
import re
import subprocess
import sys
import uuid
from typing import Any

import anyio
import fastapi.routing
import pytest
from fastapi import APIRouter, FastAPI
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Host, Match, Mount, Route, Router, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from cachemw import CacheMiddleware, MemoryStore, cache
from cachemw.asgi.routes import build_rule_table, routes_behind
from cachemw.core import rules
from cachemw.core.rules import RuleTable
from cachemw.core.settings import Settings
from tests.asgi.test_rules import handler
from tests.helpers import client, find_middleware

# FastAPI's included routers are asked whether they take a request (matches) and handle it
# (handle); older versions copy their routes into the including router instead.
ROUTERS_ASKED = hasattr(fastapi.routing, "_IncludedRouter")


# -- the reproduction, over HTTP through the middleware ----------------------------------


def host_app(calls: collections.Counter[str]) -> Starlette:
    async def api(request: Request) -> Response:
        # No policy: answers per API key.
        calls["api"] += 1
        return PlainTextResponse(f"secret of {request.headers.get('x-api-key')}")

    @cache(ttl="5m")
    async def cached_catch_all(request: Request) -> Response:
        calls["catch_all"] += 1
        return PlainTextResponse(f"page {request.path_params['p']}")

    app = Starlette(routes=[
        Mount("/h", routes=[
            Host("api.test", app=Router([Route("/secret", api)])),
            Route("/{p:path}", cached_catch_all),
        ]),
    ])
    app.add_middleware(CacheMiddleware, store=MemoryStore())
    return app


@pytest.mark.anyio
async def test_a_host_route_is_never_answered_from_a_later_routes_entry() -> None:
    calls: collections.Counter[str] = collections.Counter()
    async with client(host_app(calls)) as http:
        first = await http.get("/h/secret", headers={"host": "api.test", "x-api-key": "key-a"})
        second = await http.get("/h/secret", headers={"host": "api.test", "x-api-key": "key-b"})
    assert first.text == "secret of key-a"
    assert second.text == "secret of key-b"  # not user A's body
    assert second.headers.get("x-cache") != "HIT"
    assert calls == {"api": 2}


@pytest.mark.anyio
async def test_requests_that_may_reach_a_host_route_pass_through() -> None:
    # Another host's request goes to the catch-all, but the table cannot tell it from api.test's:
    # no policy, so the app answers every time.
    calls: collections.Counter[str] = collections.Counter()
    async with client(host_app(calls)) as http:
        for _ in range(2):
            response = await http.get("/h/secret", headers={"host": "www.test"})
            assert response.text == "page secret"
            assert "x-cache" not in response.headers
    assert calls == {"catch_all": 2}


def test_a_host_route_is_named_in_the_tables_warnings() -> None:
    app = host_app(collections.Counter())
    table = build_rule_table(app.routes, Settings())
    [warning] = table.warnings
    assert "Host('api.test') under /h" in warning
    assert "never cached" in warning
    assert "/h/{p:path}" in warning  # the cached route behind it
    assert table.match("/h/secret", "GET") is None
    assert table.route_for("/h/secret", "GET") is rules.UNKNOWN


async def endpoint(request: Request) -> Response:
    return PlainTextResponse("")


class PrefixRoute(BaseRoute):
    """A custom route: takes every path under a prefix."""

    def __init__(self, prefix: str, name: str) -> None:
        self.prefix = prefix
        self.name = name

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            return Match.FULL, {}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse(self.name, headers={"x-route": self.name})(scope, receive, send)


class PostOnlyOnWeekdaysRoute(Route):
    """A Route whose matches() is not Route's: the table cannot know what it decides."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.FULL and scope.get("query_string") == b"skip":
            return Match.NONE, {}
        return match, child


class Opaque:
    """A mounted app that has routes but is no Starlette router."""

    routes = (Route("/x", endpoint),)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("opaque")(scope, receive, send)


@pytest.mark.parametrize(
    ("unknown", "named"),
    [
        (PrefixRoute("/a", "prefix"), "PrefixRoute"),
        (PostOnlyOnWeekdaysRoute("/a/b", endpoint), "PostOnlyOnWeekdaysRoute('/a/b')"),
        (Host("{sub}.test", app=Router([])), "Host('{sub}.test')"),
        (Mount("/a", app=Opaque()), "Mount('/a')"),
    ],
)
def test_an_unmodellable_route_makes_what_may_reach_it_uncached(unknown: BaseRoute, named: str) -> None:
    before = Route("/first", cache(ttl="1m")(handler("first")))
    after = Route("/a/b", cache(ttl="1m")(handler("after")))
    table = build_rule_table([before, unknown, after], Settings())
    assert table.match("/first", "GET") is not None  # taken before the unknown route is tried
    assert table.match("/a/b", "GET") is None
    assert table.route_for("/a/b", "GET") is rules.UNKNOWN
    [warning] = table.warnings
    assert warning.startswith(named)
    assert "never cached" in warning


def test_a_websocket_route_never_takes_an_http_request() -> None:
    async def socket(websocket: WebSocket) -> None:
        await websocket.close()

    table = build_rule_table([WebSocketRoute("/a", socket), Route("/a", cache(ttl="1m")(handler("a")))],
                             Settings())
    assert table.warnings == ()
    match = table.match("/a", "GET")
    assert match is not None and match.rule.name == "a"


def test_a_root_path_the_path_does_not_start_with_is_matched_as_starlette_does() -> None:
    # Starlette then matches the whole path at every level (get_route_path returns it unchanged).
    routes = [Mount("/x", routes=[Route("/x/y", cache(ttl="1m")(handler("whole"))),
                                  Route("/y", cache(ttl="1m")(handler("stripped")))])]
    table = build_rule_table(routes, Settings())
    scope = http_scope("/x/y", "GET", "testserver", root_path="/api")
    match = table.match_scope(scope)
    assert match is not None and match.rule.name == ran(Router(routes), "/x/y", "GET", "t", "/api") == "whole"
    normal = table.match_scope({**scope, "path": "/api/x/y"})
    assert normal is not None and normal.rule.name == "stripped"


# -- the property: generated route trees against Starlette's router ----------------------------

_ids = itertools.count()
UUID = str(uuid.UUID(int=0x1234))
SEGMENTS = ["a", "b", "1", "007", "2.5", UUID, ""]
CONVERTORS = ["", ":str", ":int", ":float", ":uuid", ":path"]


def reporting(name: str, cached: bool) -> Any:
    async def run(request: Request) -> Response:
        return PlainTextResponse(name, headers={"x-route": name})

    run.__name__ = run.__qualname__ = name
    return cache(ttl="1m")(run) if cached else run


class Reporting:
    """An ASGI endpoint class: a Route without a method list takes every method."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse(self.name, headers={"x-route": self.name})(scope, receive, send)


@st.composite
def paths(draw: Any, *, params: bool) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 2))):
        if params and draw(st.booleans()):
            parts.append(f"{{p{next(_ids)}{draw(st.sampled_from(CONVERTORS))}}}")
        else:
            parts.append(draw(st.sampled_from(["a", "b", "1"])))
    return "/" + "/".join(parts)


@st.composite
def leaf(draw: Any) -> BaseRoute:
    name = f"r{next(_ids)}"
    kind = draw(st.sampled_from(["route"] * 12 + ["asgi", "asgi", "custom", "odd", "websocket"]))
    path = draw(paths(params=True))
    cached = draw(st.integers(0, 2)) > 0
    if kind == "asgi":
        target = Reporting(name)
        return Route(path, cache(ttl="1m")(target) if cached else target, name=name)
    if kind == "custom":
        return PrefixRoute(draw(st.sampled_from(["/a", "/b", "/"])), name)
    if kind == "odd":
        return PostOnlyOnWeekdaysRoute(path, reporting(name, cached), name=name)
    if kind == "websocket":
        async def socket(websocket: WebSocket) -> None:
            await websocket.close()

        return WebSocketRoute(path, socket, name=name)
    methods = draw(st.sampled_from([None, None, ["GET"], ["POST"], ["HEAD"], ["GET", "POST"], ["DELETE"]]))
    return Route(path, reporting(name, cached), methods=methods, name=name)


def trees(depth: int = 2) -> Any:
    if depth == 0:
        return st.lists(leaf(), min_size=1, max_size=4)
    inner = trees(depth - 1)
    node = st.one_of(
        leaf(),
        leaf(),
        leaf(),
        st.builds(lambda path, routes: Mount(path, routes=routes), paths(params=True), inner),
        st.builds(lambda path, routes: Mount(path, routes=routes), paths(params=True), inner),
        st.builds(lambda host, routes: Host(host, app=Router(routes)),
                  st.sampled_from(["api.test", "{sub}.test"]), inner),
    )
    return st.lists(node, min_size=1, max_size=4)


VALUES = {"str": ["a", "x-y", ""], "int": ["1", "007", "x"], "float": ["2.5", "3", "x"],
          "uuid": [UUID, UUID.upper(), "1"], "path": ["a/b", "", "1/"]}
PARAM = re.compile(r"{[^{}:]+(?::([^{}]+))?}")


def templates(routes: list[BaseRoute], prefix: str = "") -> list[str]:
    """Every path template in the tree, mounts' included, to aim requests at."""
    found = []
    for route in routes:
        path = getattr(route, "path", None)
        inner = getattr(route, "routes", None)
        if isinstance(route, Mount):
            found.append(prefix + route.path + "/")
            found.extend(templates(list(inner or []), prefix + route.path))
        elif isinstance(route, Host):
            found.extend(templates(list(inner or []), prefix))
        elif isinstance(path, str):
            found.append(prefix + path)
        elif isinstance(route, PrefixRoute):
            found.append(prefix + route.prefix)
    return found


@st.composite
def requests(draw: Any, routes: list[BaseRoute]) -> tuple[str, str, str]:
    aims = templates(routes)
    if aims and draw(st.integers(0, 4)):
        template = draw(st.sampled_from(aims))
        path = PARAM.sub(lambda m: draw(st.sampled_from(VALUES[m.group(1) or "str"])), template)
        path += draw(st.sampled_from(["", "", "", "/", "/a"]))
    else:
        path = "/" + "/".join(draw(st.lists(st.sampled_from(SEGMENTS), max_size=4)))
    method = draw(st.sampled_from(["GET", "GET", "HEAD", "HEAD", "POST", "DELETE", "PUT"]))
    host = draw(st.sampled_from(["api.test", "www.test", "API.test:8000", "other"]))
    return path, method, host


def http_scope(path: str, method: str, host: str, root_path: str = "") -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": root_path, "query_string": b"",
            "headers": [(b"host", host.encode())], "client": ("127.0.0.1", 1), "server": ("testserver", 80)}


def ran(app: Any, path: str, method: str, host: str, root_path: str = "") -> str | None:
    """The name of the route whose endpoint Starlette's router ran; None for a 404, 405 or redirect."""
    scope = http_scope(path, method, host, root_path)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    anyio.run(app, scope, receive, send)
    status = sent[0]["status"]
    if status != 200:
        assert status in (404, 405, 307), status
        return None
    # Every endpoint answers its route's name, in an x-route header (HEAD answers have no body);
    # Starlette 1.x also records the route it runs in the scope.
    body = b"".join(message.get("body", b"") for message in sent[1:]).decode()
    name = dict(sent[0].get("headers", [])).get(b"x-route", b"").decode() or getattr(scope.get("route"), "name", None)
    if name is None and method != "HEAD":
        name = body
    assert isinstance(name, str)
    if method != "HEAD":
        assert body == name
    return name


def table_name(table: RuleTable, path: str, method: str) -> Any:
    found = table.route_for(path, method)
    return found if found is None or found is rules.UNKNOWN else found.name  # type: ignore[union-attr]


def policy_of(routes: list[BaseRoute]) -> dict[str, bool]:
    """Every route's name and whether it has a policy, through mounts and hosts."""
    result: dict[str, bool] = {}
    for route in routes:
        inner = getattr(route, "routes", None)
        if inner is not None and isinstance(route, Mount | Host):
            result.update(policy_of(inner))
        elif isinstance(route, Route):
            result[route.name] = hasattr(route.endpoint, "__cachemw__")
        else:
            result[getattr(route, "name", "?")] = False
    return result


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routes=trees(), data=st.data())
def test_the_table_picks_the_route_starlettes_router_runs(routes: list[BaseRoute], data: st.DataObject) -> None:
    path, method, host = data.draw(requests(routes))
    router = Router(routes)
    table = build_rule_table(routes, Settings())
    dispatched = ran(router, path, method, host)
    ours = table_name(table, path, method)
    match = table.match(path, method)
    event("unknown: bypass" if ours is rules.UNKNOWN else "no route runs" if ours is None
          else "cached route" if match is not None else "route without a policy")
    if ours is rules.UNKNOWN:
        assert match is None  # an unmodellable route may take it: a safe bypass
    else:
        assert ours == dispatched
    if match is not None:
        # Never a policy for a request the router gives to another route, or to one without a policy.
        assert match.rule.name == dispatched
        assert policy_of(routes)[dispatched]
        if method == "HEAD":
            assert ran(router, path, "GET", host) == dispatched  # HEAD is answered from GET's entry


# -- HEAD: answered from GET's entry only where GET's route runs for it (#14 item 10) -----------


def head_and_get_app(order: str, calls: collections.Counter[str]) -> FastAPI:
    app = FastAPI()

    def add_get() -> None:
        @app.get("/doc")
        @cache(ttl="5m")
        async def doc_get() -> Response:
            calls["get"] += 1
            return PlainTextResponse("the document", headers={"x-handler": "get"})

    def add_head() -> None:
        @app.head("/doc")
        @cache(ttl="5m")
        async def doc_head() -> Response:
            calls["head"] += 1
            return Response(headers={"x-handler": "head", "x-size": "12"})

    for add in (add_get, add_head) if order == "get-first" else (add_head, add_get):
        add()
    app.add_middleware(CacheMiddleware, store=MemoryStore())
    return app


@pytest.mark.anyio
@pytest.mark.parametrize("order", ["get-first", "head-first"])
async def test_head_with_its_own_handler_is_not_answered_from_the_get_entry(order: str) -> None:
    calls: collections.Counter[str] = collections.Counter()
    async with client(head_and_get_app(order, calls)) as http:
        for _ in range(2):
            got = await http.get("/doc")
            assert got.text == "the document"
        assert got.headers["x-cache"] == "HIT"
        for _ in range(2):
            head = await http.head("/doc")
            assert head.headers["x-handler"] == "head"
            assert head.headers.get("x-cache") != "HIT"
    assert calls == {"get": 1, "head": 2}


def test_head_follows_get_where_one_route_serves_both() -> None:
    # Starlette adds HEAD to a GET route: HEAD is answered from GET's entries.
    shared = build_rule_table([Route("/x", cache(ttl="1m")(handler("x")))], Settings())
    head = shared.match("/x", "HEAD")
    assert head is not None and head.rule.name == "x"
    # A HEAD-only route before it runs for HEAD; GET goes on to the next route.
    split = build_rule_table([Route("/x", cache(ttl="1m")(handler("head")), methods=["HEAD"]),
                              Route("/x", cache(ttl="1m")(handler("x")))], Settings())
    assert split.match("/x", "HEAD") is None
    get = split.match("/x", "GET")
    assert get is not None and get.rule.name == "x"


# -- the same property on FastAPI apps: APIRoutes, included routers (nested, prefixed), mounts ---


def operation(name: str, cached: bool) -> Any:
    async def run(request: Request) -> Response:
        return PlainTextResponse(name, headers={"x-route": name})

    run.__name__ = run.__qualname__ = name
    return cache(ttl="1m")(run) if cached else run


@st.composite
def api_router(draw: Any, depth: int) -> tuple[APIRouter, list[str]]:
    """A router of operations and included routers; and the full templates it answers, to aim at."""
    router = APIRouter()
    aims: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        if depth and draw(st.integers(0, 3)) == 0:
            child, child_aims = draw(api_router(depth - 1))
            prefix = draw(st.sampled_from(["", "/a", "/b", f"/{{t{next(_ids)}}}"]))
            router.include_router(child, prefix=prefix)
            aims.extend(prefix + aim for aim in child_aims)
            continue
        name = f"op{next(_ids)}"
        path = draw(paths(params=True))
        methods = draw(st.sampled_from([["GET"], ["GET"], ["POST"], ["HEAD"], ["GET", "POST"], ["DELETE"]]))
        router.add_api_route(path, operation(name, draw(st.integers(0, 2)) > 0), methods=methods, name=name)
        aims.append(path)
    return router, aims


@st.composite
def fastapi_apps(draw: Any) -> tuple[FastAPI, list[str]]:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    router, aims = draw(api_router(2))
    app.include_router(router, prefix=draw(st.sampled_from(["", "/a"])))
    aims = [*aims, *("/a" + aim for aim in aims)]
    if draw(st.booleans()):
        name = f"mounted{next(_ids)}"
        inner = draw(paths(params=True))
        app.mount(draw(st.sampled_from(["/a", "/m"])), Router([Route(inner, operation(name, True), name=name)]))
        aims.extend(["/a" + inner, "/m" + inner])
    return app, aims


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(built=fastapi_apps(), data=st.data())
def test_the_table_picks_the_route_fastapis_router_runs(built: tuple[FastAPI, list[str]], data: st.DataObject) -> None:
    app, aims = built
    template = data.draw(st.sampled_from(aims))
    path = PARAM.sub(lambda m: data.draw(st.sampled_from(VALUES[m.group(1) or "str"])), template)
    path += data.draw(st.sampled_from(["", "", "/", "/a"]))
    method = data.draw(st.sampled_from(["GET", "GET", "HEAD", "POST", "DELETE"]))
    table = build_rule_table(app.routes, Settings())
    assert table.warnings == ()
    dispatched = ran(app, path, method, "testserver")
    ours = table_name(table, path, method)
    match = table.match(path, method)
    event("no route runs" if ours is None else "cached route" if match is not None else "route without a policy")
    assert ours == dispatched
    if match is not None:
        assert match.rule.name == dispatched
        if method == "HEAD":
            assert ran(app, path, "GET", "testserver") == dispatched


def _app_including(router: APIRouter) -> FastAPI:
    """A FastAPI app behind the middleware with ``router`` included at /api, serving a cached /api/items."""
    @router.get("/items")
    @cache(ttl="1m")
    def read_items() -> list[int]:
        return [1]

    app = FastAPI()
    app.include_router(router, prefix="/api")
    app.add_middleware(CacheMiddleware, store=MemoryStore())
    return app


@pytest.mark.skipif(not ROUTERS_ASKED, reason="FastAPI before included-router routes copies the router's routes "
                    "into the app: the router's class is never asked")
def test_an_included_router_with_its_own_matches_is_not_modelled() -> None:
    """FastAPI asks an included router as well as its routes: a router class that refuses requests
    by a header (or anything else) is not something the table can reproduce."""
    class HeaderRouter(APIRouter):
        def matches(self, scope: Any) -> Any:
            if dict(scope.get("headers", [])).get(b"x-router-match") != b"yes":
                return Match.NONE, {}
            return super().matches(scope)

    app = _app_including(HeaderRouter())
    http = TestClient(app)
    refused = http.get("/api/items")
    taken = http.get("/api/items", headers={"x-router-match": "yes"})
    assert refused.status_code == 404 and taken.status_code == 200 and taken.json() == [1]
    assert "x-cache" not in refused.headers and "x-cache" not in taken.headers
    table = build_rule_table(app.routes, Settings())
    assert any("HeaderRouter" in warning and "matches()" in warning for warning in table.warnings)


def test_a_plain_starlette_app_does_not_import_fastapi_at_its_first_request() -> None:
    """Importing FastAPI (and pydantic) inside the event loop reads files and stalls the first request."""
    code = (
        "import sys\n"
        "from starlette.applications import Starlette\n"
        "from starlette.responses import PlainTextResponse\n"
        "from starlette.routing import Route\n"
        "from starlette.testclient import TestClient\n"
        "from cachemw import CacheMiddleware, cache\n"
        "page = cache(ttl='1m')(lambda request: PlainTextResponse('hi'))\n"
        "app = Starlette(routes=[Route('/', page)])\n"
        "app.add_middleware(CacheMiddleware)\n"
        "assert TestClient(app).get('/').status_code == 200\n"
        "print('fastapi' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.skipif(not ROUTERS_ASKED, reason="FastAPI before included-router routes copies the router's routes "
                    "into the app: the router's class is never asked")
def test_an_included_router_with_its_own_handle_is_not_modelled() -> None:
    """FastAPI hands the request to the included router's handle(): one of its own may run anything."""
    class VersionedRouter(APIRouter):
        async def handle(self, scope: Any, receive: Any, send: Any) -> None:
            if dict(scope.get("headers", [])).get(b"x-version") == b"2":
                user = dict(scope["headers"]).get(b"x-user", b"?").decode()
                await PlainTextResponse(f"v2 for {user}")(scope, receive, send)
                return
            await super().handle(scope, receive, send)

    app = _app_including(VersionedRouter())
    http = TestClient(app)
    alice = http.get("/api/items", headers={"x-version": "2", "x-user": "alice"})
    bob = http.get("/api/items", headers={"x-version": "2", "x-user": "bob"})
    assert (alice.text, bob.text) == ("v2 for alice", "v2 for bob")
    assert "x-cache" not in bob.headers
    table = build_rule_table(app.routes, Settings())
    assert any("VersionedRouter" in warning and "handle()" in warning for warning in table.warnings)


def test_a_mounted_router_with_its_own_call_is_not_modelled() -> None:
    class Rewriting(Router):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await super().__call__({**scope, "path": scope["path"].lower()}, receive, send)

    table = build_rule_table([Mount("/m", app=Rewriting([Route("/a", cache(ttl="1m")(handler("a")))]))], Settings())
    assert table.route_for("/m/A", "GET") is rules.UNKNOWN
    assert table.match("/m/a", "GET") is None
    [warning] = table.warnings
    assert "Rewriting" in warning


# -- which routes: those of the router behind the middleware, not always scope["app"]'s ------------


class Passing:
    """A middleware that keeps the next app as ``.app``, as Starlette's do."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class Hiding:
    """A middleware that keeps the next app under another name: the chain cannot be followed."""

    def __init__(self, app: Any) -> None:
        self._next = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._next(scope, receive, send)


def test_the_routes_behind_a_middleware_that_wraps_a_mounted_app_are_that_apps() -> None:
    inner = Starlette(routes=[Route("/x", handler("inner"))])
    outer = Starlette(routes=[Route("/x", handler("outer"))])
    assert routes_behind(CacheMiddleware(inner), outer) == (inner.routes, "")
    assert routes_behind(CacheMiddleware(Passing(inner)), outer) == (inner.routes, "")
    plain = Router([Route("/y", handler("y"))])
    assert routes_behind(CacheMiddleware(plain), None) == (plain.routes, "")


def test_the_routes_behind_a_middleware_in_an_apps_stack_are_the_apps() -> None:
    for app in (Starlette(routes=[Route("/x", handler("x"))]), FastAPI()):
        app.add_middleware(Passing)
        app.add_middleware(CacheMiddleware, store=MemoryStore())
        app.middleware_stack = app.build_middleware_stack()
        middleware = find_middleware(app)
        assert routes_behind(middleware, app) == (app.routes, "")
        assert routes_behind(middleware, None) == (app.routes, "")  # followed down the stack


def test_where_the_chain_breaks_scope_app_counts_only_if_its_stack_leads_to_the_middleware() -> None:
    app = Starlette(routes=[Route("/x", handler("x"))])
    app.add_middleware(Hiding)
    app.add_middleware(CacheMiddleware, store=MemoryStore())
    app.middleware_stack = app.build_middleware_stack()
    assert routes_behind(find_middleware(app), app) == (app.routes, "")
    mounted = CacheMiddleware(Hiding(Starlette(routes=[Route("/x", handler("inner"))])))
    routes, why = routes_behind(mounted, app)  # app's stack never reaches this middleware
    assert routes is None and "Hiding" in why and "nothing is cached" in why


def cached_outer_plain_inner(calls: collections.Counter[str]) -> Starlette:
    @cache(ttl="5m")
    async def outer_page(request: Request) -> Response:
        calls["outer"] += 1
        return PlainTextResponse("outer")

    async def inner_page(request: Request) -> Response:  # no policy: answers per user
        calls["inner"] += 1
        return PlainTextResponse(f"inner for {request.headers.get('x-user')}")

    inner = Starlette(routes=[Route("/x", inner_page)])
    return Starlette(routes=[Route("/x", outer_page), Mount("/sub", app=CacheMiddleware(inner, store=MemoryStore()))])


def test_a_cache_middleware_wrapping_a_mounted_app_matches_that_apps_routes() -> None:
    calls: collections.Counter[str] = collections.Counter()
    http = TestClient(cached_outer_plain_inner(calls))
    alice = http.get("/sub/x", headers={"x-user": "alice"})
    bob = http.get("/sub/x", headers={"x-user": "bob"})
    assert alice.text == "inner for alice"
    assert bob.text == "inner for bob"  # not alice's answer, cached under the outer /x's policy
    assert "x-cache" not in bob.headers
