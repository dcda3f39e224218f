"""The rule table of a Starlette or FastAPI app: its routes compiled into the core's matcher.

The walk in ``cachemw.core.rules`` reproduces Starlette's router exactly for the
routes compiled here (Route, APIRoute, Mount, included routers, WebSocket routes).
A route it cannot reproduce (``Host``, a custom ``BaseRoute``, a ``matches()`` of
its own, a mounted router that dispatches its own way) becomes an unmodelled node:
requests that may reach it get no policy, and ``RuleTable.warnings`` says so.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Host, Mount, Route, Router, WebSocketRoute

from cachemw.core.policy import Policy
from cachemw.core.rules import (
    HEADER_TOKEN,
    MOUNT,
    ROUTE,
    UNMODELLED,
    RouteNode,
    RouteRule,
    RuleTable,
    check_rules_used,
    policy_for,
    route_label,
    rule_matches,
)
from cachemw.core.settings import Settings

__all__ = ["build_rule_table", "routes_behind"]


class _Build:
    """What compiling the routes collects: every route's rule, the file rules used, the warnings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.used: set[int] = set()
        self.rules: list[RouteRule] = []
        self.warnings: list[str] = []
        known = _known_matchers()
        self.matchers: dict[Any, str] = known[0]
        self.router_apps: frozenset[Any] = known[1]
        self.app_calls: frozenset[Any] = known[2]
        self.context_type: type | None = known[3]
        self.api_route: type | None = known[4]


def _known_matchers() -> tuple[dict[Any, str], frozenset[Any], frozenset[Any], type | None, type | None]:
    """The ``matches`` methods whose behaviour the walk reproduces, and the routers it can follow."""
    matchers: dict[Any, str] = {Route.matches: "route", Mount.matches: "mount", WebSocketRoute.matches: "websocket"}
    router_apps: set[Any] = {Router.app}
    app_calls: set[Any] = {Starlette.__call__}
    # FastAPI only if the app has imported it (an app with FastAPI routes has): importing it here
    # would read files inside the event loop at the first request of a plain Starlette app.
    fastapi_routing: Any = sys.modules.get("fastapi.routing")
    fastapi_applications: Any = sys.modules.get("fastapi.applications")
    if fastapi_routing is None or fastapi_applications is None:
        return matchers, frozenset(router_apps), frozenset(app_calls), None, None
    FastAPI = fastapi_applications.FastAPI
    matchers[fastapi_routing.APIRoute.matches] = "route"
    matchers[fastapi_routing.APIWebSocketRoute.matches] = "websocket"
    router_apps.add(fastapi_routing.APIRouter.app)  # Starlette's loop, then frontend routes on no match
    app_calls.add(FastAPI.__call__)  # sets root_path when given one: checked at the mount
    context_type = getattr(fastapi_routing, "_EffectiveRouteContext", None)
    return matchers, frozenset(router_apps), frozenset(app_calls), context_type, fastapi_routing.APIRoute


def _describe(route: Any) -> str:
    if isinstance(route, _CustomRouter):
        prefixes = {getattr(r, "path", "") for r in getattr(route.router, "routes", ())}
        return f"{type(route.router).__name__}({', '.join(sorted(prefixes))})"
    original = getattr(route, "original_route", None)
    if original is not None:
        route = original
    if isinstance(route, Host):
        return f"Host({route.host!r})"
    path = getattr(route, "path", None)
    return f"{type(route).__name__}({path!r})" if isinstance(path, str) else type(route).__name__


def _mounted_routes(route: Any, build: _Build) -> tuple[str, Sequence[BaseRoute] | None, str]:
    """A mount's app: ("routes", its routes, ""), ("app", None, "") for an app without routes
    (static files), or ("unknown", None, why) for a router whose dispatch we cannot follow."""
    app = getattr(route, "_base_app", getattr(route, "app", None))
    router: Any = app
    if isinstance(app, Starlette):
        if type(app).__call__ not in build.app_calls:
            return "unknown", None, f"its app {type(app).__name__} routes in its own way"
        root_path = getattr(app, "root_path", "")
        if root_path:
            return "unknown", None, f"its app sets root_path {root_path!r}"  # FastAPI(root_path=...)
        router = app.router
    if isinstance(router, Router):
        if type(router).app not in build.router_apps or type(router).__call__ is not Router.__call__:
            return "unknown", None, f"its router {type(router).__name__} routes in its own way"
        return "routes", router.routes, ""
    if getattr(app, "routes", None):
        return "unknown", None, f"its app {type(app).__name__} has routes but is no Starlette router"
    return "app", None, ""


