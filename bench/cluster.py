"""Redis Cluster, Sentinel and TLS vs a single Redis for cache hits, and 2 uvicorn workers vs 1 (issues 8, 17).

    .venv/bin/python bench/cluster.py            # ~5 min: 3 rounds x (4 hit cases + 2 worker cases) x 8 s
    .venv/bin/python bench/cluster.py --phases hits   # A-B only

Phase "hits" (cases A and B), one app (``bench/apps/cluster_app.py``: ``GET /item/{id}``,
``@cache(ttl="1h")``, 20 ms handler, ~1 KB JSON) started twice under uvicorn
(1 worker, CPU 0):

- A ``single``: on a private redis-server (CPU 0);
- B ``cluster``: on a private 3-master Redis Cluster (``tests.redis_cluster.LocalCluster``,
  every thread of the three nodes pinned to CPU 0), through ``redis+cluster://``;
- B ``sentinel``: on a private redis-server named by a private redis-sentinel (both on
  CPU 0), through ``redis+sentinel://``;
- B ``tls``: on a private redis-server with a TLS port (certificate from a CA made with
  ``trustme``), through ``rediss://...?ssl_ca_certs=``.

All warmed over 100 ids until every id answers HIT, then wrk (64 connections, CPU 1)
interleaved A B B B A B B B ... for 3 rounds: median req/s, p50, p99 (min-max), each B's ratio to A, and
the median (min-max) of the per-round ratios.

``--redis-cpu client`` puts every Redis (and Sentinel) process on the load generator's
core (CPU 1) instead: in production a Cluster's nodes run on other hosts, and three
redis-servers on the app's core charge the Cluster case for the nodes' own wake-ups
and context switches (three event loops instead of one), which the single case does
not pay. Both placements are worth reporting; the default keeps the earlier runs'.

Phase "workers" (case C), on the single Redis (still pinned to CPU 0): the same app
with ``--workers 2`` and ``--workers 1``, **not pinned** (two workers need both cores,
so the load generator, still pinned to CPU 1, shares a core with them), interleaved
w1 w2 w1 w2 ...: aggregate req/s, ratio 2 workers / 1 worker.

Sanity: the handler counter (summed over workers) must not move during a run; a
sample of requests after each run answers HIT; no socket errors or non-2xx; no
errors in the app logs. Before measuring, it waits (up to ``--wait-quiet`` s) until
no other ``wrk`` or ``bench/`` Python process runs on the machine, and records the
load average. Writes ``bench/results/cluster.md`` (and ``.json``).

Exit status: 0 when it measured (sanity checks passed or not: both are printed and
written); 1 when it could not (a process did not start, wrk failed, a cache never
warmed, the machine never became quiet).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tests.redis_cluster

import common
from common import AppProcess, CpuMeter, HarnessError, LoadResult, RedisProcess, median

TARGET = "cluster_app:app"
PREFIX = "/item/"
HIT_CASES = ("single", "cluster", "sentinel", "tls")
OTHER_HIT_CASES = HIT_CASES[1:]
WORKER_CASES = ("w1", "w2")
LABEL = {
    "single": "A: 1 worker, single Redis (`redis://`)",
    "cluster": "B: 1 worker, 3-master Redis Cluster (`redis+cluster://`)",
    "sentinel": "B: 1 worker, a Sentinel-named master (`redis+sentinel://`)",
    "tls": "B: 1 worker, single Redis over TLS (`rediss://`)",
    "w1": "C: `--workers 1`, single Redis, app not pinned",
    "w2": "C: `--workers 2`, single Redis, app not pinned",
}


@dataclass
class Run:
    phase: str
    round: int
    case: str
    load: LoadResult
    handler_calls: int  # how often the item handler ran during the load (all workers)
    sample: dict[str, int]  # X-Cache of a few requests right after the load
    cpu: dict[str, float] = field(default_factory=dict)  # shares of one core
    cpu_others: float = 0.0
    loadavg: str = ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per phase (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load run (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of unrecorded load per case before round 1 (default: %(default)s)")
    parser.add_argument("--connections", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default: %(default)s)")
    parser.add_argument("--ids", type=int, default=100, help="distinct warmed ids (default: %(default)s)")
    parser.add_argument("--sample", type=int, default=20,
                        help="requests sampled for X-Cache after each run (default: %(default)s)")
    parser.add_argument("--phases", default="hits,workers",
                        help="comma-separated: hits (A single vs B cluster), workers (C) (default: %(default)s)")
    parser.add_argument("--wait-quiet", type=float, default=600.0,
                        help="wait at most this many seconds for other wrk / bench/ python processes to end "
                             "(default: %(default)s)")
    parser.add_argument("--output", type=Path, default=common.RESULTS_DIR / "cluster.md",
                        help="Markdown results file; a .json with the raw runs goes next to it "
                             "(default: bench/results/cluster.md)")
    parser.add_argument("--redis-cpu", choices=("app", "client"), default="app",
                        help="where every Redis (and Sentinel) process runs: 'app', on the app's core (one "
                             "machine: the app shares its core with every node); 'client', on the load "
                             "generator's core, as Redis on other hosts leaves the app's core to the app "
                             "(default: %(default)s)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and redis files after the run")
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not args.phases or any(p not in ("hits", "workers") for p in args.phases):
        parser.error("--phases takes hits and/or workers")
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1 or args.threads < 1 or args.ids < 1:
        parser.error("rounds, duration, connections, threads and ids must be positive")
    return args


# -- the machine: wait for other people's benchmarks ---------------------------------------------


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
            pid = int(text[text.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return seen


def other_benchmarks() -> list[str]:
    """Other ``wrk`` processes and Python processes running something under ``bench/`` (not us, not our parents)."""
    mine = _ancestors(os.getpid())
    found: list[str] = []
    for pattern in (["-x", "wrk"], ["-f", r"python.*bench/"]):
        try:
            done = subprocess.run(["pgrep", "-a", *pattern], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HarnessError(f"pgrep failed: {exc!r}") from exc
        for line in done.stdout.splitlines():
            pid, _, cmd = line.partition(" ")
            if pid.isdigit() and int(pid) not in mine and line not in found:
                found.append(f"{pid} {cmd[:160]}")
    return found


def wait_until_quiet(limit_s: float) -> tuple[float, list[str]]:
    """(seconds waited, what was seen first); raises when others still run after ``limit_s``."""
    started = time.monotonic()
    first = other_benchmarks()
    busy = first
    announced = False
    while busy:
        waited = time.monotonic() - started
        if waited >= limit_s:
            raise HarnessError(f"other benchmark processes still run after {limit_s:.0f} s:\n  " + "\n  ".join(busy))
        if not announced:
            print("waiting for other benchmark processes to end:\n  " + "\n  ".join(busy), flush=True)
            announced = True
        time.sleep(5)
        busy = other_benchmarks()
    return time.monotonic() - started, first


# -- processes -----------------------------------------------------------------------------------


class WorkersApp(AppProcess):
    """``AppProcess`` with ``--workers N``; ``pids()``: the supervisor and its worker processes."""

    def __init__(self, *args: Any, workers: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.workers = workers

    def command(self) -> list[str]:
        args = super().command()
        args[args.index("--workers") + 1] = str(self.workers)
        return args

    def pids(self) -> dict[str, int]:
        assert self.proc is not None
        out = {"app": self.proc.pid}
        for n, child in enumerate(_descendants(self.proc.pid), start=1):
            out[f"app-child{n}"] = child
        return out

    def wait_workers(self, deadline_s: float = 30.0) -> list[int]:
        """Until ``workers`` distinct worker pids have answered ``/_calls`` (new connection each time)."""
        if self.workers == 1:
            return [int(common.http_get_json(self.port, "/_calls")["pid"])]
        deadline = time.monotonic() + deadline_s
        seen: set[int] = set()
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                seen.add(int(common.http_get_json(self.port, "/_calls", timeout=2.0)["pid"]))
            if len(seen) >= self.workers:
                return sorted(seen)
            time.sleep(0.02)
        raise HarnessError(f"only workers {sorted(seen)} of {self.workers} answered within {deadline_s} s; "
                           f"log:\n{self.log_tail()}")


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        children: list[int] = []
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    children += [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
        for child in children:
            if child not in out:
                out.append(child)
                todo.append(child)
    return out


def pin_all_threads(pid: int, cpu: str) -> None:
    """Pin every thread of a running process (``taskset -a``), e.g. redis-server's background threads too."""
    cpus = {int(c) for c in cpu.split(",")}
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)
    for tid in os.listdir(f"/proc/{pid}/task"):
        if os.sched_getaffinity(int(tid)) != cpus:
            raise HarnessError(f"could not pin thread {tid} of {pid} to CPU {cpu}")


