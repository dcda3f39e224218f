"""The rule table: one policy per route, from the ``@cache`` decorator and the config file.

The decorator only annotates the endpoint. The table is built once, at startup,
from the app's routes, because the middleware must decide before the router
runs (the router sets ``scope["endpoint"]`` only inside itself). Precedence:
decorator, then the first file rule that matches the route, then no caching.

The table's matcher reproduces Starlette's (and FastAPI's) router exactly for the
routes it knows (Route, APIRoute, Mount, included routers, WebSocket routes). A
route it cannot reproduce (``Host``, a custom ``BaseRoute``, a ``matches()`` of its
own, a mounted router that dispatches its own way) may take any request that
reaches it: such requests get no policy, and ``RuleTable.warnings`` says so.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cachemw.core.keys import strip_root_path
from cachemw.core.policy import INVALIDATING_FIELDS, ConfigError, Policy, policy_from_fields
from cachemw.core.settings import FileRule, Settings, resolve_preset

__all__ = ["MOUNT", "ROUTE", "UNKNOWN", "UNMODELLED", "CacheSpec", "RouteFinder", "RouteMatch", "RouteNode",
           "RouteRule", "RuleTable", "cache", "check_rules_used", "iter_cached", "normalise_template", "policy_for",
           "route_label", "rule_matches"]

SPEC_ATTRIBUTE = "__cachemw__"
_PARAM = re.compile(r"{([^{}:]+)(?::[^{}]*)?}")
HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header or cookie name that can be keyed
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
    from cachemw.core.policy import PRESETS
    from cachemw.core.settings import POLICY_NAME

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
        if policy is None and "ttl" not in fields and not INVALIDATING_FIELDS & fields.keys():
            raise ConfigError(f"{where}: neither a ttl nor a preset: this policy would never cache. HINT: "
                              f"@cache(ttl=\"5m\", ...), or a preset: @cache(\"minutes\") (built in: {known}, or "
                              "one of [cachemw.policies] in the config file); @cache(\"realtime\") if the route must "
                              "never be cached")
        try:
            setattr(endpoint, SPEC_ATTRIBUTE, CacheSpec(preset=policy, fields=dict(fields), where=where))
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
    # What the route authenticates with, from its FastAPI security dependencies: (location, name)
    # pairs, location "header" (name lowercased), "cookie" or "query". A request that carries one
    # is a user's request.
    credentials: tuple[tuple[str, str], ...] = ()


class RouteMatch:
    """A request matched to a rule; path params are converted only when asked for."""

    __slots__ = ("_matches", "_params", "rule")

    def __init__(self, rule: RouteRule, matches: list[tuple[re.Match[str], Mapping[str, Any]]],
                 params: Mapping[str, Any] | None = None) -> None:
        self.rule = rule
        self._matches = matches
        self._params = params  # given by a framework's own router (Flask, Django): already converted

    @property
    def path_params(self) -> dict[str, str]:
        if self._params is not None:
            return {key: str(value) for key, value in self._params.items()}
        params: dict[str, str] = {}
        for match, convertors in self._matches:
            for key, raw in match.groupdict().items():
                convertor = convertors.get(key)
                if convertor is None:
                    continue  # a mount's remaining path, which Starlette drops from path_params too
                params[key] = str(convertor.convert(raw))
        return params


ROUTE, MOUNT, UNMODELLED = 0, 1, 2


@dataclass(frozen=True, slots=True)
class RouteNode:
    kind: int  # ROUTE, MOUNT, or UNMODELLED: a route whose matching we cannot reproduce
    regex: re.Pattern[str] | None
    convertors: Mapping[str, Any]
    methods: frozenset[str] | None
    rule: RouteRule | None  # every ROUTE has one, with or without a policy
    children: tuple[RouteNode, ...] | None  # a mount's routes; None: a mounted app without routes of ours


class _Unknown:
    """What the router runs cannot be known here: an unmodellable route may take the request."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()


_Found = list[tuple[re.Match[str], Mapping[str, Any]]]


def _walk(nodes: tuple[RouteNode, ...], path: str, root_path: str, method: str,
          found: _Found) -> RouteNode | _Unknown | None:
    """The route Starlette's router runs for this request: a node, None (404, 405, a redirect, a
    mounted app of no routes of ours), or UNKNOWN (a route we cannot model may take it)."""
    route_path = strip_root_path(path, root_path)
    for node in nodes:
        if node.kind == UNMODELLED:
            return UNKNOWN  # it may match: whatever comes after it is not known to run
        assert node.regex is not None
        match = node.regex.match(route_path)
        if match is None:
            continue
        if node.kind == MOUNT:
            # A mount is a full match for Starlette's router: whatever its routes
            # say is final, later siblings are never tried.
            if node.children is None:
                return None
            remaining = "/" + match.group("path")
            found.append((match, {k: v for k, v in node.convertors.items() if k != "path"}))
            return _walk(node.children, path, root_path + route_path[: -len(remaining)], method, found)
        if node.methods is not None and method not in node.methods:
            # A partial match: a later full match wins, else the router answers 405 from it.
            continue
        found.append((match, node.convertors))
        return node
    return None


_UNSEEN = object()

RouteFinder = Callable[[str, str, str], "tuple[RouteRule, Mapping[str, Any]] | None"]
"""``find(path, root_path, method)``: the route a framework's own router runs for a request (its rule,
policy or not, and its converted path parameters), or None where no route's handler runs. For
frameworks whose routers the node walk does not model (Flask's, Django's): their router decides."""


