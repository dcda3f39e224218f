"""``cachemw warm URL...``: GET URLs from a running server, so their entries exist before traffic does.

From the app, not from Redis: the app makes and stores the entries, as it would for a client.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any
from urllib.parse import urlsplit

from cachemw.cli.common import CommandFailed, Subcommands, app_rule_table, load_app, one_line
from cachemw.cli.urls import request_scope, split_header
from cachemw.core.keys import route_path

__all__ = ["add_command"]


def add_command(commands: Subcommands) -> None:
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
    warm.set_defaults(run=run)


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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _fetch(url: str, headers: dict[str, str], timeout: float) -> dict[str, Any]:
    """GET ``url`` (redirects not followed: a redirect is an answer too) and read the whole body."""
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
        result["error"] = one_line(reason) if isinstance(reason, BaseException) else str(reason)
        return result
    result.update(status=status, x_cache=response_headers.get("x-cache"),
                  cache_status=response_headers.get("cache-status"), bytes=len(body),
                  seconds=round(time.perf_counter() - began, 4))
    if status >= 500:
        result["error"] = f"HTTP {status}"
    return result


def _request_headers(args: argparse.Namespace) -> dict[str, str]:
    """The ``-H`` headers, checked before the first request; a later one of a name replaces an earlier one."""
    headers: dict[str, str] = {}
    for raw in args.header or ():
        name, value = split_header(raw)
        headers[name] = value
    return headers


def _routes(args: argparse.Namespace, urls: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """Per URL, its cached route and policy name in the ``--app`` (both None where nothing is cached)."""
    routes: dict[str, tuple[str | None, str | None]] = {}
    table, _ = app_rule_table(load_app(args.app), args.config)
    for url in urls:
        match = table.match(route_path(request_scope(url, ())), "GET")
        policy = match.rule.policy if match is not None else None
        routes[url] = ((match.rule.template, policy.preset or "custom")
                       if match is not None and policy is not None and policy.cacheable else (None, None))
    return routes


def _progress(done: int, total: int, url: str) -> None:
    width = 30
    filled = width * done // total
    line = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {url}"
    sys.stderr.write(line[:120] + "\x1b[K")
    sys.stderr.flush()


def _fetch_all(urls: list[str], headers: dict[str, str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every URL's result, in the order given, ``--concurrency`` at a time; a progress bar on a terminal."""
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
    return results


def _print_results(results: list[dict[str, Any]], failed: list[dict[str, Any]], counts: dict[str, int],
                   app_given: bool) -> None:
    for result in results:
        state = result["x_cache"] or "-"
        took = f"{result['seconds'] * 1000:.0f}ms" if result["seconds"] is not None else "-"
        note = f"  ({result['error']})" if result["error"] else ""
        if app_given and result["route"] is None:
            note += "  (no cache policy: nothing to warm)"
        print(f"{state:<7} {result['status'] or '-':>3}  {took:>7}  {result['url']}{note}")
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    print(f"\nwarmed {len(results) - len(failed)} of {len(results)} URLs ({summary or 'none answered'})"
          + (f"; {len(failed)} failed" if failed else ""))


def run(args: argparse.Namespace) -> int:
    urls = _warm_urls(args)
    if not 1 <= args.concurrency <= 256:
        raise CommandFailed(f"--concurrency {args.concurrency}: expected a number from 1 to 256")
    if not 0 < args.timeout <= 3600:
        raise CommandFailed(f"--timeout {args.timeout:g}: expected a number of seconds above 0, at most 3600")
    headers = _request_headers(args)
    routes = _routes(args, urls) if args.app else {}
    results = _fetch_all(urls, headers, args)
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
        _print_results(results, failed, counts, bool(args.app))
    return 1 if failed else 0
