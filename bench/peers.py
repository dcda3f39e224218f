"""cachemw side by side with fastapi-cache2 and cashews, and against the raw ASGI ceiling.

    python3 bench/peers.py            # ~12 min: setup (first time), 5 rounds x 17 cases x 6 s, stampede

One command: makes ``bench/.venv-peers`` (``python3 -m venv``, ``pip install -r
bench/requirements-peers.txt -e .``: the peers' latest releases and cachemw, so every
app runs from the same environment), starts a private redis-server and one uvicorn
per app (1 process, uvloop, httptools, no access log, CPU 0), warms the caches, then
runs wrk (64 keep-alive connections, CPU 1) on every case **interleaved**: A B C ...
A B C ... for 5 rounds, and reports medians with min-max, every figure also as a
ratio to the raw ASGI ceiling measured in the same round. Then 200 concurrent
requests on one cold key per library (the stampede). Writes
``bench/results/peers.md`` (and ``.json``).

Every app serves ``GET /item/{id}`` (or a variant path) with the same ~1 KB JSON
body; cached handlers sleep 20 ms (the database), so they cost that on a miss.
Hits use 100 warmed ids (the handler counter must not move during a hit run);
misses use a new id for every request (``bench/wrk/fresh_ids.lua``).

Exit status: 0 when it measured (targets met or not, sanity checks passed or not:
both are printed and written); 1 when it could not (setup failed, a process did not
start, wrk failed, a cache never warmed).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import AppProcess, CpuMeter, HarnessError, LoadResult, RedisProcess, median

VENV = common.BENCH_DIR / ".venv-peers"
VENV_PYTHON = VENV / "bin" / "python"
REQUIREMENTS = common.BENCH_DIR / "requirements-peers.txt"
STAMP = VENV / ".cachemw-bench-stamp"
FRESH_SCRIPT = common.BENCH_DIR / "wrk" / "fresh_ids.lua"
PACKAGES = ("cachemw", "fastapi", "starlette", "fastapi-cache2", "cashews", "pydantic", "anyio", "uvicorn",
            "uvloop", "httptools", "redis", "hiredis")


# -- what runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppSpec:
    target: str  # MODULE:APP in bench/apps
    redis: bool  # gets BENCH_REDIS_URL
    header: str | None  # the response header naming the cache state, if the library sets one
    title: str = ""
    source: Path | None = None  # another checkout of cachemw to run the app from (--baseline)


APPS: dict[str, AppSpec] = {
    "raw": AppSpec("peer_raw:app", False, None, title="raw ASGI callable"),
    "starlette": AppSpec("peer_starlette:app", False, None, title="Starlette, no cache"),
    "cachemw-st": AppSpec("peer_cachemw:starlette_redis", True, "x-cache", title="Starlette + cachemw on Redis"),
    "cachemw-st-without": AppSpec("peer_cachemw:starlette_without", False, None,
                                  title="the same Starlette app without the CacheMiddleware line"),
    "cachemw-mem": AppSpec("peer_cachemw:starlette_memory", False, "x-cache",
                           title="Starlette + cachemw, memory store"),
    "cachemw-mem-inner": AppSpec("peer_cachemw:starlette_memory_inner", False, "x-cache",
                                 title="Starlette + cachemw, memory store, add_middleware form"),
    "cachemw-st-unfrozen": AppSpec("peer_cachemw:starlette_redis_unfrozen", True, "x-cache",
                                   title="Starlette + cachemw on Redis, gc_freeze = false"),
    "fastapi": AppSpec("peer_fastapi:app", False, None, title="FastAPI, no cache"),
    "fastapi-cache2": AppSpec("peer_fastapi_cache2:app", True, "x-fastapi-cache", title="FastAPI + fastapi-cache2"),
    "cashews": AppSpec("peer_cashews:app", True, None, title="FastAPI + cashews"),
    "cachemw-fa": AppSpec("peer_cachemw:fastapi_redis", True, "x-cache", title="FastAPI + cachemw on Redis"),
}


@dataclass(frozen=True)
class Case:
    name: str
    app: str
    prefix: str
    kind: str  # "hit": warmed ids, the handler must not run; "miss": a new id per request; "plain": no cache
    counter: str | None  # the handler counter of the route (``/_calls``)
    label: str
    expect: str | None = None  # header value every sampled response must carry ("none": header absent)


CASES: list[Case] = [
    Case("raw", "raw", "/item/", "plain", None, "raw ASGI callable, constant body (**the ceiling**)"),
    Case("starlette", "starlette", "/item/", "plain", None, "bare Starlette route, no cache, no sleep "
         "(`peer_starlette`)"),
    Case("starlette-without-mw", "cachemw-st-without", "/item/", "plain", None,
         "the cachemw Starlette app without the middleware line (same imports and routes)", "none"),
    Case("starlette+mw", "cachemw-st", "/item/", "plain", None,
         "the cachemw Starlette app with CacheMiddleware (Redis), route without a policy", "none"),
    Case("cachemw-redis", "cachemw-st", "/hit/", "hit", "hit", "cachemw hit on Redis (Starlette)", "HIT"),
    Case("cachemw-l1", "cachemw-st", "/l1/", "hit", "l1", "cachemw hit from L1 (`sync=\"1s\"`, Starlette)", "HIT"),
    Case("cachemw-memory", "cachemw-mem", "/hit/", "hit", "hit", "cachemw hit from the memory store (Starlette)",
         "HIT"),
    Case("cachemw-memory-inner", "cachemw-mem-inner", "/hit/", "hit", "hit",
         "cachemw hit from the memory store, *middleware inside Starlette (`add_middleware`), not wrapping it*",
         "HIT"),
    Case("cachemw-redis-unfrozen", "cachemw-st-unfrozen", "/hit/", "hit", "hit",
         "cachemw hit on Redis (Starlette), *`gc_freeze = false`, not the default*", "HIT"),
    Case("fastapi-fast", "fastapi", "/fast/", "plain", "fast", "FastAPI route, no cache, no sleep (reference)"),
    Case("fastapi-cache2-hit", "fastapi-cache2", "/item/", "hit", "item", "fastapi-cache2 hit on Redis (FastAPI)",
         "HIT"),
    Case("cashews-hit", "cashews", "/item/", "hit", "item", "cashews hit on Redis (FastAPI)"),
    Case("cachemw-fastapi-hit", "cachemw-fa", "/item/", "hit", "item", "cachemw hit on Redis (FastAPI)", "HIT"),
    Case("uncached-miss", "fastapi", "/item/", "miss", "item", "FastAPI uncached, 20 ms handler, new id per request"),
    Case("fastapi-cache2-miss", "fastapi-cache2", "/item/", "miss", "item", "fastapi-cache2 miss (new id per request)",
         "MISS"),
    Case("cashews-miss", "cashews", "/item/", "miss", "item", "cashews miss (new id per request)"),
    Case("cachemw-fastapi-miss", "cachemw-fa", "/item/", "miss", "item", "cachemw miss on Redis (FastAPI, new id "
         "per request)", "MISS"),
]
CASE = {c.name: c for c in CASES}
STAMPEDE_APPS = ("cachemw-fa", "fastapi-cache2", "cashews")
LIBRARY = {"cachemw-fa": "cachemw (Redis)", "fastapi-cache2": "fastapi-cache2", "cashews": "cashews"}


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    kind: str  # "ratio": case / other >= bound; "tail": p99/p50 <= bound; "stampede"
    case: str
    other: str | None
    bound: float


TARGETS = [
    Target("cachemw hit on Redis vs fastapi-cache2 hit on Redis (FastAPI, req/s)", ">= 4x", "ratio",
           "cachemw-fastapi-hit", "fastapi-cache2-hit", 4.0),
    Target("cachemw hit on Redis vs cashews hit on Redis (FastAPI, req/s)", ">= 3x", "ratio",
           "cachemw-fastapi-hit", "cashews-hit", 3.0),
    Target("cachemw hit from the memory store vs raw ASGI ceiling", ">= 0.75x", "ratio", "cachemw-memory", "raw",
           0.75),
    Target("cachemw hit from L1 vs raw ASGI ceiling", ">= 0.75x", "ratio", "cachemw-l1", "raw", 0.75),
    Target("route without policy: app with vs without the middleware", ">= 0.97x", "ratio", "starlette+mw",
           "starlette-without-mw", 0.97),
    Target("misses (new key per request) vs the uncached app", ">= 0.95x", "ratio", "cachemw-fastapi-miss",
           "uncached-miss", 0.95),
    Target("p99 / p50 of cachemw hits on Redis (FastAPI), 64 connections", "<= 3", "tail", "cachemw-fastapi-hit",
           None, 3.0),
    Target("p99 / p50 of cachemw hits on Redis (Starlette)", "<= 3", "tail", "cachemw-redis", None, 3.0),
    Target("p99 / p50 of cachemw hits from L1", "<= 3", "tail", "cachemw-l1", None, 3.0),
    Target("p99 / p50 of cachemw hits from the memory store", "<= 3", "tail", "cachemw-memory", None, 3.0),
    Target("200 concurrent requests on one cold key: handler runs (cachemw)", "1", "stampede", "cachemw-fa", None,
           1.0),
]
# Shown next to the targets, not targets themselves.
INFO_RATIOS = [
    ("route without policy: app with the middleware vs the bare Starlette app (fewer imports)", "starlette+mw",
     "starlette"),
    ("the cachemw app without the middleware line vs the bare Starlette app", "starlette-without-mw", "starlette"),
    ("fastapi-cache2 misses vs the uncached app", "fastapi-cache2-miss", "uncached-miss"),
    ("cashews misses vs the uncached app", "cashews-miss", "uncached-miss"),
    ("cachemw hit on Redis, FastAPI vs Starlette app", "cachemw-fastapi-hit", "cachemw-redis"),
    ("cachemw hit from L1 vs on Redis (Starlette)", "cachemw-l1", "cachemw-redis"),
    ("cachemw memory hit, wrapping the app (`CacheMiddleware(app)`) vs inside it (`app.add_middleware`)",
     "cachemw-memory", "cachemw-memory-inner"),
    ("cachemw hit on Redis, default (gc.freeze() after startup) vs `gc_freeze = false` (Starlette)", "cachemw-redis",
     "cachemw-redis-unfrozen"),
    ("fastapi-cache2 hit vs a FastAPI route without cache or sleep", "fastapi-cache2-hit", "fastapi-fast"),
    ("cashews hit vs a FastAPI route without cache or sleep", "cashews-hit", "fastapi-fast"),
]


NOTES = [
    "fastapi-cache2 is installed without its `redis` extra, which caps redis-py below 5 while cachemw needs 5 or "
    "later; its Redis backend only imports `redis.asyncio`, so every library runs on the same (latest) redis-py "
    "and hiredis. fastapi-cache2 0.2.2 also needs jinja2 (it imports `starlette.templating`) without declaring it.",
    "A fastapi-cache2 hit is a MULTI/TTL/GET/EXEC pipeline, a JSON decode of the stored value and FastAPI's own "
    "serialization of it; a cashews hit is one GET through its default pool (a BlockingConnectionPool of 10 "
    "connections) and an unpickle, then FastAPI's serialization; a cachemw hit is one GET and the stored bytes "
    "sent as they are, before FastAPI's router runs.",
    "cashews' `@cache` is `protected=True` by default (concurrent calls of one key in one process share one "
    "call), which is why it runs the handler once in the stampede; fastapi-cache2 has no such protection.",
    "Every app, the redis-servers and the load generator share a 2-CPU machine with other people's work: the "
    "*others CPU* column says how much. Interleaved rounds and per-round ratios take slow drift out; bursts "
    "that hit one run and not its partner are what the min-max ranges and the CPU-cost ratios are for.",
]


@dataclass
class Run:
    round: int
    case: str
    load: LoadResult
    handler_calls: int  # the case's handler counter moved by this much during the load
    sample: dict[str, int]  # header values of a few requests right after the load
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_others: float = 0.0
    gc: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Stampede:
    app: str
    attempt: int
    path: str
    handler_runs: int
    statuses: dict[int, int]
    header_values: dict[str, int]
    errors: list[str]
    seconds: float


def add_baseline(source: Path) -> None:
    """The FastAPI Redis app of another checkout (its own bench/apps and cachemw), and its miss case."""
    if not (source / "cachemw" / "__init__.py").is_file() or not (source / "bench" / "apps").is_dir():
        raise SystemExit(f"--baseline {source}: not a cachemw checkout (no cachemw/ and bench/apps/)")
    done = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    revision = done.stdout.strip() or "?"
    APPS["cachemw-fa-base"] = AppSpec("peer_cachemw:fastapi_redis", True, "x-cache", source=source,
                                      title=f"FastAPI + cachemw on Redis at {revision} ({source})")
    case = Case("cachemw-fastapi-miss-base", "cachemw-fa-base", "/item/", "miss", "item",
                f"cachemw miss on Redis (FastAPI, new id per request) **at {revision}, the baseline**", "MISS")
    CASES.append(case)
    CASE[case.name] = case
    INFO_RATIOS.extend([
        (f"cachemw misses vs the uncached app, at {revision}", "cachemw-fastapi-miss-base", "uncached-miss"),
        (f"cachemw misses, this revision vs {revision}", "cachemw-fastapi-miss", "cachemw-fastapi-miss-base"),
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds over all cases (default: %(default)s)")
    parser.add_argument("--duration", type=int, default=6,
                        help="seconds per load run, whole (wrk's unit) (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="seconds of unrecorded load per case before round 1, whole; 0: none "
                             "(default: %(default)s)")
    parser.add_argument("--connections", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default: %(default)s)")
    parser.add_argument("--ids", type=int, default=100, help="warmed ids per hit route (default: %(default)s)")
    parser.add_argument("--sample", type=int, default=20,
                        help="requests sampled after each hit run (default: %(default)s)")
    parser.add_argument("--cases", default="all",
                        help="comma-separated case names to run (default: all; 'raw' always runs): "
                             + ", ".join(c.name for c in CASES))
    parser.add_argument("--no-frozen", action="store_true", help="skip the gc_freeze = false variant row")
    parser.add_argument("--stampede", type=int, default=200, help="concurrent requests on one cold key; 0 skips "
                                                                  "(default: %(default)s)")
    parser.add_argument("--stampede-tries", type=int, default=3, help="cold keys per library (default: %(default)s)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs with taskset")
    parser.add_argument("--setup-only", action="store_true", help="make bench/.venv-peers and stop")
    parser.add_argument("--refresh-venv", action="store_true",
                        help="remake bench/.venv-peers even if it is up to date (to pick up new releases)")
    parser.add_argument("--output", type=Path, default=common.RESULTS_DIR / "peers.md",
                        help="Markdown results file; a .json with the raw runs goes next to it "
                             "(default: bench/results/peers.md)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and redis files after the run")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="a checkout of another cachemw revision (git worktree add /tmp/base REV): its FastAPI "
                             "Redis app runs too, for the case cachemw-fastapi-miss-base, in the same rounds")
    parser.add_argument("--profile", nargs="?", const="auto", default=None, metavar="CASES",
                        help="after the rounds, one more run per case under py-spy; CASES: comma-separated, or "
                             "'auto' (default when given without a value): the cachemw cases of missed targets. "
                             "Collapsed stacks go next to the output as <name>.profile-<case>.txt")
    args = parser.parse_args(argv)
    if args.baseline is not None:
        add_baseline(args.baseline.resolve())
    if args.warmup < 0:
        parser.error("warmup must not be negative")
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1 or args.threads < 1 or args.ids < 1:
        parser.error("rounds, duration, connections, threads and ids must be positive")
    if args.connections < args.threads:
        parser.error("wrk needs at least one connection per thread")
    names = [c.name for c in CASES] if args.cases == "all" else [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASE]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASE)}")
    if "raw" not in names:
        names.insert(0, "raw")  # every ratio is to the ceiling of the same round
    if args.no_frozen:
        names = [n for n in names if n != "cachemw-redis-unfrozen"]
    args.case_names = [c.name for c in CASES if c.name in names]  # always in the table's order
    return args


# -- the environment -----------------------------------------------------------------------------


def _stamp_text() -> str:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes() + (common.REPO_ROOT / "pyproject.toml").read_bytes())
    return f"{digest.hexdigest()} {sys.version_info[0]}.{sys.version_info[1]}\n"


def ensure_venv(refresh: bool) -> None:
    """``bench/.venv-peers`` with the peers' latest releases and cachemw (editable); remade when the
    requirements or cachemw's pyproject.toml change, or on request."""
    stamp = _stamp_text()
    if not refresh and VENV_PYTHON.exists() and STAMP.exists() and STAMP.read_text() == stamp:
        return
    print(f"setting up {os.path.relpath(VENV, common.REPO_ROOT)} (python -m venv; pip install -r "
          f"{os.path.relpath(REQUIREMENTS, common.REPO_ROOT)} -e .) ...", flush=True)
    if VENV.exists():
        shutil.rmtree(VENV)
    steps = [
        [sys.executable, "-m", "venv", str(VENV)],
        [str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(REQUIREMENTS),
         "-e", str(common.REPO_ROOT)],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=600, cwd=common.REPO_ROOT)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"setup step timed out: {shlex.join(step)}") from exc
        if done.returncode != 0:
            raise HarnessError(f"setup step failed ({done.returncode}): {shlex.join(step)}\n{done.stdout}\n"
                               f"{done.stderr}")
    STAMP.write_text(stamp)


