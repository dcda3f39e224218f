"""The rule table: @cache, file rules, and a matcher that picks the route Starlette's router picks."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Match, Mount, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from cachemw.asgi.routes import build_rule_table
from cachemw.core.policy import PRESETS, ConfigError, Policy
from cachemw.core.rules import RouteRule, RuleTable, cache
from cachemw.core.settings import Settings, load_settings


def settings_from(directory: Path, rules: str, *, extra: str = "") -> Settings:
    path = directory / "cachemw.toml"
    path.write_text("[cachemw]\n" + extra + "\n" + rules, encoding="utf-8")
    return load_settings(path, environ={})


def rule_for(table: RuleTable, template: str) -> RouteRule:
    found = [rule for rule in table.rules if rule.template == template]
    assert len(found) == 1, [rule.template for rule in table.rules]
    return found[0]


def handler(name: str) -> Any:
    """A fresh endpoint function per route, so a decorator on one never touches another."""

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse(name)

    endpoint.__name__ = endpoint.__qualname__ = name
    return endpoint


# -- @cache -----------------------------------------------------------------------------------


def test_cache_returns_the_same_function_with_its_signature() -> None:
    async def item(item_id: int, q: str | None = None) -> dict[str, int]:
        return {"id": item_id}

    before = inspect.signature(item)
    decorated = cache(ttl="5m", tags=["item:{item_id}"])(item)
    assert decorated is item
    assert inspect.signature(decorated) == before
    assert not hasattr(decorated, "__wrapped__")


def test_fastapi_still_validates_path_params_of_a_cached_endpoint() -> None:
    app = FastAPI()

    @app.get("/items/{item_id}")
    @cache(ttl="5m")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    [route] = [r for r in app.routes if isinstance(r, APIRoute)]
    assert route.endpoint is item
    assert inspect.signature(route.endpoint).parameters["item_id"].annotation in (int, "int")
    [param] = route.dependant.path_params
    assert param.name == "item_id"
    assert param.field_info.annotation is int
    assert param.validate("42", {}, loc=("path", "item_id")) == (42, [])
    _, errors = param.validate("abc", {}, loc=("path", "item_id"))
    assert errors and errors[0]["type"] == "int_parsing"

    table = build_rule_table(app.routes, Settings())
    assert rule_for(table, "/items/{item_id}").policy == Policy(ttl=300.0)


@pytest.mark.parametrize("order", ["cache above route", "cache below route"])
def test_decorator_order_does_not_matter_in_fastapi(order: str) -> None:
    app = FastAPI()

    async def listing() -> list[int]:
        return []

    if order == "cache above route":
        cache(ttl="1m")(app.get("/list")(listing))
    else:
        app.get("/list")(cache(ttl="1m")(listing))
    match = build_rule_table(app.routes, Settings()).match("/list", "GET")
    assert match is not None
    assert match.rule.policy is not None and match.rule.policy.ttl == 60
    assert match.rule.source == "decorator"


def test_bad_field_fails_at_decoration_naming_the_endpoint() -> None:
    async def product(request: Request) -> Response:
        return PlainTextResponse("")

    with pytest.raises(ConfigError) as info:
        cache(ttl="5 minutes")(product)
    message = str(info.value)
    assert f"@cache on {product.__module__}.{product.__qualname__}" in message
    assert "'ttl'" in message
    assert "'5 minutes'" in message
    assert not hasattr(product, "__cachemw__")


def test_unknown_field_fails_at_decoration() -> None:
    async def product(request: Request) -> Response:
        return PlainTextResponse("")

    with pytest.raises(ConfigError, match=r"@cache on .*product: unknown field 'tll'"):
        cache(tll="5m")(product)


def test_cache_without_parentheses_is_a_type_error_with_a_hint() -> None:
    async def product(request: Request) -> Response:
        return PlainTextResponse("")

    with pytest.raises(TypeError) as info:
        cache(product)  # type: ignore[arg-type]
    assert "@cache(" in str(info.value)
    assert "ttl=" in str(info.value)


def test_cache_on_a_bound_method_is_a_type_error_with_a_hint() -> None:
    class Views:
        async def product(self, request: Request) -> Response:
            return PlainTextResponse("")

    with pytest.raises(TypeError, match=r"@cache on .*Views.product: @cache goes on a function or class; wrap"):
        cache(ttl="5m")(Views().product)


def test_decorator_preset_with_overrides() -> None:
    endpoint = cache("minutes", ttl="30s")(handler("inbox"))
    table = build_rule_table([Route("/inbox", endpoint)], Settings())
    policy = rule_for(table, "/inbox").policy
    assert policy is not None
    assert policy.ttl == 30
    assert policy.stale_while_revalidate == PRESETS["minutes"].stale_while_revalidate
    assert policy.preset == "minutes"


def test_decorator_preset_comes_from_the_settings(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, "", extra='[cachemw.policies.catalogue]\nttl = "10m"\n')
    endpoint = cache("catalogue")(handler("catalogue"))
    policy = rule_for(build_rule_table([Route("/c", endpoint)], settings), "/c").policy
    assert policy is not None and policy.ttl == 600


def test_decorator_with_unknown_preset_fails_when_the_table_is_built() -> None:
    endpoint = cache("minuets")(handler("typo"))
    with pytest.raises(ConfigError) as info:
        build_rule_table([Route("/typo", endpoint)], Settings())
    message = str(info.value)
    assert "@cache on" in message
    assert "typo" in message
    assert "'policy'" in message
    assert "'minuets'" in message


def test_decorator_on_a_class_endpoint() -> None:
    @cache(ttl="1m")
    class Things(HTTPEndpoint):
        async def get(self, request: Request) -> Response:
            return PlainTextResponse("")

    table = build_rule_table([Route("/things", Things)], Settings())
    match = table.match("/things", "GET")
    assert match is not None and match.rule.name == "Things"


# -- precedence: decorator, then the first matching file rule, then the default ---------------


def test_decorator_wins_over_a_file_rule(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, '[[cachemw.rules]]\nroute = "/items/{id}"\nttl = "1h"\n')
    endpoint = cache(ttl="5m")(handler("item"))
    rule = rule_for(build_rule_table([Route("/items/{id}", endpoint)], settings), "/items/{id}")
    assert rule.source == "decorator"
    assert rule.policy is not None and rule.policy.ttl == 300


@pytest.mark.parametrize(
    ("template", "file_route"),
    [
        ("/items/{id}", "/items/{id}"),
        ("/items/{id:int}", "/items/{id}"),  # the rule need not repeat the convertor
        ("/items/{id}", "/items/{id:int}"),
        ("/items/{id:int}", "/items/{id:int}"),
        ("/stats/daily", "/stats/*"),
        ("/stats/{region}/weekly", "/stats/*"),
        ("/v2/stats", "/v?/stats"),
    ],
)
def test_file_rule_applies_to_a_matching_route(tmp_path: Path, template: str, file_route: str) -> None:
    settings = settings_from(tmp_path, f'[[cachemw.rules]]\nroute = "{file_route}"\nttl = "2m"\n')
    table = build_rule_table([Route(template, handler("r")), Route("/other", handler("other"))], settings)
    rule = rule_for(table, template)
    assert rule.policy is not None and rule.policy.ttl == 120
    assert rule.source == f"{tmp_path / 'cachemw.toml'} rule 1"
    other = rule_for(table, "/other")
    assert (other.policy, other.source) == (None, "default")


def test_first_matching_file_rule_wins(tmp_path: Path) -> None:
    settings = settings_from(
        tmp_path,
        '[[cachemw.rules]]\nroute = "/stats/daily"\nttl = 10\n\n'
        '[[cachemw.rules]]\nroute = "/stats/*"\nttl = 3600\n',
    )
    table = build_rule_table(
        [Route("/stats/daily", handler("d")), Route("/stats/weekly", handler("w"))], settings
    )
    daily, weekly = rule_for(table, "/stats/daily"), rule_for(table, "/stats/weekly")
    assert daily.policy is not None and daily.policy.ttl == 10
    assert daily.source.endswith("rule 1")
    assert weekly.policy is not None and weekly.policy.ttl == 3600
    assert weekly.source.endswith("rule 2")


def test_a_rule_outranked_by_an_earlier_one_is_not_an_error(tmp_path: Path) -> None:
    settings = settings_from(
        tmp_path,
        '[[cachemw.rules]]\nroute = "/stats/*"\nttl = 3600\n\n'
        '[[cachemw.rules]]\nroute = "/stats/daily"\nttl = 10\n',
    )
    table = build_rule_table([Route("/stats/daily", handler("d"))], settings)
    rule = rule_for(table, "/stats/daily")
    assert rule.policy is not None and rule.policy.ttl == 3600


def test_a_rule_for_a_decorated_route_is_not_an_error(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, '[[cachemw.rules]]\nroute = "/d"\nttl = 1\n')
    table = build_rule_table([Route("/d", cache(ttl=5)(handler("d")))], settings)
    assert rule_for(table, "/d").source == "decorator"


@pytest.mark.parametrize(
    "file_route",
    [
        "/nowhere",
        "/items/{item_id}",  # another parameter name is another template: nothing is guessed
        "/items",
        "/stats/*",
        "/items/{id}/",
    ],
)
def test_file_rule_matching_no_route_is_a_startup_error(tmp_path: Path, file_route: str) -> None:
    settings = settings_from(
        tmp_path,
        '[[cachemw.rules]]\nroute = "/items/{id}"\nttl = 1\n\n'
        f'[[cachemw.rules]]\nroute = "{file_route}"\nttl = 1\n',
    )
    with pytest.raises(ConfigError) as info:
        build_rule_table([Route("/items/{id:int}", handler("item"))], settings)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'cachemw.toml'}: rule 2 ")
    assert repr(file_route) in message
    assert "'route'" in message
    assert "/items/{id:int}" in message  # the app's routes are listed


def test_unmatched_rule_error_keeps_a_file_name_that_contains_rule(tmp_path: Path) -> None:
    directory = tmp_path / "shop rules"
    directory.mkdir()
    settings = settings_from(directory, '[[cachemw.rules]]\nroute = "/gone"\nttl = 1\n')
    with pytest.raises(ConfigError) as info:
        build_rule_table([Route("/here", handler("here"))], settings)
    assert str(info.value).startswith(f"{directory / 'cachemw.toml'}: rule 1 (route '/gone')")


def test_no_rules_and_no_decorators_caches_nothing() -> None:
    table = build_rule_table([Route("/a", handler("a")), Route("/b/{x}", handler("b"))], Settings())
    assert not table.has_policies
    assert all(rule.policy is None and rule.source == "default" for rule in table.rules)
    assert table.match("/a", "GET") is None


# -- mounts and sub-apps ----------------------------------------------------------------------


def test_nested_mounts_give_the_full_template(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, '[[cachemw.rules]]\nroute = "/api/v1/items/{id}"\nttl = 60\n')
    app = Starlette(
        routes=[Mount("/api", routes=[Mount("/v1/", routes=[Route("/items/{id}", handler("item"))])])]
    )
    table = build_rule_table(app.routes, settings)
    assert [rule.template for rule in table.rules] == ["/api/v1/items/{id}"]
    match = table.match("/api/v1/items/42", "GET")
    assert match is not None
    assert match.rule.template == "/api/v1/items/{id}"
    assert match.path_params == {"id": "42"}
    assert table.match("/items/42", "GET") is None
    assert table.match("/api/items/42", "GET") is None


def test_fastapi_sub_app_mounted_under_starlette() -> None:
    api = FastAPI()

    @api.get("/products/{pid}")
    @cache(ttl="1m", tags=["product:{pid}"])
    async def product(pid: int) -> dict[str, int]:
        return {"id": pid}

    app = Starlette(routes=[Mount("/shop", app=api)])
    table = build_rule_table(app.routes, Settings())
    assert "/shop/docs" in [rule.template for rule in table.rules]
    match = table.match("/shop/products/5", "GET")
    assert match is not None
    assert match.rule.template == "/shop/products/{pid}"
    assert match.rule.name == "product"
    assert match.path_params == {"pid": "5"}
    # FastAPI routes do not add HEAD: the router answers 405, so there is nothing to serve.
    assert table.match("/shop/products/5", "HEAD") is None
    assert table.match("/shop/docs", "GET") is None


def test_fastapi_included_routers_are_in_the_table(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, '[[cachemw.rules]]\nroute = "/api/reports/*"\npolicy = "hours"\n')
    app = FastAPI()
    items = APIRouter()
    reports = APIRouter()

    @items.get("/{item_id}")
    @cache("minutes")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @reports.get("/daily")
    async def daily() -> dict[str, int]:
        return {}

    items.include_router(reports, prefix="/reports")
    app.include_router(items, prefix="/api")

    @app.get("/api/late")
    @cache(ttl=1)
    async def late() -> dict[str, int]:
        return {}

    table = build_rule_table(app.routes, settings)
    templates = [rule.template for rule in table.rules]
    assert (
        templates.index("/api/{item_id}")
        < templates.index("/api/reports/daily")
        < templates.index("/api/late")
    )

    match = table.match("/api/7", "GET")
    assert match is not None
    assert match.rule.policy == PRESETS["minutes"]
    assert match.path_params == {"item_id": "7"}

    match = table.match("/api/reports/daily", "GET")
    assert match is not None
    assert match.rule.policy == PRESETS["hours"]
    assert match.rule.source.endswith("rule 1")

    # "/api/{item_id}" comes first and matches "late" as an item id: the router picks it, so do we.
    match = table.match("/api/late", "GET")
    assert match is not None and match.rule.template == "/api/{item_id}"


def test_websocket_route_on_the_same_path_does_not_hide_the_http_route() -> None:
    app = FastAPI()

    @app.websocket("/live")
    async def live_socket(websocket: WebSocket) -> None:
        await websocket.close()

    @app.get("/live")
    @cache(ttl="5s")
    async def live() -> dict[str, int]:
        return {}

    table = build_rule_table(app.routes, Settings())
    match = table.match("/live", "GET")
    assert match is not None and match.rule.name == "live"
    assert [rule.name for rule in table.rules if rule.template == "/live"] == ["live"]


# -- matching, checked against Starlette's own routing ----------------------------------------


async def plain_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """A mounted app without routes (static files, say)."""


async def socket(websocket: WebSocket) -> None:
    await websocket.close()


@cache(ttl="1m")
class Thing(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        return PlainTextResponse("")


def cached(name: str, **fields: Any) -> Any:
    return cache(**(fields or {"ttl": "1m"}))(handler(name))


def make_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/", handler("home")),
            Route("/items/special", cached("special")),
            Route("/items/{id:int}", cached("item_by_id")),
            Route("/items/{slug}", cached("item_by_slug")),
            Route("/things", cached("create_thing", invalidates=["things"]), methods=["POST"]),
            Route("/things", cached("list_things")),
            Route("/thing", Thing),
            Mount(
                "/api",
                routes=[
                    Mount(
                        "/v1",
                        routes=[
                            Route("/items/{id:int}", cached("api_item")),
                            Route("/files/{rest:path}", cached("api_file")),
                        ],
                    ),
                    Route("/health", handler("health")),
                ],
            ),
            Route("/api/v1/shadowed", cached("shadowed")),  # the /api mount is final: never reached
            Mount("/tenants/{tenant}", routes=[Route("/orders/{oid:int}", cached("tenant_order"))]),
            Route("/prices/{amount:float}", cached("price")),
            Route("/ids/{u:uuid}", cached("by_uuid")),
            WebSocketRoute("/live", socket),
            Route("/live", cached("live")),
            Mount("/static", app=plain_asgi),
            Route("/static/late", cached("static_late")),  # the /static mount is final
            Mount("", routes=[Route("/fallback", cached("fallback"))]),  # takes every path left
        ]
    )


def starlette_pick(routes: Sequence[BaseRoute], scope: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """The endpoint and path params Starlette's router would run (None for 404 and 405)."""
    for route in routes:
        match, child_scope = route.matches(scope)
        if match is Match.FULL:
            scope = {**scope, **child_scope}
            if isinstance(route, Mount):
                return starlette_pick(route.routes, scope)
            return child_scope["endpoint"], scope["path_params"]
    return None


