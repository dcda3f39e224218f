"""cachemw's WSGI shell under gunicorn, side by side with Flask-Caching and Django's cache_page (issue 16).

    python3 bench/wsgi.py                          # ~16 min: gthread and sync, 3 rounds x 13 cases x 10 s each
    python3 bench/wsgi.py --worker-classes gthread --rounds 3 --duration 10

One command, any ``python3`` >= 3.10 (the harness is standard library only). It:

1. makes ``bench/.venv-peers`` as ``bench/peers.py`` does (the peers' latest releases from
   ``bench/requirements-peers.txt``: Flask-Caching, Flask, Django, gunicorn; and cachemw
   itself, editable), so every app runs from the same venv and server stack;
2. starts one private redis-server per app that uses Redis (free port, never 6379) and
   one gunicorn per app (``--workers 2 --worker-class gthread --threads 4``, then the
   same with ``--worker-class sync``), server side pinned to CPU 0, wrk to CPU 1;
3. warms every hit route (100 ids, until a pass over all of them runs no view and, for
   cachemw, every answer says ``X-Cache: HIT``), a few seconds of unrecorded load per case;
4. runs ``wrk -t2 -c16 -d10s --latency`` (keep-alive) on every case **interleaved**, 3 rounds:
   hits round robin over the warmed ids (``bench/wrk/ids.lua``), misses with a new id per
   request (``bench/wrk/fresh_ids.lua``); wrk counts the ``X-Cache`` header of every response;
5. writes ``bench/results/wsgi.md`` (and ``.json``): command, machine, revision, date, versions,
   req/s and p99 (min-max over rounds), CPU per request, the targets' ratios (per round, both
   figures from the same round), every run, the sanity checks.

The apps (``bench/apps/wsgi_*.py``) serve ``GET /item/<id>`` with the same ~1 KB JSON body;
the view reads the "database" (``time.sleep(0.002)``, ``--db-ms``) first, so whatever reaches
the view pays 2 ms. View runs are counted across gunicorn's worker processes (a byte
appended to a file per run), so a hit run must not move the count and a miss run must move
it once per request.

A hand-written analysis below the line ``<!-- analysis -->`` of an existing results file
is kept when the report is rewritten (it names the run it was written for).

Exit status: 0 when it measured (targets met or not); 1 when it could not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import peers
from common import AppProcess, CpuMeter, HarnessError, LoadResult, RedisProcess, median

PACKAGES = ("cachemw", "flask", "werkzeug", "flask-caching", "django", "gunicorn", "redis", "hiredis", "uvloop",
            "anyio", "starlette")
ANALYSIS_MARK = "<!-- analysis -->"
DJANGO_SHELL = common.REPO_ROOT / "cachemw" / "frameworks" / "django.py"


class GunicornProcess(AppProcess):
    """``gunicorn MODULE:APP`` (from ``bench/apps``) with ``workers`` workers of ``worker_class``."""

    def __init__(self, target: str, *, worker_class: str, workers: int, threads: int, **kwargs: Any) -> None:
        super().__init__(target, ready_path="/_ready", **kwargs)
        self.worker_class = worker_class
        self.workers = workers
        self.threads = threads

    @property
    def log_path(self) -> Path:
        return self.workdir / "gunicorn.log"

    def command(self) -> list[str]:
        return [
            *common.taskset_prefix(self.cpu), self.python, "-m", "gunicorn", self.target,
            "--pythonpath", str(self.app_dir), "--bind", f"127.0.0.1:{self.port}",
            "--workers", str(self.workers), "--worker-class", self.worker_class, "--threads", str(self.threads),
            "--log-level", "warning", *self.extra_args,
        ]  # fmt: skip

    def worker_pids(self) -> list[int]:
        """The master's children (its workers), from /proc."""
        assert self.proc is not None
        master = self.proc.pid
        try:
            text = Path(f"/proc/{master}/task/{master}/children").read_text()
            return sorted(int(p) for p in text.split())
        except OSError:
            found = []
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    with contextlib.suppress(OSError, IndexError):
                        stat = (entry / "stat").read_text()
                        if int(stat[stat.rindex(")") + 2:].split()[1]) == master:
                            found.append(int(entry.name))
            return sorted(found)

    def context_switches(self, pids: list[int]) -> int:
        """Voluntary and involuntary context switches of every thread of ``pids`` so far."""
        total = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError):
                        for line in (task / "status").read_text().splitlines():
                            if "ctxt_switches:" in line:
                                total += int(line.split(":", 1)[1])
        return total

    def wait_workers(self, deadline_s: float = 20.0) -> list[int]:
        """Until every worker has booted (the master forks them before the first answers)."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            if len(pids) == self.workers:
                return pids
            time.sleep(0.05)
        raise HarnessError(f"{self.target}: {self.workers} workers did not come up; log:\n{self.log_tail()}")


# -- what runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppSpec:
    target: str  # MODULE:APP in bench/apps
    redis: bool
    header: bool  # the app says X-Cache (cachemw)
    title: str


APPS: dict[str, AppSpec] = {
    "raw": AppSpec("wsgi_raw:app", False, False, "bare WSGI callable, constant body"),
    "flask-cachemw": AppSpec("wsgi_flask:cachemw", True, True, "Flask + cachemw.wsgi.CacheMiddleware on Redis"),
    "flask-caching": AppSpec("wsgi_flask:flask_caching", True, False, "Flask + Flask-Caching RedisCache"),
    "flask": AppSpec("wsgi_flask:uncached", False, False, "Flask, uncached"),
    "django-cachemw": AppSpec("wsgi_django:cachemw", True, True, "Django + cachemw.wsgi.CacheMiddleware on Redis"),
    "django-cache_page": AppSpec("wsgi_django:cache_page", True, False, "Django + cache_page on its RedisCache"),
    "django": AppSpec("wsgi_django:uncached", False, False, "Django, uncached"),
}


@dataclass(frozen=True)
class Case:
    name: str
    app: str
    prefix: str
    kind: str  # "hit": warmed ids, no view runs; "miss": a new id per request; "plain": no cache
    counter: str | None  # the view counter of the route
    label: str
    expect: str | None = None  # the X-Cache every response must carry (cachemw)


CASES: list[Case] = [
    Case("raw", "raw", "/item/", "plain", None, "bare WSGI callable, constant ~1 KB body (**gunicorn's ceiling**)"),
    Case("flask-fast", "flask", "/fast/", "plain", "fast", "Flask route, no cache, no sleep (Flask's own cost)"),
    Case("flask-cachemw-hit", "flask-cachemw", "/item/", "hit", "item", "Flask + cachemw hit (Redis)", "HIT"),
    Case("flask-caching-hit", "flask-caching", "/item/", "hit", "item", "Flask + Flask-Caching hit (RedisCache)"),
    Case("flask-uncached", "flask", "/item/", "miss", "item", "Flask uncached, 2 ms view, new id per request"),
    Case("flask-cachemw-miss", "flask-cachemw", "/item/", "miss", "item", "Flask + cachemw miss, new id per request",
         "MISS"),
    Case("flask-caching-miss", "flask-caching", "/item/", "miss", "item",
         "Flask + Flask-Caching miss, new id per request"),
    Case("django-fast", "django", "/fast/", "plain", "fast", "Django route, no cache, no sleep (Django's own cost)"),
    Case("django-cachemw-hit", "django-cachemw", "/item/", "hit", "item", "Django + cachemw hit (Redis)", "HIT"),
    Case("django-cache_page-hit", "django-cache_page", "/item/", "hit", "item", "Django + cache_page hit (RedisCache)"),
    Case("django-uncached", "django", "/item/", "miss", "item", "Django uncached, 2 ms view, new id per request"),
    Case("django-cachemw-miss", "django-cachemw", "/item/", "miss", "item",
         "Django + cachemw miss, new id per request", "MISS"),
    Case("django-cache_page-miss", "django-cache_page", "/item/", "miss", "item",
         "Django + cache_page miss, new id per request"),
]
CASE = {c.name: c for c in CASES}


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    case: str
    other: str
    bound: float


TARGETS = [
    Target("Flask: cachemw hit vs Flask-Caching hit (req/s)", ">= 3x", "flask-cachemw-hit", "flask-caching-hit", 3.0),
    Target("Django: cachemw hit vs cache_page hit (req/s)", ">= 3x", "django-cachemw-hit", "django-cache_page-hit",
           3.0),
    Target("Flask: cachemw miss vs the uncached app (req/s)", ">= 0.9x", "flask-cachemw-miss", "flask-uncached", 0.9),
    Target("Django: cachemw miss vs the uncached app (req/s)", ">= 0.9x", "django-cachemw-miss", "django-uncached",
           0.9),
]
INFO_RATIOS = [
    ("Flask: cachemw hit vs gunicorn's ceiling (bare WSGI callable)", "flask-cachemw-hit", "raw"),
    ("Flask: cachemw hit vs a Flask route without cache or sleep", "flask-cachemw-hit", "flask-fast"),
    ("Flask: Flask-Caching hit vs a Flask route without cache or sleep", "flask-caching-hit", "flask-fast"),
    ("Flask: Flask-Caching miss vs the uncached app", "flask-caching-miss", "flask-uncached"),
    ("Flask route without cache or sleep vs gunicorn's ceiling", "flask-fast", "raw"),
    ("Django: cachemw hit vs gunicorn's ceiling (bare WSGI callable)", "django-cachemw-hit", "raw"),
    ("Django: cachemw hit vs a Django route without cache or sleep", "django-cachemw-hit", "django-fast"),
    ("Django: cache_page hit vs a Django route without cache or sleep", "django-cache_page-hit", "django-fast"),
    ("Django: cache_page miss vs the uncached app", "django-cache_page-miss", "django-uncached"),
    ("Django route without cache or sleep vs gunicorn's ceiling", "django-fast", "raw"),
]


@dataclass
class Run:
    worker_class: str
    round: int
    case: str
    load: LoadResult
    view_calls: int  # the case's view counter moved by this much during the load
    sample: dict[str, int]  # X-Cache of a few requests right after the load
    cpu: dict[str, float] = field(default_factory=dict)  # app (master + workers), redis, loadgen, harness
    cpu_others: float = 0.0
    workers_same: bool = True  # no worker restarted during the run
    switches: int = 0  # context switches of the workers' threads during the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="seconds of unrecorded load per case before round 1; 0: none (default: %(default)s)")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t (default: %(default)s)")
    parser.add_argument("--ids", type=int, default=100, help="warmed ids per hit route (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn --workers (default: %(default)s)")
    parser.add_argument("--gthreads", type=int, default=4,
                        help="gunicorn --threads for the gthread worker class (default: %(default)s)")
    parser.add_argument("--worker-classes", default="gthread,sync",
                        help="gunicorn worker classes, one full set of rounds each (default: %(default)s)")
    parser.add_argument("--db-ms", type=float, default=2.0,
                        help="the view's simulated database read, time.sleep (default: %(default)s)")
    parser.add_argument("--cases", default="all", help="comma-separated cases ('raw' always runs): "
                                                       + ", ".join(c.name for c in CASES))
    parser.add_argument("--sample", type=int, default=10, help="requests sampled after each run (default: %(default)s)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs with taskset")
    parser.add_argument("--refresh-venv", action="store_true", help="remake bench/.venv-peers")
    parser.add_argument("--output", type=Path, default=common.RESULTS_DIR / "wsgi.md",
                        help="Markdown results file, a .json next to it (default: bench/results/wsgi.md)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and redis files after the run")
    parser.add_argument("--profile", nargs="?", const="auto", default=None, metavar="CASES",
                        help="after each worker class's rounds, per case: one more run with py-spy --gil on one "
                             "worker (installed into bench/.venv-peers if missing), and one run of a 1-worker "
                             "gunicorn under cProfile (bench/apps/wsgi_cprofile.py); CASES: comma-separated, or "
                             "'auto' (without a value): %(const)s = both cases of every target")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.connections < args.threads or args.ids < 1:
        parser.error("rounds, duration and ids must be positive, connections at least threads")
    names = [c.name for c in CASES] if args.cases == "all" else [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASE]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASE)}")
    args.skipped = []
    if not DJANGO_SHELL.is_file():
        args.skipped = [n for n in names if CASE[n].app == "django-cachemw"]
    names = [n for n in names if n not in args.skipped]
    if "raw" not in names:
        names.insert(0, "raw")
    args.case_names = [c.name for c in CASES if c.name in names]
    args.classes = [w.strip() for w in args.worker_classes.split(",") if w.strip()]
    if not args.classes or any(w not in ("gthread", "sync") for w in args.classes):
        parser.error("--worker-classes: gthread, sync or both")
    if args.profile == "auto":
        args.profile_cases = [c for t in TARGETS for c in (t.case, t.other) if c in args.case_names]
    elif args.profile:
        args.profile_cases = [c.strip() for c in args.profile.split(",") if c.strip() in args.case_names]
    else:
        args.profile_cases = []
    args.profile_cases = list(dict.fromkeys(args.profile_cases))
    return args


# -- steps ---------------------------------------------------------------------------------------


class Counters:
    """View runs per app and route: the size of ``<calls dir>/<route>.calls``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def directory(self, app: str) -> Path:
        path = self.root / app
        path.mkdir(parents=True, exist_ok=True)
        return path

    def read(self, app: str, name: str | None) -> int:
        if name is None:
            return 0
        try:
            return (self.directory(app) / f"{name}.calls").stat().st_size
        except FileNotFoundError:
            return 0