class Cluster:
    """A private 3-master ``LocalCluster`` (tests/redis_cluster.py), every node's threads pinned to ``cpu``."""

    def __init__(self, workdir: Path, binary: str, cpu: str | None) -> None:
        # LocalCluster finds its binary like the tests do: make it the one the single Redis runs.
        os.environ["CACHEMW_TEST_REDIS_SERVER"] = binary
        from tests.redis_cluster import LocalCluster

        self.cluster = LocalCluster(workdir, masters=3)
        self.cpu = cpu

    @property
    def url(self) -> str:
        return self.cluster.url

    def node_pids(self) -> dict[str, int]:
        out = {}
        for n, node in enumerate(self.cluster.nodes):
            proc = node._proc  # the test helper keeps its process private; we only read the pid
            assert proc is not None
            out[f"redis{n}"] = proc.pid
        return out

    def __enter__(self) -> Cluster:
        try:
            self.cluster.start()
        except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            self.cluster.stop()
            raise HarnessError(f"the local Redis Cluster did not start: {exc!r}") from exc
        if self.cpu is not None:
            for pid in self.node_pids().values():
                pin_all_threads(pid, self.cpu)
        for node in self.cluster.nodes:
            if node.port == common.FORBIDDEN_PORT:
                raise HarnessError("a cluster node got port 6379")
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.stop()

    def entries_per_node(self) -> dict[int, int]:
        return {node.port: entry_keys(node.port) for node in self.cluster.nodes}


