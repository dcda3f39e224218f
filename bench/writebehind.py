"""Write-behind: how fast is ``put``, and how fast does the flusher drain into SQLite?

    .venv/bin/python bench/writebehind.py             # ~1 min: 2 Redis settings x (put, drain, put+flush)

For each Redis persistence setting (none, and AOF with ``appendfsync everysec``, the
one the module docstring recommends), on a private redis-server pinned to CPU 0,
with this process (uvloop) pinned to CPU 1:

1. **put**: 64 concurrent putters call ``WriteBehind.put`` for ``--duration``
   seconds (a ~100-byte cart JSON, keys drawn from ``--keys`` carts); no flusher runs,
   so the stream grows. Reported: puts/s, p50, p99, max latency.
2. **drain**: a flusher drains that backlog into SQLite (WAL, ``synchronous=FULL``,
   one transaction per batch, the version-guarded upsert). Reported: writes
   acknowledged per second, rows upserted per second (after coalescing), batches.
3. **put + flush**: both at once in this one process, as in an app server: put
   latency with a flusher running, and the largest lag seen (sampled every 100 ms).

Writes ``bench/results/writebehind.md`` (and ``.json``). Exit status 0 when it
measured, 1 when it could not (redis-server did not start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import CpuMeter, HarnessError, RedisProcess

from cachemw.store.redis import RedisStore
from cachemw.writebehind import Write, WriteBehind

UPSERT = ("INSERT INTO carts (key, value, version) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
          "value = excluded.value, version = excluded.version WHERE excluded.version > carts.version")
SETTINGS = {
    "none": [],  # the harness's default: --appendonly no, --save ""
    "aof-everysec": [("appendonly", "yes"), ("appendfsync", "everysec")],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per put run (default: %(default)s)")
    parser.add_argument("--putters", type=int, default=64, help="concurrent putters (default: %(default)s)")
    parser.add_argument("--keys", type=int, default=10_000, help="distinct carts (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=500, help="flush batch size (default: %(default)s)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--output", type=Path, default=common.RESULTS_DIR / "writebehind.md")
    return parser.parse_args(argv)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


def cart(rng: random.Random) -> dict[str, int]:
    return {str(rng.randint(1, 40)): rng.randint(1, 5) for _ in range(rng.randint(1, 8))}


class Sqlite:
    """The database the flusher writes to, one transaction per batch in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE carts (key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL)")
        self.rows = 0
        self.batches = 0

    def _save(self, rows: list[tuple[str, str, int]]) -> None:
        with closing(sqlite3.connect(self.path, timeout=30)) as conn, conn:
            conn.execute("PRAGMA synchronous=FULL")
            conn.executemany(UPSERT, rows)

    async def flush(self, batch: list[Write[Any]]) -> None:
        await asyncio.to_thread(self._save, [(w.key, json.dumps(w.value), w.version) for w in batch])
        self.rows += len(batch)
        self.batches += 1