def find_py_spy() -> str:
    for candidate in (VENV / "bin" / "py-spy", common.REPO_ROOT / ".venv" / "bin" / "py-spy"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("py-spy")
    if found:
        return found
    print("installing py-spy into bench/.venv-peers (for --profile) ...", flush=True)
    done = subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "py-spy"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise HarnessError(f"could not install py-spy: {done.stderr}")
    return str(VENV / "bin" / "py-spy")


# -- steps ---------------------------------------------------------------------------------------


def calls(app: AppProcess, timeout: float = 30.0) -> dict[str, Any]:
    """``/_calls`` of the app; a busy app (a miss run's background fills, a machine under other people's
    load) may take a while to answer, so the wait is long and a time-out is a harness error, not a crash."""
    try:
        data: dict[str, Any] = common.http_get_json(app.port, "/_calls", timeout=timeout)
    except OSError as exc:
        raise HarnessError(f"{app.target} did not answer /_calls within {timeout} s ({exc!r}); log:\n"
                           f"{app.log_tail()}") from exc
    return data


def counter(data: dict[str, Any], name: str | None) -> int:
    return 0 if name is None else int(data["calls"].get(name, 0))


def gc_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[float]]:
    return {k: [b - a for a, b in zip(before["gc"][k], after["gc"][k], strict=True)]
            for k in ("collections", "seconds")}