def x_cache(reply: common.Reply) -> str:
    return (reply.header("x-cache") or "none") if reply.status == 200 else f"status {reply.status}"


def warm(app: GunicornProcess, key: str, case: Case, ids: int, counters: Counters, deadline_s: float = 30.0) -> None:
    """One request per id, then passes until one runs no view and (cachemw) every answer says HIT."""
    paths = [f"{case.prefix}{i}" for i in range(ids)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(lambda p: common.http_get(app.port, p, timeout=30.0), paths))
    bad = [r.status for r in replies if r.status != 200]
    if bad:
        raise HarnessError(f"{case.name}: warm-up requests failed ({len(bad)} of {ids}: {bad[:5]}); log:\n"
                           f"{app.log_tail()}")
    deadline = time.monotonic() + deadline_s
    seen: dict[str, int] = {}
    moved = -1
    while time.monotonic() < deadline:
        before = counters.read(key, case.counter)
        seen = {}
        for path in paths:
            value = x_cache(common.http_get(app.port, path))
            seen[value] = seen.get(value, 0) + 1
        moved = counters.read(key, case.counter) - before
        if moved == 0 and (case.expect is None or seen.get(case.expect, 0) == ids):
            return
        time.sleep(0.2)
    raise HarnessError(f"{case.name}: did not warm within {deadline_s} s (last pass: view ran {moved} times, "
                       f"X-Cache {seen}); log:\n{app.log_tail()}")