def _compile(routes: Iterable[BaseRoute], prefix: str, build: _Build) -> tuple[RouteNode, ...]:
    nodes: list[RouteNode] = []
    unknown: list[tuple[str, int]] = []  # (what, how many rules existed when it was met)
    for route in _expand_included(routes):
        kind, why = _kind_of(route, build)
        if kind == "websocket":
            continue  # never matches an HTTP request
        if kind == "mount":
            mounted, children_routes, why = _mounted_routes(route, build)
            regex = route.path_regex
            convertors = getattr(route, "param_convertors", {})
            if mounted == "routes":
                assert children_routes is not None
                children = _compile(children_routes, prefix + route.path, build)
                nodes.append(RouteNode(MOUNT, regex, convertors, None, None, children))
            elif mounted == "app":
                nodes.append(RouteNode(MOUNT, regex, convertors, None, None, None))
            else:
                # What the mounted router runs is unknown: a request the mount takes gets no policy.
                inner = (RouteNode(UNMODELLED, None, {}, None, None, None),)
                nodes.append(RouteNode(MOUNT, regex, convertors, None, None, inner))
                build.warnings.append(
                    f"Mount({route.path!r}){_under(prefix)}: {why}, so cachemw cannot tell which of its "
                    f"routes runs; requests under {prefix + route.path}/ are never cached")
            continue
        if kind == "unknown":
            unknown.append((f"{_describe(route)}{_under(prefix)}: {why}", len(build.rules)))
            nodes.append(RouteNode(UNMODELLED, None, {}, None, None, None))
            continue
        template = prefix + route.path
        methods = getattr(route, "methods", None)
        method_set = frozenset(m.upper() for m in methods) if methods else None
        # A rule outranked by a decorator or an earlier rule is not wrong: it matches a route.
        for file_rule in build.settings.rules:
            if rule_matches(file_rule, template):
                build.used.add(file_rule.index)
        policy, source = policy_for(template, route.endpoint, build.settings)
        if policy is not None and policy.cacheable:
            keyed = _keyed_on_what_it_reads(policy, route)
            if keyed is None:
                build.warnings.append(
                    f"{template}: a header model of this route takes extra fields, so its handler reads every "
                    "request header and no key can cover them; it is never answered from the cache")
                keyed = replace(policy, ttl=0.0)  # what it invalidates still holds
            policy = keyed
        rule = RouteRule(
            template=template,
            methods=method_set,
            name=getattr(route, "name", "") or "",
            policy=policy,
            source=source,
            label=route_label(template),
            credentials=_credentials(route),
        )
        build.rules.append(rule)
        nodes.append(RouteNode(ROUTE, route.path_regex, getattr(route, "param_convertors", {}), method_set, rule, None))
    for what, mark in unknown:
        scope = f"under {prefix}/" if prefix else "of the app"
        behind = [rule.template for rule in build.rules[mark:] if rule.policy is not None]
        also = f"; this includes every request for these cached routes after it: {', '.join(behind)}" if behind else ""
        build.warnings.append(f"{what}: cachemw cannot tell which requests the router sends to it, so every "
                              f"request {scope} that no route before it takes is never cached{also}")
    return tuple(nodes)


def _under(prefix: str) -> str:
    return f" under {prefix}" if prefix else ""


def _kind_of(route: Any, build: _Build) -> tuple[str, str]:
    """"route", "mount", "websocket" (never an HTTP request's), or "unknown" with why."""
    if isinstance(route, _CustomRouter):
        return "unknown", f"its router {type(route.router).__name__} has its own matches() or handle()"
    if build.context_type is not None and isinstance(route, build.context_type):
        # A FastAPI route of an included router: the router asks the original route, which asks this.
        original: Any = getattr(route, "original_route", None)
        if build.api_route is not None and isinstance(original, build.api_route):
            if build.matchers.get(getattr(type(original), "matches", None)) != "route":
                return "unknown", f"{type(original).__name__} has its own matches()"
            if getattr(route, "path_regex", None) is None or not hasattr(route, "endpoint"):
                return "unknown", "it has no path pattern"
            return "route", ""
        return "unknown", "it is a kind of route cachemw does not know"
    if isinstance(route, Host):
        return "unknown", "it matches on the Host header"
    kind = build.matchers.get(getattr(type(route), "matches", None))
    if kind is None:
        return "unknown", (f"{type(route).__name__} has its own matches()" if isinstance(route, BaseRoute)
                           else "it is a kind of route cachemw does not know")
    if getattr(route, "path_regex", None) is None or not isinstance(getattr(route, "path", None), str):
        return "unknown", "it has no path pattern"
    if kind == "route" and not hasattr(route, "endpoint"):
        return "unknown", "it has no endpoint"
    return kind, ""