class TlsRedis(RedisProcess):
    """A private redis-server with a TLS port beside its plain one (setup and the harness's PING use that)."""

    def __init__(self, workdir: Path, *, cpu: str | None, binary: str) -> None:
        super().__init__(workdir, cpu=cpu, binary=binary)
        import trustme  # the test extra's

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = workdir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert.cert_chain_pems[0].write_to_path(str(workdir / "server.pem"))
        cert.private_key_pem.write_to_path(str(workdir / "server.key"))
        self.tls_port = common.free_port()

    def args(self) -> list[str]:
        return [*super().args(), "--tls-port", str(self.tls_port), "--tls-cert-file", str(self.workdir / "server.pem"),
                "--tls-key-file", str(self.workdir / "server.key"), "--tls-ca-cert-file", str(self.ca_file),
                "--tls-auth-clients", "no"]

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0?ssl_ca_certs={self.ca_file}"


class SentinelProcess:
    """A private redis-sentinel naming a private redis-server ``bench``, pinned to ``cpu``."""

    def __init__(self, workdir: Path, master_port: int, *, cpu: str | None, binary: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = common.free_port()
        self.config = workdir / "sentinel.conf"
        self.config.write_text("\n".join([f"port {self.port}", "bind 127.0.0.1", f"dir {workdir}",
                                          f"sentinel monitor bench 127.0.0.1 {master_port} 1",
                                          "sentinel down-after-milliseconds bench 5000", ""]))
        self.command = [*common.taskset_prefix(cpu), binary, str(self.config), "--sentinel"]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/bench"

    def __enter__(self) -> SentinelProcess:
        import redis

        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError), redis.Redis(port=self.port, socket_timeout=1) as client:
                if client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "bench"):
                    return self
            time.sleep(0.05)
        self.__exit__()
        raise HarnessError("redis-sentinel did not name its master within 15 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def entry_keys(port: int) -> int:
    """How many cache entries (``cachemw:e:*``) a private Redis on ``port`` holds."""
    import redis

    if port == common.FORBIDDEN_PORT:
        raise HarnessError("refusing to talk to a Redis that is not ours")
    with redis.Redis(port=port, socket_timeout=2) as client:
        return sum(1 for _ in client.scan_iter(match="cachemw:e:*", count=1000))


def shown(app: AppProcess, workdir: Path) -> str:
    """The app's command line without this run's scratch directory and ports."""
    text = app.display_command().replace(str(workdir), "$WORKDIR")
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)


# -- steps ---------------------------------------------------------------------------------------


def handler_total(app: AppProcess, timeout: float = 30.0) -> int:
    try:
        return int(common.http_get_json(app.port, "/_calls", timeout=timeout)["item"])
    except OSError as exc:
        raise HarnessError(f"{app.target} did not answer /_calls within {timeout} s ({exc!r}); log:\n"
                           f"{app.log_tail()}") from exc


def warm(app: AppProcess, name: str, ids: int, deadline_s: float = 30.0) -> int:
    """One request per id (the 20 ms handler, in parallel), then until a pass over every id runs no handler and
    answers HIT everywhere (the entry is stored after the response). Returns the handler runs so far."""
    paths = [f"{PREFIX}{i}" for i in range(ids)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(lambda p: common.http_get(app.port, p, timeout=30.0), paths))
    bad = [r.status for r in replies if r.status != 200]
    if bad:
        raise HarnessError(f"{name}: warm-up requests failed ({len(bad)} of {ids}: {bad[:5]}); log:\n"
                           f"{app.log_tail()}")
    deadline = time.monotonic() + deadline_s
    seen: dict[str, int] = {}
    moved = -1
    while time.monotonic() < deadline:
        before = handler_total(app)
        seen = {}
        for path in paths:
            reply = common.http_get(app.port, path)
            value = reply.header("x-cache") or f"status {reply.status}"
            seen[value] = seen.get(value, 0) + 1
        moved = handler_total(app) - before
        if moved == 0 and seen.get("HIT", 0) == ids:
            return handler_total(app)
        time.sleep(0.2)
    raise HarnessError(f"{name}: the cache did not warm within {deadline_s} s (last pass: handler ran {moved} times, "
                       f"answers {seen}); log:\n{app.log_tail()}")