SAMPLE_PATHS = [
    "/",
    "/items/special",
    "/items/7",
    "/items/007",
    "/items/-1",
    "/items/abc",
    "/items/",
    "/items/7/extra",
    "/things",
    "/thing",
    "/api",
    "/api/",
    "/api/health",
    "/api/v1/items/3",
    "/api/v1/items/x",
    "/api/v1/files/a/b.txt",
    "/api/v1/files/",
    "/api/v1/shadowed",
    "/tenants/acme/orders/0042",
    "/tenants/acme/orders/x",
    "/tenants//orders/1",
    "/prices/1.50",
    "/prices/2",
    "/ids/" + str(uuid.UUID(int=0xABCDEF)).upper(),
    "/ids/not-a-uuid",
    "/live",
    "/static/late",
    "/fallback",
    "/nowhere",
]


@pytest.fixture(scope="module")
def app_and_table() -> tuple[Starlette, RuleTable]:
    app = make_app()
    return app, build_rule_table(app.routes, Settings())


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "DELETE"])
@pytest.mark.parametrize("path", SAMPLE_PATHS)
def test_match_agrees_with_starlettes_router(
    app_and_table: tuple[Starlette, RuleTable], path: str, method: str
) -> None:
    app, table = app_and_table
    picked = starlette_pick(app.routes, {"type": "http", "path": path, "root_path": "", "method": method})
    ours = table.match(path, method)
    if picked is None or not hasattr(picked[0], "__cachemw__"):
        assert ours is None
        return
    endpoint, params = picked
    assert ours is not None
    assert ours.rule.name == endpoint.__name__
    assert ours.path_params == {key: str(value) for key, value in params.items()}


