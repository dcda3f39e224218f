"""``cachemw purge (--tag T | --route R | --url U | --all) [--soft]``: drop entries from the shared Redis store.

Running apps drop their in-process copies when they hear the broadcast. ``--soft``
marks the entries stale instead: served STALE while one refresh per key replaces them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

from cachemw.cli.common import REDIS_URL_HELP, CommandFailed, Subcommands, operator_settings
from cachemw.cli.store import prefix_in_use, unused_prefix, with_store
from cachemw.core.describe import describe_policy
from cachemw.core.keys import path_tag
from cachemw.core.rules import RuleTable, normalise_template
from cachemw.runtime.invalidation import Invalidator
from cachemw.store import Store

__all__ = ["add_command"]


def add_command(commands: Subcommands) -> None:
    purge = commands.add_parser(
        "purge", help="drop entries from the shared Redis store, by tag, route, URL or all (--soft: mark them stale)",
        description="Drop entries from the shared Redis store. Running apps drop their in-process copies "
                    "when they hear the broadcast. With --soft the entries are marked stale instead: each is "
                    "served STALE within its route's stale_while_revalidate while one refresh per key (across "
                    "servers) replaces it, so a hot tag costs the origin one call per key; entries of a route "
                    "without stale_while_revalidate are dropped. The in-process memory store cannot be purged "
                    "from here.")
    what = purge.add_mutually_exclusive_group(required=True)
    what.add_argument("--tag", action="append", metavar="TAG", help="every entry carrying TAG, e.g. product:1 "
                      "(repeatable)")
    what.add_argument("--route", action="append", metavar="TEMPLATE",
                      help="every entry of a route, as the app declares it, e.g. '/products/{id}' (repeatable)")
    what.add_argument("--url", action="append", metavar="URL", help="every entry of a URL's path, whatever its "
                      "query string, varied headers or users (repeatable)")
    what.add_argument("--all", action="store_true", help="every entry under the key prefix")
    purge.add_argument("--soft", action="store_true",
                       help="mark the entries stale instead of dropping them (see above); those that cannot be "
                            "served stale are dropped")
    purge.add_argument("--app", help="the app as MODULE:ATTRIBUTE, to use the config its CacheMiddleware names")
    purge.add_argument("--config", help="a cachemw.toml or pyproject.toml (default: the app's, else defaults)")
    purge.add_argument("--redis-url", help=REDIS_URL_HELP)
    purge.add_argument("--json", action="store_true",
                       help='machine-readable output: {"dropped": N} (--soft adds "soft": true)')
    purge.set_defaults(run=run)


def _purged_path(url: str) -> str:
    """The path of a URL or path, decoded as ASGI servers give it to the app (and as entries are tagged)."""
    split = urlsplit(url)
    if split.scheme or split.netloc:
        return unquote(split.path) or "/"
    if not split.path.startswith("/"):
        raise CommandFailed(f"--url {url!r}: expected a URL (http://host/path) or a path starting with /")
    return unquote(split.path)


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



def run(args: argparse.Namespace) -> int:
    if args.route:
        for template in args.route:
            if not template.startswith("/"):
                raise CommandFailed(f"--route {template!r}: expected a route template such as /products/{{id}}")
    if args.tag and not all(tag.strip() for tag in args.tag):
        raise CommandFailed("--tag: a tag cannot be empty")
    # Paths are decoded before they are tagged: the middleware tags entries with the ASGI
    # scope's (decoded) path, while Invalidator.urls() would keep "%xx" escapes as given.
    paths = [_purged_path(url) for url in args.url or ()]
    _, table, settings = operator_settings(args)
    what = _purge_targets(args, table, paths)

    async def purge(store: Store) -> int | None:
        if not await prefix_in_use(store, settings.key_prefix):
            return None
        invalidator = Invalidator(store, settings.key_prefix, timeout=settings.background_timeout)
        soft = args.soft
        if args.all:
            return await invalidator.everything(soft=soft)
        if args.route:
            return await invalidator.routes(*args.route, soft=soft)
        if paths:
            return await invalidator.tags(*(path_tag(path) for path in paths), soft=soft)
        return await invalidator.tags(*args.tag, soft=soft)

    dropped = with_store(settings, "purge", purge)
    if dropped is None:
        raise unused_prefix(settings)
    if args.json:
        print(json.dumps({"dropped": dropped, "prefix": settings.key_prefix, **({"soft": True} if args.soft else {})}))
    else:
        entries = f"{dropped} entr{'y' if dropped == 1 else 'ies'} {what}"
        done = f"marked {entries} stale (dropped those without a stale window)" if args.soft else f"dropped {entries}"
        print(f"{done}, under the key prefix {settings.key_prefix!r}")
    return 0