def _expand_included(routes: Iterable[BaseRoute]) -> Iterator[Any]:
    """The routes as the router tries them, with FastAPI's included routers flattened.

    FastAPI's ``include_router`` (recent versions) adds one opaque route for the
    whole router; it tries the router's routes, prefixed, in order (a full match
    first, else the first partial one), which is the same as listing them in its
    place.
    """
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if not callable(contexts):
            yield route
        elif _matches_its_own_way(route):
            yield _CustomRouter(route)  # its router may refuse what its routes would take
        else:
            for context in contexts():
                yield getattr(context, "starlette_route", None) or context


class _CustomRouter:
    """An included router (or one it includes) whose class has its own ``matches()`` or ``handle()``: not modelled."""

    __slots__ = ("router",)

    def __init__(self, included: Any) -> None:
        self.router = getattr(included, "original_router", included)


def _matches_its_own_way(included: Any) -> bool:
    """Whether an included router, or any router included in it, overrides FastAPI's ``matches`` or
    ``handle``: FastAPI asks the router whether it takes a request, then hands the request to it."""
    api_router: Any = getattr(sys.modules.get("fastapi.routing"), "APIRouter", None)
    router = getattr(included, "original_router", None)
    if router is not None and any(getattr(type(router), method, None) is not getattr(api_router, method, None)
                                  for method in ("matches", "handle")):
        return True
    candidates = getattr(included, "effective_candidates", None)
    return callable(candidates) and any(
        hasattr(candidate, "original_router") and _matches_its_own_way(candidate) for candidate in candidates())


def _dependants(route: Any) -> Iterator[Any]:
    """A FastAPI route's dependency tree, the route's own first, each dependant once."""
    dependant = getattr(route, "dependant", None)
    seen: set[int] = set()
    stack = [] if dependant is None else [dependant]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(reversed(getattr(current, "dependencies", None) or ()))


def _keyed_on_what_it_reads(policy: Policy, route: Any) -> Policy | None:
    """A FastAPI route's ``Header()`` and ``Cookie()`` parameters (its dependencies' too) join its ``vary``.

    The handler reads them, so they change its answer: an entry filled for one
    ``X-Token`` must not answer another. Nothing the app reads is left out of the key:
    every name a parameter may be read under is keyed (its alias, its name, each of its
    ``AliasChoices``, with and without FastAPI's underscore conversion), and so is every
    field of a header or cookie parameter model. A cookie model that takes extra fields
    reads every cookie: the whole ``Cookie`` header is keyed. A header model that takes
    extra fields reads every header, which no key can cover: None, the route is not cached.
    """
    reads: dict[str, None] = {}
    for current in _dependants(route):
        for field in getattr(current, "header_params", None) or ():
            names = _names_read(field, header=True)
            if names is None:
                return None
            reads.update(dict.fromkeys(name.lower() for name in names if HEADER_TOKEN.fullmatch(name)))
        for field in getattr(current, "cookie_params", None) or ():
            names = _names_read(field, header=False)
            if names is None:
                reads["cookie"] = None  # every cookie: the whole header
                continue
            reads.update(dict.fromkeys("cookie:" + name for name in names if _COOKIE_NAME.fullmatch(name)))
    extra = tuple(name for name in reads if name not in policy.vary)
    return replace(policy, vary=(*policy.vary, *extra)) if extra else policy


_COOKIE_NAME = re.compile(r"[^\x00-\x20;=\x7f]+")  # a name Starlette's cookie parser can give back