def rewarm(apps: dict[str, GunicornProcess], redises: dict[str, RedisProcess], case: Case, args: argparse.Namespace,
           counters: Counters) -> None:
    """Fresh entries for a hit run: every library's entries live 5 minutes, a run of all cases takes longer."""
    redis = redises.get(case.app)
    if redis is not None:
        redis.flushall()  # also drops the previous miss runs' keys
    warm(apps[case.app], case.app, case, args.ids, counters)


def settle(key: str, case: Case, counters: Counters, quiet_s: float = 0.5, deadline_s: float = 30.0) -> None:
    """Until the view counter stops moving (a miss run leaves views and background fills in flight)."""
    deadline = time.monotonic() + deadline_s
    last = counters.read(key, case.counter)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = counters.read(key, case.counter)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
    raise HarnessError(f"{case.name}: the view still runs {deadline_s} s after the load stopped")


def load(app: GunicornProcess, case: Case, args: argparse.Namespace, cpu: str | None, duration: float,
         fresh: peers.FreshIds) -> LoadResult:
    if case.kind == "miss":
        return common.run_wrk(app.base_url, case.prefix, fresh.next_base(), duration=duration,
                              connections=args.connections, threads=args.threads, cpu=cpu, count_header="x-cache",
                              script=peers.FRESH_SCRIPT)
    return common.run_wrk(app.base_url, case.prefix, args.ids, duration=duration, connections=args.connections,
                          threads=args.threads, cpu=cpu, count_header="x-cache")


