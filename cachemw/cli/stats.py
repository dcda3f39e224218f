"""``cachemw stats``: every live process's counters, added up from what each writes to Redis.

Exit status: 0 shown, 1 no process reports, 2 a usage, configuration or store error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import anyio

from cachemw.cli.common import REDIS_URL_HELP, CommandFailed, Subcommands, one_line, operator_settings
from cachemw.cli.store import OPERATOR_TIMEOUT, with_store
from cachemw.observe import aggregate, quantile, read_fleet
from cachemw.store import Store, StoreError
from cachemw.store.redis import DRIVER_ERRORS

__all__ = ["add_command", "render_stats"]


def add_command(commands: Subcommands) -> None:
    stats = commands.add_parser(
        "stats", help="every live process's counters, added up from Redis",
        description="Read the counters each running process writes to Redis (CacheMiddleware with "
                    "enable_fleet_metrics) and add them up: per route requests, hit ratio, HIT/STALE/MISS/BYPASS, "
                    "stale-if-error serves and refreshes; the store, the background queue, the L1, write-behind. "
                    "Exit status: 0 shown, 1 no process reports, 2 a usage, configuration or store error.")
    stats.add_argument("--app", help="the app as MODULE:ATTRIBUTE, to use the config its CacheMiddleware names")
    stats.add_argument("--config", help="a cachemw.toml or pyproject.toml (default: the app's, else defaults)")
    stats.add_argument("--redis-url", help=REDIS_URL_HELP)
    stats.add_argument("--watch", type=float, metavar="SECONDS", nargs="?", const=2.0,
                       help="show them again every SECONDS (default 2) until interrupted")
    stats.add_argument("--json", action="store_true", help="machine-readable output (with --watch: one JSON "
                       "object per line)")
    stats.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.watch is not None and not 0.1 <= args.watch <= 3600:
        raise CommandFailed(f"--watch {args.watch:g}: expected a number of seconds from 0.1 to 3600")
    _, _, settings = operator_settings(args)
    prefix = settings.key_prefix
    found: list[int] = []

    async def view(store: Store) -> dict[str, Any]:
        client = getattr(store, "client", None)
        assert client is not None  # with_store opens a RedisStore
        try:
            with anyio.fail_after(OPERATOR_TIMEOUT * 5):
                documents = await read_fleet(client, prefix)
        except DRIVER_ERRORS as exc:  # as the store boundary reports the driver's errors (a timeout is an OSError)
            raise StoreError(one_line(exc) or "timed out") from exc
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
        with_store(settings, "read stats", work)
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
                 f"tracking {store.get('tracking', 0)}/{len(processes)}; "
                 f"errors {store['errors']}; lookup p50 {_ms(quantile(latency, 0.5))}, "
                 f"p99 {_ms(quantile(latency, 0.99))}")
    lag = store.get("loop_lag")
    if lag and lag.get("count"):  # which of the two: our own lateness or the store's
        lines.append(f"loop lag      p50 {_ms(quantile(lag, 0.5))}, p99 {_ms(quantile(lag, 0.99))}; "
                     f"{store.get('loop_lag_timeouts', 0)} of the store errors were timeouts of this lag, "
                     "not the store's (not counted by the breaker); "
                     f"{store.get('late_replies', 0)} replies came late and were used (the grace)")
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