def _names_read(field: Any, *, header: bool) -> list[str] | None:
    """Every request name a ``Header()``/``Cookie()`` parameter may read; None: every one there is."""
    info = getattr(field, "field_info", None)
    names = _aliases(info, getattr(field, "name", None), getattr(field, "alias", None))
    models = _models_in(getattr(info, "annotation", None))
    for model in models:
        if (getattr(model, "model_config", None) or {}).get("extra") == "allow":
            return None  # the model takes every other header or cookie too
        for name, model_field in (getattr(model, "model_fields", None) or {}).items():
            names.extend(_aliases(model_field, name))
    if header:  # FastAPI reads "x_token" as "x-token" unless told not to: key on both spellings
        names.extend([name.replace("_", "-") for name in names])
    return list(dict.fromkeys(name for name in names if name))


def _aliases(info: Any, *names: object) -> list[str]:
    """``names`` and a field's alias, validation alias and alias choices: the request names it may be read under."""
    found = [*names, getattr(info, "alias", None)]
    validation = getattr(info, "validation_alias", None)
    found.append(validation)
    for choice in getattr(validation, "choices", None) or ():
        found.append(choice)
        found.extend(getattr(choice, "path", None) or ())  # an AliasPath's first item is a request name
    return [name for name in found if isinstance(name, str)]


def _models_in(annotation: Any) -> list[type]:
    """The pydantic models in a parameter's annotation (``Model``, ``Model | None``, ``Annotated[...]``)."""
    base_model: Any = getattr(sys.modules.get("pydantic"), "BaseModel", None)
    if base_model is None:
        return []
    found: list[type] = []
    stack = [annotation]
    while stack:
        current = stack.pop()
        if isinstance(current, type) and issubclass(current, base_model):
            found.append(current)
        else:
            stack.extend(getattr(current, "__args__", None) or ())
    return found


def _credentials(route: Any) -> tuple[tuple[str, str], ...]:
    """The FastAPI security schemes among a route's dependencies, sub-dependencies and its routers'.

    A scheme reads one credential: an API key from a header, cookie or query parameter,
    or ``Authorization`` (HTTP Basic/Bearer/Digest, OAuth2, OpenID Connect). Plain
    ``Header()`` and ``Cookie()`` parameters are not taken for credentials.
    """
    models: Any = sys.modules.get("fastapi.openapi.models")
    security_base: Any = sys.modules.get("fastapi.security.base")
    if models is None or security_base is None:  # loaded by any FastAPI app
        return ()
    found: dict[tuple[str, str], None] = {}
    for current in _dependants(route):
        call = getattr(current, "call", None)
        if isinstance(call, security_base.SecurityBase):
            model = getattr(call, "model", None)
            if isinstance(model, models.APIKey):
                location = model.in_.value
                found[(location, model.name.lower() if location == "header" else model.name)] = None
            elif isinstance(model, (models.HTTPBase, models.OAuth2, models.OpenIdConnect)):
                found[("header", "authorization")] = None
    return tuple(found)


def routes_behind(middleware: Any, scope_app: Any = None) -> tuple[Sequence[BaseRoute] | None, str]:
    """The routes of the router that runs after ``middleware``; None, and why, where it cannot be found.

    Followed down from ``middleware.app`` (each middleware keeps the next as ``.app``),
    so a ``CacheMiddleware`` that wraps a mounted app reads that app's routes, not those
    of the outer app that ``scope["app"]`` names there. Where that chain breaks, the app
    in ``scope["app"]`` is taken only if its middleware stack leads to ``middleware``.
    """
    node = getattr(middleware, "app", None)
    for _ in range(_MAX_LAYERS):
        if isinstance(node, (Starlette, Router)):
            return node.routes, ""
        following = getattr(node, "app", None)
        if following is None or following is node:
            break
        node = following
    if scope_app is not None:
        layer = getattr(scope_app, "middleware_stack", None)
        for _ in range(_MAX_LAYERS):
            if layer is None:
                break
            if layer is middleware:
                return getattr(scope_app, "routes", None), ""
            layer = getattr(layer, "app", None)
    what = type(node).__name__ if node is not None else "an app"
    return None, (f"the app behind it ({what}) keeps the next one in no attribute 'app', so cachemw cannot find "
                  "the routes it runs; nothing is cached")


_MAX_LAYERS = 64  # middleware layers followed, at most


def build_rule_table(routes: Iterable[BaseRoute], settings: Settings) -> RuleTable:
    """Resolve every route's policy; a file rule that matches no route is a startup error."""
    build = _Build(settings)
    nodes = _compile(routes, "", build)
    check_rules_used(settings, build.used, build.rules)
    return RuleTable(build.rules, nodes, build.warnings)
