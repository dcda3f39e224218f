"""The rule table: one policy per route, from the ``@cache`` decorator and the config file.

The decorator only annotates the endpoint. The table is built once, at startup,
from the app's routes, because the middleware must decide before the router
runs (the router sets ``scope["endpoint"]`` only inside itself). Precedence:
decorator, then the first file rule that matches the route, then no caching.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.routing import BaseRoute, Mount, WebSocketRoute

from cachemw.config import FileRule, Settings, resolve_preset
from cachemw.policy import ConfigError, Policy, policy_from_fields

__all__ = ["CacheSpec", "RouteMatch", "RouteRule", "RuleTable", "build_rule_table", "cache"]

_SPEC_ATTRIBUTE = "__cachemw__"
_PARAM = re.compile(r"{([^{}:]+)(?::[^{}]*)?}")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """What ``@cache`` leaves on an endpoint: checked now, resolved against presets at startup."""

    preset: str | None
    fields: Mapping[str, object]
    where: str


def cache(policy: str | None = None, /, **fields: Any) -> Callable[[_T], _T]:
    """Declare how a route is cached: ``@cache("minutes")`` or ``@cache(ttl="5m", tags=["p:{id}"])``.

    The endpoint is returned unchanged (FastAPI's signature introspection keeps
    working); the decorator may go above or below ``@app.get(...)``. Mistakes fail
    here, at import: unknown fields, bad values, neither a ``ttl`` nor a preset (a
    policy that would never cache; ``invalidates`` alone is fine, for unsafe
    routes), a preset that no config file could define. A name that is not built
    in may come from the config file, so it is looked up at startup.
    """
    from cachemw.config import POLICY_NAME
    from cachemw.policy import PRESETS

    if callable(policy):
        raise TypeError("use @cache(...) with arguments, e.g. @cache(ttl='5m') or @cache('minutes')")

    def annotate(endpoint: _T) -> _T:
        name = getattr(endpoint, "__qualname__", repr(endpoint))
        module = getattr(endpoint, "__module__", "?")
        where = f"@cache on {module}.{name}"
        known = ", ".join(repr(preset) for preset in PRESETS)
        if policy is not None and (not isinstance(policy, str) or not POLICY_NAME.fullmatch(policy)):
            raise ConfigError(f"{where}: preset {policy!r} is not a preset name (1-64 of A-Z a-z 0-9 _ -). HINT: "
                              f"the built-in presets are {known}, or one of [cachemw.policies] in the config "
                              "file; a ttl is written @cache(ttl=\"5m\")")
        policy_from_fields(fields, base=Policy(), where=where)  # fail at import, not at startup
        if policy is None and "ttl" not in fields and "invalidates" not in fields:
            raise ConfigError(f"{where}: neither a ttl nor a preset: this policy would never cache. HINT: "
                              f"@cache(ttl=\"5m\", ...), or a preset: @cache(\"minutes\") (built in: {known}, or "
                              "one of [cachemw.policies] in the config file); @cache(\"realtime\") if the route must "
                              "never be cached")
        try:
            setattr(endpoint, _SPEC_ATTRIBUTE, CacheSpec(preset=policy, fields=dict(fields), where=where))
        except AttributeError:  # a bound method, a builtin: nothing to carry the policy
            raise TypeError(f"{where}: @cache goes on a function or class; wrap this callable in a function "
                            "and decorate that") from None
        return endpoint

    return annotate


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One route of the app with its effective policy and where that came from."""

    template: str  # the full path template, mounts included: "/api/items/{id}"
    methods: frozenset[str] | None
    name: str
    policy: Policy | None
    source: str  # "decorator", "cachemw.toml rule 2", or "default"
    label: str  # the template as it appears in keys: braces would be Redis Cluster hash tags


class RouteMatch:
    """A request matched to a rule; path params are converted only when asked for."""

    __slots__ = ("_matches", "rule")

    def __init__(self, rule: RouteRule, matches: list[tuple[re.Match[str], Mapping[str, Any]]]) -> None:
        self.rule = rule
        self._matches = matches

    @property
    def path_params(self) -> dict[str, str]:
        params: dict[str, str] = {}
        for match, convertors in self._matches:
            for key, raw in match.groupdict().items():
                convertor = convertors.get(key)
                if convertor is None:
                    continue  # a mount's remaining path, which Starlette drops from path_params too
                params[key] = str(convertor.convert(raw))
        return params


@dataclass(frozen=True, slots=True)
class _Node:
    regex: re.Pattern[str]
    convertors: Mapping[str, Any]
    methods: frozenset[str] | None
    rule: RouteRule | None  # None for a mount and for routes we cannot cache
    children: tuple[_Node, ...] | None  # a mount's routes


class RuleTable:
    """All routes in the router's order, and a matcher that mirrors Starlette's."""

    def __init__(self, rules: Sequence[RouteRule], nodes: tuple[_Node, ...]) -> None:
        self.rules = tuple(rules)
        self._nodes = nodes
        self.has_policies = any(rule.policy is not None for rule in self.rules)
        # Recent answers by (path, method): hot paths skip the walk over the routes. Bounded:
        # emptied when full, so a scan of distinct paths costs no more than without it.
        self._memo: dict[tuple[str, str], RouteMatch | None] = {}

    def match(self, route_path: str, method: str) -> RouteMatch | None:
        """The rule of the route the router will pick for this request, if it has a policy."""
        if not self.has_policies:
            return None
        memo_key = (route_path, method)
        try:
            return self._memo[memo_key]
        except KeyError:
            pass
        found = _match(self._nodes, route_path, method, [])
        if len(self._memo) >= 4096:
            self._memo.clear()
        self._memo[memo_key] = found
        return found


