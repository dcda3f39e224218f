"""``cachemw routes APP`` (or ``--django SETTINGS``): every route of an app with its effective policy, as the
middleware would apply it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cachemw.cli.common import (
    CommandFailed,
    Subcommands,
    app_rule_table,
    app_store,
    django_rule_table,
    load_app,
    store_description,
)
from cachemw.core.describe import describe_policy
from cachemw.core.policy import Policy

__all__ = ["add_command"]


def add_command(commands: Subcommands) -> None:
    routes = commands.add_parser("routes", help="show every route of an app with its effective policy")
    routes.add_argument("app", nargs="?", help="the app as MODULE:ATTRIBUTE, e.g. sample_app:app (Starlette, "
                        "FastAPI, Flask, or one behind cachemw's CacheMiddleware)")
    routes.add_argument("--django", metavar="SETTINGS", help="a Django project's settings module instead of an "
                        "app, e.g. mysite.settings: its URLconf, with settings.CACHEMW")
    routes.add_argument("--config", help="a cachemw.toml or pyproject.toml (default: what the app's "
                        "CacheMiddleware names)")
    routes.add_argument("--json", action="store_true", help="machine-readable output")
    routes.set_defaults(run=run)


def _policy_json(policy: Policy | None) -> dict[str, Any] | None:
    if policy is None:
        return None
    return {
        "preset": policy.preset,
        "cached": policy.cacheable,
        "ttl": policy.ttl,
        "stale_while_revalidate": policy.stale_while_revalidate,
        "stale_if_error": policy.stale_if_error,
        "sync": policy.sync,
        "vary": list(policy.vary),
        "query": None if policy.query is None else list(policy.query),
        "private": policy.private,
        "tags": list(policy.tags),
        "invalidates": list(policy.invalidates),
        "invalidates_soft": list(policy.invalidates_soft),
        "max_body": policy.max_body,
        "statuses": sorted(policy.statuses),
    }


def run(args: argparse.Namespace) -> int:
    if (args.app is None) == (args.django is None):
        raise CommandFailed("name an app (MODULE:ATTRIBUTE) or a Django project (--django SETTINGS), one of them")
    if args.django is not None:
        table, settings, given_store = django_rule_table(args.django, args.config)
    else:
        app = load_app(args.app)
        table, settings = app_rule_table(app, args.config)
        given_store = app_store(app)
    store = store_description(settings, given_store)
    if args.json:
        print(json.dumps({
            "config": settings.source,
            "store": store,
            "routes": [
                {"route": rule.template, "methods": sorted(rule.methods or []), "name": rule.name,
                 "source": rule.source, "policy": _policy_json(rule.policy),
                 "credentials": [{"in": location, "name": name} for location, name in rule.credentials]}
                for rule in table.rules
            ],
            "warnings": list(table.warnings),
        }, indent=2))
        return 0
    rows = [("ROUTE", "METHODS", "POLICY", "SOURCE")]
    credentials: dict[int, str] = {}
    for rule in table.rules:
        methods = ",".join(sorted(m for m in (rule.methods or {"*"}) if m != "HEAD")) or "*"
        rows.append((rule.template, methods, describe_policy(rule.policy), rule.source))
        if rule.credentials:
            credentials[len(rows) - 1] = ", ".join(f"{location} {name}" for location, name in rule.credentials)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
        if index in credentials:
            # The route authenticates with these (its FastAPI security schemes): requests that carry one are
            # a user's.
            print(f"    credentials: {credentials[index]}")
    print(f"\nconfig: {settings.source or '(none: defaults)'}; store: {store}")
    for warning in table.warnings:
        print(f"warning: {warning}")
    return 0