def sample(app: GunicornProcess, case: Case, args: argparse.Namespace, fresh: peers.FreshIds) -> dict[str, int]:
    if case.kind == "miss":
        base = fresh.next_base()
        paths = [f"{case.prefix}{base + i}" for i in range(min(args.sample, 3))]
    else:
        paths = [f"{case.prefix}{(i * 37) % args.ids}" for i in range(min(args.sample, args.ids))]
    counts: dict[str, int] = {}
    for path in paths:
        value = x_cache(common.http_get(app.port, path))
        counts[value] = counts.get(value, 0) + 1
    return counts


def measure_class(worker_class: str, args: argparse.Namespace, workdir: Path, redis_binary: str,
                  server_cpu: str | None, client_cpu: str | None, fresh: peers.FreshIds,
                  settings: dict[str, str], profiles: dict[str, list[str]]) -> tuple[list[Run], dict[str, str]]:
    """Every case under gunicorn workers of ``worker_class``: start, warm, interleaved rounds, stop."""
    names: list[str] = args.case_names
    app_keys = list(dict.fromkeys(CASE[n].app for n in names))
    counters = Counters(workdir / f"calls-{worker_class}")
    threads = args.gthreads if worker_class == "gthread" else 1
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        redises: dict[str, RedisProcess] = {}
        apps: dict[str, GunicornProcess] = {}
        workers: dict[str, list[int]] = {}
        for key in app_keys:
            spec = APPS[key]
            env = {"BENCH_CALLS_DIR": str(counters.directory(key)), "BENCH_DB_SECONDS": f"{args.db_ms / 1000:g}"}
            if spec.redis:
                redis = RedisProcess(workdir / f"redis-{worker_class}-{key}", cpu=server_cpu, binary=redis_binary)
                stack.enter_context(redis)
                redises[key] = redis
                env["BENCH_REDIS_URL"] = redis.url
            app = GunicornProcess(spec.target, worker_class=worker_class, workers=args.workers, threads=threads,
                                  workdir=workdir / f"{worker_class}-{key}", env=env, cpu=server_cpu,
                                  python=str(peers.VENV_PYTHON), start_deadline=30.0,
                                  unset_env=("CACHEMW_REDIS_URL", "PYTHONPATH", "DJANGO_SETTINGS_MODULE"))
            stack.enter_context(app)
            apps[key] = app
            workers[key] = app.wait_workers()
            print(f"[{worker_class}] app {key}: {app.display_command()}", flush=True)
        settings[f"server ({worker_class})"] = (
            f"one gunicorn per app: `{'taskset -c ' + server_cpu + ' ' if server_cpu else ''}"
            f"bench/.venv-peers/bin/python -m gunicorn MODULE:APP --pythonpath bench/apps --bind 127.0.0.1:P "
            f"--workers {args.workers} --worker-class {worker_class} --threads {threads} --log-level warning` "
            f"({'pinned to CPU ' + server_cpu if server_cpu else 'not pinned'}); apps: "
            + "; ".join(f"{k} = `{APPS[k].target}`" for k in app_keys))
        for name in names:
            case = CASE[name]
            if case.kind == "hit":
                warm(apps[case.app], case.app, case, args.ids, counters)
        print(f"[{worker_class}] warm; keys in Redis: " + ", ".join(f"{k} {r.dbsize()}" for k, r in redises.items()),
              flush=True)
        if args.warmup > 0:
            for name in names:
                case = CASE[name]
                load(apps[case.app], case, args, client_cpu, args.warmup, fresh)
                settle(case.app, case, counters)
        for n in range(1, args.rounds + 1):
            for name in names:
                case = CASE[name]
                app = apps[case.app]
                assert app.proc is not None
                pids = {"master": app.proc.pid, **{f"worker-{p}": p for p in workers[case.app]}}
                redis_proc = redises[case.app].proc if case.app in redises else None
                if redis_proc is not None:
                    pids["redis"] = redis_proc.pid
                if case.kind == "hit":
                    rewarm(apps, redises, case, args, counters)
                before = counters.read(case.app, case.counter)
                switches = app.context_switches(workers[case.app])
                with CpuMeter(pids).measure() as usage:
                    result = load(app, case, args, client_cpu, args.duration, fresh)
                switches = app.context_switches(workers[case.app]) - switches
                if case.kind == "miss":
                    settle(case.app, case, counters)
                moved = counters.read(case.app, case.counter) - before
                if not app.alive():
                    raise HarnessError(f"app {case.app} died during a run; log:\n{app.log_tail()}")
                picked = sample(app, case, args, fresh)
                cpu = {"app": sum(v for k, v in usage.processes.items() if k == "master" or k.startswith("worker-")),
                       **{k: v for k, v in usage.processes.items() if k in ("redis", "loadgen", "harness")}}
                run_ = Run(worker_class, n, name, result, moved, picked, cpu, usage.others,
                           app.worker_pids() == workers[case.app], switches)
                runs.append(run_)
                print(f"[{worker_class}] round {n} {name:23} {result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
                      f"p99 {result.p99_ms:7.2f} ms  views {moved:6}  X-Cache {result.x_cache}  sample {picked}  "
                      f"CPU app {cpu['app']:.2f} redis {cpu.get('redis', 0):.2f} wrk {cpu.get('loadgen', 0):.2f} "
                      f"others {usage.others:.2f}  switches/req {switches_per_request(run_):.1f}", flush=True)
        for name in args.profile_cases:
            case = CASE[name]
            if case.kind == "hit":
                rewarm(apps, redises, case, args, counters)
            label = f"{worker_class} {name}"
            profiles[f"{label}: py-spy --gil, one worker of the measured server"] = spy_profile(
                apps[case.app], workers[case.app][0], case, args, client_cpu, fresh, workdir)
            profiles[f"{label}: cProfile (thread CPU time), a 1-worker gunicorn"] = cprofile_run(
                case, worker_class, args, workdir, redises.get(case.app), server_cpu, client_cpu, fresh, counters)
            print(f"[{worker_class}] profiled {name}", flush=True)
        logs = {key: app.log_path.read_text(errors="replace") for key, app in apps.items()}
    return runs, logs