async def load(call: Callable[[random.Random], Awaitable[object]], args: argparse.Namespace, seed: int,
               meter: CpuMeter) -> dict[str, Any]:
    """``args.putters`` concurrent callers for ``args.duration`` seconds; latencies around each call."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + args.duration

    async def caller(n: int) -> None:
        nonlocal errors
        rng = random.Random(seed * 1000 + n)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await call(rng)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    with meter.measure() as usage:
        started = time.perf_counter()
        await asyncio.gather(*(caller(n) for n in range(args.putters)))
        elapsed = time.perf_counter() - started
    return {"calls": len(latencies), "errors": errors, "seconds": elapsed, "per_second": len(latencies) / elapsed,
            "p50_ms": pct(latencies, 50) * 1000, "p99_ms": pct(latencies, 99) * 1000,
            "max_ms": max(latencies) * 1000 if latencies else float("nan"),
            "cpu": {"redis": usage.processes.get("redis", 0.0), "harness": usage.processes.get("harness", 0.0),
                    "others": usage.others}}


def put_call(writes: WriteBehind[Any], keys: int) -> Callable[[random.Random], Awaitable[object]]:
    async def call(rng: random.Random) -> object:
        return await writes.put(f"user:{rng.randrange(keys)}", cart(rng))

    return call


async def run_setting(name: str, args: argparse.Namespace, redis: RedisProcess, scratch: Path) -> dict[str, Any]:
    redis.flushall()
    for key, value in SETTINGS[name]:
        redis.command("CONFIG", "SET", key, value)
    prefix = f"bench-{name}"
    db = Sqlite(scratch / f"{name}.sqlite3")
    writes = WriteBehind("cart", flush=db.flush, redis_url=redis.url, key_prefix=prefix,
                         batch_size=args.batch_size, batch_delay=0.005, max_in_flight=args.batch_size * 4)
    assert redis.proc is not None
    meter = CpuMeter({"redis": redis.proc.pid})
    result: dict[str, Any] = {"setting": name}
    baseline = RedisStore.from_url(redis.url, timeout=writes.timeout)
    try:
        # 0. for scale: a bare GET of a ~100-byte value through the same kind of client and pool.
        await baseline.set("bench:get", b"x" * 100, 3600)
        result["get"] = await load(lambda rng: baseline.get("bench:get"), args, 0, meter)
        # 1. put alone: the stream grows.
        result["put"] = await load(put_call(writes, args.keys), args, 1, meter)
        backlog = (await writes.status()).backlog

        # 2. drain it into SQLite.
        started = time.perf_counter()
        async with writes.running():
            while (await writes.status()).backlog:
                await asyncio.sleep(0.01)
            drained = time.perf_counter() - started
        result["drain"] = {"writes": backlog, "seconds": drained, "writes_per_second": backlog / drained,
                           "rows": db.rows, "rows_per_second": db.rows / drained, "batches": db.batches}

        # 3. put while a flusher runs, as in an app server.
        rows_before, batches_before = db.rows, db.batches
        max_lag = 0.0
        async with writes.running():
            async def watch() -> None:
                nonlocal max_lag
                while True:
                    max_lag = max(max_lag, (await writes.status()).lag)
                    await asyncio.sleep(0.1)

            watcher = asyncio.create_task(watch())
            try:
                result["put_with_flusher"] = await load(put_call(writes, args.keys), args, 2, meter)
            finally:
                watcher.cancel()
            end = await writes.status()
            started = time.perf_counter()
            while (await writes.status()).backlog:
                await asyncio.sleep(0.01)
            caught_up = time.perf_counter() - started
        result["flush_during_puts"] = {"max_lag_s": max_lag, "backlog_at_end": end.backlog,
                                       "caught_up_after_s": caught_up, "rows": db.rows - rows_before,
                                       "batches": db.batches - batches_before}
        result["final"] = (await writes.status()).as_dict()
    finally:
        await writes.aclose()
        await baseline.aclose()
    return result


def report(args: argparse.Namespace, facts: dict[str, str], results: list[dict[str, Any]], argv: list[str]) -> str:
    command = " ".join([".venv/bin/python bench/writebehind.py", *map(shlex.quote, argv)])
    lines = [
        "# Write-behind: put latency and flush throughput",
        "",
        "How fast `WriteBehind.put` returns (value stored and change appended to the stream, one Lua",
        "script, durable in Redis), and how fast the flusher drains the stream into SQLite.",
        "",
        "Generated by `bench/writebehind.py`; see its docstring.",
        "",
        "## Setup",
        "",
        *(f"- {k}: {v}" for k, v in facts.items()),
        "",
        "- redis-server: private, loopback TCP, pinned to CPU 0; persistence per row below",
        f"- harness: one process, uvloop, pinned to CPU 1; {args.putters} concurrent putters for "
        f"{args.duration:g} s per put run; keys drawn uniformly from {args.keys} carts; values ~100-byte JSON",
        f"- flusher: batch_size {args.batch_size}, batch_delay 5 ms, SQLite WAL with synchronous=FULL, "
        "one transaction per batch in a worker thread, version-guarded upsert",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "## put (no flusher running)",
        "",
        "With, for scale, a bare `GET` through the same kind of client and pool. Redis stays below 0.1 core:",
        "throughput is bounded by the client side (redis-py in one Python process, on a core it shares with",
        "whatever *others* run). CPU columns: share of one core during the run (*others*: everything else on",
        "the machine, i.e. noise; when it is high, read absolute numbers as a floor).",
        "",
        "| Redis persistence | call | calls/s | p50 ms | p99 ms | max ms | errors | redis CPU | harness CPU | "
        "others CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for label, p in (("bare GET", r["get"]), ("**put**", r["put"])):
            cpu = p["cpu"]
            lines.append(f"| {r['setting']} | {label} | {p['per_second']:.0f} | {p['p50_ms']:.2f} | "
                         f"{p['p99_ms']:.2f} | {p['max_ms']:.1f} | {p['errors']} | {cpu['redis']:.2f} | "
                         f"{cpu['harness']:.2f} | {cpu['others']:.2f} |")
    lines += ["", "## drain: the backlog of that run into SQLite", "",
              "| Redis persistence | writes | seconds | writes acknowledged/s | rows upserted/s | batches |",
              "|---|---|---|---|---|---|"]
    for r in results:
        d = r["drain"]
        lines.append(f"| {r['setting']} | {d['writes']} | {d['seconds']:.2f} | {d['writes_per_second']:.0f} | "
                     f"{d['rows_per_second']:.0f} | {d['batches']} |")
    lines += ["", "Rows are fewer than writes: repeated writes to one cart within a batch are coalesced.", "",
              "## put while a flusher runs (same process, as in an app server)", "",
              "| Redis persistence | puts/s | p50 ms | p99 ms | max ms | largest lag s | backlog at end | "
              "caught up after s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, f = r["put_with_flusher"], r["flush_during_puts"]
        lines.append(f"| {r['setting']} | {p['per_second']:.0f} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | "
                     f"{p['max_ms']:.1f} | {f['max_lag_s']:.2f} | {f['backlog_at_end']} | "
                     f"{f['caught_up_after_s']:.2f} |")
    lines += ["", "Latencies are measured in the harness around `await put(...)` (client side, loopback).",
              "Numbers from a 2-CPU machine shared with other work are noisy; compare rows of one report.", ""]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace, redis: RedisProcess, scratch: Path) -> list[dict[str, Any]]:
    results = []
    for name in args.settings:
        print(f"writebehind bench: Redis persistence {name} ...", flush=True)
        results.append(await run_setting(name, args, redis, scratch))
        put = results[-1]["put"]
        print(f"  bare GET {results[-1]['get']['per_second']:.0f}/s;"
              f" put {put['per_second']:.0f}/s p50 {put['p50_ms']:.2f} ms p99 {put['p99_ms']:.2f} ms; drain "
              f"{results[-1]['drain']['writes_per_second']:.0f} writes/s", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    server_cpu, client_cpu = common.default_cpus()
    if client_cpu is not None:
        os.sched_setaffinity(0, {int(client_cpu)})
    scratch = Path(tempfile.mkdtemp(prefix="cachemw-bench-wb-"))
    try:
        with RedisProcess(scratch / "redis", cpu=server_cpu) as redis:
            facts = common.machine_description(redis_binary=redis.binary,
                                               packages=("cachemw", "anyio", "uvloop", "redis", "hiredis"))
            facts.pop("wrk", None)
            facts["sqlite"] = sqlite3.sqlite_version
            import uvloop

            results = uvloop.run(main_async(args, redis, scratch))
    except HarnessError as exc:
        print(f"writebehind bench: {exc}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report(args, facts, results, argv))
    args.output.with_suffix(".json").write_text(json.dumps({"facts": facts, "results": results}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
