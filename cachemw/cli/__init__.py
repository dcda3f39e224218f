"""The ``cachemw`` command: what an operator asks of a deployed app's cache.

- ``cachemw routes APP``: every route of an app with its effective policy;
- ``cachemw check FILE [--app APP]``: validate a config file (and its rules against an app);
- ``cachemw purge (--tag T | --route R | --url U | --all)``: drop entries from the shared Redis store;
- ``cachemw inspect URL --app APP``: compute a URL's key as the middleware does and show its entry;
- ``cachemw stats``: every live process's counters, added up from Redis (``--watch`` to follow them);
- ``cachemw warm URL...``: GET URLs from a running server, so their entries exist before traffic does.

``purge`` and ``inspect`` act on the Redis the configuration names (``--config``,
else the config the app's ``CacheMiddleware`` names), overridden by
``CACHEMW_REDIS_URL`` and then ``--redis-url``. The in-process memory store is out
of their reach. Exit status: 0 done, 1 nothing to show (no policy for a URL), 2 a
usage, configuration or store error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import anyio

from cachemw.asgi.routes import build_rule_table
from cachemw.core.describe import describe_policy
from cachemw.core.entry import EntryDecodeError, decode_entry
from cachemw.core.keys import RequestHeaders, SessionIdentity, make_key, path_tag, route_path
from cachemw.core.policy import ConfigError, Policy, freshness
from cachemw.core.rules import RouteRule, RuleTable, normalise_template
from cachemw.core.settings import REDIS_URL_ENV, Settings, load_settings, masked_url
from cachemw.runtime.invalidation import Invalidator
from cachemw.store import Store, StoreError
from cachemw.store.opening import open_store

__all__ = ["main"]


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
        raise CommandFailed(f"{path!r} is not an app import path; expected MODULE:ATTRIBUTE, e.g. sample_app:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandFailed(f"cannot import {module_name!r}: {exc}") from None
    app = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise CommandFailed(f"module {module_name!r} has no attribute {attribute!r}") from None
    return app


def _middleware_options(app: Any) -> dict[str, Any]:
    """The keyword arguments the app's CacheMiddleware was given (empty if it has none)."""
    from cachemw.asgi.middleware import CacheMiddleware

    if isinstance(app, CacheMiddleware):
        options = app.options
        return {field.name: getattr(options, field.name) for field in fields(options)}
    for middleware in getattr(app, "user_middleware", ()):
        if middleware.cls is CacheMiddleware:
            return dict(middleware.kwargs)
    return {}


def app_write_behinds(app: Any) -> list[str]:
    """The names of the write-behind queues the app's CacheMiddleware runs."""
    from cachemw.asgi.middleware import CacheMiddleware

    if isinstance(app, CacheMiddleware):
        queues: Any = app.write_behinds
    else:
        queues = _middleware_options(app).get("write_behind") or ()
    return [queue.name for queue in queues]


def app_rule_table(app: Any, config: str | None) -> tuple[RuleTable, Settings]:
    """The rule table the app's CacheMiddleware would build, with the config it names (or ``config``)."""
    options = _middleware_options(app)
    if config is not None:
        settings = load_settings(config)
    elif options.get("settings") is not None:
        settings = options["settings"]
    else:
        settings = load_settings(options.get("config"))
    return build_rule_table(_routes_of(app), settings), settings


def _routes_of(app: Any) -> Any:
    from cachemw.asgi.middleware import CacheMiddleware

    routes = getattr(app.app if isinstance(app, CacheMiddleware) else app, "routes", None)
    if routes is None:
        raise CommandFailed("the app has no routes (is it a Starlette or FastAPI app?)")
    return routes