# -- profiles ------------------------------------------------------------------------------------


def spy_profile(app: GunicornProcess, worker: int, case: Case, args: argparse.Namespace, client_cpu: str | None,
                fresh: peers.FreshIds, workdir: Path) -> list[str]:
    """py-spy on one worker during one more run, only samples where a thread holds the GIL: where Python runs
    (and which calls hold the GIL while they wait in the kernel)."""
    out = workdir / f"spy-{app.worker_class}-{case.name}.txt"
    spy = common.PySpy(worker, out, seconds=args.duration, rate=250, executable=peers.find_py_spy(), cpu=client_cpu)
    spy.args += ["--gil", "--threads"]
    spy.start()
    try:
        result = load(app, case, args, client_cpu, args.duration, fresh)
    finally:
        spy.stop()
    lines = [f"{result.rps:.0f} req/s under py-spy (both workers; one sampled)", "self (by line):"]
    lines += [f"  {share:6.1%}  {frame}" for share, frame in common.top_frames(out, limit=12, exclusive=True,
                                                                              by_function=False)]
    everything = common.top_frames(out, limit=200)
    lines += ["inclusive (frames in every sample left out):"]
    generic = ("(threading.py)", "(<frozen runpy>)", "(gunicorn/app/base.py)", "(gunicorn/__main__.py)",
               "(concurrent/futures/thread.py)", "(asyncio/runners.py)", "(anyio/_core/_eventloop.py)",
               "AsyncIOBackend.run", "Arbiter.spawn_worker", "init_process")
    lines += [f"  {share:6.1%}  {frame}" for share, frame in everything
              if share < 0.98 and not any(g in frame for g in generic)][:22]
    return lines


def cprofile_run(case: Case, worker_class: str, args: argparse.Namespace, workdir: Path, redis: RedisProcess | None,
                 server_cpu: str | None, client_cpu: str | None, fresh: peers.FreshIds,
                 counters: Counters) -> list[str]:
    """One worker under cProfile (``bench/apps/wsgi_cprofile.py``): CPU time and calls per request, by function."""
    key = f"{case.app}-cprofile"
    out_dir = workdir / f"cprofile-{worker_class}-{case.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"BENCH_CALLS_DIR": str(counters.directory(key)), "BENCH_DB_SECONDS": f"{args.db_ms / 1000:g}",
           "BENCH_PROFILE_DIR": str(out_dir)}
    if redis is not None:
        env["BENCH_REDIS_URL"] = redis.url  # the measured app's: its hit entries are there already
    app = GunicornProcess(APPS[case.app].target, worker_class=worker_class, workers=1,
                          threads=args.gthreads if worker_class == "gthread" else 1, workdir=workdir / key, env=env,
                          cpu=server_cpu, python=str(peers.VENV_PYTHON), start_deadline=30.0,
                          extra_args=["-c", str(common.APPS_DIR / "wsgi_cprofile.py")],
                          unset_env=("CACHEMW_REDIS_URL", "PYTHONPATH", "DJANGO_SETTINGS_MODULE"))
    with app:
        app.wait_workers()
        if case.kind == "hit":
            warm(app, key, case, args.ids, counters)
        result = load(app, case, args, client_cpu, args.duration, fresh)
    dumps = sorted(out_dir.glob("*.pstats"))
    if not dumps:
        return [f"no profile written (log: {app.log_tail(5)})"]
    stats = pstats.Stats(*map(str, dumps))
    total = stats.total_tt  # type: ignore[attr-defined]
    n = max(1, result.requests)
    groups: dict[str, float] = {}
    for (filename, _, function), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        group = _group(filename, function)
        groups[group] = groups.get(group, 0.0) + own
    lines = [f"{result.rps:.0f} req/s under cProfile, {n} requests, {total / n * 1e6:.0f} µs of profiled CPU per "
             "request (cProfile's own overhead included: shares, not absolute figures)",
             "own CPU by where the code is (C functions count for themselves, under `C:`):"]
    lines += [f"  {own / total:6.1%}  {own / n * 1e6:7.1f} µs/req  {group}"
              for group, own in sorted(groups.items(), key=lambda kv: -kv[1])[:14]]
    lines += ["by function:", "  own CPU   µs/req  calls/req  function"]
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:25]  # type: ignore[attr-defined]
    for (filename, line, function), (_, calls, own, _cum, _) in rows:
        where = os.path.relpath(filename, common.REPO_ROOT) if filename.startswith("/") else filename
        where = where.split("site-packages/", 1)[-1]
        lines.append(f"  {own / total:6.1%}  {own / n * 1e6:7.1f}  {calls / n:9.2f}  {function} ({where}:{line})")
    return lines


