"""Two app servers and one Redis driven past saturation on hot, cold and stale keys (issue 15, item 6).

    python3 bench/overload.py              # ~12 min: setup (first time), calibration, 3 rounds x 3 libraries x 2 phases
    python3 bench/overload.py --help       # rounds, duration, connections, factor, key mix, libraries, phases

Per library (cachemw, fastapi-cache2, cashews; ``bench/apps/overload_app.py``, FastAPI,
20 ms database per origin call) it starts one private redis-server and two uvicorn
servers (``--loop uvloop``, one worker each, CPU 0 and CPU 1) from ``bench/.venv-peers``
(made as ``bench/peers.py`` makes it). It warms the hot and stale keys, measures the
hit rate one server sustains (closed-loop wrk on hot keys of server A), then drives
both servers at once with one wrk process each (same ``Host``), paced by
``bench/wrk/overload.lua`` to offer ``--factor`` (2.5) times that rate in total, on a
mix of hot, stale and cold keys; a new cold key every ``--window-ms`` for all
connections of both processes (a fleet-wide stampede per key). Phases: ``quiet`` and
``hog`` (``bench/hog.py`` spinning one process per CPU during the run). Runs are
interleaved: rounds x libraries x phases, the order rotating per round.

Reported per run and per case (min-max over rounds): origin calls per distinct cold
key (both servers' counts per id, summed), 2xx share (and 503s with Retry-After),
p50/p99 (the two wrk processes' quantiles merged), breaker openings and the other
cachemw counters that say why (store errors, loop-lag timeouts, origin_busy, shed
jobs), hot keys that went to the origin, stale refreshes, offered and achieved
rate, and CPU. Writes ``bench/results/overload.md`` (and ``.json``).

Exit status: 0 when it measured (targets met or not); 1 when it could not.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import peers
from common import AppProcess, CpuMeter, HarnessError, RedisProcess

SCRIPT = common.BENCH_DIR / "wrk" / "overload.lua"
HOG = common.BENCH_DIR / "hog.py"
HOST = "overload.bench"  # every request of both servers carries the same Host, as behind one balancer
LIBRARIES = {"cachemw": "overload_app:cachemw", "fastapi-cache2": "overload_app:fastapi_cache2",
             "cashews": "overload_app:cashews"}
STALE_TTL = 2.0  # bench/apps/overload_app.py's STALE_TTL
COLD_SPAN = 1_000_000  # cold ids of run n: n * COLD_SPAN + 0, 1, ...
MIN_FACTOR = 2.0  # the issue: at least twice the rate one server sustains on hits
QUIET_CORES = 0.3  # other processes' CPU below which the machine counts as quiet


@dataclass
class WrkOut:
    """One wrk process of a run."""

    requests: int
    seconds: float
    errors: int
    statuses: dict[str, int]
    retry_after: int
    x_cache: dict[str, int]
    sent: int
    late: int
    quantiles_us: list[float]
    command: str


@dataclass
class Run:
    round: int
    library: str
    phase: str
    offered_rps: float
    rps: float
    per_server_rps: list[float]
    late_share: float
    requests: int
    errors: int
    statuses: dict[str, int]
    retry_after: int
    x_cache: dict[str, int]
    p50_ms: float
    p99_ms: float
    cold_keys: int
    cold_calls: int
    cold_max: int
    cold_keys_over_one: int
    cold_over_one_same_server: int  # of those, keys one server alone called more than once (in-process coalescing)
    hot_calls: int
    stale_calls: int
    counters: dict[str, int] = field(default_factory=dict)  # cachemw's, both servers, moved during the run
    breaker_end: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_others: float = 0.0
    redis_ok: bool = True
    others_before: float = math.nan  # other processes' CPU (cores) in the 2 s before a quiet run's load

    @property
    def ok_share(self) -> float:
        total = self.requests + self.errors
        ok = sum(n for s, n in self.statuses.items() if s.startswith("2"))
        return ok / total if total else math.nan

    @property
    def cold_ratio(self) -> float:
        return self.cold_calls / self.cold_keys if self.cold_keys else math.nan

    @property
    def non_2xx_other(self) -> int:
        """Non-2xx answers that are not the documented 503 + Retry-After, plus socket errors."""
        bad = sum(n for s, n in self.statuses.items() if not s.startswith("2"))
        return bad - self.retry_after + self.errors

    @property
    def breaker_openings(self) -> int:
        return self.counters.get("breaker_openings", 0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per run, whole (default: %(default)s)")
    parser.add_argument("--calibrate", type=int, default=5,
                        help="seconds of the one-server hit-rate run per library (default: %(default)s)")
    parser.add_argument("--factor", type=float, default=2.5,
                        help=f"offered rate / one-server hit rate, >= {MIN_FACTOR:g} (default: %(default)s)")
    parser.add_argument("--connections", type=int, default=256,
                        help="connections per wrk process, i.e. per server (default: %(default)s)")
    parser.add_argument("--hot", type=int, default=100, help="hot keys, warmed (default: %(default)s)")
    parser.add_argument("--stale", type=int, default=50, help="stale keys, warmed, 2 s ttl (default: %(default)s)")
    parser.add_argument("--mix", default="7,2,1", help="weights hot,stale,cold per request (default: %(default)s)")
    parser.add_argument("--window-ms", type=int, default=100,
                        help="how long each cold key is the cold key, ms (default: %(default)s)")
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help="(default: %(default)s)")
    parser.add_argument("--phases", default="quiet,hog", help="quiet and/or hog (default: %(default)s)")
    parser.add_argument("--hog-procs", type=int, default=common.cpu_count(),
                        help="bench/hog.py processes in the hog phase (default: one per CPU, %(default)s)")
    parser.add_argument("--wait-quiet", type=float, default=30.0, metavar="SECONDS",
                        help="before each quiet-phase run, wait up to this long until other processes use < "
                             f"{QUIET_CORES:g} core (a shared machine); the run's own figure is reported either way "
                             "(default: %(default)s)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the two servers to CPU 0 and CPU 1")
    parser.add_argument("--refresh-venv", action="store_true", help="remake bench/.venv-peers")
    parser.add_argument("--output", type=Path, default=common.RESULTS_DIR / "overload.md",
                        help="Markdown results; the raw runs go to a .json next to it (default: %(default)s)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and redis files after the run")
    args = parser.parse_args(argv)
    args.library_names = [n.strip() for n in args.libraries.split(",") if n.strip()]
    args.phase_names = [n.strip() for n in args.phases.split(",") if n.strip()]
    if unknown := [n for n in args.library_names if n not in LIBRARIES]:
        parser.error(f"unknown libraries {unknown}; known: {', '.join(LIBRARIES)}")
    if unknown := [n for n in args.phase_names if n not in ("quiet", "hog")]:
        parser.error(f"unknown phases {unknown}; known: quiet, hog")
    weights = args.mix.split(",")
    if len(weights) != 3 or not all(w.isdigit() for w in weights) or not int(weights[2]):
        parser.error("--mix is three whole weights hot,stale,cold, cold > 0")
    args.weights = [int(w) for w in weights]
    if args.factor < MIN_FACTOR:
        parser.error(f"--factor must be >= {MIN_FACTOR:g} (past saturation is the point)")
    if min(args.rounds, args.duration, args.calibrate, args.connections, args.hot, args.stale, args.window_ms) < 1:
        parser.error("rounds, duration, calibrate, connections, hot, stale and window-ms must be positive")
    return args


# -- talking to the servers ----------------------------------------------------------------------


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One GET with the benchmark's Host (cache keys may include it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": HOST})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def stats(app: AppProcess) -> dict[str, Any]:
    status, _, body = get(app.port, "/_stats", timeout=30.0)
    if status != 200:
        raise HarnessError(f"/_stats answered {status} on port {app.port}")
    data: dict[str, Any] = json.loads(body)
    return data


def warm(servers: list[AppProcess], args: argparse.Namespace, deadline_s: float = 60.0) -> None:
    """Fill every hot and stale key, then pass over them until no hot key reaches the origin."""
    paths = [f"/hot/{i}" for i in range(args.hot)] + [f"/stale/{i}" for i in range(args.stale)]
    for path in paths:
        get(servers[0].port, path)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        time.sleep(0.5)  # fills are written after the response
        before = sum(stats(s)["calls"]["hot"] for s in servers)
        for server in servers:
            for i in range(args.hot):
                status, _, _ = get(server.port, f"/hot/{i}")
                if status != 200:
                    raise HarnessError(f"warm-up: /hot/{i} answered {status}")
        if sum(stats(s)["calls"]["hot"] for s in servers) == before:
            return
    raise HarnessError(f"hot keys still reach the origin after {deadline_s:g} s of warm-up")


BREAKER_OPENED = "circuit open, requests go to the app"  # cachemw's log line when its breaker opens


def log_count(app: AppProcess, needle: str) -> int:
    """Lines of the server's log holding ``needle`` so far (the breaker's openings are logged, one line each)."""
    try:
        return sum(needle in line for line in app.log_path.read_text(errors="replace").splitlines())
    except OSError:
        return 0


def cachemw_counters(data: dict[str, Any]) -> dict[str, int]:
    lib = data.get("library") or {}
    return {k: int(v) for k, v in lib.items() if isinstance(v, int) and not isinstance(v, bool)}


# -- load ----------------------------------------------------------------------------------------


def wrk_args(base_url: str, *, duration: int, connections: int, rate: float, t0_ms: float, cold_base: int,
             args: argparse.Namespace, weights: list[int] | None = None) -> list[str]:
    path = common.wrk_path()
    if path is None:
        raise HarnessError(f"wrk not found; {common.WRK_INSTALL_HINT}")
    w = weights or args.weights
    return [path, "-c", str(connections), "-t", "1", "-d", f"{duration}s", "--timeout", "10s", "--latency",
            "-H", f"Host: {HOST}", "-s", str(SCRIPT), base_url, "--", f"{rate:.0f}", f"{t0_ms:.0f}", str(cold_base),
            str(args.window_ms), str(args.hot), str(args.stale), *map(str, w)]


def shown(argv: list[str]) -> str:
    return shlex.join([os.path.relpath(a, common.REPO_ROOT) if a.startswith(str(common.REPO_ROOT)) else a
                       for a in argv])


def parse_wrk_out(text: str, command: str) -> WrkOut:
    parsed = common.parse_wrk(text)

    def line(tag: str) -> str:
        for row in text.splitlines():
            if row.startswith(tag + " ") or row == tag:
                return row[len(tag):].strip()
        raise HarnessError(f"wrk output lacks its {tag} line (bench/wrk/overload.lua):\n{text}")

    def pairs(tag: str) -> dict[str, int]:
        return {k: int(v) for k, _, v in (item.partition("=") for item in line(tag).split())}

    pace = pairs("PACE")
    return WrkOut(requests=parsed["requests"], seconds=parsed["seconds"], errors=parsed["errors"],
                  statuses=pairs("STATUS"), retry_after=int(line("RETRYAFTER")), x_cache=parsed["x_cache"],
                  sent=pace["sent"], late=pace["late"], quantiles_us=[float(q) for q in line("QUANTILES").split()],
                  command=command)


def run_wrks(argvs: list[list[str]], timeout: float) -> list[WrkOut]:
    """Start every wrk at once (one per server) and wait for all of them."""
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
    outs: list[WrkOut] = []
    try:
        for argv, proc in zip(argvs, procs, strict=True):
            out, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise HarnessError(f"wrk failed ({proc.returncode}): {shown(argv)}\n{out}\n{err}")
            outs.append(parse_wrk_out(out, shown(argv)))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outs


def merged_quantile(outs: list[WrkOut], q: float) -> float:
    """The q-quantile (ms) of all processes' requests: each process's 1000 quantiles weighted by its requests."""
    points = sorted((value, out.requests / len(out.quantiles_us)) for out in outs for value in out.quantiles_us)
    total = sum(w for _, w in points)
    if total == 0:
        return math.nan
    acc = 0.0
    for value, weight in points:
        acc += weight
        if acc >= q * total - 1e-9:
            return value / 1000
    return points[-1][0] / 1000


@contextlib.contextmanager
def hog(procs: int, seconds: float, workdir: Path, on: bool) -> Any:
    """``bench/hog.py`` for the length of a hog-phase run (its children die with it)."""
    if not on:
        yield None
        return
    proc = subprocess.Popen([sys.executable, str(HOG), "--procs", str(procs), "--seconds", f"{seconds:g}"],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "hog.log", "ab"))  # noqa: SIM115
    time.sleep(1.0)  # let it take the CPUs before the load starts
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def calibrate(servers: list[AppProcess], args: argparse.Namespace) -> tuple[float, str]:
    """Hits one server sustains: closed-loop wrk (64 connections) on the hot keys of server A alone."""
    argv = wrk_args(servers[0].base_url, duration=args.calibrate, connections=64, rate=0, t0_ms=0, cold_base=0,
                    args=args, weights=[1, 0, 0])
    out = run_wrks([argv], timeout=args.calibrate + 40)[0]
    if out.errors or set(out.statuses) != {"200"}:
        raise HarnessError(f"calibration run had errors or non-200s: {out.statuses}, {out.errors} socket errors")
    return out.requests / out.seconds, out.command


def wait_quiet(meter: CpuMeter, limit: float) -> float:
    """Wait (2 s samples, at most ``limit`` s) until everybody else uses < QUIET_CORES; the last sample."""
    deadline = time.monotonic() + limit
    while True:
        with meter.measure() as usage:
            time.sleep(2.0)
        if usage.others < QUIET_CORES or time.monotonic() >= deadline:
            return usage.others


def one_run(index: int, rnd: int, library: str, phase: str, servers: list[AppProcess], redis: RedisProcess,
            rate: float, args: argparse.Namespace, workdir: Path) -> tuple[Run, list[str]]:
    cold_base = (index + 1) * COLD_SPAN
    meter = CpuMeter({"app A": servers[0].proc.pid, "app B": servers[1].proc.pid,  # type: ignore[union-attr]
                      "redis": redis.pid or 0})
    others_before = wait_quiet(meter, args.wait_quiet) if phase == "quiet" and args.wait_quiet > 0 else math.nan
    before = [stats(s) for s in servers]
    opened_before = sum(log_count(s, BREAKER_OPENED) for s in servers)
    with hog(args.hog_procs, args.duration + 30, workdir, phase == "hog"):
        t0 = time.time() * 1000
        argvs = [wrk_args(s.base_url, duration=args.duration, connections=args.connections, rate=rate / 2, t0_ms=t0,
                          cold_base=cold_base, args=args) for s in servers]
        with meter.measure() as usage:
            outs = run_wrks(argvs, timeout=args.duration + 60)
    time.sleep(1.5)  # background fills and refreshes of the last requests
    after = [stats(s) for s in servers]
    opened = sum(log_count(s, BREAKER_OPENED) for s in servers) - opened_before
    cold: dict[int, int] = {}
    same_server: set[int] = set()  # cold ids one server called more than once
    for data in after:
        same_server |= {int(k) for k, n in data["cold"].items()
                        if n > 1 and cold_base - 1 <= int(k) < cold_base + COLD_SPAN - 1}
        for key, n in data["cold"].items():
            if cold_base - 1 <= int(key) < cold_base + COLD_SPAN - 1:
                cold[int(key)] = cold.get(int(key), 0) + n
    counters: dict[str, int] = {}
    for b, a in zip(before, after, strict=True):
        for name, value in cachemw_counters(a).items():
            counters[name] = counters.get(name, 0) + value - cachemw_counters(b).get(name, 0)
    if library == "cachemw":
        counters["breaker_openings"] = opened
    try:
        redis_ok = redis.command("PING", timeout=2.0) == "PONG"
    except (OSError, HarnessError):
        redis_ok = False
    statuses: dict[str, int] = {}
    x_cache: dict[str, int] = {}
    for out in outs:
        for k, v in out.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in out.x_cache.items():
            x_cache[k] = x_cache.get(k, 0) + v
    seconds = max(out.seconds for out in outs)
    sent = sum(out.sent for out in outs)
    run = Run(
        round=rnd, library=library, phase=phase, offered_rps=rate, rps=sum(o.requests for o in outs) / seconds,
        per_server_rps=[o.requests / o.seconds for o in outs],
        late_share=sum(o.late for o in outs) / sent if sent else 0.0,
        requests=sum(o.requests for o in outs), errors=sum(o.errors for o in outs), statuses=statuses,
        retry_after=sum(o.retry_after for o in outs), x_cache=x_cache, p50_ms=merged_quantile(outs, 0.50),
        p99_ms=merged_quantile(outs, 0.99), cold_keys=len(cold), cold_calls=sum(cold.values()),
        cold_max=max(cold.values(), default=0), cold_keys_over_one=sum(1 for n in cold.values() if n > 1),
        cold_over_one_same_server=len(same_server),
        hot_calls=sum(a["calls"]["hot"] - b["calls"]["hot"] for a, b in zip(after, before, strict=True)),
        stale_calls=sum(a["calls"]["stale"] - b["calls"]["stale"] for a, b in zip(after, before, strict=True)),
        counters=counters, breaker_end=[str((a.get("library") or {}).get("breaker", "-")) for a in after],
        cpu={k: round(v, 2) for k, v in usage.processes.items()}, cpu_others=round(usage.others, 2),
        redis_ok=redis_ok, others_before=others_before)  # fmt: skip
    return run, [out.command for out in outs]


# -- report --------------------------------------------------------------------------------------


def _range(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}-{format(hi, fmt)}"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%" if value < 0.99995 else "100%"


def case_rows(runs: list[Run], libraries: list[str], phases: list[str]) -> list[dict[str, Any]]:
    rows = []
    for library in libraries:
        for phase in phases:
            mine = [r for r in runs if r.library == library and r.phase == phase]
            if not mine:
                continue
            rows.append({
                "library": library, "phase": phase, "runs": mine,
                "cold_ratio": [r.cold_ratio for r in mine], "ok": [r.ok_share for r in mine],
                "p50": [r.p50_ms for r in mine], "p99": [r.p99_ms for r in mine],
                "openings": [r.breaker_openings for r in mine], "rps": [r.rps for r in mine],
                "offered": [r.offered_rps for r in mine], "late": [r.late_share for r in mine],
            })  # fmt: skip
    return rows


def verdicts(row: dict[str, Any]) -> dict[str, str]:
    runs: list[Run] = row["runs"]
    cold = "MET" if all(r.cold_calls == r.cold_keys for r in runs) else "MISSED"
    ok = "MET" if all(r.non_2xx_other == 0 for r in runs) else "MISSED"
    if row["library"] != "cachemw":
        breaker = "n/a"
    else:
        breaker = "MET" if all(r.breaker_openings == 0 and r.redis_ok for r in runs) else "MISSED"
    return {"cold": cold, "ok": ok, "breaker": breaker}


def truly_quiet(run: Run) -> bool:
    """A quiet-phase run during which (and just before which) other processes used < QUIET_CORES."""
    return run.phase == "quiet" and run.others_before < QUIET_CORES and run.cpu_others < QUIET_CORES


def quiet_lines(runs: list[Run]) -> list[str]:
    """The quiet phase on a shared machine is quiet only when nobody else runs: those runs apart."""
    lines = ["", f"Quiet-phase runs during which the machine really was quiet (other processes < {QUIET_CORES:g} "
             "core before and during the load; `--wait-quiet` waits for that, then runs anyway):", ""]
    for library in dict.fromkeys(r.library for r in runs):
        mine = [r for r in runs if r.library == library and truly_quiet(r)]
        quiet_all = [r for r in runs if r.library == library and r.phase == "quiet"]
        if not mine:
            lines.append(f"- {library}: none of {len(quiet_all)}")
            continue
        openings = _range([r.breaker_openings for r in mine], "d") if library == "cachemw" else "n/a"
        lines.append(f"- {library}: {len(mine)} of {len(quiet_all)}: origin calls / cold key "
                     f"{_range([r.cold_ratio for r in mine], '.2f')}, 2xx {_pct(min(r.ok_share for r in mine))}, "
                     f"breaker openings {openings}, hot keys to origin {_range([r.hot_calls for r in mine], 'd')}, "
                     f"p50 {_range([r.p50_ms for r in mine], '.1f')} ms, p99 {_range([r.p99_ms for r in mine], '.1f')} "
                     f"ms, {_range([r.rps for r in mine], '.0f')} req/s")
    return lines


def render(facts: dict[str, str], command: str, settings: dict[str, str], calibration: dict[str, dict[str, Any]],
           runs: list[Run], rows: list[dict[str, Any]], commands: dict[str, str], ideal_stale: int) -> str:
    lines = common.results_preamble("Overload: two servers and one Redis past saturation (issue 15, item 6)",
                                    facts, command)
    lines += ["## Setup", "", *(f"- {k}: {v}" for k, v in settings.items()), ""]
    lines += ["Server and load commands (first run of each library):", "", "```", *commands.values(), "```", ""]
    lines += ["## One server's hit rate (calibration) and the offered rate", "",
              "| library | one server, hot keys, 64 conns (req/s) | offered to the fleet (req/s) | x |",
              "|---|---|---|---|"]
    for library, cal in calibration.items():
        lines.append(f"| {library} | {cal['rps']:.0f} | {cal['offered']:.0f} | {cal['offered'] / cal['rps']:.2f} |")
    lines += ["", "## Summary (min-max over rounds)", "",
              "| library | phase | origin calls / cold key | 2xx | 503 (+Retry-After) | other non-2xx + errors "
              "| p50 ms | p99 ms | breaker openings | hot keys to origin | stale origin calls (one per key "
              f"per ttl: ~{ideal_stale} at most) | achieved req/s | offered | sends late "
              "| others' CPU (cores, hog included) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        runs_ = row["runs"]
        lines.append(
            f"| {row['library']} | {row['phase']} | {_range(row['cold_ratio'], '.2f')} | "
            f"{_range(row['ok'], '.4f') if min(row['ok']) < 0.99995 else '100%'} | "
            f"{_range([r.retry_after for r in runs_], 'd')} | {_range([r.non_2xx_other for r in runs_], 'd')} | "
            f"{_range(row['p50'], '.1f')} | {_range(row['p99'], '.1f')} | "
            f"{_range(row['openings'], 'd') if row['library'] == 'cachemw' else 'n/a'} | "
            f"{_range([r.hot_calls for r in runs_], 'd')} | {_range([r.stale_calls for r in runs_], 'd')} | "
            f"{_range(row['rps'], '.0f')} | {row['offered'][0]:.0f} | {_range(row['late'], '.0%')} | "
            f"{_range([r.cpu_others for r in runs_], '.2f')} |")
    lines += ["", "## Against the targets", "",
              "| library | phase | 1.0 origin call per cold key per fleet | 100% 2xx (or 503 + Retry-After) "
              "| zero breaker openings, Redis healthy |", "|---|---|---|---|---|"]
    for row in rows:
        v = verdicts(row)
        worst = max(row["runs"], key=lambda r: r.cold_ratio)
        lines.append(f"| {row['library']} | {row['phase']} | **{v['cold']}** (worst {worst.cold_ratio:.2f}, max "
                     f"{worst.cold_max} calls on one key) | **{v['ok']}** | **{v['breaker']}** |")
    lines += quiet_lines(runs)
    lines += ["", "## Every run, in order", "",
              "| # | round | library | phase | cold keys | origin calls (cold) | max / key | keys > 1 (by one server "
              "alone) | hot origin "
              "calls | stale origin calls | statuses | X-Cache | p50 | p99 | req/s (A, B) | late | counters "
              "(cachemw, moved) | CPU (A, B, redis, wrk, others incl. hog) | others before the load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        counters = ", ".join(f"{k} {v}" for k, v in r.counters.items() if v) or "-"
        if r.library != "cachemw":
            counters = "n/a"
        cpu = ", ".join(f"{r.cpu.get(k, 0):.2f}" for k in ("app A", "app B", "redis", "loadgen"))
        lines.append(
            f"| {i} | {r.round} | {r.library} | {r.phase} | {r.cold_keys} | {r.cold_calls} | {r.cold_max} | "
            f"{r.cold_keys_over_one} ({r.cold_over_one_same_server}) | {r.hot_calls} | {r.stale_calls} | "
            f"{' '.join(f'{k}={v}' for k, v in sorted(r.statuses.items()))} | "
            f"{' '.join(f'{k}={v}' for k, v in sorted(r.x_cache.items()))} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
            f"{r.rps:.0f} ({', '.join(f'{x:.0f}' for x in r.per_server_rps)}) | {r.late_share:.0%} | {counters} | "
            f"{cpu}, {r.cpu_others:.2f} | {'-' if math.isnan(r.others_before) else f'{r.others_before:.2f}'} |")
    lines += ["", "Redis answered PING after every run: " + ("yes" if all(r.redis_ok for r in runs) else "**no**"), ""]
    return "\n".join(lines) + "\n"


# -- the whole run -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    peers.ensure_venv(args.refresh_venv)
    if common.wrk_path() is None:
        raise HarnessError(f"wrk not found; {common.WRK_INSTALL_HINT}")
    command = shlex.join(["python3", "bench/overload.py", *sys.argv[1:]])
    n_runs = args.rounds * len(args.library_names) * len(args.phase_names)
    minutes = (n_runs * (args.duration + 6) + len(args.library_names) * (args.calibrate + 25)) / 60
    print(f"{n_runs} runs x {args.duration} s + calibration: about {minutes:.0f} min", flush=True)
    workdir = common.workdir("cachemw-overload-")
    keep = True  # a failed run keeps its logs
    try:
        measure(args, workdir, command)
        keep = args.keep_workdir
    finally:
        common.remove_workdir(workdir, keep=keep)
    return 0


def measure(args: argparse.Namespace, workdir: Path, command: str) -> None:
    """Start the fleets, calibrate, run every case interleaved, write the report."""
    cpus = [None, None] if args.no_pin or common.cpu_count() < 2 else ["0", "1"]
    redis_binary = common.find_redis_server()
    facts = common.machine_description(redis_binary=redis_binary, packages=peers.PACKAGES,
                                       python=str(peers.VENV_PYTHON))
    commands: dict[str, str] = {}
    calibration: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        fleets: dict[str, tuple[RedisProcess, list[AppProcess]]] = {}
        for library in args.library_names:
            redis = stack.enter_context(RedisProcess(workdir / f"redis-{library}", binary=redis_binary))
            servers = []
            for name, cpu in zip("AB", cpus, strict=True):
                app = AppProcess(LIBRARIES[library], workdir=workdir / f"{library}-{name}", cpu=cpu,
                                 env={"BENCH_REDIS_URL": redis.url}, ready_path="/_stats",
                                 python=str(peers.VENV_PYTHON), unset_env=("CACHEMW_REDIS_URL",))
                servers.append(stack.enter_context(app))
            fleets[library] = (redis, servers)
            commands[library] = "\n".join(s.display_command() for s in servers)
            warm(servers, args)
            if args.wait_quiet > 0:
                wait_quiet(CpuMeter({"app A": servers[0].proc.pid, "app B": servers[1].proc.pid,  # type: ignore[union-attr]
                                     "redis": redis.pid or 0}), args.wait_quiet)
            rps, cal_command = calibrate(servers, args)
            calibration[library] = {"rps": rps, "offered": args.factor * rps, "command": cal_command}
            print(f"{library}: one server sustains {rps:.0f} hits/s; offering {args.factor * rps:.0f} req/s "
                  "to the two", flush=True)
        runs: list[Run] = []
        for rnd in range(1, args.rounds + 1):
            shift = (rnd - 1) % len(args.library_names)
            order = args.library_names[shift:] + args.library_names[:shift]
            phases = args.phase_names if rnd % 2 else list(reversed(args.phase_names))
            for library in order:
                for phase in phases:
                    redis, servers = fleets[library]
                    result, wrk_commands = one_run(len(runs), rnd, library, phase, servers, redis,
                                                   calibration[library]["offered"], args, workdir)
                    runs.append(result)
                    commands.setdefault(f"wrk-{library}", "\n".join(wrk_commands))
                    print(f"round {rnd} {library:14} {phase:5}: cold {result.cold_ratio:.2f} calls/key "
                          f"(max {result.cold_max}), 2xx {_pct(result.ok_share)}, p50 {result.p50_ms:.1f} "
                          f"p99 {result.p99_ms:.1f} ms, {result.rps:.0f} req/s, breaker openings "
                          f"{result.breaker_openings}, hot→origin {result.hot_calls}", flush=True)
        for library, (_, servers) in fleets.items():
            for server in servers:
                if not server.alive():
                    raise HarnessError(f"{library} server died:\n{server.log_tail()}")
    rows = case_rows(runs, args.library_names, args.phase_names)
    settings = {
        "servers": "two uvicorn processes per library (`--loop uvloop --http httptools --workers 1`), "
                   f"pinned to CPU {cpus[0]} and CPU {cpus[1]}; one private redis-server per library (unpinned)",
        "app": "`bench/apps/overload_app.py` (FastAPI), 20 ms database per origin call, ~1 KB JSON",
        "key mix (weights hot,stale,cold)": f"{args.mix}: {args.hot} hot keys (warmed, ttl 1 h), {args.stale} "
                                            f"stale keys (ttl {STALE_TTL:g} s; cachemw stale_while_revalidate "
                                            "1 h, cashews cache.early, fastapi-cache2 plain expiry), one new "
                                            f"cold key every {args.window_ms} ms for every connection",
        "load": f"two wrk processes (one per server, {args.connections} connections each, 1 thread, unpinned, "
                f"`Host: {HOST}` on both), paced by `bench/wrk/overload.lua` to offer {args.factor:g} x the "
                "one-server hit rate in total; a send whose slot has passed goes at once and counts as late "
                "(closed loop over the connections once the fleet is saturated)",
        "runs": f"{args.rounds} rounds x {len(args.library_names)} libraries x {len(args.phase_names)} phases, "
                f"{args.duration} s each, interleaved (library order rotates, phase order alternates per round)",
        "hog phase": f"`python3 bench/hog.py --procs {args.hog_procs} --seconds {args.duration + 30}` during the "
                     "run (started 1 s before the load)",
        "origin calls / cold key": "sum over both servers of the handler's calls per cold id, over the number of "
                                   "distinct cold ids called (each is new, so each needs one call)",
        "breaker openings": "lines 'circuit open, requests go to the app' that cachemw logged on both servers "
                            "during the run (one per opening); the counters column also shows its breaker "
                            "transitions, store errors, loop-lag timeouts, origin_busy and shed jobs; n/a for the "
                            "peers (no breaker)",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    ideal_stale = round(args.stale * args.duration / STALE_TTL)
    args.output.write_text(render(facts, command, settings, calibration, runs, rows, commands, ideal_stale))
    args.output.with_suffix(".json").write_text(json.dumps(
        {"facts": facts, "command": command, "settings": settings, "calibration": calibration,
         "runs": [asdict(r) | {"ok_share": r.ok_share, "cold_ratio": r.cold_ratio} for r in runs],
         "verdicts": [{"library": row["library"], "phase": row["phase"], **verdicts(row)} for row in rows]},
        indent=1) + "\n")
    for row in rows:
        print(f"{row['library']:14} {row['phase']:5} " + "  ".join(f"{k} {v}" for k, v in verdicts(row).items()))
    print(f"results: {args.output} (+ {args.output.with_suffix('.json').name})")


if __name__ == "__main__":
    sys.exit(common.exit_status(lambda: run(parse_args(sys.argv[1:]))))