def sample(app: AppProcess, ids: int, n: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(min(n, ids)):
        reply = common.http_get(app.port, f"{PREFIX}{(i * 37) % ids}")
        value = reply.header("x-cache") or f"status {reply.status}"
        counts[value] = counts.get(value, 0) + 1
    return counts


def measure(phase: str, n: int, case: str, app: AppProcess, meter: CpuMeter, args: argparse.Namespace,
            client_cpu: str | None, count_header: str | None) -> Run:
    before = handler_total(app)
    with meter.measure() as usage:
        result = common.run_wrk(app.base_url, PREFIX, args.ids, duration=args.duration, connections=args.connections,
                                threads=args.threads, cpu=client_cpu, count_header=count_header)
    after = handler_total(app)
    if not app.alive():
        raise HarnessError(f"{case}: the app died during a run; log:\n{app.log_tail()}")
    run = Run(phase, n, case, result, after - before, sample(app, args.ids, args.sample), dict(usage.processes),
              usage.others, _loadavg())
    print(f"{phase} round {n} {case:7}: {result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
          f"p99 {result.p99_ms:6.2f} ms  handler {run.handler_calls}  X-Cache {result.x_cache or '-'}  "
          f"CPU app {app_cpu(run):.2f} redis {redis_cpu(run):.2f} wrk {run.cpu.get('loadgen', 0):.2f} "
          f"others {run.cpu_others:.2f}  load {run.loadavg}", flush=True)
    return run


# -- report --------------------------------------------------------------------------------------


def app_cpu(run: Run) -> float:
    return sum(v for k, v in run.cpu.items() if k.startswith("app"))


def redis_cpu(run: Run) -> float:
    return sum(v for k, v in run.cpu.items() if k.startswith("redis"))


def cpu_us(run: Run) -> float:
    """CPU of the app (all its processes) and Redis (all nodes) per request, in microseconds."""
    return (app_cpu(run) + redis_cpu(run)) * run.load.seconds / max(1, run.load.requests) * 1e6


def _range(values: list[float], fmt: str) -> str:
    return f"{format(median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def summarize(runs: list[Run], cases: tuple[str, str]) -> dict[str, Any] | None:
    base, other = cases
    mine = {c: [r for r in runs if r.case == c] for c in cases}
    if not all(mine.values()):
        return None
    out: dict[str, Any] = {"cases": {}}
    for c in cases:
        out["cases"][c] = {"rps": [r.load.rps for r in mine[c]], "p50": [r.load.p50_ms for r in mine[c]],
                           "p99": [r.load.p99_ms for r in mine[c]], "cpu_us": [cpu_us(r) for r in mine[c]],
                           "app_cpu": [app_cpu(r) for r in mine[c]], "redis_cpu": [redis_cpu(r) for r in mine[c]],
                           "wrk_cpu": [r.cpu.get("loadgen", 0.0) for r in mine[c]],
                           "others_cpu": [r.cpu_others for r in mine[c]]}
    cs = out["cases"]
    out["ratio_of_medians"] = {m: median(cs[other][m]) / median(cs[base][m]) for m in ("rps", "p50", "p99", "cpu_us")}
    per_round = []
    for r_base in mine[base]:
        r_other = next((r for r in mine[other] if r.round == r_base.round), None)
        if r_other is not None:
            per_round.append({"round": r_base.round, "rps": r_other.load.rps / r_base.load.rps,
                              "p50": r_other.load.p50_ms / r_base.load.p50_ms,
                              "p99": r_other.load.p99_ms / r_base.load.p99_ms})
    out["per_round"] = per_round
    return out


def sanity_checks(runs: list[Run], log_errors: dict[str, list[str]], extra: list[tuple[bool, str]]) -> list[
        tuple[bool, str]]:
    checks = list(extra)
    for r in runs:
        where = f"{r.phase} round {r.round} {r.case}"
        checks.append((r.handler_calls == 0, f"{where}: handler ran {r.handler_calls} times during the run "
                                             "(expected 0: every request a hit)"))
        if r.load.x_cache:
            total = sum(r.load.x_cache.values())
            hits = r.load.x_cache.get("HIT", 0)
            checks.append((hits == total, f"{where}: wrk counted {hits}/{total} responses X-Cache: HIT"))
        s_total = sum(r.sample.values())
        s_hits = r.sample.get("HIT", 0)
        checks.append((s_hits == s_total and s_total > 0, f"{where}: sample after the run: {s_hits}/{s_total} HIT"))
        checks.append((r.load.errors == 0 and r.load.non_2xx == 0,
                       f"{where}: {r.load.errors} socket errors, {r.load.non_2xx} non-2xx responses"))
    for name, lines in log_errors.items():
        checks.append((not lines, f"app log ({name}): {len(lines)} error/warning lines"))
    return checks


def _table(summary: dict[str, Any], cases: tuple[str, str], ratio_label: str) -> list[str]:
    cs = summary["cases"]
    r = summary["ratio_of_medians"]
    lines = [
        "| case | req/s | p50 ms | p99 ms | CPU µs/req (app + redis) | app CPU | redis CPU | wrk CPU | others CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        x = cs[c]
        lines.append(f"| {LABEL[c]} | {_range(x['rps'], '.0f')} | {_range(x['p50'], '.2f')} | "
                     f"{_range(x['p99'], '.2f')} | {_range(x['cpu_us'], '.0f')} | {median(x['app_cpu']):.2f} | "
                     f"{median(x['redis_cpu']):.2f} | {median(x['wrk_cpu']):.2f} | {median(x['others_cpu']):.2f} |")
    lines.append(f"| **ratio {ratio_label}** (of medians) | **{r['rps']:.2f}** | {r['p50']:.2f} | {r['p99']:.2f} "
                 f"| {r['cpu_us']:.2f} | | | | |")
    lines += ["", f"Per-round ratios {ratio_label}: "
              + "; ".join(f"round {x['round']}: req/s {x['rps']:.2f}, p50 {x['p50']:.2f}, p99 {x['p99']:.2f}"
                          for x in summary["per_round"])]
    return lines


def _overview(each: dict[str, dict[str, Any] | None]) -> list[str]:
    """Each topology's hit req/s against the single Redis's: of medians, and the per-round ratios."""
    lines = ["| topology | ratio of medians (req/s) | per-round ratio: median (min-max) | target 0.9x |",
             "|---|---|---|---|"]
    for case, summary in each.items():
        if summary is None:
            continue
        per = [x["rps"] for x in summary["per_round"]]
        r = summary["ratio_of_medians"]["rps"]
        verdict = "met" if median(per) >= 0.9 else "NOT met"
        lines.append(f"| {LABEL[case]} | **{r:.2f}** | {_range(per, '.2f')} | {verdict} |")
    return lines


def render(facts: dict[str, str], settings: dict[str, str], command: str, runs: list[Run],
           each: dict[str, dict[str, Any] | None], workers: dict[str, Any] | None, checks: list[tuple[bool, str]],
           notes: dict[str, str], redis_core: str | None, server_cpu: str | None) -> str:
    hits = each.get("cluster")
    lines = [
        "# Redis Cluster, Sentinel and TLS vs single Redis (hits), and 2 uvicorn workers vs 1",
        "",
        "Issues 8 and 17: hit throughput on a Redis Cluster, a Sentinel-named master and a TLS Redis vs a single",
        "Redis, same run (target: each >= 0.9x); aggregate throughput of 2 workers vs 1 on this 2-core machine.",
        "Generated by `bench/cluster.py`.",
        "",
        "## Setup",
        "",
        *(f"- {k}: {v}" for k, v in facts.items()),
        "",
        *(f"- {k}: {v}" for k, v in settings.items()),
        "",
        *(f"- {k}: {v}" for k, v in notes.items()),
        "",
        "Command (from the repository root):",
        "",
        "```",
        command,
        "```",
        "",
    ]
    if hits is not None:
        lines += [
            "## A vs B: hits on a single Redis vs a 3-master Cluster, a Sentinel-named master, a TLS Redis",
            "",
            f"Same app, 1 uvicorn worker on CPU 0, every Redis (and Sentinel) process on CPU {redis_core}, "
            "wrk on CPU 1; "
            f"{args_rounds(runs, 'hits')} interleaved rounds (single cluster sentinel tls, repeated); median "
            "(min-max). CPU columns: share of one core (median run).",
            "",
            *_overview(each),
            "",
        ]
        for case, summary in each.items():
            if summary is not None:
                lines += [f"### {LABEL[case]}", "", *_table(summary, ("single", case), f"{case} / single"), ""]
    if workers is not None:
        lines += [
            "## C: `--workers 2` vs `--workers 1` (single Redis)",
            "",
            "The app is **not pinned** here (two workers need both cores); redis-server stays on CPU "
            f"{redis_core} and wrk "
            "on CPU 1, so wrk and Redis share the two cores with the workers: the ratio is what a 2-core box",
            f"serving and loading itself gets, not the scaling of the app alone. {args_rounds(runs, 'workers')}"
            " interleaved rounds (w1 w2 w1 w2 ...); median (min-max). App CPU: all uvicorn processes summed.",
            "",
            *_table(workers, ("w1", "w2"), "2 workers / 1 worker"),
            "",
        ]
    lines += reading(hits, workers, runs, redis_on_app_core=redis_core == server_cpu)
    lines += [
        "## Runs (in the order they ran)",
        "",
        "CPU: share of one core during the run (1.00 = one core busy); *others* is everything else on",
        "the machine (noise). Load: /proc/loadavg (1, 5, 15 min) right after the run.",
        "",
        "| phase | round | case | req/s | p50 ms | p99 ms | requests | X-Cache (wrk) | handler runs | app CPU "
        "| redis CPU | wrk CPU | others CPU | CPU µs/req | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        xc = ", ".join(f"{k} {v}" for k, v in sorted(r.load.x_cache.items())) or "not counted"
        lines.append(f"| {r.phase} | {r.round} | {r.case} | {r.load.rps:.0f} | {r.load.p50_ms:.2f} | "
                     f"{r.load.p99_ms:.2f} | {r.load.requests} | {xc} | {r.handler_calls} | {app_cpu(r):.2f} | "
                     f"{redis_cpu(r):.2f} | {r.cpu.get('loadgen', 0):.2f} | {r.cpu_others:.2f} | {cpu_us(r):.0f} | "
                     f"{r.loadavg} |")
    lines += ["", "## Sanity checks", ""]
    lines += [f"- {'ok' if ok else '**FAILED**'}: {text}" for ok, text in checks]
    lines += ["", "wrk command of the last run:", "", "```", runs[-1].load.command, "```", ""]
    return "\n".join(lines)


def reading(hits: dict[str, Any] | None, workers: dict[str, Any] | None, runs: list[Run], *,
            redis_on_app_core: bool) -> list[str]:
    """What the figures say and do not say (partly computed from them)."""
    lines = ["## Reading the numbers, and caveats", ""]
    if hits is not None:
        r = hits["ratio_of_medians"]["rps"]
        per = [x["rps"] for x in hits["per_round"]]
        cs = hits["cases"]
        if all(x >= 0.97 for x in per) and r >= 0.97:
            verdict = (f"A hit costs no more through the cluster client than through the single-server one here: "
                       f"cluster / single = {r:.2f} in req/s (per round {min(per):.2f}-{max(per):.2f}).")
        else:
            verdict = (f"Hits through the cluster client ran at {r:.2f}x the single-server throughput "
                       f"(per round {min(per):.2f}-{max(per):.2f}).")
        lines += [f"- **A vs B.** {verdict} The app process is the bottleneck in both cases "
                  f"(app CPU {median(cs['single']['app_cpu']):.2f} / {median(cs['cluster']['app_cpu']):.2f} of its "
                  f"core; all Redis processes together {median(cs['single']['redis_cpu']):.2f} / "
                  f"{median(cs['cluster']['redis_cpu']):.2f}), so this compares the *client-side* cost of a hit "
                  "(cachemw + redis-py's `Redis` vs `RedisCluster`, one GET per request), not Redis's capacity."]
        if r > 1.03 and all(x > 1.0 for x in per):
            app_us = {c: median([app_cpu(run) * run.load.seconds / max(1, run.load.requests) * 1e6
                                 for run in runs if run.case == c]) for c in HIT_CASES}
            lines += ["- The cluster case came out *faster* in every round. The cause is not isolated by this "
                      f"benchmark: the app process spent {app_us['cluster']:.0f} µs of CPU per request with "
                      f"`RedisCluster` against {app_us['single']:.0f} µs with `Redis` (the two clients take "
                      "different code paths in redis-py), and B always runs right after A within a round. "
                      "Read it as \"no slower\", not as a speed-up to count on."]
        where = "the app's core" if redis_on_app_core else "the load generator's core"
        lines += [f"- All three masters run on one machine, on {where}, over loopback: no network hop, no "
                  "spread over hosts, no replicas, no resharding (MOVED/ASK) during the runs. What a real cluster "
                  "buys (memory and write capacity, failover) is not measured here.",
                  "- Hits only. A miss on a cluster cannot use the single-server one-script lock and fill "
                  "(`cachemw/store/redis.py`: the keys span slots, so it pipelines), so miss costs may differ "
                  "more than hit costs do; not measured here."]
    if workers is not None:
        r = workers["ratio_of_medians"]["rps"]
        cs = workers["cases"]
        busy = (median(cs["w2"]["app_cpu"]) + median(cs["w2"]["redis_cpu"]) + median(cs["w2"]["wrk_cpu"])
                + median(cs["w2"]["others_cpu"]))
        splits = [sorted((v for k, v in run.cpu.items() if k.startswith("app-child") and v > 0.05), reverse=True)
                  for run in runs if run.case == "w2"]
        split_text = "; ".join("/".join(f"{v:.2f}" for v in s_) for s_ in splits)
        even = all(len(s_) == 2 and s_[0] <= 1.1 * s_[1] for s_ in splits)
        split_line = (f"- The two workers shared the work about evenly (CPU per worker, per run: {split_text})."
                      if even else
                      f"- The two workers did not get equal shares (CPU per worker, per run: {split_text}): they "
                      "accept from one shared listening socket, and wrk's connections are split between them "
                      "once, at connect time.")
        lines += [f"- **C.** 2 workers served {r:.2f}x the aggregate req/s of 1 worker. With 2 workers the machine "
                  f"is saturated: app {median(cs['w2']['app_cpu']):.2f} + Redis {median(cs['w2']['redis_cpu']):.2f} "
                  f"+ wrk {median(cs['w2']['wrk_cpu']):.2f} + others {median(cs['w2']['others_cpu']):.2f} "
                  f"= {busy:.2f} of 2 cores, so the ratio is capped by the cores wrk and Redis take, not by "
                  "cachemw; with the load generator on another machine it could come closer to 2x (not measured).",
                  split_line,
                  *one_worker_note(hits, workers)]
    lines += ["- Load average includes this benchmark's own processes (app, Redis and wrk keep 1-2 cores busy, so "
              "the 1-minute figure climbs during the run); the *others CPU* column is the measure of other "
              "people's load on the machine.",
              "- 3 rounds of 8 s per case on a 2-CPU VM: differences of a few percent are within the noise; "
              "compare the interleaved cases of this report with each other, not with other reports.", ""]
    return lines


def one_worker_note(hits: dict[str, Any] | None, workers: dict[str, Any]) -> list[str]:
    """C's 1 worker against A's: the same app and Redis, but set up differently."""
    text = ("- C's 1-worker case differs from A in setup, not only in time: the app is not pinned (it can run "
            "on the other core than Redis, and the kernel moves it), and wrk does not count X-Cache.")
    if hits is not None:
        w1 = median(workers["cases"]["w1"]["rps"])
        a = median(hits["cases"]["single"]["rps"])
        text += (f" Here it ran at {w1:.0f} req/s against A's {a:.0f} ({w1 / a:.2f}x); which of the differences "
                 "(or the later time) accounts for that is not isolated, so the 2-worker ratio is taken against "
                 "C's own 1-worker case only.")
    return [text]


def args_rounds(runs: list[Run], phase: str) -> int:
    return len({r.round for r in runs if r.phase == phase})


def errors_in(text: str) -> list[str]:
    marks = ("ERROR", "WARNING", "Traceback", "cachemw:")
    return [ln for ln in text.splitlines() if any(w in ln for w in marks)]


# -- main ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if common.wrk_path() is None:
        raise HarnessError(f"wrk not found; {common.WRK_INSTALL_HINT}")
    server_cpu, client_cpu = common.default_cpus()
    redis_core = server_cpu if args.redis_cpu == "app" else client_cpu
    if server_cpu is None:
        print("WARNING: fewer than 2 CPUs or no taskset: nothing is pinned", file=sys.stderr, flush=True)
    command = shlex.join([".venv/bin/python", "bench/cluster.py", *sys.argv[1:]])
    waited, seen_busy = wait_until_quiet(args.wait_quiet)
    workdir = common.workdir("cachemw-bench-cluster-")
    ok = False
    runs: list[Run] = []
    extra_checks: list[tuple[bool, str]] = []
    log_errors: dict[str, list[str]] = {}
    notes: dict[str, str] = {}
    settings: dict[str, str] = {}
    try:
        single = RedisProcess(workdir / "redis", cpu=redis_core)
        facts = common.machine_description(redis_binary=single.binary)
        facts["load average at start"] = (f"{facts['load average at start']} (1, 5, 15 min; after waiting "
                                          f"{waited:.0f} s for other benchmarks)")
        notes["other benchmark processes seen before the run"] = ("; ".join(f"`{s}`" for s in seen_busy)
                                                                  if seen_busy else "none")
        settings = {
            "app": "`bench/apps/cluster_app.py`: Starlette, `GET /item/{id:int}` `@cache(ttl=\"1h\")`, handler "
                   "sleeps 20 ms on a miss, ~1 KB JSON; `CacheMiddleware()` reads `CACHEMW_REDIS_URL`",
            "load generator": f"wrk, {args.connections} keep-alive connections, {args.threads} threads, "
                              f"{args.duration:g} s per run, pinned to CPU {client_cpu}; round robin over "
                              f"{args.ids} warmed ids (`bench/wrk/ids.lua`)",
            "warm-up": f"one request per id, then until a pass over all ids runs no handler and answers HIT; "
                       f"then {args.warmup:g} s of unrecorded load per case",
        }
        with single:
            facts["redis"] = f"single: private redis-server, no persistence, pinned to CPU {redis_core}"
            if "hits" in args.phases:
                watched = RedisProcess(workdir / "redis-sentinel-master", cpu=redis_core, binary=single.binary)
                tls = TlsRedis(workdir / "redis-tls", cpu=redis_core, binary=single.binary)
                with Cluster(workdir / "cluster", single.binary, redis_core) as cluster, watched, tls, \
                        SentinelProcess(workdir / "sentinel", watched.port, cpu=redis_core,
                                        binary=single.binary) as sentinel:
                    facts["redis sentinel"] = (f"a private redis-sentinel (quorum 1) naming a private redis-server, "
                                               f"both pinned to CPU {redis_core}")
                    facts["redis tls"] = (f"a private redis-server with `--tls-port` (certificate from a trustme CA), "
                                          f"pinned to CPU {redis_core}")
                    facts["redis cluster"] = (f"3 masters, no replicas (`tests/redis_cluster.py` LocalCluster: "
                                              f"redis-server --cluster-enabled yes + redis-cli --cluster create), "
                                              f"same binary, every thread pinned to CPU {redis_core}")
                    urls = {"single": single.url, "cluster": cluster.url, "sentinel": sentinel.url, "tls": tls.tls_url}
                    apps = {}
                    for case, url in urls.items():
                        (workdir / f"calls-{case}").mkdir()
                        apps[case] = WorkersApp(TARGET, workdir=workdir / f"app-{case}", workers=1, cpu=server_cpu,
                                                ready_path="/_calls",
                                                env={"CACHEMW_REDIS_URL": url,
                                                     "CACHEMW_BENCH_CALLS_DIR": str(workdir / f"calls-{case}")})
                    app_a, app_b = apps["single"], apps["cluster"]
                    with app_a, app_b, apps["sentinel"], apps["tls"]:
                        shown_urls = "; ".join(f"{case}: `CACHEMW_REDIS_URL="
                                               f"{re.sub(r':[0-9]+', ':PORT', url).replace(str(workdir), '$WORKDIR')}`"
                                               for case, url in urls.items() if case != "single")
                        settings["server (A, B)"] = f"`{shown(app_a, workdir)}`; B: the same with {shown_urls}"
                        for case, app in apps.items():
                            print(f"{case}: {app.display_command()}", flush=True)
                        for name, app in apps.items():
                            warm(app, name, args.ids)
                        keys_a = entry_keys(single.port)
                        keys_b = cluster.entries_per_node()
                        extra_checks.append((keys_a == args.ids,
                                             f"single Redis holds {keys_a} cache entries (`cachemw:e:*`) after "
                                             f"warm-up ({args.ids} expected)"))
                        extra_checks.append((sum(keys_b.values()) == args.ids and all(v > 0 for v in keys_b.values()),
                                             "cluster holds " + ", ".join(f"{v}" for v in keys_b.values())
                                             + f" cache entries on its 3 masters after warm-up ({args.ids} in all "
                                               "expected, some on every master)"))
                        notes["cluster: cache entries per master after warm-up"] = ", ".join(
                            str(v) for v in keys_b.values())
                        print(f"warm: single {keys_a} entries; cluster entries per node {keys_b}", flush=True)
                        for app in apps.values():
                            common.run_wrk(app.base_url, PREFIX, args.ids, duration=args.warmup,
                                           connections=args.connections, threads=args.threads, cpu=client_cpu,
                                           count_header=None)
                        meters = {"single": CpuMeter({**app_a.pids(), "redis": single.proc.pid}),  # type: ignore[union-attr]
                                  "cluster": CpuMeter({**app_b.pids(), **cluster.node_pids()}),
                                  "sentinel": CpuMeter({**apps["sentinel"].pids(),
                                                        "redis": watched.proc.pid,  # type: ignore[union-attr]
                                                        "redis-sentinel": sentinel.proc.pid}),  # type: ignore[union-attr]
                                  "tls": CpuMeter({**apps["tls"].pids(), "redis": tls.proc.pid})}  # type: ignore[union-attr]
                        for n in range(1, args.rounds + 1):
                            for case in HIT_CASES:
                                runs.append(measure("hits", n, case, apps[case], meters[case], args, client_cpu,
                                                    "x-cache"))
                        time.sleep(0.5)
                        for name, app in apps.items():
                            log_errors[name] = errors_in(app.log_path.read_text(errors="replace"))
            if "workers" in args.phases:
                single.flushall()
                calls_1, calls_2 = workdir / "calls-w1", workdir / "calls-w2"
                calls_1.mkdir()
                calls_2.mkdir()
                app_1 = WorkersApp(TARGET, workdir=workdir / "app-w1", workers=1, cpu=None, ready_path="/_calls",
                                   env={"CACHEMW_REDIS_URL": single.url, "CACHEMW_BENCH_CALLS_DIR": str(calls_1)})
                app_2 = WorkersApp(TARGET, workdir=workdir / "app-w2", workers=2, cpu=None, ready_path="/_calls",
                                   env={"CACHEMW_REDIS_URL": single.url, "CACHEMW_BENCH_CALLS_DIR": str(calls_2)})
                apps = {"w1": app_1, "w2": app_2}
                with app_1, app_2:
                    worker_pids = app_2.wait_workers()
                    app_1.wait_workers()
                    settings["server (C)"] = (f"`{shown(app_2, workdir)}` and the same with `--workers 1`; "
                                              "no taskset")
                    print(f"C: {app_2.display_command()} (workers {worker_pids})", flush=True)
                    for name, app in apps.items():
                        warm(app, name, args.ids)
                    for app in apps.values():
                        common.run_wrk(app.base_url, PREFIX, args.ids, duration=args.warmup,
                                       connections=args.connections, threads=args.threads, cpu=client_cpu,
                                       count_header=None)
                    pids_2 = app_2.pids()
                    children = [v for k, v in pids_2.items() if k != "app"]
                    extra_checks.append((all(p in children for p in worker_pids),
                                         f"--workers 2: workers {worker_pids} both answered, and are among the "
                                         f"supervisor's children {children}"))
                    meters = {"w1": CpuMeter({**app_1.pids(), "redis": single.proc.pid}),  # type: ignore[union-attr]
                              "w2": CpuMeter({**pids_2, "redis": single.proc.pid})}  # type: ignore[union-attr]
                    for n in range(1, args.rounds + 1):
                        for case in WORKER_CASES:
                            runs.append(measure("workers", n, case, apps[case], meters[case], args, client_cpu,
                                                None))
                    time.sleep(0.5)
                    for name, app in apps.items():
                        log_errors[name] = errors_in(app.log_path.read_text(errors="replace"))
        notes["load average at end"] = _loadavg()
        settings["X-Cache counting"] = ("A/B: wrk counts the X-Cache header of every response (its Lua `response()` "
                                        "callback; wrk has CPU 1 to itself); C: not counted, since wrk shares the "
                                        "cores with the app there (handler counter and samples only)")

        each = {case: summarize(runs, ("single", case)) for case in OTHER_HIT_CASES}
        workers = summarize(runs, WORKER_CASES)
        checks = sanity_checks(runs, log_errors, extra_checks)
        report = render(facts, settings, command, runs, each, workers, checks, notes, redis_core, server_cpu)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        raw = {"facts": facts, "settings": settings, "notes": notes, "command": command,
               "summary": {"hits": each, "workers": workers},
               "runs": [dict(asdict(r), load={k: v for k, v in asdict(r.load).items() if k != "raw"}) for r in runs],
               "checks": [{"ok": ok_, "text": t} for ok_, t in checks],
               "app_log_errors": {k: v[:50] for k, v in log_errors.items()}}
        args.output.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
        print()
        for title, summary, cases, label in (*((f"A vs {case}", each[case], ("single", case), f"{case}/single")
                                               for case in OTHER_HIT_CASES),
                                             ("C", workers, WORKER_CASES, "w2/w1")):
            if summary is None:
                continue
            print(title)
            for c in cases:
                x = summary["cases"][c]
                print(f"  {c:8} req/s {_range(x['rps'], '.0f'):>22}  p50 {_range(x['p50'], '.2f'):>20}  "
                      f"p99 {_range(x['p99'], '.2f'):>20}  µs/req {_range(x['cpu_us'], '.0f')}")
            r = summary["ratio_of_medians"]
            print(f"  ratio {label}: req/s {r['rps']:.2f}  p50 {r['p50']:.2f}  p99 {r['p99']:.2f}  "
                  f"µs/req {r['cpu_us']:.2f}")
        failed = [t for ok_, t in checks if not ok_]
        for text in failed:
            print(f"SANITY CHECK FAILED: {text}")
        for name, lines in log_errors.items():
            if lines:
                print(f"app log {name}:\n  " + "\n  ".join(lines[:10]))
        print(f"results: {args.output} (+ {args.output.with_suffix('.json').name})")
        ok = True
        return 0
    finally:
        common.remove_workdir(workdir, keep=not ok or args.keep_workdir)


def main(argv: list[str] | None = None) -> int:
    return common.exit_status(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