def _group(filename: str, function: str) -> str:
    """What a profiled function belongs to: cachemw's subpackage, a library, the standard library, C."""
    if filename == "~":  # a C function: <method 'get' of 'dict' objects>, <built-in method time.sleep>
        if " of '" in function:
            return "C: methods of " + function.split(" of '", 1)[1].split("'", 1)[0]
        return "C: " + function.strip("<>").removeprefix("built-in method ")
    if "/cachemw/" in filename:
        return "cachemw." + filename.split("/cachemw/", 1)[1].split("/")[0].removesuffix(".py")
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/")[0].removesuffix(".py")
    if "/bench/apps/" in filename:
        return "bench app (view, counter)"
    if "/lib/python" in filename:
        return "stdlib " + filename.rsplit("/lib/python", 1)[1].split("/", 2)[1].removesuffix(".py")
    return filename


# -- checks and report ---------------------------------------------------------------------------


def sanity_checks(runs: list[Run], args: argparse.Namespace, logs: dict[str, str]) -> list[tuple[bool, str]]:
    checks: list[tuple[bool, str]] = []
    for r in runs:
        case = CASE[r.case]
        where = f"{r.worker_class} round {r.round} {r.case}"
        if case.kind == "hit":
            checks.append((r.view_calls == 0, f"{where}: the view ran {r.view_calls} times during the hit run "
                                              "(expected 0)"))
        elif case.kind == "miss":
            ok = r.load.requests <= r.view_calls <= r.load.requests + args.connections
            checks.append((ok, f"{where}: the view ran {r.view_calls} times for {r.load.requests} requests "
                               "(every request a miss)"))
        if case.expect is not None:
            counted = r.load.x_cache
            checks.append((set(counted) == {case.expect}, f"{where}: X-Cache of every response (wrk): {counted}"))
            good = r.sample.get(case.expect, 0)
            checks.append((good == sum(r.sample.values()) > 0, f"{where}: sample after the run: {r.sample}"))
        else:
            checks.append((set(r.load.x_cache) <= {"none"}, f"{where}: no X-Cache header (wrk): {r.load.x_cache}"))
        checks.append((r.load.errors == 0 and r.load.non_2xx == 0,
                       f"{where}: {r.load.errors} socket errors, {r.load.non_2xx} non-2xx responses"))
        checks.append((r.workers_same, f"{where}: no gunicorn worker restarted during the run"))
        wrk_cpu = r.cpu.get("loadgen", 0.0)
        checks.append((wrk_cpu < 0.9, f"{where}: wrk used {wrk_cpu:.2f} of its core (below 0.9: not the bottleneck)"))
    marks = ("ERROR", "WARNING", "Traceback", "cachemw:")
    for key, text in logs.items():
        bad = [ln for ln in text.splitlines() if any(m in ln for m in marks)]
        checks.append((not bad, f"log of {key}: {len(bad)} error/warning lines" + (f", first: `{bad[0].strip()}`"
                                                                                    if bad else "")))
    return checks


def cpu_us(run: Run) -> float:
    share = run.cpu.get("app", 0.0) + run.cpu.get("redis", 0.0)
    return 1e6 * share / run.load.rps if run.load.rps > 0 else float("nan")


def switches_per_request(run: Run) -> float:
    return run.switches / run.load.requests if run.load.requests else float("nan")


def cost_ratios(runs: list[Run], case: str, other: str) -> list[float]:
    """``other``'s CPU per request over ``case``'s, round by round: the req/s ratio if both had the core to
    themselves (other people's load on a shared machine taken out)."""
    mine = {r.round: cpu_us(r) for r in runs if r.case == case}
    theirs = {r.round: cpu_us(r) for r in runs if r.case == other}
    return [theirs[n] / mine[n] for n in sorted(mine) if n in theirs and mine[n] > 0]