def header_of(reply: common.Reply, spec: AppSpec) -> str:
    if reply.status != 200:
        return f"status {reply.status}"
    if spec.header is None:
        return "none"
    return reply.header(spec.header) or "none"


def warm(app: AppProcess, spec: AppSpec, case: Case, ids: int, deadline_s: float = 30.0) -> None:
    """One request per id (the 20 ms handlers in parallel), then until a pass over every id moves no
    handler counter and, where the library says, every answer is a HIT (cachemw stores in the background)."""
    paths = [f"{case.prefix}{i}" for i in range(ids)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(lambda p: common.http_get(app.port, p, timeout=30.0), paths))
    bad = [r.status for r in replies if r.status != 200]
    if bad:
        raise HarnessError(f"{case.name}: warm-up requests failed ({len(bad)} of {ids}: {bad[:5]}); app log:\n"
                           f"{app.log_tail()}")
    deadline = time.monotonic() + deadline_s
    seen: dict[str, int] = {}
    moved = -1
    while time.monotonic() < deadline:
        before = counter(calls(app), case.counter)
        seen = {}
        for path in paths:
            value = header_of(common.http_get(app.port, path), spec)
            seen[value] = seen.get(value, 0) + 1
        moved = counter(calls(app), case.counter) - before
        if moved == 0 and (case.expect is None or seen.get(case.expect, 0) == ids):
            return
        time.sleep(0.2)
    raise HarnessError(f"{case.name}: the cache did not warm within {deadline_s} s (last pass: handler ran {moved} "
                       f"times, answers {seen}); app log:\n{app.log_tail()}")


