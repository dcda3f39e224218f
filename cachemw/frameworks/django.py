"""Django's URLconf as a rule table: ``@cache`` on Django views, file rules naming Django's routes.

The table lists every ``path()`` and ``re_path()`` of the URLconf, ``include()``
prefixes joined, in cachemw's brace form (``api/`` + ``items/<int:pk>/`` is
``/api/items/{pk}/``). Which view a request reaches is not modelled: the table asks
Django's own resolver (``django.urls.resolve``), with the path Django's ASGI
handler resolves, and maps its answer back to the route by Django's route string
and the view. Nothing else in cachemw imports Django.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cachemw.core.policy import ConfigError
from cachemw.core.rules import (
    RouteFinder,
    RouteRule,
    RuleTable,
    check_rules_used,
    policy_for,
    route_label,
    rule_matches,
)
from cachemw.core.settings import Settings

__all__ = ["OPTIONS", "DjangoRoutes", "is_django_handler", "regex_template", "route_table", "settings_cachemw"]

# What settings.CACHEMW may hold: the keywords both shells (``cachemw.CacheMiddleware``,
# ``cachemw.wsgi.CacheMiddleware``) take, but the app and its route table.
OPTIONS = ("config", "redis_url", "store", "key_prefix", "identity", "settings", "supervisor", "access_log_json",
           "write_behind")

_PARAMETER = re.compile(r"<(?:[^>:]+:)?([^>]+)>")  # Django's own: <converter:name> or <name>


@dataclass(frozen=True, slots=True)
class DjangoRoutes:
    """A shell's ``route_table`` for a Django project: ``route_table(settings, urlconf, wsgi=wsgi)``.

    A cache whose routes are these is a Django project's: it takes ``settings.CACHEMW``
    for the keywords it was not given (``settings_cachemw``).
    """

    urlconf: str | None = None
    wsgi: bool = False

    def __call__(self, settings: Settings) -> RuleTable:
        return route_table(settings, self.urlconf, wsgi=self.wsgi)


def is_django_handler(app: object, kind: str) -> bool:
    """Whether ``app`` is Django's own handler of that kind (``"asgi"``: ``get_asgi_application()``, ``"wsgi"``:
    ``get_wsgi_application()``); False without importing Django when nothing has."""
    if "django" not in sys.modules:
        return False
    if kind == "asgi":
        from django.core.handlers.asgi import ASGIHandler  # type: ignore[import-untyped]

        return isinstance(app, ASGIHandler)
    from django.core.handlers.wsgi import WSGIHandler  # type: ignore[import-untyped]

    return isinstance(app, WSGIHandler)


def settings_cachemw() -> dict[str, Any]:
    """``settings.CACHEMW``, checked: a dict whose keys are among ``OPTIONS`` (a ConfigError names any other)."""
    from django.conf import settings as django_settings  # type: ignore[import-untyped]

    configured = getattr(django_settings, "CACHEMW", None) or {}
    if not isinstance(configured, Mapping):
        raise ConfigError(f"settings.CACHEMW: expected a dict of CacheMiddleware keywords, got "
                          f"{type(configured).__name__}")
    unknown = [key for key in configured if key not in OPTIONS]
    if unknown:
        key = unknown[0]
        hint = ""
        if key in {field.name for field in dataclasses.fields(Settings)}:
            hint = (f". HINT: {key!r} is a setting of the config file: put it under [cachemw] in the file "
                    "that 'config' names, or pass 'settings': a cachemw Settings")
        raise ConfigError(f"settings.CACHEMW: unknown key {key!r}; the keys are: {', '.join(sorted(OPTIONS))}"
                          f"{hint}")
    return dict(configured)


def route_table(settings: Settings, urlconf: str | None = None, *, wsgi: bool = False) -> RuleTable:
    """Every view of the URLconf (default ``ROOT_URLCONF``) with its policy; a file rule matching none is a
    ConfigError. Django must be set up (``django.setup()``, as ``get_asgi_application()`` does).

    ``wsgi``: requests come through Django's WSGI handler, which resolves ``PATH_INFO``
    (the path after ``root_path``, ``SCRIPT_NAME``), where the ASGI handler takes
    ``FORCE_SCRIPT_NAME`` off the path instead when it is set.
    """
    from django.conf import settings as django_settings
    from django.urls import get_resolver  # type: ignore[import-untyped]
    from django.urls.resolvers import LocalePrefixPattern  # type: ignore[import-untyped]

    urlconf = urlconf or django_settings.ROOT_URLCONF
    rules: list[RouteRule] = []
    by_route: dict[tuple[str, Any], RouteRule] = {}
    own_head: set[int] = set()
    used: set[int] = set()
    warnings: list[str] = []
    for resolvers, pattern in _views(get_resolver(urlconf), ()):
        template = "/" + "".join(_template_part(level.pattern) for level in (*resolvers, pattern))
        view = pattern.callback
        view_class = getattr(view, "view_class", None)
        # @cache on the view function, or on a class-based view's class (what as_view() was called on).
        endpoint = view_class if view_class is not None and not hasattr(view, "__cachemw__") else view
        policy, source = policy_for(template, endpoint, settings)
        used.update(file_rule.index for file_rule in settings.rules if rule_matches(file_rule, template))
        if policy is not None and any(isinstance(level.pattern, LocalePrefixPattern) for level in resolvers):
            warnings.append(f"route {template!r} is under i18n_patterns(): the view it runs depends on the "
                            "request's language, which the cache does not key: it is not cached")
            policy, source = None, "default"
        rule = RouteRule(template=template, methods=None, name=_name(resolvers, pattern), policy=policy,
                         source=source, label=route_label(template))
        rules.append(rule)
        by_route.setdefault((_django_route(resolvers, pattern), view), rule)  # the first one is what resolves
        if view_class is not None and any("head" in vars(klass) for klass in view_class.__mro__):
            own_head.add(id(rule))  # HEAD runs its own handler: GET's entries are not its answers
    check_rules_used(settings, used, rules)
    path_info = _wsgi_path_info if wsgi else _asgi_path_info(django_settings.FORCE_SCRIPT_NAME or "")
    return RuleTable(rules, (), warnings, find=_finder(urlconf, by_route, own_head, path_info))


def _views(resolver: Any, above: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every URLPattern under ``resolver`` in Django's order, with the include()s it is under."""
    for entry in resolver.url_patterns:
        if hasattr(entry, "url_patterns"):  # a URLResolver: include()
            yield from _views(entry, (*above, entry))
        else:
            yield above, entry


