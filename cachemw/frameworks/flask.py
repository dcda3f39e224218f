"""Flask's routes as a rule table: ``@cache`` on Flask views, file rules naming Flask's route templates.

Werkzeug's matcher orders rules by how specific they are, not by registration,
and has converters, strict slashes and host matching of its own: the table does not
model it. It asks Werkzeug itself which rule a request reaches (``find``), once per
path, method and script root (the table remembers the answers of hot paths).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cachemw.core.rules import RouteRule, RuleTable, check_rules_used, policy_for, route_label, rule_matches
from cachemw.core.settings import Settings

__all__ = ["find_flask_app", "route_table", "template_of"]

_VARIABLE = re.compile(r"<(?:[a-zA-Z_][a-zA-Z0-9_]*(?:\([^)]*\))?:)?([a-zA-Z_][a-zA-Z0-9_]*)>")


def template_of(rule: str) -> str:
    """``/items/<int:item_id>`` -> ``/items/{item_id}``: the brace form the config file and keys use."""
    return _VARIABLE.sub(lambda match: "{" + match.group(1) + "}", rule)


def find_flask_app(app: object) -> Any | None:
    """The Flask app behind ``app``: itself, or the app of its bound ``wsgi_app``; None if not Flask."""
    for candidate in (app, getattr(app, "__self__", None)):
        if hasattr(candidate, "url_map") and hasattr(candidate, "view_functions"):
            return candidate
    return None


def route_table(app: Any, settings: Settings) -> RuleTable:
    """Every rule of ``app.url_map`` with its policy; a file rule that matches no route is a ConfigError."""
    url_map = app.url_map
    rules: list[RouteRule] = []
    by_rule: dict[int, RouteRule] = {}
    used: set[int] = set()
    warnings: list[str] = []
    for werkzeug_rule in url_map.iter_rules():
        template = template_of(werkzeug_rule.rule)
        view = app.view_functions.get(werkzeug_rule.endpoint)
        endpoint = getattr(view, "view_class", None) or view  # a class-based view carries @cache on its class
        policy, source = policy_for(template, endpoint, settings)
        used.update(file_rule.index for file_rule in settings.rules if rule_matches(file_rule, template))
        if policy is not None and (url_map.host_matching or werkzeug_rule.subdomain or werkzeug_rule.host):
            warnings.append(f"route {template!r} is matched by host or subdomain, which the cache does not key: "
                            "it is not cached")
            policy, source = None, "default"
        rule = RouteRule(template=template, methods=frozenset(werkzeug_rule.methods or ()) or None,
                         name=werkzeug_rule.endpoint, policy=policy, source=source, label=route_label(template))
        rules.append(rule)
        by_rule[id(werkzeug_rule)] = rule
    check_rules_used(settings, used, rules)
    return RuleTable(rules, (), warnings, find=_finder(url_map, by_rule))


def _finder(url_map: Any, by_rule: Mapping[int, RouteRule]) -> Any:
    from werkzeug.exceptions import HTTPException
    from werkzeug.routing import RequestRedirect

    def find(path: str, root_path: str, method: str) -> tuple[RouteRule, Mapping[str, Any]] | None:
        adapter = url_map.bind("localhost", script_name=root_path or "/")
        route_path = path[len(root_path):] if root_path and path.startswith(root_path) else path
        try:
            werkzeug_rule, params = adapter.match(route_path or "/", method, return_rule=True)
        except (HTTPException, RequestRedirect):  # 404, 405, a strict-slash redirect: no view runs
            return None
        rule = by_rule.get(id(werkzeug_rule))
        return None if rule is None else (rule, params)

    return find
