"""``cachemw inspect URL --app APP``: the key a GET of URL is answered from, computed as the middleware does.

Shown with its entry; refused, with the reason, where the middleware itself would never read an entry for the request.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from cachemw.cli.common import (
    REDIS_URL_HELP,
    CommandFailed,
    Subcommands,
    app_middleware_options,
    one_line,
    operator_settings,
)
from cachemw.cli.store import with_store
from cachemw.cli.urls import request_scope
from cachemw.core.describe import describe_policy
from cachemw.core.entry import EntryDecodeError, decode_entry
from cachemw.core.keys import RequestHeaders, SessionIdentity, make_key, route_path
from cachemw.core.policy import Policy, freshness
from cachemw.core.rules import RouteRule
from cachemw.core.settings import Settings
from cachemw.store import Store
from cachemw.wsgi.environ import environ_for

__all__ = ["add_command"]


def add_command(commands: Subcommands) -> None:
    inspect = commands.add_parser(
        "inspect", help="show the cache entry a GET of a URL would be answered from",
        description="Compute the key of GET URL exactly as the app's CacheMiddleware does and show the entry "
                    "stored under it in Redis: freshness, age, status, size, ETag, tags and headers.")
    inspect.add_argument("url", metavar="URL", help="an absolute URL as clients ask it, e.g. "
                         "http://shop.example/products/1 (its host is part of the key)")
    inspect.add_argument("--app", required=True, help="the app as MODULE:ATTRIBUTE, e.g. sample_app:app")
    inspect.add_argument("--config", help="a cachemw.toml or pyproject.toml (default: what the app's "
                         "CacheMiddleware names)")
    inspect.add_argument("--redis-url", help=REDIS_URL_HELP)
    inspect.add_argument("-H", "--header", action="append", metavar="'NAME: VALUE'",
                         help="a request header, e.g. one the route varies on (repeatable)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=run)


def _identity_of(app: Any, settings: Settings, rule: RouteRule, headers: RequestHeaders,
                 scope: dict[str, Any], url: str) -> tuple[str | None, str | None]:
    """The request's credentials and who it is for, as the app's middleware decides them (its custom
    identity, if it has one): the session cookie, Authorization, the ``credentials`` setting and the
    route's FastAPI security schemes."""
    names = [name if where == "header" else f"{where}:{name}" for where, name in rule.credentials]
    credentials = SessionIdentity(settings.session_cookie, (*settings.credentials, *names))(
        headers, scope.get("query_string", b""))
    custom = app_middleware_options(app).identity
    if custom is None:
        return credentials, credentials
    try:
        # A WSGI app's identity reads the environ, which the WSGI shell puts in the scope as this does.
        value: str | None = custom(HTTPConnection({**scope, "cachemw.environ": _environ(url, scope)}))
    except Exception as exc:
        raise CommandFailed(f"the app's identity function failed on this request: {one_line(exc)}") from None
    return credentials, value


def _entry_report(data: bytes | None, policy: Policy, now: float) -> dict[str, Any]:
    report: dict[str, Any] = {"state": "absent", "age": None, "ttl_left": None, "status": None, "size": None,
                              "etag": None, "tags": [], "headers": []}
    if data is None:
        return report
    try:
        entry = decode_entry(data)
    except EntryDecodeError as exc:
        report.update(state="corrupt (not a cachemw entry)", detail=f"{len(data)} bytes: {exc}")
        return report
    age = now - entry.stored_at
    report.update(
        state=freshness(entry.stored_at, policy, now).value,
        age=round(age, 3),
        ttl_left=round(policy.ttl - age, 3),
        status=entry.status,
        size=len(entry.body),
        etag=entry.etag.decode("latin-1"),
        tags=list(entry.tags),
        headers=[[name.decode("latin-1"), value.decode("latin-1")] for name, value in entry.headers],
    )
    return report


def _environ(url: str, scope: dict[str, Any]) -> dict[str, Any]:
    """The WSGI environ a server would give for the request ``scope`` describes."""
    split = urlsplit(url)
    port = split.port or (443 if split.scheme == "https" else 80)
    base = {"SCRIPT_NAME": "", "PATH_INFO": scope["path"], "SERVER_NAME": split.hostname or "",
            "SERVER_PORT": str(port), "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": scope["scheme"]}
    return environ_for(scope, base)


def run(args: argparse.Namespace) -> int:
    scope = request_scope(args.url, args.header or ())
    app, table, settings = operator_settings(args)
    assert table is not None  # --app is required
    path = route_path(scope)
    match = table.match(path, "GET")
    if match is None:
        raise CommandFailed(f"no cache policy for {path}", 1)
    rule: RouteRule = match.rule
    policy = rule.policy
    assert policy is not None
    if not policy.cacheable:
        raise CommandFailed(f"no cache policy for {path}: its route {rule.template} is never cached "
                            f"(policy {policy.preset or 'with ttl 0'}, from {rule.source})", 1)
    headers = RequestHeaders(scope)
    credentials, identity = _identity_of(app, settings, rule, headers, scope, args.url)
    # The middleware's own bypasses: such a request never reads or writes an entry.
    if policy.private and identity is None:
        raise CommandFailed(f"{path}: the route {rule.template} is private (one entry per user) and the request "
                            f"names nobody; pass the user's credentials, e.g. "
                            f"-H 'Cookie: {settings.session_cookie}=...' or -H 'Authorization: ...'", 1)
    if not policy.private and (identity is not None or credentials is not None):
        raise CommandFailed(f"{path}: the route {rule.template} is shared and this request carries credentials "
                            f"(the {settings.session_cookie!r} cookie, Authorization, or what the credentials "
                            "setting or the route's security schemes name): the middleware never answers such a "
                            "request from the cache; leave them out", 1)
    key = make_key(scope, headers, policy, rule.label, settings.key_prefix, identity).key

    async def get(store: Store) -> bytes | None:
        value: bytes | None = await store.get(key)
        return value

    data: bytes | None = with_store(settings, "inspect", get)
    report = {"url": args.url, "route": rule.template, "policy": describe_policy(policy), "key": key,
              **_entry_report(data, policy, time.time())}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    lines = [("url", report["url"]), ("route", f"{rule.template}  ({report['policy']}; {rule.source})"),
             ("key", key), ("state", report["state"])]
    if "detail" in report:
        lines.append(("value", report["detail"]))
    if report["status"] is not None:
        lines += [
            ("age", f"{report['age']:.1f}s"),
            ("ttl", f"{report['ttl_left']:.1f}s"),
            ("status", str(report["status"])),
            ("size", f"{report['size']} bytes"),
            ("etag", report["etag"]),
            ("tags", ", ".join(report["tags"]) or "-"),
        ]
        stored = [f"{name}: {value}" for name, value in report["headers"]] or ["-"]
        lines += [("headers", stored[0]), *(("", line) for line in stored[1:])]
    for label, value in lines:
        print(f"{label:<8} {value}")
    return 0