def _template_part(pattern: Any) -> str:
    """What one pattern adds to the template: ``items/<int:pk>/`` -> ``items/{pk}/``."""
    from django.urls.resolvers import RegexPattern, RoutePattern

    if isinstance(pattern, RoutePattern):
        return _PARAMETER.sub(lambda match: "{" + match.group(1) + "}", str(pattern))
    if isinstance(pattern, RegexPattern):
        return regex_template(str(pattern))
    return str(pattern)  # i18n_patterns(): the active language's prefix


def _django_route(resolvers: tuple[Any, ...], pattern: Any) -> str:
    """``ResolverMatch.route`` for this pattern: joined as ``URLResolver.resolve`` joins it."""
    route = str(pattern.pattern)
    for resolver in reversed(resolvers):
        prefix = str(resolver.pattern)
        route = prefix + route.removeprefix("^") if prefix else route
    return route


def _name(resolvers: tuple[Any, ...], pattern: Any) -> str:
    """``namespace:name`` as ``reverse()`` takes it, else the view's dotted path."""
    if pattern.name:
        return ":".join([*(level.namespace for level in resolvers if level.namespace), pattern.name])
    return str(pattern.lookup_str)


def _asgi_path_info(script_name: str) -> Callable[[str, str], str]:
    """The path Django's ASGI handler resolves: FORCE_SCRIPT_NAME, else root_path, taken off the front."""

    def path_info(path: str, root_path: str) -> str:
        prefix = script_name or root_path
        return path.removeprefix(prefix) if prefix else path

    return path_info


def _wsgi_path_info(path: str, root_path: str) -> str:
    """The path Django's WSGI handler resolves: PATH_INFO (the scope's path is SCRIPT_NAME + PATH_INFO), or "/"."""
    return (path[len(root_path):] if path.startswith(root_path) else path) or "/"


def _finder(urlconf: str, by_route: Mapping[tuple[str, Any], RouteRule], own_head: set[int],
            path_info: Callable[[str, str], str]) -> RouteFinder:
    from django.urls import resolve

    def find(path: str, root_path: str, method: str) -> tuple[RouteRule, Mapping[str, Any]] | None:
        try:
            match = resolve(path_info(path, root_path), urlconf)
        except Exception:  # Resolver404 (Django answers 404, or APPEND_SLASH's redirect), or a converter's error
            return None
        rule = by_route.get((match.route, match.func))
        if rule is None or (method == "HEAD" and id(rule) in own_head):
            return None
        return rule, match.kwargs

    return find


_NAMED_GROUP = re.compile(r"\(\?P<([A-Za-z_][A-Za-z0-9_]*)>")


def regex_template(regex: str) -> str:
    """A ``re_path()`` regex, readable: ``^archive/(?P<year>[0-9]{4})/$`` -> ``archive/{year}/``.

    Named groups become ``{name}``, the anchors go, escaped punctuation loses its
    backslash; whatever else the regex says (an unnamed group, a class) stays as written.
    """
    text = regex.removeprefix("^")
    if text.endswith(r"\Z"):
        text = text[:-2]
    elif text.endswith("$") and not text.endswith(r"\$"):
        text = text[:-1]
    out: list[str] = []
    index = 0
    while index < len(text):
        group = _NAMED_GROUP.match(text, index)
        if group is not None:
            out.append("{" + group.group(1) + "}")
            index = _group_end(text, group.end())
        elif text[index] == "\\" and index + 1 < len(text):
            escaped = text[index + 1]
            out.append(text[index:index + 2] if escaped.isalnum() else escaped)
            index += 2
        else:
            out.append(text[index])
            index += 1
    return "".join(out)


def _group_end(text: str, index: int) -> int:
    """Where the group whose body starts at ``index`` ends: past its closing parenthesis."""
    depth = 1
    in_class = False
    while index < len(text) and depth:
        char = text[index]
        if char == "\\":
            index += 1
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            index += 1
            index += text.startswith("^", index)
            index += text.startswith("]", index)  # a "]" first in a class is a literal
            continue
        elif char in "()":
            depth += 1 if char == "(" else -1
        index += 1
    return index