def settle(app: AppProcess, case: Case, quiet_s: float = 0.3, deadline_s: float = 20.0) -> None:
    """Until the case's handler counter stops moving (miss runs leave handlers and fills in flight)."""
    deadline = time.monotonic() + deadline_s
    last = counter(calls(app), case.counter)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = counter(calls(app), case.counter)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
    raise HarnessError(f"{case.name}: the handler still runs {deadline_s} s after the load stopped")


class FreshIds:
    """First id of each miss run: never reused, so every request of every miss run is a new key."""

    def __init__(self) -> None:
        self.runs = 0

    def next_base(self) -> int:
        self.runs += 1
        return 1_000_000_000 + self.runs * 100_000_000


def load(app: AppProcess, case: Case, args: argparse.Namespace, client_cpu: str | None, duration: float,
         fresh: FreshIds) -> LoadResult:
    if case.kind == "miss":
        return common.run_wrk(app.base_url, case.prefix, fresh.next_base(), duration=duration,
                              connections=args.connections, threads=args.threads, cpu=client_cpu, count_header=None,
                              script=FRESH_SCRIPT)
    return common.run_wrk(app.base_url, case.prefix, args.ids, duration=duration, connections=args.connections,
                          threads=args.threads, cpu=client_cpu, count_header=None)


def sample(app: AppProcess, spec: AppSpec, case: Case, ids: int, n: int, fresh: FreshIds) -> dict[str, int]:
    """Header values of a few requests right after a run: warmed ids for hits, new ids for misses."""
    if case.kind == "miss":
        base = fresh.next_base()
        paths = [f"{case.prefix}{base + i}" for i in range(min(n, 3))]
    else:
        paths = [f"{case.prefix}{(i * 37) % ids}" for i in range(min(n, ids))]
    counts: dict[str, int] = {}
    for path in paths:
        value = header_of(common.http_get(app.port, path), spec)
        counts[value] = counts.get(value, 0) + 1
    return counts


def stampede(app: AppProcess, spec: AppSpec, key: str, attempt: int, n: int) -> Stampede:
    path = f"/slow/{9_000_000_000 + attempt * 1000 + list(APPS).index(key)}"
    before = counter(calls(app), "slow")
    result = common.burst_get(app.port, path, n, header=spec.header or "x-cache", timeout=60.0)
    time.sleep(0.5)  # a handler started by a late request would show now
    runs = counter(calls(app), "slow") - before
    return Stampede(key, attempt, path, runs, result.statuses, result.header_values, result.errors[:5],
                    result.seconds)


# -- summary -------------------------------------------------------------------------------------


def _per_round(runs: list[Run], case: str, metric: str) -> dict[int, float]:
    return {r.round: getattr(r.load, metric) for r in runs if r.case == case}


def ratios(runs: list[Run], case: str, other: str, metric: str = "rps") -> list[float]:
    """case / other, round by round (both measured in the same round)."""
    mine, theirs = _per_round(runs, case, metric), _per_round(runs, other, metric)
    return [mine[n] / theirs[n] for n in sorted(mine) if n in theirs and theirs[n] > 0]


def tails(runs: list[Run], case: str) -> list[float]:
    return [r.load.p99_ms / r.load.p50_ms for r in runs if r.case == case and r.load.p50_ms > 0]