def _cmd_routes(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    table, settings = app_rule_table(app, args.config)
    if args.json:
        print(json.dumps({
            "config": settings.source,
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
    print(f"\nconfig: {settings.source or '(none: defaults)'}; store: "
          f"{'redis' if settings.redis_url else 'memory'}")
    for warning in table.warnings:
        print(f"warning: {warning}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    # What CacheMiddleware.prepare does at startup, short of connecting: the settings, the rule
    # table (with --app) and the store the settings name, made and closed unused.
    settings = load_settings(args.file, environ={})
    if args.app:
        app = load_app(args.app)
        build_rule_table(_routes_of(app), settings)
    store = open_store(settings)
    with contextlib.suppress(StoreError):
        anyio.run(store.aclose)
    print(f"{args.file}: ok ({len(settings.rules)} rule(s), {len(settings.presets)} polic"
          f"{'y' if len(settings.presets) == 1 else 'ies'})")
    return 0


# -- purge and inspect: the shared store ------------------------------------------------------------

OPERATOR_TIMEOUT = 2.0  # seconds per store call: longer than the request path's budget, an operator waits
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_QUERY_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "#")


class CommandFailed(Exception):
    """A failure to report in one line (``cachemw: MESSAGE``) with an exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def _operator_settings(args: argparse.Namespace) -> tuple[Any, RuleTable | None, Settings]:
    """The app (if named), its rule table and the settings its middleware runs with, then the overrides.

    Precedence of the store URL: ``--redis-url``, ``CACHEMW_REDIS_URL``, the
    app's ``CacheMiddleware(redis_url=...)``, the config file.
    """
    app: Any = None
    table: RuleTable | None = None
    if args.app:
        app = load_app(args.app)
        table, settings = app_rule_table(app, args.config)
        # What CacheMiddleware.prepare applies over its settings: keys are made with this prefix.
        options = _middleware_options(app)
        if options.get("redis_url") is not None:
            settings = replace(settings, redis_url=options["redis_url"])
        if options.get("key_prefix") is not None:
            settings = replace(settings, key_prefix=options["key_prefix"])
    else:
        settings = load_settings(args.config)
    env_url = os.environ.get(REDIS_URL_ENV)
    if env_url:
        settings = replace(settings, redis_url=env_url)
    if args.redis_url:
        settings = replace(settings, redis_url=args.redis_url)
    return app, table, settings


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _open_store(settings: Settings, doing: str) -> Store:
    if settings.redis_url is None:
        raise CommandFailed("no redis_url configured: the memory store lives inside the app process; "
                            f"nothing to {doing} from here")
    return open_store(settings, timeout=OPERATOR_TIMEOUT)  # as startup makes it; a bad URL is a ConfigError


def _with_store(settings: Settings, doing: str, work: Callable[[Store], Any]) -> Any:
    """Run ``await work(store)`` on the configured Redis and close it; a store failure is one line."""
    store = _open_store(settings, doing)

    async def go() -> Any:
        try:
            return await work(store)
        finally:
            # A failure to close says less than the command's own failure, if any.
            with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
                await store.aclose()

    try:
        return anyio.run(go)
    except StoreError as exc:
        assert settings.redis_url is not None
        detail = _one_line(exc.__cause__ or exc)  # the driver's own words say more than the wrapper's
        raise CommandFailed(f"{doing} failed: the redis store at {masked_url(settings.redis_url)} did not answer "
                            f"({detail})") from None


def _purged_path(url: str) -> str:
    """The path of a URL or path, decoded as ASGI servers give it to the app (and as entries are tagged)."""
    split = urlsplit(url)
    if split.scheme or split.netloc:
        return unquote(split.path) or "/"
    if not split.path.startswith("/"):
        raise CommandFailed(f"--url {url!r}: expected a URL (http://host/path) or a path starting with /")
    return unquote(split.path)


async def prefix_in_use(store: Store, prefix: str) -> bool:
    """Whether the store holds any key under ``prefix:`` (entries, tag indexes, fleet reports, queues)."""
    client = getattr(store, "client", None)
    if client is None:
        return True  # not a Redis store: nothing to look at, so nothing to say
    from cachemw.store.redis import DRIVER_ERRORS

    try:
        async for _ in client.scan_iter(match=f"{prefix}:*", count=1000):  # a prefix has no glob characters
            return True
    except DRIVER_ERRORS as exc:
        raise StoreError(_one_line(exc) or "timed out") from exc
    return False


def _unused_prefix(settings: Settings) -> CommandFailed:
    assert settings.redis_url is not None
    return CommandFailed(
        f"nothing is stored under the key prefix {settings.key_prefix!r} at {masked_url(settings.redis_url)}: no "
        "app caches there under that prefix. HINT: pass --app (or --config) so the command uses the app's "
        "key_prefix", 1)


def _purge_targets(args: argparse.Namespace, table: RuleTable | None, paths: Sequence[str]) -> str:
    """What a purge looks for, in words; with the app's rule table, a route or URL that cannot have entries fails."""
    if table is not None:
        cached = sorted({rule.template for rule in table.rules if rule.policy is not None and rule.policy.cacheable})
        for template in args.route or ():
            wanted = normalise_template(template)
            rules = [rule for rule in table.rules if normalise_template(rule.template) == wanted]
            if not rules:
                raise CommandFailed(f"--route {template!r} names no route of {args.app}; its cached routes are: "
                                    f"{', '.join(cached) or '(none)'}")
            if not any(rule.policy is not None and rule.policy.cacheable for rule in rules):
                raise CommandFailed(f"--route {template!r}: the route {rules[0].template} has no cache policy that "
                                    f"stores entries ({describe_policy(rules[0].policy)}, from {rules[0].source}): "
                                    "nothing to purge", 1)
        for url, path in zip(args.url or (), paths, strict=True):
            match = table.match(path, "GET")
            if match is None or match.rule.policy is None or not match.rule.policy.cacheable:
                raise CommandFailed(f"--url {url!r}: {path} is on no cached route of {args.app}: nothing to purge; "
                                    f"its cached routes are: {', '.join(cached) or '(none)'}", 1)
    if args.all:
        return "(all entries)"
    if args.route:
        return "of route " + ", ".join(args.route)
    if paths:
        return "of path " + ", ".join(paths)
    return "tagged " + ", ".join(args.tag)


def _cmd_purge(args: argparse.Namespace) -> int:
    if args.route:
        for template in args.route:
            if not template.startswith("/"):
                raise CommandFailed(f"--route {template!r}: expected a route template such as /products/{{id}}")
    if args.tag and not all(tag.strip() for tag in args.tag):
        raise CommandFailed("--tag: a tag cannot be empty")
    # Paths are decoded before they are tagged: the middleware tags entries with the ASGI
    # scope's (decoded) path, while Invalidator.urls() would keep "%xx" escapes as given.
    paths = [_purged_path(url) for url in args.url or ()]
    _, table, settings = _operator_settings(args)
    what = _purge_targets(args, table, paths)

    async def purge(store: Store) -> int | None:
        if not await prefix_in_use(store, settings.key_prefix):
            return None
        invalidator = Invalidator(store, settings.key_prefix, timeout=settings.background_timeout)
        if args.all:
            return await invalidator.everything()
        if args.route:
            return await invalidator.routes(*args.route)
        if paths:
            return await invalidator.tags(*(path_tag(path) for path in paths))
        return await invalidator.tags(*args.tag)

    dropped: int | None = _with_store(settings, "purge", purge)
    if dropped is None:
        raise _unused_prefix(settings)
    if args.json:
        print(json.dumps({"dropped": dropped, "prefix": settings.key_prefix}))
    else:
        print(f"dropped {dropped} entr{'y' if dropped == 1 else 'ies'} {what}, under the key prefix "
              f"{settings.key_prefix!r}")
    return 0


def _request_scope(url: str, extra_headers: Sequence[str]) -> dict[str, Any]:
    """The ASGI scope of ``GET url`` as a server gives it to the app (path decoded, Host from the URL)."""
    split = urlsplit(url)
    scheme = split.scheme.lower()
    if scheme not in ("http", "https") or not split.hostname:
        raise CommandFailed(f"{url!r} is not an absolute http(s) URL, e.g. http://example.com/products/1")
    try:
        port = split.port
    except ValueError:
        raise CommandFailed(f"{url!r}: the port is not a number from 0 to 65535") from None
    headers: list[tuple[bytes, bytes]] = []
    for raw in extra_headers:
        name, colon, value = raw.partition(":")
        name = name.strip().lower()
        if not colon or not name or not set(name) <= _TOKEN:
            raise CommandFailed(f"-H {raw!r}: expected a header as 'Name: value'")
        try:
            headers.append((name.encode("ascii"), value.strip().encode("latin-1")))
        except UnicodeEncodeError:
            raise CommandFailed(f"-H {raw!r}: a header value must be latin-1 text") from None
    if not any(name == b"host" for name, _ in headers):
        # As HTTP clients send it: no userinfo, no default port.
        host = split.netloc.rpartition("@")[2].lower()
        if port is not None and port == (80 if scheme == "http" else 443):
            port = None
            host = host[: host.rfind(":")]
        try:
            host_bytes = host.encode("ascii")
        except UnicodeEncodeError:  # an international domain name, as clients send it
            try:
                host_bytes = split.hostname.encode("idna") + (b"" if port is None else f":{port}".encode())
            except UnicodeError:
                raise CommandFailed(f"{url!r}: {split.hostname!r} is not a valid host name") from None
        headers.insert(0, (b"host", host_bytes))
    raw_path = quote(split.path or "/", safe=_QUERY_SAFE)
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": scheme,
        "path": unquote(split.path) or "/",
        "raw_path": raw_path.encode("ascii"),
        "root_path": "",
        "query_string": quote(split.query, safe=_QUERY_SAFE).encode("ascii"),
        "headers": headers,
        "client": None,
        "server": None,
    }


def _identity_of(app: Any, settings: Settings, rule: RouteRule, headers: RequestHeaders,
                 scope: dict[str, Any]) -> tuple[str | None, str | None]:
    """The request's credentials and who it is for, as the app's middleware decides them (its custom
    identity, if it has one): the session cookie, Authorization, the ``credentials`` setting and the
    route's FastAPI security schemes."""
    names = [name if where == "header" else f"{where}:{name}" for where, name in rule.credentials]
    credentials = SessionIdentity(settings.session_cookie, (*settings.credentials, *names))(
        headers, scope.get("query_string", b""))
    custom = _middleware_options(app).get("identity")
    if custom is None:
        return credentials, credentials
    from starlette.requests import HTTPConnection

    try:
        value: str | None = custom(HTTPConnection(scope))
    except Exception as exc:
        raise CommandFailed(f"the app's identity function failed on this request: {_one_line(exc)}") from None
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


def _cmd_inspect(args: argparse.Namespace) -> int:
    scope = _request_scope(args.url, args.header or ())
    app, table, settings = _operator_settings(args)
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
    credentials, identity = _identity_of(app, settings, rule, headers, scope)
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

    data: bytes | None = _with_store(settings, "inspect", get)
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

    store_help = ("the Redis holding the entries (default: CACHEMW_REDIS_URL, else the app's CacheMiddleware, "
                  "else the config file)")
    purge = commands.add_parser(
        "purge", help="drop entries from the shared Redis store, by tag, route, URL or all",
        description="Drop entries from the shared Redis store. Running apps drop their in-process copies "
                    "when they hear the broadcast. The in-process memory store cannot be purged from here.")
    what = purge.add_mutually_exclusive_group(required=True)
    what.add_argument("--tag", action="append", metavar="TAG", help="every entry carrying TAG, e.g. product:1 "
                      "(repeatable)")
    what.add_argument("--route", action="append", metavar="TEMPLATE",
                      help="every entry of a route, as the app declares it, e.g. '/products/{id}' (repeatable)")
    what.add_argument("--url", action="append", metavar="URL", help="every entry of a URL's path, whatever its "
                      "query string, varied headers or users (repeatable)")
    what.add_argument("--all", action="store_true", help="every entry under the key prefix")
    purge.add_argument("--app", help="the app as MODULE:ATTRIBUTE, to use the config its CacheMiddleware names")
    purge.add_argument("--config", help="a cachemw.toml or pyproject.toml (default: the app's, else defaults)")
    purge.add_argument("--redis-url", help=store_help)
    purge.add_argument("--json", action="store_true", help='machine-readable output: {"dropped": N}')
    purge.set_defaults(run=_cmd_purge)

    inspect = commands.add_parser(
        "inspect", help="show the cache entry a GET of a URL would be answered from",
        description="Compute the key of GET URL exactly as the app's CacheMiddleware does and show the entry "
                    "stored under it in Redis: freshness, age, status, size, ETag, tags and headers.")
    inspect.add_argument("url", metavar="URL", help="an absolute URL as clients ask it, e.g. "
                         "http://shop.example/products/1 (its host is part of the key)")
    inspect.add_argument("--app", required=True, help="the app as MODULE:ATTRIBUTE, e.g. sample_app:app")
    inspect.add_argument("--config", help="a cachemw.toml or pyproject.toml (default: what the app's "
                         "CacheMiddleware names)")
    inspect.add_argument("--redis-url", help=store_help)
    inspect.add_argument("-H", "--header", action="append", metavar="'NAME: VALUE'",
                         help="a request header, e.g. one the route varies on (repeatable)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=_cmd_inspect)
    _add_observe_commands(commands, store_help)
    from cachemw.writebehind import cli as writebehind_cli

    writebehind_cli.add_commands(commands)
    return parser


# -- stats and warm: the fleet's counters, and entries filled ahead of traffic ----------------------


def _add_observe_commands(commands: Any, store_help: str) -> None:
    stats = commands.add_parser(
        "stats", help="every live process's counters, added up from Redis",
        description="Read the counters each running process writes to Redis (CacheMiddleware with "
                    "enable_fleet_metrics) and add them up: per route requests, hit ratio, HIT/STALE/MISS/BYPASS, "
                    "stale-if-error serves and refreshes; the store, the background queue, the L1, write-behind. "
                    "Exit status: 0 shown, 1 no process reports, 2 a usage, configuration or store error.")
    stats.add_argument("--app", help="the app as MODULE:ATTRIBUTE, to use the config its CacheMiddleware names")
    stats.add_argument("--config", help="a cachemw.toml or pyproject.toml (default: the app's, else defaults)")
    stats.add_argument("--redis-url", help=store_help)
    stats.add_argument("--watch", type=float, metavar="SECONDS", nargs="?", const=2.0,
                       help="show them again every SECONDS (default 2) until interrupted")
    stats.add_argument("--json", action="store_true", help="machine-readable output (with --watch: one JSON "
                       "object per line)")
    stats.set_defaults(run=_cmd_stats)

    warm = commands.add_parser(
        "warm", help="GET URLs from a running server so their entries exist before traffic does",
        description="GET each URL from the running app (not from Redis: the app makes and stores the entries), "
                    "a few at a time, and report each answer's X-Cache: MISS (filled now), HIT (was cached), "
                    "BYPASS (not cacheable as asked). Exit status: 0 all answered, 1 some failed, 2 none could "
                    "be fetched or a usage error.")
    warm.add_argument("urls", nargs="*", metavar="URL", help="absolute URLs, e.g. http://localhost:8000/products/1")
    warm.add_argument("--from-file", metavar="FILE", help="also the URLs in FILE, one per line ('-': stdin)")
    warm.add_argument("--app", help="the app as MODULE:ATTRIBUTE: show each URL's route and policy, and warn "
                      "about URLs without one")
    warm.add_argument("--config", help="a cachemw.toml or pyproject.toml (with --app; default: the app's)")
    warm.add_argument("--concurrency", type=int, default=4, help="requests at once (default: %(default)s)")
    warm.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: %(default)s)")
    warm.add_argument("-H", "--header", action="append", metavar="'NAME: VALUE'",
                      help="a request header, e.g. one the route varies on (repeatable)")
    warm.add_argument("--json", action="store_true", help="machine-readable output")
    warm.set_defaults(run=_cmd_warm)


def _cmd_stats(args: argparse.Namespace) -> int:
    from cachemw.observe import aggregate, read_fleet
    from cachemw.store.redis import DRIVER_ERRORS

    if args.watch is not None and not 0.1 <= args.watch <= 3600:
        raise CommandFailed(f"--watch {args.watch:g}: expected a number of seconds from 0.1 to 3600")
    _, _, settings = _operator_settings(args)
    prefix = settings.key_prefix
    found: list[int] = []

    async def view(store: Store) -> dict[str, Any]:
        client = getattr(store, "client", None)
        assert client is not None  # _open_store makes a RedisStore
        try:
            with anyio.fail_after(OPERATOR_TIMEOUT * 5):
                documents = await read_fleet(client, prefix)
        except DRIVER_ERRORS as exc:  # as the store boundary reports the driver's errors (a timeout is an OSError)
            raise StoreError(_one_line(exc) or "timed out") from exc
        return aggregate(documents)

    def show(data: dict[str, Any], clear: bool) -> None:
        if args.json:
            print(json.dumps(data, indent=None if args.watch is not None else 2), flush=True)
            return
        text = render_stats(data, prefix)
        if clear:
            sys.stdout.write("\x1b[H\x1b[2J")
        print(text, flush=True)

    async def work(store: Store) -> None:
        clear = args.watch is not None and sys.stdout.isatty()
        while True:
            data = await view(store)
            found.append(len(data["processes"]))
            show(data, clear)
            if args.watch is None:
                return
            await anyio.sleep(args.watch)

    try:
        _with_store(settings, "read stats", work)
    except KeyboardInterrupt:
        return 0
    if args.watch is None and not found[-1]:
        print(f"cachemw: no process reports its counters to this Redis under the prefix {prefix!r}. HINT: the "
              "app's CacheMiddleware writes them with cachemw.observe.enable_fleet_metrics(cache); check --app "
              "or --config name the app's key_prefix", file=sys.stderr)
        return 1
    return 0


def _by_route(routes: list[dict[str, Any]], totals: dict[str, Any], counter: str, label: str, meaning: str
              ) -> list[str]:
    """One line for a counter that should be zero, with the routes where it is not, most first; none if zero."""
    rows = sorted((row for row in routes if row.get(counter)), key=lambda row: -row[counter])
    if not rows:
        return []
    return [f"{label:<13} {totals.get(counter, 0)} {meaning} ("
            + ", ".join(f"{row['route']} {row[counter]}" for row in rows) + ")"]


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == float("inf"):
        return "> 10s"
    return f"<={seconds * 1000:g}ms" if seconds < 1 else f"<={seconds:g}s"


def render_stats(data: dict[str, Any], prefix: str) -> str:
    """The text of ``cachemw stats``: a route table, then one line each for processes, store, queue, L1."""
    from cachemw.observe import quantile

    header = ("ROUTE", "POLICY", "REQUESTS", "HIT RATIO", "HIT", "STALE", "MISS", "BYPASS", "STALE-IF-ERROR",
              "COALESCED", "REFRESH OK/FAILED", "ORIGIN P50")
    rows = [header]
    for row in sorted(data["routes"], key=lambda r: (-r["requests"], r["route"])):
        rows.append((row["route"], row["policy"], str(row["requests"]),
                     f"{row['hit_ratio'] * 100:.1f}%" if row["hit"] + row["stale"] + row["miss"] else "-",
                     str(row["hit"]), str(row["stale"]), str(row["miss"]), str(row["bypass"]),
                     str(row["stale_if_error"]), str(row["collapsed"]), f"{row['refresh_ok']}/{row['refresh_failed']}",
                     _ms(quantile(row["origin_latency"], 0.5))))
    totals = data["totals"]
    if len(rows) > 1:
        rows.append(("(all)", "", str(totals["requests"]),
                     f"{totals['hit_ratio'] * 100:.1f}%" if totals["hit"] + totals["stale"] + totals["miss"] else "-",
                     str(totals["hit"]), str(totals["stale"]), str(totals["miss"]), str(totals["bypass"]),
                     str(totals["stale_if_error"]), str(totals["collapsed"]),
                     f"{totals['refresh_ok']}/{totals['refresh_failed']}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(r)).rstrip()
             for r in rows]
    processes = data["processes"]
    if not processes:
        lines.append(f"(no process reports under the prefix {prefix!r})")
    lines.append("")
    if processes:
        names = ", ".join(f"{p['host']}:{p['pid']}" for p in processes)
        newest = min(p["age"] for p in processes)
        lines.append(f"processes     {len(processes)} reporting ({names}); newest report {max(newest, 0):.1f}s ago")
    store = data["store"]
    kinds = ", ".join(f"{kind} x{n}" for kind, n in store["kinds"].items()) or "-"
    breaker = ", ".join(f"{state} x{n}" for state, n in store["breaker"].items()) or "-"
    latency = store["latency"]
    lines.append(f"store         {kinds}; breaker {breaker}; subscribed {store['listening']}/{len(processes)}; "
                 f"errors {store['errors']}; lookup p50 {_ms(quantile(latency, 0.5))}, "
                 f"p99 {_ms(quantile(latency, 0.99))}")
    lag = store.get("loop_lag")
    if lag and lag.get("count"):  # which of the two: our own lateness or the store's
        lines.append(f"loop lag      p50 {_ms(quantile(lag, 0.5))}, p99 {_ms(quantile(lag, 0.99))}; "
                     f"{store.get('loop_lag_timeouts', 0)} of the store errors were timeouts of this lag, "
                     "not the store's (not counted by the breaker)")
    kinds_text = "; ".join(
        f"{kind} {c['queued']} queued, {c['running']} running, {c['done']} done, {c['failed']} failed, "
        f"{c['shed']} shed" + (f", {c['abandoned']} abandoned" if c["abandoned"] else "")
        for kind, c in data["supervisor"]["kinds"].items())
    lines.append(f"queue         {kinds_text or '-'}")
    # Past origin_concurrency the database was spared these calls; a full queue cost these entries.
    lines += _by_route(data["routes"], totals, "origin_busy", "origin busy", "answered stale or 503 past "
                       "origin_concurrency")
    lines += _by_route(data["routes"], totals, "fills_shed", "fills shed", "answered but not stored: the "
                       "background queue was full")
    l1 = data["l1"]
    lines.append(f"L1            {l1['entries']} entries, {l1['bytes_used']} bytes; {l1['hits']} hits "
                 f"({l1['hit_share'] * 100:.1f}% of HITs); {l1['dropped']} dropped")
    for status in data["write_behind"]:
        if "error" in status:
            lines.append(f"write-behind  {status['name']}: {status['error']}")
        else:
            lines.append(f"write-behind  {status['name']}: backlog {status['backlog']}, lag {status['lag']:.1f}s, "
                         f"dead {status['dead']}, flushed {status['flushed']}")
    return "\n".join(lines)


def _warm_urls(args: argparse.Namespace) -> list[str]:
    urls = list(args.urls)
    if args.from_file:
        try:
            if args.from_file == "-":
                text = sys.stdin.read()
            else:
                with open(args.from_file, encoding="utf-8") as fh:
                    text = fh.read()
        except OSError as exc:
            raise CommandFailed(f"--from-file {args.from_file}: {exc.strerror or exc}") from None
        urls += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not urls:
        raise CommandFailed("no URL to warm: name them as arguments or with --from-file")
    for url in urls:
        split = urlsplit(url)
        if split.scheme.lower() not in ("http", "https") or not split.hostname:
            raise CommandFailed(f"{url!r} is not an absolute http(s) URL, e.g. http://localhost:8000/products/1")
    return urls


def _fetch(url: str, headers: dict[str, str], timeout: float) -> dict[str, Any]:
    """GET ``url`` (redirects not followed: a redirect is an answer too) and read the whole body."""
    import urllib.error
    import urllib.request

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(_NoRedirect())
    request = urllib.request.Request(url, headers={"User-Agent": "cachemw-warm", **headers}, method="GET")
    began = time.perf_counter()
    result: dict[str, Any] = {"url": url, "status": None, "x_cache": None, "cache_status": None, "bytes": 0,
                              "seconds": None, "error": None}
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read()
            status, response_headers = response.status, response.headers
    except urllib.error.HTTPError as exc:  # a 4xx/5xx or an unfollowed redirect: still an answer
        with exc:
            body = exc.read()
            status, response_headers = exc.code, exc.headers
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        result["error"] = _one_line(reason) if isinstance(reason, BaseException) else str(reason)
        return result
    result.update(status=status, x_cache=response_headers.get("x-cache"),
                  cache_status=response_headers.get("cache-status"), bytes=len(body),
                  seconds=round(time.perf_counter() - began, 4))
    if status >= 500:
        result["error"] = f"HTTP {status}"
    return result


def _cmd_warm(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    urls = _warm_urls(args)
    if not 1 <= args.concurrency <= 256:
        raise CommandFailed(f"--concurrency {args.concurrency}: expected a number from 1 to 256")
    if not 0 < args.timeout <= 3600:
        raise CommandFailed(f"--timeout {args.timeout:g}: expected a number of seconds above 0, at most 3600")
    headers: dict[str, str] = {}
    for raw in args.header or ():
        name, colon, value = raw.partition(":")
        if not colon or not name.strip() or not set(name.strip().lower()) <= _TOKEN:
            raise CommandFailed(f"-H {raw!r}: expected a header as 'Name: value'")
        headers[name.strip()] = value.strip()
    routes: dict[str, tuple[str | None, str | None]] = {}
    if args.app:
        table, _ = app_rule_table(load_app(args.app), args.config)
        for url in urls:
            match = table.match(route_path(_request_scope(url, ())), "GET")
            policy = match.rule.policy if match is not None else None
            routes[url] = ((match.rule.template, policy.preset or "custom")
                           if match is not None and policy is not None and policy.cacheable else (None, None))
    progress = sys.stderr.isatty()
    results: list[dict[str, Any]] = [{} for _ in urls]
    done = 0
    with ThreadPoolExecutor(max_workers=min(args.concurrency, len(urls))) as pool:
        futures = {pool.submit(_fetch, url, headers, args.timeout): i for i, url in enumerate(urls)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                done += 1
                if progress:
                    _progress(done, len(urls), urls[futures[future]])
        except KeyboardInterrupt:
            for future in futures:
                future.cancel()
            raise CommandFailed(f"interrupted after {done} of {len(urls)} URLs", 1) from None
        finally:
            if progress:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
    for result in results:
        if args.app:
            result["route"], result["policy"] = routes[result["url"]]
    failed = [r for r in results if r["error"] is not None]
    counts: dict[str, int] = {}
    for result in results:
        if result["error"] is None:
            state = result["x_cache"] or "-"
            counts[state] = counts.get(state, 0) + 1
    if len(failed) == len(results) and all(r["status"] is None for r in failed):
        where = {urlsplit(r["url"]).netloc for r in failed}
        raise CommandFailed(f"could not reach {', '.join(sorted(where))}: {failed[0]['error']} (is the app "
                            "running there?)")
    if args.json:
        print(json.dumps({"results": results, "summary": {"urls": len(results), "failed": len(failed),
                                                           "x_cache": counts}}, indent=2))
    else:
        for result in results:
            state = result["x_cache"] or "-"
            took = f"{result['seconds'] * 1000:.0f}ms" if result["seconds"] is not None else "-"
            note = f"  ({result['error']})" if result["error"] else ""
            if args.app and result["route"] is None:
                note += "  (no cache policy: nothing to warm)"
            print(f"{state:<7} {result['status'] or '-':>3}  {took:>7}  {result['url']}{note}")
        summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        print(f"\nwarmed {len(results) - len(failed)} of {len(results)} URLs ({summary or 'none answered'})"
              + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def _progress(done: int, total: int, url: str) -> None:
    width = 30
    filled = width * done // total
    line = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {url}"
    sys.stderr.write(line[:120] + "\x1b[K")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.run(args)
        sys.stdout.flush()  # a closed pipe shows up here, not as a traceback at exit
    except ConfigError as exc:
        print(f"cachemw: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"cachemw: {exc}", file=sys.stderr)
        return exc.status
    except BrokenPipeError:
        # The reader left early (`cachemw routes app | head`); what it read is all it wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