@pytest.mark.parametrize(
    ("path", "method", "name"),
    [
        ("/items/special", "GET", "special"),  # first full match wins over the {slug} route after it
        ("/items/7", "GET", "item_by_id"),
        ("/items/abc", "GET", "item_by_slug"),
        ("/things", "GET", "list_things"),  # the POST-only route before it is skipped
        ("/things", "POST", "create_thing"),
        ("/thing", "POST", "Thing"),  # an endpoint class takes every method
        ("/items/7", "HEAD", "item_by_id"),  # Starlette adds HEAD to GET routes
        ("/api/v1/files/a/b.txt", "GET", "api_file"),
        ("/live", "GET", "live"),
    ],
)
def test_match_picks_the_routers_route(
    app_and_table: tuple[Starlette, RuleTable], path: str, method: str, name: str
) -> None:
    match = app_and_table[1].match(path, method)
    assert match is not None
    assert match.rule.name == name


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/", "GET"),  # a route without policy
        ("/api/health", "GET"),
        ("/things", "DELETE"),  # no route allows it: 405
        ("/items/7", "POST"),
        ("/api/v1/shadowed", "GET"),  # the /api mount answers 404 itself
        ("/static/late", "GET"),
        ("/nowhere", "GET"),
    ],
)
def test_match_finds_nothing_where_no_cached_route_runs(
    app_and_table: tuple[Starlette, RuleTable], path: str, method: str
) -> None:
    assert app_and_table[1].match(path, method) is None


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/items/007", {"id": "7"}),
        ("/tenants/acme/orders/0042", {"tenant": "acme", "oid": "42"}),
        ("/api/v1/files/a/b.txt", {"rest": "a/b.txt"}),
        ("/prices/1.50", {"amount": "1.5"}),
        ("/ids/" + str(uuid.UUID(int=0xABCDEF)).upper(), {"u": str(uuid.UUID(int=0xABCDEF))}),
        ("/items/special", {}),
    ],
)
def test_path_params_are_converted_and_include_mount_params(
    app_and_table: tuple[Starlette, RuleTable], path: str, params: dict[str, str]
) -> None:
    match = app_and_table[1].match(path, "GET")
    assert match is not None
    assert match.path_params == params