def _match(
    nodes: tuple[_Node, ...], path: str, method: str, found: list[tuple[re.Match[str], Mapping[str, Any]]]
) -> RouteMatch | None:
    for node in nodes:
        match = node.regex.match(path)
        if match is None:
            continue
        if node.children is not None:
            # A mount is a full match for Starlette's router: whatever its routes
            # say is final, later siblings are never tried.
            found.append((match, {k: v for k, v in node.convertors.items() if k != "path"}))
            return _match(node.children, "/" + match.group("path"), method, found)
        if node.methods is not None and method not in node.methods:
            continue  # a partial match: the router answers 405 or tries later routes
        if node.rule is None or node.rule.policy is None:
            return None
        found.append((match, node.convertors))
        return RouteMatch(node.rule, found)
    return None


def normalise_template(template: str) -> str:
    """``/items/{id:int}`` and ``/items/{id}`` name the same route in a rule."""
    return _PARAM.sub(lambda m: "{" + m.group(1) + "}", template)


def route_label(template: str) -> str:
    label = normalise_template(template).replace("{", "<").replace("}", ">")
    return label if len(label) <= 200 else label[:200]


def _rule_matches(rule: FileRule, template: str) -> bool:
    normal = normalise_template(template)
    if rule.is_glob:
        return fnmatch.fnmatchcase(normal, normalise_template(rule.route))
    return normal == normalise_template(rule.route)


def _policy_for(template: str, endpoint: object, settings: Settings) -> tuple[Policy | None, str]:
    spec = getattr(endpoint, _SPEC_ATTRIBUTE, None)
    if isinstance(spec, CacheSpec):
        base = resolve_preset(spec.preset, settings.presets, spec.where)
        return policy_from_fields(spec.fields, base=base, where=spec.where), "decorator"
    for rule in settings.rules:
        if _rule_matches(rule, template):
            return rule.policy, rule.source
    return None, "default"


def _compile(routes: Iterable[BaseRoute], prefix: str, settings: Settings, used: set[int],
             rules: list[RouteRule]) -> tuple[_Node, ...]:
    nodes: list[_Node] = []
    for route in _expand_included(routes):
        regex = getattr(route, "path_regex", None)
        path = getattr(route, "path", None)
        if regex is None or path is None:
            continue  # Host and custom routes: the router may pick them, we never cache them
        convertors = getattr(route, "param_convertors", {})
        if isinstance(route, Mount):
            children = _compile(route.routes, prefix + path, settings, used, rules)
            nodes.append(_Node(regex, convertors, None, None, children))
            continue
        if not hasattr(route, "endpoint"):
            continue  # a websocket-only or unknown route
        if isinstance(route, WebSocketRoute):
            continue  # FastAPI's APIWebSocketRoute too: never matches an HTTP request
        template = prefix + path
        methods = getattr(route, "methods", None)
        method_set = frozenset(m.upper() for m in methods) if methods else None
        # A rule outranked by a decorator or an earlier rule is not wrong: it matches a route.
        for file_rule in settings.rules:
            if _rule_matches(file_rule, template):
                used.add(file_rule.index)
        policy, source = _policy_for(template, route.endpoint, settings)
        rule = RouteRule(
            template=template,
            methods=method_set,
            name=getattr(route, "name", "") or "",
            policy=policy,
            source=source,
            label=route_label(template),
        )
        rules.append(rule)
        nodes.append(_Node(regex, convertors, method_set, rule, None))
    return tuple(nodes)


def _expand_included(routes: Iterable[BaseRoute]) -> Iterator[Any]:
    """The routes as the router tries them, with FastAPI's included routers flattened.

    FastAPI's ``include_router`` (recent versions) adds one opaque route for the
    whole router; it tries the router's routes, prefixed, in order, which is the
    same as listing them in its place.
    """
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):
            for context in contexts():
                yield getattr(context, "starlette_route", None) or context
        else:
            yield route


def build_rule_table(routes: Iterable[BaseRoute], settings: Settings) -> RuleTable:
    """Resolve every route's policy; a file rule that matches no route is a startup error."""
    used: set[int] = set()
    rules: list[RouteRule] = []
    nodes = _compile(routes, "", settings, used, rules)
    for file_rule in settings.rules:
        if file_rule.index not in used:
            known = ", ".join(rule.template for rule in rules) or "(none)"
            file_name, _, number = file_rule.source.rpartition(" rule ")
            raise ConfigError(
                f"{file_name}: rule {number} (route {file_rule.route!r}): "
                f"field 'route': matches no route of the app; its routes are: {known}"
            )
    return RuleTable(rules, nodes)


def iter_cached(table: RuleTable) -> Iterator[RouteRule]:
    return (rule for rule in table.rules if rule.policy is not None)
