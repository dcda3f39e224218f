"""Is a STALE answer (stale-while-revalidate, 500 ms refresh in the background) as fast as a fresh HIT?

Target: p50 and p99 of STALE within 20% of those of HIT, at 64 connections.

    .venv/bin/python bench/stale_vs_hit.py            # 3 rounds x 10 s per case, ~1.5 min

Starts a private redis-server and ``bench/apps/stale_app.py`` under uvicorn (CPU 0),
warms both routes for every id and waits until ``/fresh/{id}`` answers HIT and
``/stale/{id}`` STALE, then runs wrk (CPU 1) interleaved: fresh, stale, fresh,
stale, ... Writes ``bench/results/stale_vs_hit.md`` (and ``.json``).

Exit status: 0 when the benchmark ran (whether or not the target was met, and
whether or not a sanity check failed: both are printed and written); 1 when it
could not measure (a process did not start, wrk failed, the cache never warmed).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import AppProcess, CpuMeter, HarnessError, LoadResult, RedisProcess, median

CASES = ("fresh", "stale")
EXPECTED = {"fresh": "HIT", "stale": "STALE"}
LABEL = {"fresh": "fresh HIT (`/fresh/{id}`, ttl 1h)",
         "stale": "STALE (`/stale/{id}`, ttl 1ms + swr 1h, 500 ms refresh)"}
TARGET = 0.20  # p50 and p99 of STALE within 20% of HIT's


@dataclass
class Run:
    round: int
    case: str
    load: LoadResult
    handler_calls: dict[str, int]  # how often each handler ran during the load
    sample: dict[str, int]  # X-Cache of a few requests right after the load
    cpu: dict[str, float] = field(default_factory=dict)  # shares of one core
    cpu_others: float = 0.0
    gc: dict[str, list[float]] = field(default_factory=dict)  # collections and seconds per generation


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (fresh, stale) (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of unrecorded load per case before round 1 (default: %(default)s)")
    parser.add_argument("--connections", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default: %(default)s)")
    parser.add_argument("--ids", type=int, default=100, help="distinct ids per route (default: %(default)s)")
    parser.add_argument("--sample", type=int, default=20,
                        help="requests sampled for X-Cache after each run (default: %(default)s)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="auto: wrk if installed, else the Python generator (default: %(default)s)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs with taskset")
    parser.add_argument("--output", type=Path, default=common.RESULTS_DIR / "stale_vs_hit.md",
                        help="Markdown results file; a .json with the raw runs goes next to it "
                             "(default: bench/results/stale_vs_hit.md)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and redis files after the run")
    parser.add_argument("--profile", action="store_true",
                        help="after the measured rounds, one more run per case under py-spy (pip install py-spy); "
                             "collapsed stacks go next to the output as <name>.profile-<case>.txt")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1 or args.threads < 1 or args.ids < 1:
        parser.error("rounds, duration, connections, threads and ids must be positive")
    if args.connections < args.threads:
        parser.error("wrk needs at least one connection per thread")
    return args


# -- steps ---------------------------------------------------------------------------------------


def calls(app: AppProcess) -> dict[str, Any]:
    """Handler counters and GC totals of the app (``/_calls``)."""
    data: dict[str, Any] = common.http_get_json(app.port, "/_calls")
    return data


def gc_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[float]]:
    return {k: [b - a for a, b in zip(before["gc"][k], after["gc"][k], strict=True)]
            for k in ("collections", "seconds")}


def warm(app: AppProcess, ids: int) -> None:
    """One request per id and route (the stale ones run the 500 ms handler: in parallel)."""
    paths = [f"/{case}/{i}" for case in CASES for i in range(ids)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        replies = list(pool.map(lambda p: (p, common.http_get(app.port, p, timeout=30.0)), paths))
    bad = [(p, r.status) for p, r in replies if r.status != 200]
    if bad:
        raise HarnessError(f"warm-up requests failed: {bad[:5]} (of {len(bad)}); app log:\n{app.log_tail()}")


def wait_for_states(app: AppProcess, ids: int, deadline_s: float = 30.0) -> None:
    """Until every /fresh/{id} answers HIT and every /stale/{id} STALE (all ids checked)."""
    deadline = time.monotonic() + deadline_s
    seen: dict[str, dict[str, int]] = {}
    while time.monotonic() < deadline:
        seen = {case: {} for case in CASES}
        for case in CASES:
            for i in range(ids):
                reply = common.http_get(app.port, f"/{case}/{i}")
                state = reply.header("x-cache") or f"status {reply.status}, no X-Cache"
                seen[case][state] = seen[case].get(state, 0) + 1
        if all(seen[case].get(EXPECTED[case], 0) == ids for case in CASES):
            return
        time.sleep(0.2)
    raise HarnessError(f"the cache did not reach HIT/STALE on all ids within {deadline_s} s; last seen {seen}; "
                       f"app log:\n{app.log_tail()}")


def settle(app: AppProcess, deadline_s: float = 30.0, quiet_s: float = 0.3) -> None:
    """Until no background refresh is running or queued, so one run's refreshes do not spill into the next.

    Queued refreshes are invisible to the app until their handler starts (a lock
    round trip after a worker picks them up), so "quiet" means: no stale handler
    running and none started, for ``quiet_s``.
    """
    deadline = time.monotonic() + deadline_s
    quiet_since: float | None = None
    last = -1
    while time.monotonic() < deadline:
        now = calls(app)
        if now["stale_in_flight"] == 0 and now["stale"] == last:
            if quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return
        else:
            quiet_since = None
        last = now["stale"]
        time.sleep(0.05)
    raise HarnessError(f"background refreshes still running after {deadline_s} s: {calls(app)}")


def sample(app: AppProcess, case: str, ids: int, n: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in random.Random(n).sample(range(ids), min(n, ids)):
        reply = common.http_get(app.port, f"/{case}/{i}")
        state = reply.header("x-cache") or f"status {reply.status}"
        counts[state] = counts.get(state, 0) + 1
    return counts


def load(app: AppProcess, case: str, args: argparse.Namespace, tool: str, client_cpu: str | None,
         duration: float) -> LoadResult:
    return common.run_load(app.base_url, f"/{case}/", args.ids, duration=duration, connections=args.connections,
                           threads=args.threads, cpu=client_cpu, tool=tool, count_header="x-cache")


# -- report --------------------------------------------------------------------------------------


def _range(values: list[float], fmt: str) -> str:
    return f"{format(median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def summarize(runs: list[Run]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case in CASES:
        mine = [r for r in runs if r.case == case]
        out[case] = {
            "rps": [r.load.rps for r in mine],
            "p50": [r.load.p50_ms for r in mine],
            "p99": [r.load.p99_ms for r in mine],
        }
    ratios = {m: median(out["stale"][m]) / median(out["fresh"][m]) for m in ("rps", "p50", "p99")}
    rounds = sorted({r.round for r in runs})
    per_round = []
    for n in rounds:
        f = next(r for r in runs if r.round == n and r.case == "fresh")
        s = next(r for r in runs if r.round == n and r.case == "stale")
        per_round.append({m: getattr(s.load, a) / getattr(f.load, a)
                          for m, a in (("rps", "rps"), ("p50", "p50_ms"), ("p99", "p99_ms"))})
    met = all(1 - TARGET <= ratios[m] <= 1 + TARGET for m in ("p50", "p99"))
    return {"cases": out, "ratios": ratios, "per_round_ratios": per_round, "target_met": met}


def sanity_checks(runs: list[Run], app_log_errors: int) -> list[tuple[bool, str]]:
    checks: list[tuple[bool, str]] = []
    for r in runs:
        where = f"round {r.round} {r.case}"
        total = sum(r.load.x_cache.values())
        if r.case == "fresh":
            moved = r.handler_calls["fresh"]
            checks.append((moved == 0, f"{where}: fresh handler ran {moved} times during the run (expected 0)"))
            hits = r.load.x_cache.get("HIT", 0)
            checks.append((hits == total and total > 0,
                           f"{where}: {hits}/{total} responses HIT ({_pct(hits, total)})"))
        else:
            stale = r.load.x_cache.get("STALE", 0)
            checks.append((total > 0 and stale / total >= 0.99,
                           f"{where}: {stale}/{total} responses STALE ({_pct(stale, total)})"
                           f"{_others(r.load.x_cache, 'STALE')}"))
            refreshes = r.handler_calls["stale"]
            checks.append((refreshes > 0, f"{where}: {refreshes} background refreshes ran "
                                          f"({refreshes / r.load.seconds:.1f}/s; at most one per key at a time)"))
        s_total = sum(r.sample.values())
        s_ok = r.sample.get(EXPECTED[r.case], 0)
        checks.append((s_ok == s_total, f"{where}: sample after the run: {s_ok}/{s_total} {EXPECTED[r.case]}"
                                        f"{_others(r.sample, EXPECTED[r.case])}"))
        checks.append((r.load.errors == 0 and r.load.non_2xx == 0,
                       f"{where}: {r.load.errors} socket errors, {r.load.non_2xx} non-2xx responses"))
    checks.append((app_log_errors == 0, f"app log: {app_log_errors} error/warning lines"))
    return checks


def _gc_text(run: Run) -> str:
    if not run.gc:
        return "-"
    per_second = 1000 * sum(run.gc["seconds"]) / run.load.seconds
    return f"{per_second:.1f} ms/s ({'/'.join(str(int(c)) for c in run.gc['collections'])})"


def _pct(part: int, total: int) -> str:
    return f"{100 * part / total:.2f}%" if total else "n/a"


def _others(counts: dict[str, int], expected: str) -> str:
    rest = {k: v for k, v in counts.items() if k != expected}
    return "" if not rest else " (others: " + ", ".join(f"{k}: {v}" for k, v in sorted(rest.items())) + ")"


def render(facts: dict[str, str], settings: dict[str, str], runs: list[Run], summary: dict[str, Any],
           checks: list[tuple[bool, str]], command: str) -> str:
    c = summary["cases"]
    r = summary["ratios"]
    verdict = "MET" if summary["target_met"] else "MISSED"
    lines = [
        "# STALE vs fresh HIT",
        "",
        "Is answering a stale entry (stale-while-revalidate, while a 500 ms handler refreshes it in the",
        f"background) as fast as answering a fresh one? Target: STALE p50 and p99 within {TARGET:.0%} of HIT's,",
        f"at {settings['connections']} connections. **Target {verdict}**: p50 ratio {r['p50']:.2f}, "
        f"p99 ratio {r['p99']:.2f}.",
        "",
        "Generated by `bench/stale_vs_hit.py`; see `bench/README.md`.",
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
        "## Result",
        "",
        f"Median over {len(runs) // 2} interleaved rounds (min-max); latencies in ms.",
        "",
        "| case | req/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
        f"| {LABEL['fresh']} | {_range(c['fresh']['rps'], '.0f')} | {_range(c['fresh']['p50'], '.2f')} "
        f"| {_range(c['fresh']['p99'], '.2f')} |",
        f"| {LABEL['stale']} | {_range(c['stale']['rps'], '.0f')} | {_range(c['stale']['p50'], '.2f')} "
        f"| {_range(c['stale']['p99'], '.2f')} |",
        f"| **ratio stale / fresh** (of medians) | {r['rps']:.2f} | **{r['p50']:.2f}** | **{r['p99']:.2f}** |",
        "",
        "Per-round ratios stale / fresh: "
        + "; ".join(f"round {i + 1}: req/s {x['rps']:.2f}, p50 {x['p50']:.2f}, p99 {x['p99']:.2f}"
                    for i, x in enumerate(summary["per_round_ratios"])),
        "",
        "## Runs (in the order they ran)",
        "",
        "CPU columns: share of one core during the run (1.00 = one core busy); *others* is everything",
        "else on the machine (noise). GC: milliseconds per second of run the app spent in the cyclic",
        "garbage collector, and collections of generations 0/1/2.",
        "",
        "| round | case | req/s | p50 ms | p99 ms | requests | X-Cache (wrk count) | handler calls | app CPU "
        "| redis CPU | wrk CPU | others CPU | GC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        xc = ", ".join(f"{k} {v}" for k, v in sorted(run.load.x_cache.items()))
        calls_ = run.handler_calls[run.case]
        lines.append(
            f"| {run.round} | {run.case} | {run.load.rps:.0f} | {run.load.p50_ms:.2f} | {run.load.p99_ms:.2f} "
            f"| {run.load.requests} | {xc} | {calls_} | {run.cpu.get('app', 0):.2f} | {run.cpu.get('redis', 0):.2f} "
            f"| {run.cpu.get('loadgen', 0):.2f} | {run.cpu_others:.2f} | {_gc_text(run)} |")
    lines += ["", "## Sanity checks", ""]
    lines += [f"- {'ok' if ok else '**FAILED**'}: {text}" for ok, text in checks]
    lines += ["", "Load generator command of the last run:", "", "```", runs[-1].load.command, "```", ""]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    tool = common.choose_load_tool(args.loadgen)
    server_cpu, client_cpu = (None, None) if args.no_pin else common.default_cpus()
    command = shlex.join([".venv/bin/python", "bench/stale_vs_hit.py", *sys.argv[1:]])
    workdir = common.workdir("cachemw-bench-")
    ok = False
    try:
        redis = RedisProcess(workdir / "redis", cpu=server_cpu)
        facts = common.machine_description(redis_binary=redis.binary)
        with redis:
            app = AppProcess("stale_app:app", workdir=workdir, env={"CACHEMW_REDIS_URL": redis.url}, cpu=server_cpu,
                             ready_path="/_calls")
            with app:
                assert app.proc is not None and redis.proc is not None
                settings = {
                    "server": f"`{app.display_command()}`",
                    "redis-server": f"private, port R, no persistence, "
                                    f"{'pinned to CPU ' + server_cpu if server_cpu else 'not pinned'}",
                    "load generator": f"{tool}, {args.connections} keep-alive connections, {args.threads} threads, "
                                      f"{args.duration:g} s per run, "
                                      f"{'pinned to CPU ' + client_cpu if client_cpu else 'not pinned'}; "
                                      f"requests spread round-robin over {args.ids} ids per route; "
                                      "X-Cache of every response counted",
                    "connections": str(args.connections),
                    "warm-up": f"one request per id and route, then until all ids answer HIT / STALE, "
                               f"then {args.warmup:g} s of unrecorded load per case",
                    "rounds": f"{args.rounds}, each fresh then stale; before each run, wait until no background "
                              "refresh is running",
                }
                print(f"app: {app.display_command()}\nredis: {redis.url} (v{redis.version}); load generator: {tool}",
                      flush=True)
                warm(app, args.ids)
                wait_for_states(app, args.ids)
                keys = redis.dbsize()
                if keys < 2 * args.ids:
                    raise HarnessError(f"expected at least {2 * args.ids} keys in Redis after warm-up, found {keys}")
                print(f"warm: all {args.ids} ids HIT on /fresh and STALE on /stale; {keys} keys in Redis", flush=True)
                if args.warmup > 0:
                    for case in CASES:
                        settle(app)
                        load(app, case, args, tool, client_cpu, args.warmup)
                meter = CpuMeter({"app": app.proc.pid, "redis": redis.proc.pid})
                runs: list[Run] = []
                for n in range(1, args.rounds + 1):
                    for case in CASES:
                        settle(app)
                        before = calls(app)
                        with meter.measure() as usage:
                            result = load(app, case, args, tool, client_cpu, args.duration)
                        after = calls(app)
                        if not app.alive():
                            raise HarnessError(f"the app died during a run; log:\n{app.log_tail()}")
                        picked = sample(app, case, args.ids, args.sample)
                        moved = {k: after[k] - before[k] for k in ("fresh", "stale")}
                        run_ = Run(n, case, result, moved, picked, dict(usage.processes), usage.others,
                                   gc_delta(before, after))
                        runs.append(run_)
                        print(f"round {n} {case:5}: {result.rps:8.0f} req/s  p50 {result.p50_ms:7.2f} ms  "
                              f"p99 {result.p99_ms:7.2f} ms  X-Cache {result.x_cache}  handler calls {moved}  "
                              f"CPU app {usage.processes.get('app', 0):.2f} redis {usage.processes.get('redis', 0):.2f}"
                              f" others {usage.others:.2f}  GC {_gc_text(run_)}", flush=True)
                settle(app)
                measured_log = app.log_path.read_text(errors="replace")  # what the measured runs logged
                profiles: dict[str, Path] = {}
                if args.profile:
                    for case in CASES:
                        settle(app)
                        out = args.output.with_name(f"{args.output.stem}.profile-{case}.txt")
                        out.parent.mkdir(parents=True, exist_ok=True)
                        spy = common.PySpy(app.proc.pid, out, seconds=args.duration, cpu=client_cpu)
                        spy.start()
                        try:
                            result = load(app, case, args, tool, client_cpu, args.duration)
                        finally:
                            spy.stop()
                        profiles[case] = out
                        print(f"profiled {case}: {result.rps:.0f} req/s under py-spy; {out}", flush=True)
                settle(app)
                log_text = app.log_path.read_text(errors="replace")

        def errors_in(text: str) -> list[str]:
            marks = ("ERROR", "WARNING", "Traceback", "cachemw:")
            return [ln for ln in text.splitlines() if any(w in ln for w in marks)]

        error_lines = errors_in(measured_log)
        profile_lines = errors_in(log_text[len(measured_log):])
        summary = summarize(runs)
        checks = sanity_checks(runs, len(error_lines))
        report = render(facts, settings, runs, summary, checks, command)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        raw = {"facts": facts, "settings": settings, "command": command, "summary": summary,
               "runs": [dict(asdict(r), load={k: v for k, v in asdict(r.load).items() if k != "raw"}) for r in runs],
               "checks": [{"ok": ok_, "text": t} for ok_, t in checks], "app_log_errors": error_lines[:50]}
        args.output.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
        c, r = summary["cases"], summary["ratios"]
        print()
        print(f"{'case':6} {'req/s':>24} {'p50 ms':>24} {'p99 ms':>24}")
        for case in CASES:
            print(f"{case:6} {_range(c[case]['rps'], '.0f'):>24} {_range(c[case]['p50'], '.2f'):>24} "
                  f"{_range(c[case]['p99'], '.2f'):>24}")
        print(f"{'ratio':6} {r['rps']:>24.2f} {r['p50']:>24.2f} {r['p99']:>24.2f}   (stale / fresh, of medians)")
        failed = [t for ok_, t in checks if not ok_]
        for text in failed:
            print(f"SANITY CHECK FAILED: {text}")
        if error_lines:
            print("app log excerpts:\n  " + "\n  ".join(error_lines[:10]))
        if profile_lines:
            print("app log during the profiled runs (py-spy pauses the process, so store timeouts are expected):\n  "
                  + "\n  ".join(profile_lines[:10]))
        print(f"target (p50 and p99 within {TARGET:.0%}): {'MET' if summary['target_met'] else 'MISSED'}"
              f"{'' if not failed else ' (but see the failed sanity checks: the numbers may not mean what they say)'}")
        for case, path in profiles.items():
            print(f"\nprofile {case} ({path}), share of samples with the frame on the stack:")
            for share, frame in common.top_frames(path, limit=30):
                print(f"  {share:6.1%}  {frame}")
        print(f"results: {args.output} (+ {args.output.with_suffix('.json').name})")
        ok = True
        return 0
    finally:
        common.remove_workdir(workdir, keep=not ok or args.keep_workdir)


def main(argv: list[str] | None = None) -> int:
    return common.exit_status(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