def test_route_rules_keep_router_order_methods_and_names(app_and_table: tuple[Starlette, RuleTable]) -> None:
    table = app_and_table[1]
    assert [rule.template for rule in table.rules][:4] == [
        "/",
        "/items/special",
        "/items/{id:int}",
        "/items/{slug}",
    ]
    assert "/live" in [rule.template for rule in table.rules]
    assert [rule.name for rule in table.rules].count("live") == 1  # the websocket route is not listed
    things = [rule for rule in table.rules if rule.template == "/things"]
    assert [rule.methods for rule in things] == [frozenset({"POST"}), frozenset({"GET", "HEAD"})]
    assert rule_for(table, "/thing").methods is None
    assert rule_for(table, "/api/v1/items/{id:int}").name == "api_item"


def test_labels_have_no_braces(app_and_table: tuple[Starlette, RuleTable]) -> None:
    # Braces in a Redis key make a Cluster hash tag; the label sits inside keys.
    for rule in app_and_table[1].rules:
        assert "{" not in rule.label and "}" not in rule.label
    assert (
        rule_for(app_and_table[1], "/tenants/{tenant}/orders/{oid:int}").label
        == "/tenants/<tenant>/orders/<oid>"
    )


def test_long_labels_are_bounded() -> None:
    template = "/" + "/".join(f"{{p{i}}}" for i in range(100))
    table = build_rule_table([Route(template, cached("long"))], Settings())
    label = rule_for(table, template).label
    assert len(label) <= 200
    assert "{" not in label and "}" not in label