class RuleTable:
    """All routes in the router's order, and a matcher that mirrors Starlette's.

    ``warnings`` names each route the table cannot model (``Host``, custom routes):
    requests that may reach one get no policy, so they are never cached.
    """

    def __init__(self, rules: Sequence[RouteRule], nodes: tuple[RouteNode, ...],
                 warnings: Sequence[str] = (), *, find: RouteFinder | None = None) -> None:
        self.rules = tuple(rules)
        self._nodes = nodes
        self._find_route = find
        self.warnings: tuple[str, ...] = tuple(warnings)
        self.has_policies = any(rule.policy is not None for rule in self.rules)
        # Recent answers by (path, method, root_path): hot paths skip the walk over the routes.
        # Bounded: emptied when full, so a scan of distinct paths costs no more than without it.
        # A path is remembered the second time it comes: a run of misses on new paths (each
        # answer a few objects the garbage collector would carry to its oldest generation)
        # leaves only their keys in ``_seen``, plain tuples of strings it does not track.
        self._memo: dict[tuple[str, str, str], RouteMatch | None] = {}
        self._seen: set[tuple[str, str, str]] = set()

    def match(self, route_path: str, method: str) -> RouteMatch | None:
        """The rule of the route the router will pick for this request, if it has a policy.

        ``route_path`` as Starlette's ``get_route_path`` gives it (``cachemw.core.keys.route_path``).
        HEAD gets a rule only when the route that runs for HEAD is the one that runs for GET:
        HEAD is answered from GET's entries.
        """
        return self._match(route_path, "", method)

    def match_scope(self, scope: Mapping[str, Any]) -> RouteMatch | None:
        """``match`` for an HTTP scope, exact also where ``path`` does not start with ``root_path``."""
        return self._match(scope["path"], scope.get("root_path", ""), scope["method"])

    def route_for(self, route_path: str, method: str, root_path: str = "") -> RouteRule | _Unknown | None:
        """The rule of the route the router runs, policy or not; None where no route's handler runs
        (404, 405, a redirect, a mounted app); ``UNKNOWN`` where a route we cannot model may take it."""
        if self._find_route is not None:
            routed = self._find_route(route_path, root_path, method)
            return None if routed is None else routed[0]
        found = _walk(self._nodes, route_path, root_path, method, [])
        return found if found is None or isinstance(found, _Unknown) else found.rule

    def _match(self, path: str, root_path: str, method: str) -> RouteMatch | None:
        if not self.has_policies:
            return None
        memo_key = (path, method, root_path)
        remembered = self._memo.get(memo_key, _UNSEEN)  # not a KeyError raised and caught for each new path
        if remembered is not _UNSEEN:
            return remembered  # type: ignore[return-value]
        found = self._find(path, root_path, method)
        seen = self._seen
        if memo_key not in seen:
            if len(seen) >= 4096:
                seen.clear()
            seen.add(memo_key)
            return found
        if len(self._memo) >= 4096:
            self._memo.clear()
        self._memo[memo_key] = found
        return found

    def _find(self, path: str, root_path: str, method: str) -> RouteMatch | None:
        if self._find_route is not None:
            return self._find_routed(self._find_route, path, root_path, method)
        matches: _Found = []
        node = _walk(self._nodes, path, root_path, method, matches)
        if not isinstance(node, RouteNode) or node.rule is None or node.rule.policy is None:
            return None
        if method == "HEAD" and _walk(self._nodes, path, root_path, "GET", []) is not node:
            return None  # HEAD runs its own handler: GET's entries are not its answers
        return RouteMatch(node.rule, matches)


    @staticmethod
    def _find_routed(find: RouteFinder, path: str, root_path: str, method: str) -> RouteMatch | None:
        routed = find(path, root_path, method)
        if routed is None or routed[0].policy is None:
            return None
        rule = routed[0]
        if method == "HEAD":
            for_get = find(path, root_path, "GET")
            if for_get is None or for_get[0] is not rule:
                return None  # HEAD runs its own handler: GET's entries are not its answers
        return RouteMatch(rule, [], routed[1])


def normalise_template(template: str) -> str:
    """``/items/{id:int}`` and ``/items/{id}`` name the same route in a rule."""
    return _PARAM.sub(lambda m: "{" + m.group(1) + "}", template)


def route_label(template: str) -> str:
    label = normalise_template(template).replace("{", "<").replace("}", ">")
    return label if len(label) <= 200 else label[:200]


def rule_matches(rule: FileRule, template: str) -> bool:
    normal = normalise_template(template)
    if rule.is_glob:
        return fnmatch.fnmatchcase(normal, normalise_template(rule.route))
    return normal == normalise_template(rule.route)


def policy_for(template: str, endpoint: object, settings: Settings) -> tuple[Policy | None, str]:
    spec = getattr(endpoint, SPEC_ATTRIBUTE, None)
    if isinstance(spec, CacheSpec):
        base = resolve_preset(spec.preset, settings.presets, spec.where)
        return policy_from_fields(spec.fields, base=base, where=spec.where), "decorator"
    for rule in settings.rules:
        if rule_matches(rule, template):
            return rule.policy, rule.source
    return None, "default"


def check_rules_used(settings: Settings, used: Collection[int], rules: Sequence[RouteRule]) -> None:
    """A file rule that matches no route is a mistake (a typo, a renamed route), not a rule for later:
    a ConfigError naming the file, the rule and every route it could have meant. ``used``: the
    indexes of the rules that match some route."""
    for file_rule in settings.rules:
        if file_rule.index not in used:
            known = ", ".join(rule.template for rule in rules) or "(none)"
            file_name, _, number = file_rule.source.rpartition(" rule ")
            raise ConfigError(f"{file_name}: rule {number} (route {file_rule.route!r}): field 'route': matches "
                              f"no route of the app; its routes are: {known}")


def iter_cached(table: RuleTable) -> Iterator[RouteRule]:
    return (rule for rule in table.rules if rule.policy is not None)