def evaluate(runs: list[Run], stampedes: list[Stampede], names: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for t in TARGETS:
        if t.kind == "stampede":
            mine = [s.handler_runs for s in stampedes if s.app == t.case]
            if not mine:
                continue
            out.append({"target": t.name, "goal": t.goal, "values": mine, "median": max(mine),
                        "met": all(v <= t.bound for v in mine)})
            continue
        if t.case not in names or (t.other is not None and t.other not in names):
            continue
        values = ratios(runs, t.case, t.other) if t.kind == "ratio" and t.other else tails(runs, t.case)
        if not values:
            continue
        mid = median(values)
        met = mid >= t.bound if t.kind == "ratio" else mid <= t.bound
        cost = cost_ratios(runs, t.case, t.other) if t.kind == "ratio" and t.other else []
        out.append({"target": t.name, "goal": t.goal, "values": values, "median": mid, "met": met,
                    "cases": [t.case, *([t.other] if t.other else [])], "cost_values": cost,
                    "cost_met": (median(cost) >= t.bound) if cost else None})
    return out


def sanity_checks(runs: list[Run], stampedes: list[Stampede], args: argparse.Namespace,
                  log_errors: dict[str, int]) -> list[tuple[bool, str]]:
    checks: list[tuple[bool, str]] = []
    for r in runs:
        case = CASE[r.case]
        where = f"round {r.round} {r.case}"
        if case.kind == "hit":
            checks.append((r.handler_calls == 0, f"{where}: handler ran {r.handler_calls} times during the hit run "
                                                 f"(expected 0)"))
        elif case.kind == "miss":
            ok = r.load.requests <= r.handler_calls <= r.load.requests + 2 * args.connections
            checks.append((ok, f"{where}: handler ran {r.handler_calls} times for {r.load.requests} requests "
                               f"(every request a miss)"))
        if case.expect is not None:
            total = sum(r.sample.values())
            good = r.sample.get(case.expect, 0)
            checks.append((total > 0 and good == total,
                           f"{where}: sample after the run: {good}/{total} {case.expect}"
                           + ("" if good == total else f" (got {r.sample})")))
        checks.append((r.load.errors == 0 and r.load.non_2xx == 0,
                       f"{where}: {r.load.errors} socket errors, {r.load.non_2xx} non-2xx responses"))
        wrk_cpu = r.cpu.get("loadgen", 0.0)
        checks.append((wrk_cpu < 0.9, f"{where}: wrk used {wrk_cpu:.2f} of its core (below 0.9: the load "
                                      f"generator was not the bottleneck)"))
    for s in stampedes:
        ok_statuses = s.statuses.get(200, 0)
        checks.append((not s.errors and ok_statuses == sum(s.statuses.values()),
                       f"stampede {s.app} #{s.attempt}: {ok_statuses} x 200 of {sum(s.statuses.values())} responses, "
                       f"{len(s.errors)} client errors"))
    for app, n in log_errors.items():
        checks.append((n == 0, f"app log of {app}: {n} error/warning/traceback lines"))
    return checks


# -- report --------------------------------------------------------------------------------------


# Where a sample's time goes: the first rule whose frame is on its stack names it (outermost rules first).
_BREAKDOWN = [
    ("Supervisor._run", "background work (cachemw's supervisor: fills, unlocks)"),
    ("RedisStore.listen", "pub/sub listener (fill and invalidation announcements)"),
    ("GuardedStore.get", "lookup: GuardedStore.get (one Redis GET under the store budget)"),
    ("GuardedStore.lock", "miss: GuardedStore.lock (the lock attempt under the store budget)"),
    ("RequestHandler.forward", "miss: the app behind the middleware (routing, handler, serialization)"),
    ("serve", "answer from the cache: serve (uvicorn's send, socket writes)"),
    # RequestHandler.http only picks the step's coroutine (look_up, bypass, unsafe), which the middleware awaits.
    ("RequestHandler.", None),  # split by what runs inside it: see breakdown()
    ("CacheMiddleware.__call__", "CacheMiddleware.__call__ around RequestHandler"),
    ("HttpToolsProtocol", "uvicorn: HTTP parsing, starting the request task"),
    ("RequestResponseCycle.run_asgi", "the request outside cachemw (framework layers, app)"),
]


def breakdown(collapsed: Path, limit: int = 12) -> list[tuple[float, str]]:
    counts: dict[str, int] = {}
    total = 0
    for frames, n in common.collapsed_stacks(collapsed):
        total += n
        name = None
        for pattern, label in _BREAKDOWN:
            at = next((i for i, f in enumerate(frames) if pattern in f), None)
            if at is None:
                continue
            if label is None:  # inside RequestHandler, in cachemw's own code or in the app it passes to
                inner = frames[at + 1] if at + 1 < len(frames) else ""
                label = ("the app behind the middleware, passed through (no policy)"
                         if inner and "(cachemw/" not in inner else
                         "rest of RequestHandler (key, decode, freshness)")
            name = label
            break
        if name is None:
            # Shallow stacks: the event loop itself, or a callback it runs (redis-py's writes show up here).
            name = "event loop and callbacks, top frame: " + frames[-1].rsplit(":", 1)[0].rstrip(")") + ")"
        counts[name] = counts.get(name, 0) + n
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return [(n / total, name) for name, n in ranked] if total else []


def profile_lines(collapsed: Path, inclusive: int = 25, own: int = 15) -> list[str]:
    """The interesting part of a py-spy profile: where the time goes, inclusive shares below the stack all
    samples share, and self."""
    lines = ["where the time goes (each sample counted once):"]
    lines += [f"  {share:6.1%}  {name}" for share, name in breakdown(collapsed)]
    everything = common.top_frames(collapsed, limit=200)
    below = [(share, frame) for share, frame in everything if share < 0.99][:inclusive]
    lines += ["inclusive:"] + [f"  {share:6.1%}  {frame}" for share, frame in below]
    lines += ["self:"] + [f"  {share:6.1%}  {frame}"
                          for share, frame in common.top_frames(collapsed, limit=own, exclusive=True)]
    return lines


def _range(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def cpu_us(run: Run, with_redis: bool = True) -> float:
    """CPU time of the app (and its redis-server) per request, in microseconds: what one request costs,
    whatever share of the core other people's processes took during the run."""
    share = run.cpu.get("app", 0.0) + (run.cpu.get("redis", 0.0) if with_redis else 0.0)
    return 1e6 * share / run.load.rps if run.load.rps > 0 else float("nan")


def cost_ratios(runs: list[Run], case: str, other: str) -> list[float]:
    """How many more requests ``case`` serves per CPU-second than ``other`` (its CPU cost per request over
    ``case``'s), round by round: the req/s ratio with the contention of a shared machine taken out."""
    mine = {r.round: cpu_us(r) for r in runs if r.case == case}
    theirs = {r.round: cpu_us(r) for r in runs if r.case == other}
    return [theirs[n] / mine[n] for n in sorted(mine) if n in theirs and mine[n] > 0]


def _gc_ms_per_s(run: Run) -> float:
    return 1000 * sum(run.gc["seconds"]) / run.load.seconds if run.gc else 0.0


def case_rows(runs: list[Run], names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        mine = [r for r in runs if r.case == name]
        if not mine:
            continue
        rows.append({
            "case": name,
            "label": CASE[name].label,
            "rps": [r.load.rps for r in mine],
            "x_raw": ratios(runs, name, "raw"),
            "p50": [r.load.p50_ms for r in mine],
            "p99": [r.load.p99_ms for r in mine],
            "tail": tails(runs, name),
            "gc": [_gc_ms_per_s(r) for r in mine],
            "gen2": [r.gc["collections"][2] / r.load.seconds if r.gc else 0.0 for r in mine],
            "cpu_us": [cpu_us(r) for r in mine],
            "cost_x_raw": cost_ratios(runs, name, "raw"),
            "app_cpu": [r.cpu.get("app", 0.0) for r in mine],
            "redis_cpu": [r.cpu.get("redis", 0.0) for r in mine],
            "others_cpu": [r.cpu_others for r in mine],
        })
    return rows


def render(facts: dict[str, str], settings: dict[str, str], runs: list[Run], rows: list[dict[str, Any]],
           targets: list[dict[str, Any]], stampedes: list[Stampede], checks: list[tuple[bool, str]],
           command: str, profiles: dict[str, list[str]], redis_after: str,
           log_excerpts: dict[str, list[str]]) -> str:
    by_case = {row["case"]: row for row in rows}
    met = sum(1 for t in targets if t["met"])
    lines = [
        "# cachemw vs fastapi-cache2 vs cashews (and the raw ASGI ceiling)",
        "",
        "Generated by `bench/peers.py`; see `bench/README.md`. Every app serves `GET /item/{id}` (or a variant",
        "path) with the same ~1 KB JSON body; cached handlers sleep 20 ms (the database), so they pay that on a",
        "miss. Hits: 100 warmed ids, the handler counter must not move. Misses: a new id for every request.",
        f"Targets met: **{met} of {len(targets)}** (details below).",
        "",
        "## Setup",
        "",
        *(f"- {k}: {v}" for k, v in facts.items()),
        "",
        *(f"- {k}: {v}" for k, v in settings.items()),
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "## Targets",
        "",
        "Ratios are taken round by round (both figures from the same round), then the median (min-max) over rounds.",
        "",
        "The verdict is on req/s (p99/p50 for the tail targets), as the targets are written. On a machine",
        "shared with other work, a run whose app got less of its core than another's skews req/s ratios: the",
        "*CPU cost* column gives the same ratio from CPU time per request (app + its redis-server), which",
        "other people's load does not change; where the two disagree, trust neither alone.",
        "",
        "| target | goal | measured | verdict | same ratio from CPU cost per request |",
        "|---|---|---|---|---|",
    ]
    for t in targets:
        shown = _range(t["values"], ".2f") if "cases" in t else ", ".join(str(v) for v in t["values"]) + " handler runs"
        cost = "-"
        if t.get("cost_values"):
            cost = f"{_range(t['cost_values'], '.2f')} ({'met' if t['cost_met'] else 'missed'})"
        lines.append(f"| {t['target']} | {t['goal']} | {shown} | {'**met**' if t['met'] else '**MISSED**'} "
                     f"| {cost} |")
    info = []
    for text, case, other in INFO_RATIOS:
        if case in by_case and other in by_case:
            info.append(f"| {text} | {_range(ratios(runs, case, other), '.2f')} |")
    if info:
        lines += ["", "For context (not targets):", "", "| ratio | measured |", "|---|---|", *info]
    lines += ["", "Notes:", "", *(f"- {note}" for note in NOTES)]
    lines += [
        "",
        "## All cases",
        "",
        f"Median over {len({r.round for r in runs})} interleaved rounds (min-max). *x raw*: req/s as a ratio to the "
        "raw ASGI ceiling of the same round. *µs/req*: CPU time of the app and its redis-server per request; "
        "*x raw (CPU)*: the raw ceiling's µs/req over the case's, per round (the throughput ratio if both had a "
        "whole core). GC: milliseconds per second the app spent in the cyclic garbage collector, and full "
        "(generation 2) collections per second. CPU: share of one core (app, its redis-server, and everything on "
        "the machine that is not ours: other people's work).",
        "",
        "| case | req/s | x raw | p50 ms | p99 ms | p99/p50 | µs/req | x raw (CPU) | GC ms/s | gen-2 GC/s "
        "| app CPU | redis CPU | others CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} (`{row['case']}`) | {_range(row['rps'], '.0f')} | {_range(row['x_raw'], '.3f')} "
            f"| {_range(row['p50'], '.2f')} | {_range(row['p99'], '.2f')} | {_range(row['tail'], '.1f')} "
            f"| {_range(row['cpu_us'], '.0f')} | {_range(row['cost_x_raw'], '.3f')} "
            f"| {_range(row['gc'], '.0f')} | {_range(row['gen2'], '.1f')} | {_range(row['app_cpu'], '.2f')} "
            f"| {_range(row['redis_cpu'], '.2f')} | {_range(row['others_cpu'], '.2f')} |")
    side = [n for n in ("cachemw-l1", "cachemw-redis", "cachemw-memory", "uncached-miss") if n in by_case]
    if len(side) > 1:
        lines += ["", "### L1 hit vs Redis hit vs the uncached route (issue 4), from the same rounds", "",
                  "| case | req/s | x raw | p50 ms | p99 ms | µs/req |", "|---|---|---|---|---|---|"]
        for n in side:
            row = by_case[n]
            lines.append(f"| {row['label']} | {_range(row['rps'], '.0f')} | {_range(row['x_raw'], '.3f')} "
                         f"| {_range(row['p50'], '.2f')} | {_range(row['p99'], '.2f')} "
                         f"| {_range(row['cpu_us'], '.0f')} |")
    if stampedes:
        lines += ["", "## Stampede: concurrent requests on one cold key", "",
                  f"{sum(stampedes[0].statuses.values()) + len(stampedes[0].errors)} requests on one new key "
                  "(`/slow/{id}`, handler sleeps 200 ms), all connections opened first, then every request sent at "
                  "once; *handler runs* is the handler counter's move.", "",
                  "| library | attempt | handler runs | statuses | cache header | client errors | all answered in |",
                  "|---|---|---|---|---|---|---|"]
        for s in stampedes:
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(s.statuses.items()))
            header = ", ".join(f"{k}: {v}" for k, v in sorted(s.header_values.items()))
            lines.append(f"| {LIBRARY[s.app]} | {s.attempt} | **{s.handler_runs}** | {statuses} | {header} "
                         f"| {len(s.errors)} | {s.seconds * 1000:.0f} ms |")
    lines += [
        "",
        "## Runs (in the order they ran)",
        "",
        "| round | case | req/s | p50 ms | p99 ms | requests | handler calls | sample | µs/req | app CPU | redis CPU "
        "| wrk CPU | others CPU | GC ms/s (gen 0/1/2 collections) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        sample_text = ", ".join(f"{k} {v}" for k, v in sorted(r.sample.items())) or "-"
        gc_text = f"{_gc_ms_per_s(r):.1f} ({'/'.join(str(int(c)) for c in r.gc['collections'])})" if r.gc else "-"
        lines.append(
            f"| {r.round} | {r.case} | {r.load.rps:.0f} | {r.load.p50_ms:.2f} | {r.load.p99_ms:.2f} "
            f"| {r.load.requests} | {r.handler_calls} | {sample_text} | {cpu_us(r):.0f} | {r.cpu.get('app', 0):.2f} "
            f"| {r.cpu.get('redis', 0):.2f} "
            f"| {r.cpu.get('loadgen', 0):.2f} | {r.cpu_others:.2f} | {gc_text} |")
    lines += ["", "## Sanity checks", ""]
    failed = [(ok, t) for ok, t in checks if not ok]
    lines.append(f"{len(checks) - len(failed)} of {len(checks)} passed (every check, passed or not, is in the "
                 ".json next to this file): hit runs ran no handler, miss runs ran it once per request, sampled "
                 "answers said HIT/MISS, no socket errors or non-2xx, wrk below 0.9 of its core, stampede answers "
                 "all 200, no warnings in the app logs." + (" Failed:" if failed else ""))
    lines.append("")
    lines += [f"- **FAILED**: {t}" for _, t in failed]
    if log_excerpts:
        lines += ["", "App log lines behind the failed log checks (first 5 per app):", ""]
        for app, excerpt in log_excerpts.items():
            lines += [f"- {app}: " + "; ".join(f"`{ln.strip()}`" for ln in excerpt[:5])]
    if profiles:
        lines += ["", "## Profiles (py-spy, one extra run per case after the rounds, not in the tables)", "",
                  "py-spy pauses the process for each sample, so these runs are slower. *Inclusive*: share of samples",
                  "with the function anywhere on the stack (the frames every sample shares are left out); *self*:",
                  "with the function on top (time in C code, such as a socket write, counts for the Python function",
                  "that called it; the event loop's own time shows as `Runner.run`).", ""]
        for case, frames in profiles.items():
            lines += [f"`{case}`:", "", "```", *frames, "```", ""]
    lines += ["", f"Redis after the run: {redis_after}", "", "Load generator command of the last run:", "", "```",
              runs[-1].load.command if runs else "-", "```", ""]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    ensure_venv(args.refresh_venv)
    if args.setup_only:
        print(f"{os.path.relpath(VENV, common.REPO_ROOT)} is ready")
        return 0
    if common.wrk_path() is None:
        raise HarnessError(f"wrk not found; {common.WRK_INSTALL_HINT} (this benchmark needs wrk: ratios to the raw "
                           "ceiling mean nothing with a load generator slower than the server)")
    server_cpu, client_cpu = (None, None) if args.no_pin else common.default_cpus()
    command = shlex.join(["python3", "bench/peers.py", *sys.argv[1:]])
    names: list[str] = args.case_names
    app_keys = list(dict.fromkeys([CASE[n].app for n in names]
                                  + (list(STAMPEDE_APPS) if args.stampede > 0 else [])))
    loads = args.rounds * len(names) * args.duration + len(names) * args.warmup
    print(f"{len(names)} cases x {args.rounds} rounds x {args.duration:g} s + warm-up: about "
          f"{(loads + 60 + 5 * len(app_keys)) / 60:.0f} min", flush=True)
    workdir = common.workdir("cachemw-peers-")
    ok = False
    fresh = FreshIds()
    try:
        redis_binary = common.find_redis_server()
        facts = common.machine_description(redis_binary=redis_binary, packages=PACKAGES, python=str(VENV_PYTHON))
        with contextlib.ExitStack() as stack:
            # One private redis-server per app that uses Redis: no app hears another's pub/sub
            # announcements, pays for another's keyspace, or competes for its server.
            redises: dict[str, RedisProcess] = {}
            apps: dict[str, AppProcess] = {}
            for key in app_keys:
                spec = APPS[key]
                env: dict[str, str] = {}
                if spec.redis:
                    redis = RedisProcess(workdir / f"redis-{key}", cpu=server_cpu, binary=redis_binary)
                    stack.enter_context(redis)
                    redises[key] = redis
                    env["BENCH_REDIS_URL"] = redis.url
                if spec.source is not None:
                    # --app-dir goes first on sys.path, before the repository root (the cwd of ``-m``):
                    # the checkout's own cachemw is imported, its bench/apps from PYTHONPATH.
                    env["PYTHONPATH"] = str(spec.source / "bench" / "apps")
                app = AppProcess(spec.target, workdir=workdir / key, env=env, cpu=server_cpu, ready_path="/_calls",
                                 python=str(VENV_PYTHON), unset_env=("CACHEMW_REDIS_URL", "PYTHONPATH"),
                                 app_dir=spec.source or common.APPS_DIR)
                stack.enter_context(app)
                apps[key] = app
                print(f"app {key}: {app.display_command()}", flush=True)
            settings = {
                "server": "one uvicorn per app: `bench/.venv-peers/bin/python -m uvicorn MODULE:APP --app-dir "
                          "bench/apps --host 127.0.0.1 --port P --loop uvloop --http httptools --no-access-log "
                          f"--workers 1`, {'pinned to CPU ' + server_cpu if server_cpu else 'not pinned'}; apps: "
                          + "; ".join(f"{k} = `{APPS[k].target}`" for k in app_keys),
                "redis-server": f"private, one per app that uses Redis, port R, no persistence, "
                                f"{'pinned to CPU ' + server_cpu if server_cpu else 'not pinned'}",
                "load generator": f"wrk, {args.connections} keep-alive connections, {args.threads} threads, "
                                  f"{args.duration:g} s per run, "
                                  f"{'pinned to CPU ' + client_cpu if client_cpu else 'not pinned'}; hits and plain "
                                  f"routes: round robin over {args.ids} ids (`bench/wrk/ids.lua`); misses: a new id "
                                  "per request (`bench/wrk/fresh_ids.lua`); no response header parsing in wrk "
                                  "(hits are checked by handler counters and sampled requests instead)",
                "warm-up": f"one request per id, then until a pass over all ids runs no handler (and, where the "
                           f"library has a header, every answer says HIT), then {args.warmup:g} s of unrecorded load "
                           "per case",
                "rounds": f"{args.rounds}, each running every case once in the order of the table",
                "peers' configuration": "as their READMEs show: fastapi-cache2 `FastAPICache.init(RedisBackend("
                                        "redis.asyncio.from_url(url)))` + `@cache(expire=3600)`; cashews "
                                        "`cache.setup(\"redis://...\")` + `@cache(ttl=\"1h\")`, defaults otherwise",
            }
            warmed: set[tuple[str, str]] = set()
            for name in names:
                case = CASE[name]
                if case.kind == "hit" and (case.app, case.prefix) not in warmed:
                    warm(apps[case.app], APPS[case.app], case, args.ids)
                    warmed.add((case.app, case.prefix))
            print(f"warm: {len(warmed)} hit routes x {args.ids} ids; keys in Redis: "
                  + ", ".join(f"{k} {r.dbsize()}" for k, r in redises.items()), flush=True)
            if args.warmup > 0:
                for name in names:
                    case = CASE[name]
                    load(apps[case.app], case, args, client_cpu, args.warmup, fresh)
                    settle(apps[case.app], case)
            runs: list[Run] = []
            for n in range(1, args.rounds + 1):
                for name in names:
                    case = CASE[name]
                    app, spec = apps[case.app], APPS[case.app]
                    assert app.proc is not None
                    pids = {"app": app.proc.pid}
                    if case.app in redises and redises[case.app].proc is not None:
                        pids["redis"] = redises[case.app].proc.pid  # type: ignore[union-attr]
                    meter = CpuMeter(pids)
                    before = calls(app)
                    with meter.measure() as usage:
                        result = load(app, case, args, client_cpu, args.duration, fresh)
                    if case.kind == "miss":
                        settle(app, case)
                    after = calls(app)
                    if not app.alive():
                        raise HarnessError(f"app {case.app} died during a run; log:\n{app.log_tail()}")
                    picked = sample(app, spec, case, args.ids, args.sample, fresh)
                    run_ = Run(n, name, result, counter(after, case.counter) - counter(before, case.counter), picked,
                               dict(usage.processes), usage.others, gc_delta(before, after))
                    runs.append(run_)
                    print(f"round {n} {name:21} {result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f} ms  p99 "
                          f"{result.p99_ms:7.2f} ms  handler {run_.handler_calls:6}  sample {picked}  CPU app "
                          f"{usage.processes.get('app', 0):.2f} redis {usage.processes.get('redis', 0):.2f} wrk "
                          f"{usage.processes.get('loadgen', 0):.2f} others {usage.others:.2f}  GC "
                          f"{_gc_ms_per_s(run_):.0f} ms/s", flush=True)
            stampedes: list[Stampede] = []
            if args.stampede > 0:
                for attempt in range(1, args.stampede_tries + 1):
                    for key in STAMPEDE_APPS:
                        s = stampede(apps[key], APPS[key], key, attempt, args.stampede)
                        stampedes.append(s)
                        print(f"stampede {key:15} #{attempt}: {s.handler_runs} handler runs for {args.stampede} "
                              f"requests; statuses {s.statuses}; header {s.header_values}; errors {len(s.errors)}; "
                              f"{s.seconds * 1000:.0f} ms", flush=True)
            logs = {key: app.log_path.read_text(errors="replace") for key, app in apps.items()}
            targets = evaluate(runs, stampedes, names)
            profiles: dict[str, list[str]] = {}
            if args.profile:
                if args.profile == "auto":
                    chosen = [c for t in targets if not t["met"] for c in t.get("cases", [])
                              if CASE[c].app.startswith("cachemw")]
                else:
                    chosen = [c.strip() for c in args.profile.split(",") if c.strip() in CASE]
                spy_binary = find_py_spy() if chosen else ""
                for name in dict.fromkeys(chosen):
                    case = CASE[name]
                    app = apps[case.app]
                    assert app.proc is not None
                    out = args.output.with_name(f"{args.output.stem}.profile-{name}.txt")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    spy = common.PySpy(app.proc.pid, out, seconds=args.duration, cpu=client_cpu,
                                       executable=spy_binary)
                    spy.start()
                    try:
                        result = load(app, case, args, client_cpu, args.duration, fresh)
                    finally:
                        spy.stop()
                    if case.kind == "miss":
                        settle(app, case)
                    profiles[name] = profile_lines(out)
                    print(f"profiled {name}: {result.rps:.0f} req/s under py-spy; {out}", flush=True)
            after_run = []
            for key, redis in redises.items():
                info = redis.command("INFO", "memory")
                used = next((ln.split(":", 1)[1].strip() for ln in info.decode().splitlines()
                             if ln.startswith("used_memory_human:")), "?")
                after_run.append(f"{key}: {redis.dbsize()} keys, {used}")
            redis_after = "; ".join(after_run)
        marks = ("ERROR", "WARNING", "Traceback", "cachemw:")
        log_errors = {key: sum(1 for ln in text.splitlines() if any(m in ln for m in marks))
                      for key, text in logs.items()}
        checks = sanity_checks(runs, stampedes, args, log_errors)
        rows = case_rows(runs, names)
        excerpts = {k: [ln for ln in v.splitlines() if any(m in ln for m in marks)] for k, v in logs.items()}
        report = render(facts, settings, runs, rows, targets, stampedes, checks, command, profiles, redis_after,
                        {k: v for k, v in excerpts.items() if v})
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        raw = {"facts": facts, "settings": settings, "command": command, "targets": targets, "cases": rows,
               "runs": [dict(asdict(r), load={k: v for k, v in asdict(r.load).items() if k != "raw"}) for r in runs],
               "stampedes": [asdict(s) for s in stampedes], "checks": [{"ok": o, "text": t} for o, t in checks],
               "app_log_excerpts": {k: [ln for ln in v.splitlines() if any(m in ln for m in marks)][:20]
                                    for k, v in logs.items()}}
        args.output.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
        print()
        print(f"{'case':22} {'req/s':>22} {'x raw':>20} {'p50 ms':>20} {'p99 ms':>22}")
        for row in rows:
            print(f"{row['case']:22} {_range(row['rps'], '.0f'):>22} {_range(row['x_raw'], '.3f'):>20} "
                  f"{_range(row['p50'], '.2f'):>20} {_range(row['p99'], '.2f'):>22}")
        print()
        for t in targets:
            shown = _range(t["values"], ".2f") if "cases" in t else ", ".join(map(str, t["values"]))
            print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']} ({t['goal']}): {shown}")
        for ok_, text in checks:
            if not ok_:
                print(f"SANITY CHECK FAILED: {text}")
        for key, text in logs.items():
            excerpt = [ln for ln in text.splitlines() if any(m in ln for m in marks)]
            if excerpt:
                print(f"app log {key}:\n  " + "\n  ".join(excerpt[:5]))
        for name, frames in profiles.items():
            print(f"\nprofile {name}:")
            for line in frames:
                print(f"  {line}")
        print(f"results: {args.output} (+ {args.output.with_suffix('.json').name})")
        ok = True
        return 0
    finally:
        common.remove_workdir(workdir, keep=not ok or args.keep_workdir)


def main(argv: list[str] | None = None) -> int:
    return common.exit_status(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