def _range(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{format(median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def _minmax(values: list[float], fmt: str) -> str:
    return "-" if not values else f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def evaluate(runs: list[Run], names: list[str]) -> list[dict[str, Any]]:
    out = []
    for worker_class in dict.fromkeys(r.worker_class for r in runs):
        mine = [r for r in runs if r.worker_class == worker_class]
        for t in TARGETS:
            if t.case in names and t.other in names:
                values = peers.ratios(mine, t.case, t.other)  # type: ignore[arg-type]
                cost = cost_ratios(mine, t.case, t.other)
                if values:
                    out.append({"worker_class": worker_class, "target": t.name, "goal": t.goal, "values": values,
                                "median": median(values), "met": median(values) >= t.bound,
                                "cases": [t.case, t.other], "cost_values": cost,
                                "cost_met": bool(cost) and median(cost) >= t.bound})
    return out


def render(facts: dict[str, str], settings: dict[str, str], runs: list[Run], targets: list[dict[str, Any]],
           checks: list[tuple[bool, str]], args: argparse.Namespace, command: str, profiles: dict[str, list[str]],
           analysis: str) -> str:
    met = sum(1 for t in targets if t["met"])
    lines = common.results_preamble(
        "cachemw's WSGI shell vs Flask-Caching and Django's cache_page, under gunicorn",
        facts, command, [f"{k}: {v}" for k, v in settings.items()])
    lines[1:1] = [
        "",
        "Generated by `bench/wsgi.py` (see `bench/README.md`). Every app serves `GET /item/<id>` with the same ~1 KB",
        f"JSON body; the view sleeps {args.db_ms:g} ms (`time.sleep`, the simulated database read) before answering,",
        "so whatever reaches the view pays it. Hits: 100 warmed ids, the view must not run. Misses: a new id per",
        "request, the view runs once per request. All in one run on one machine, cases interleaved round by round.",
        f"Targets met: **{met} of {len(targets)}**.",
    ]
    if args.skipped:
        lines += [f"Not run: {', '.join(args.skipped)} (`cachemw/frameworks/django.py` is not in this checkout yet).",
                  ""]
    lines += [
        "## Targets",
        "",
        "Ratio of req/s, round by round (both cases from the same round): median (min-max) over rounds. The",
        "verdict is on req/s, as the targets are written; the last column is the same ratio from CPU time per",
        "request (gunicorn's processes and the app's redis-server), which other people's load on a shared",
        "machine changes least.",
        "",
        "| worker class | target | goal | measured (req/s) | verdict | same ratio from CPU per request |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets:
        cost = f"{_range(t['cost_values'], '.2f')} ({'met' if t['cost_met'] else 'missed'})" \
            if t["cost_values"] else "-"
        lines.append(f"| {t['worker_class']} | {t['target']} | {t['goal']} | {_range(t['values'], '.2f')} "
                     f"| {'**met**' if t['met'] else '**MISSED**'} | {cost} |")
    for worker_class in dict.fromkeys(r.worker_class for r in runs):
        mine = [r for r in runs if r.worker_class == worker_class]
        present = {r.case for r in mine}
        threads = args.gthreads if worker_class == "gthread" else 1
        lines += [
            "",
            f"## `--worker-class {worker_class}` ({args.workers} workers x {threads} threads)",
            "",
            "req/s and p99: min-max over rounds (median in bold for req/s). *µs CPU/req*: CPU time of the gunicorn",
            "master, its workers and the app's redis-server per request (median). CPU columns: share of one core,",
            "median over rounds; *others*: everything on the machine that is not ours. *switches/req*: context",
            "switches of the workers' threads per request (median).",
            "",
            "| case | req/s | p50 ms | p99 ms | µs CPU/req | switches/req | app CPU | redis CPU | wrk CPU "
            "| others CPU |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in args.case_names:
            rs = [r for r in mine if r.case == name]
            if not rs:
                continue
            rps = [r.load.rps for r in rs]
            lines.append(
                f"| {CASE[name].label} (`{name}`) | **{median(rps):.0f}** ({_minmax(rps, '.0f')}) "
                f"| {_minmax([r.load.p50_ms for r in rs], '.2f')} | {_minmax([r.load.p99_ms for r in rs], '.2f')} "
                f"| {median([cpu_us(r) for r in rs]):.0f} | {median([switches_per_request(r) for r in rs]):.1f} "
                f"| {median([r.cpu.get('app', 0) for r in rs]):.2f} "
                f"| {median([r.cpu.get('redis', 0) for r in rs]):.2f} "
                f"| {median([r.cpu.get('loadgen', 0) for r in rs]):.2f} | {median([r.cpu_others for r in rs]):.2f} |")
        info = [f"| {text} | {_range(peers.ratios(mine, case, other), '.2f')} |"  # type: ignore[arg-type]
                for text, case, other in INFO_RATIOS if case in present and other in present]
        if info:
            lines += ["", "For context (not targets), req/s ratios per round:", "", "| ratio | measured |",
                      "|---|---|", *info]
    lines += [
        "",
        "## Runs (in the order they ran)",
        "",
        "| worker class | round | case | req/s | p50 ms | p99 ms | requests | view runs | X-Cache (wrk) | sample "
        "| µs CPU/req | switches/req | app CPU | redis CPU | wrk CPU | others CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        counted = ", ".join(f"{k} {v}" for k, v in sorted(r.load.x_cache.items())) or "-"
        picked = ", ".join(f"{k} {v}" for k, v in sorted(r.sample.items())) or "-"
        lines.append(f"| {r.worker_class} | {r.round} | {r.case} | {r.load.rps:.0f} | {r.load.p50_ms:.2f} "
                     f"| {r.load.p99_ms:.2f} | {r.load.requests} | {r.view_calls} | {counted} | {picked} "
                     f"| {cpu_us(r):.0f} | {switches_per_request(r):.1f} | {r.cpu.get('app', 0):.2f} "
                     f"| {r.cpu.get('redis', 0):.2f} "
                     f"| {r.cpu.get('loadgen', 0):.2f} | {r.cpu_others:.2f} |")
    failed = [text for ok, text in checks if not ok]
    lines += ["", "## Sanity checks", "",
              f"{len(checks) - len(failed)} of {len(checks)} passed: hit runs ran no view, miss runs ran it once per "
              "request, cachemw's X-Cache said HIT (hits) / MISS (misses) on every response wrk read and on the "
              "sampled requests after each run, no socket errors or non-2xx, no worker restarted, wrk below 0.9 of "
              "its core, no errors or warnings in the gunicorn logs." + (" Failed:" if failed else ""), ""]
    lines += [f"- **FAILED**: {text}" for text in failed]
    if runs:
        lines += ["", "Load generator command of the last run:", "", "```", runs[-1].load.command, "```"]
    if profiles:
        lines += ["", "## Profiles (`--profile`: extra runs after the rounds, not in the tables)", "",
                  "py-spy `--gil` samples only the thread holding the GIL: where Python code runs, and C calls that",
                  "keep the GIL while they are in the kernel (a socket write, a queue put that wakes another thread);",
                  "*self* counts the sample for the innermost Python line. cProfile times each thread by its own CPU",
                  "time (`time.thread_time`), so waiting costs nothing; its overhead inflates call-heavy code.", ""]
        for title, text in profiles.items():
            lines += [f"`{title}`:", "", "```", *text, "```", ""]
    lines += ["", ANALYSIS_MARK, analysis.strip("\n"), ""] if analysis.strip() else ["", ANALYSIS_MARK, ""]
    return "\n".join(lines)


def kept_analysis(output: Path) -> str:
    with contextlib.suppress(OSError):
        text = output.read_text()
        if ANALYSIS_MARK in text:
            return text.split(ANALYSIS_MARK, 1)[1]
    return ""


# -- main ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    peers.ensure_venv(args.refresh_venv)
    if common.wrk_path() is None:
        raise HarnessError(f"wrk not found; {common.WRK_INSTALL_HINT}")
    server_cpu, client_cpu = (None, None) if args.no_pin else common.default_cpus()
    command = shlex.join(["python3", "bench/wsgi.py", *sys.argv[1:]])
    names: list[str] = args.case_names
    per_class = args.rounds * len(names) * (args.duration + 1) + len(names) * (args.warmup + 1) + 30
    print(f"{len(names)} cases x {args.rounds} rounds x {args.duration} s x {len(args.classes)} worker classes: "
          f"about {per_class * len(args.classes) / 60:.0f} min", flush=True)
    workdir = common.workdir("cachemw-wsgi-")
    ok = False
    fresh = peers.FreshIds()
    try:
        redis_binary = common.find_redis_server()
        facts = common.machine_description(redis_binary=redis_binary, packages=PACKAGES,
                                           python=str(peers.VENV_PYTHON))
        settings = {
            "redis-server": "private, one per app that uses Redis, free port, no persistence, "
                            + (f"pinned to CPU {server_cpu}" if server_cpu else "not pinned"),
            "load generator": f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency (keep-alive), "
                              + (f"pinned to CPU {client_cpu}" if client_cpu else "not pinned")
                              + f"; hits and plain routes round robin over {args.ids} ids (`bench/wrk/ids.lua`), "
                              "misses a new id per request (`bench/wrk/fresh_ids.lua`); wrk counts X-Cache "
                              "(`BENCH_COUNT_HEADER=x-cache`) in every run",
            "view": f"`time.sleep({args.db_ms / 1000:g})` (the simulated database read) and one byte appended to "
                    "a counter file, then the ~1 KB JSON body",
            "warm-up": "one request per id, then until a pass over all ids runs no view (and cachemw answers "
                       f"HIT on every id), then {args.warmup} s of unrecorded load per case",
            "rounds": f"{args.rounds} per worker class, each running every case once in the order of the tables",
            "configuration": "cachemw `app.wsgi_app = CacheMiddleware(app.wsgi_app, redis_url=URL)` (Flask), "
                             "`CacheMiddleware(get_wsgi_application(), redis_url=URL)` (Django), `@cache(ttl=\"5m\")` "
                             "on the view, defaults otherwise; Flask-Caching `CACHE_TYPE=\"RedisCache\"`, "
                             "`CACHE_REDIS_URL`, `@cache.cached(timeout=300)`; Django `cache_page(300)`, `CACHES` "
                             "default `django.core.cache.backends.redis.RedisCache`; Django: `settings.configure()`"
                             " with no installed apps and no middleware",
        }
        runs: list[Run] = []
        logs: dict[str, str] = {}
        profiles: dict[str, list[str]] = {}
        for worker_class in args.classes:
            mine, class_logs = measure_class(worker_class, args, workdir, redis_binary, server_cpu, client_cpu, fresh,
                                             settings, profiles)
            runs += mine
            logs.update({f"{worker_class} {k}": v for k, v in class_logs.items()})
        targets = evaluate(runs, names)
        checks = sanity_checks(runs, args, logs)
        report = render(facts, settings, runs, targets, checks, args, command, profiles, kept_analysis(args.output))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        raw = {"facts": facts, "settings": settings, "command": command, "targets": targets, "skipped": args.skipped,
               "profiles": profiles,
               "runs": [dict(asdict(r), load={k: v for k, v in asdict(r.load).items() if k != "raw"}) for r in runs],
               "checks": [{"ok": o, "text": t} for o, t in checks]}
        args.output.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
        print()
        for t in targets:
            print(f"{'met   ' if t['met'] else 'MISSED'} [{t['worker_class']}] {t['target']} ({t['goal']}): "
                  f"{_range(t['values'], '.2f')}; from CPU per request {_range(t['cost_values'], '.2f')}")
        for ok_, text in checks:
            if not ok_:
                print(f"SANITY CHECK FAILED: {text}")
        print(f"results: {args.output} (+ {args.output.with_suffix('.json').name})")
        ok = True
        return 0
    finally:
        common.remove_workdir(workdir, keep=not ok or args.keep_workdir)


def main(argv: list[str] | None = None) -> int:
    return common.exit_status(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
