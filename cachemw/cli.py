"""The ``cachemw`` command: what an operator asks of a deployed app's cache."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from cachemw.config import Settings, load_settings
from cachemw.policy import ConfigError, Policy
from cachemw.rules import RuleTable, build_rule_table

__all__ = ["main"]


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1 and seconds > 0:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def describe_policy(policy: Policy | None) -> str:
    if policy is None:
        return "-"
    if not policy.cacheable:
        return f"{policy.preset or 'custom'} (not cached)"
    parts = [f"ttl={format_duration(policy.ttl)}"]
    if policy.stale_while_revalidate:
        parts.append(f"swr={format_duration(policy.stale_while_revalidate)}")
    if policy.stale_if_error:
        parts.append(f"sie={format_duration(policy.stale_if_error)}")
    if policy.sync:
        parts.append(f"sync={format_duration(policy.sync)}")
    if policy.private:
        parts.append("private")
    if policy.vary:
        parts.append("vary=" + ",".join(policy.vary))
    if policy.query is not None:
        parts.append("query=" + ",".join(policy.query))
    if policy.tags:
        parts.append("tags=" + ",".join(policy.tags))
    head = f"{policy.preset}: " if policy.preset else ""
    return head + " ".join(parts)


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
        "max_body": policy.max_body,
        "statuses": sorted(policy.statuses),
    }


def load_app(path: str) -> Any:
    """Import ``module:attribute`` (like uvicorn), from the current directory too."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"cachemw: {path!r} is not an app import path; expected MODULE:ATTRIBUTE, "
                         "e.g. sample_app:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"cachemw: cannot import {module_name!r}: {exc}") from None
    app = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise SystemExit(f"cachemw: module {module_name!r} has no attribute {attribute!r}") from None
    return app


def app_rule_table(app: Any, config: str | None) -> tuple[RuleTable, Settings]:
    """The rule table the app's CacheMiddleware would build, with the config it names (or ``config``)."""
    from cachemw.middleware import CacheMiddleware

    options: dict[str, Any] = {}
    if isinstance(app, CacheMiddleware):
        options = {"config": app._config, "settings": app._given_settings, "key_prefix": app._key_prefix}
    else:
        for middleware in getattr(app, "user_middleware", ()):
            if middleware.cls is CacheMiddleware:
                options = dict(middleware.kwargs)
                break
    if config is not None:
        settings = load_settings(config)
    elif options.get("settings") is not None:
        settings = options["settings"]
    else:
        settings = load_settings(options.get("config"))
    return build_rule_table(_routes_of(app), settings), settings


def _routes_of(app: Any) -> Any:
    from cachemw.middleware import CacheMiddleware

    routes = getattr(app.app if isinstance(app, CacheMiddleware) else app, "routes", None)
    if routes is None:
        raise SystemExit("cachemw: the app has no routes (is it a Starlette or FastAPI app?)")
    return routes


def _cmd_routes(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    table, settings = app_rule_table(app, args.config)
    if args.json:
        print(json.dumps({
            "config": settings.source,
            "routes": [
                {"route": rule.template, "methods": sorted(rule.methods or []), "name": rule.name,
                 "source": rule.source, "policy": _policy_json(rule.policy)}
                for rule in table.rules
            ],
        }, indent=2))
        return 0
    rows = [("ROUTE", "METHODS", "POLICY", "SOURCE")]
    for rule in table.rules:
        methods = ",".join(sorted(m for m in (rule.methods or {"*"}) if m != "HEAD")) or "*"
        rows.append((rule.template, methods, describe_policy(rule.policy), rule.source))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    print(f"\nconfig: {settings.source or '(none: defaults)'}; store: "
          f"{'redis' if settings.redis_url else 'memory'}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.file, environ={})
    if args.app:
        app = load_app(args.app)
        build_rule_table(_routes_of(app), settings)
    print(f"{args.file}: ok ({len(settings.rules)} rule(s), {len(settings.presets)} polic"
          f"{'y' if len(settings.presets) == 1 else 'ies'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cachemw", description="Inspect and operate cachemw caches.")
    commands = parser.add_subparsers(dest="command", required=True)

    routes = commands.add_parser("routes", help="show every route of an app with its effective policy")
    routes.add_argument("app", help="the app as MODULE:ATTRIBUTE, e.g. sample_app:app")
    routes.add_argument("--config", help="a cachemw.toml or pyproject.toml (default: what the app's "
                        "CacheMiddleware names)")
    routes.add_argument("--json", action="store_true", help="machine-readable output")
    routes.set_defaults(run=_cmd_routes)

    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("file", help="a cachemw.toml or pyproject.toml")
    check.add_argument("--app", help="also check that every rule matches a route of this app (MODULE:ATTRIBUTE)")
    check.set_defaults(run=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.run(args)
        sys.stdout.flush()  # a closed pipe shows up here, not as a traceback at exit
    except ConfigError as exc:
        print(f"cachemw: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left early (`cachemw routes app | head`); what it read is all it wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
