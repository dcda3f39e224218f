"""The cross-server staleness bound, measured: how long server B answers from a copy server A purged.

    .venv/bin/python bench/staleness.py            # 3 phases x 10,000 purges, ~3-5 min

Two uvicorn processes, A and B (``bench/apps/staleness_app.py``), on one private
redis-server; every entry's body carries its version (kept in a file both map: the
database). B serves ``GET /item/{id}`` for ``--ids`` ids under load (``--connections``
keep-alive asyncio clients, as fast as B answers); meanwhile the harness asks A to
purge ``--purges`` times, one at a time (``POST /purge/{id}``: bump the version, then
``invalidate(tags=["item:{id}"])``). Each answer carries B's CLOCK_MONOTONIC when its
head was sent, each purge A's when ``invalidate()`` returned. For each purge, its
staleness is the time from that return to B's last answer with an older version
(0 if there was none after it). Three phases, each on a fresh pair of servers:

- ``healthy``: nothing goes wrong;
- ``link cut``: every ``--cut-every`` s, ``CLIENT KILL TYPE pubsub`` cuts both servers'
  subscription (and tracking) links; they reconnect by themselves;
- ``redis paused``: every ``--pause-every`` s Redis is frozen (SIGSTOP) for ``--pause-for`` s.

Targets (#17): p99 <= 10 ms healthy; the max never above ``sync`` in any phase; no
answer from a purged copy later than ``sync`` after its purge. With ``--baseline``, a
fourth phase runs the healthy case with tracking off (the pub/sub broadcast alone).
Writes ``bench/results/staleness.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import AppProcess, RedisProcess

HERE = Path(__file__).resolve().parent
PHASES = ("healthy", "link cut", "redis paused")


@dataclass
class Phase:
    name: str
    purges: list[tuple[int, int, int]] = field(default_factory=list)  # (id, new version, t returned ns)
    failed_purges: int = 0
    answers: int = 0
    errors: int = 0
    # Per id: (served at ns, version) of every answer, in the order B sent them.
    served: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    faults: int = 0
    seconds: float = 0.0


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
                   ) -> tuple[int, dict[bytes, bytes], bytes]:
    writer.write(head)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    headers: dict[bytes, bytes] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers, body


async def _load(port: int, ids: int, stop: asyncio.Event, phase: Phase, offset: int) -> None:
    """One keep-alive client asking B for every id in turn until ``stop``."""
    item = offset
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            phase.errors += 1
            await asyncio.sleep(0.01)
            continue
        try:
            while not stop.is_set():
                item_id = item % ids
                item += 1
                head = f"GET /item/{item_id} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
                status, headers, body = await asyncio.wait_for(_request(reader, writer, head), 10)
                if status != 200:
                    phase.errors += 1
                    continue
                phase.answers += 1
                phase.served.setdefault(item_id, []).append((int(headers[b"x-served-at"]), json.loads(body)["v"]))
        except (OSError, ValueError, KeyError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            phase.errors += 1
        finally:
            writer.close()


async def _purger(port: int, ids: int, purges: int, phase: Phase, pace: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for n in range(purges):
            item_id = n % ids
            head = f"POST /purge/{item_id} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n".encode()
            try:
                status, _, body = await asyncio.wait_for(_request(reader, writer, head), 10)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                phase.failed_purges += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            if status != 200:
                phase.failed_purges += 1  # invalidate() raised: Redis did not take the purge
                continue
            done = json.loads(body)
            phase.purges.append((item_id, int(done["v"]), int(done["t"])))
            await asyncio.sleep(pace)
    finally:
        writer.close()


def _faults(name: str, redis: RedisProcess, stop: threading.Event, phase: Phase, args: argparse.Namespace) -> None:
    """The phase's fault, repeated until ``stop``: cut the subscription links, or freeze Redis."""
    while not stop.wait(args.cut_every if name == "link cut" else args.pause_every):
        if name == "link cut":
            redis.command("CLIENT", "KILL", "TYPE", "pubsub")
            phase.faults += 1
        elif name == "redis paused" and redis.pid is not None:
            os.kill(redis.pid, signal.SIGSTOP)
            phase.faults += 1
            time.sleep(args.pause_for)
            os.kill(redis.pid, signal.SIGCONT)


async def _measure(name: str, b_port: int, a_port: int, redis: RedisProcess, args: argparse.Namespace) -> Phase:
    phase = Phase(name)
    stop = asyncio.Event()
    loaders = [asyncio.create_task(_load(b_port, args.ids, stop, phase, i * 7)) for i in range(args.connections)]
    await asyncio.sleep(1.0)  # B's L1 warm
    fault_stop = threading.Event()
    faults = threading.Thread(target=_faults, args=(name, redis, fault_stop, phase, args), daemon=True)
    started = time.monotonic()
    faults.start()
    try:
        await _purger(a_port, args.ids, args.purges, phase, args.pace)
    finally:
        fault_stop.set()
        await asyncio.to_thread(faults.join)
        phase.seconds = time.monotonic() - started
        await asyncio.sleep(args.sync * 1.5)  # what B still serves after the last purge counts too
        stop.set()
        await asyncio.gather(*loaders, return_exceptions=True)
    return phase


def _staleness(phase: Phase, sync: float) -> dict[str, Any]:
    """Per purge: B's last answer older than the purge's version, after invalidate() returned."""
    sync_ns = int(sync * 1e9)
    values: list[float] = []
    late = 0
    for item_id, version, returned in phase.purges:
        last = 0
        for served_at, seen in phase.served.get(item_id, ()):
            if seen < version and served_at > returned:
                last = max(last, served_at - returned)
                if served_at - returned > sync_ns:
                    late += 1
        values.append(last / 1e6)
    values.sort()

    def q(p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")

    return {"purges": len(values), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": values[-1] if values else 0.0,
            "stale_after_purge": sum(1 for v in values if v > 0), "answers_past_sync": late,
            "failed_purges": phase.failed_purges, "answers": phase.answers, "errors": phase.errors,
            "faults": phase.faults, "seconds": round(phase.seconds, 1)}


def _phase(name: str, args: argparse.Namespace, work: Path, round_no: int, tracking: bool) -> dict[str, Any]:
    versions = work / f"versions-{round_no}-{name.replace(' ', '-')}"
    versions.write_bytes(b"\0" * 8 * args.ids)
    with RedisProcess(work / f"redis-{round_no}-{name.replace(' ', '-')}") as redis:
        env = {"CACHEMW_REDIS_URL": redis.url, "STALENESS_VERSIONS": str(versions),
               "STALENESS_SYNC": str(args.sync), "STALENESS_TRACKING": "1" if tracking else "0"}
        with AppProcess("staleness_app:app", workdir=work / f"a-{round_no}-{name}", env=env) as a, \
                AppProcess("staleness_app:app", workdir=work / f"b-{round_no}-{name}", env=env) as b:
            phase = asyncio.run(_measure(name if tracking else "healthy", b.port, a.port, redis, args))
            result = _staleness(phase, args.sync)
            result["tracking"] = tracking
            result["command"] = a.display_command().replace(str(versions), "VERSIONS").replace(redis.url, "REDIS_URL")
            return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--purges", type=int, default=10_000, help="purges per phase and round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ids", type=int, default=64)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--sync", type=float, default=1.0)
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between purges")
    parser.add_argument("--cut-every", type=float, default=0.5)
    parser.add_argument("--pause-every", type=float, default=1.0)
    parser.add_argument("--pause-for", type=float, default=0.4)
    parser.add_argument("--baseline", action="store_true", help="also the healthy phase with tracking off")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--keep-workdir", action="store_true")
    args = parser.parse_args(argv)
    work = common.workdir("cachemw-staleness-")
    phases = [(name, True) for name in PHASES] + ([("no tracking", False)] if args.baseline else [])
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in phases}
    ok = False
    try:
        for round_no in range(args.rounds):
            for name, tracking in phases:
                result = _phase(name, args, work, round_no, tracking)
                results[name].append(result)
                print(f"round {round_no + 1} {name:13s} p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms,"
                      f" max {result['max_ms']:.2f} ms over {result['purges']} purges; {result['answers']} answers, "
                      f"{result['answers_past_sync']} past sync, {result['failed_purges']} purges failed, "
                      f"{result['faults']} faults", flush=True)
        ok = True
    finally:
        common.remove_workdir(work, keep=args.keep_workdir or not ok)
    command = " ".join([".venv/bin/python", "bench/staleness.py", *(argv if argv is not None else sys.argv[1:])])
    lines = _report(args, results, command)
    print("\n".join(lines))
    if not args.no_write:
        (HERE / "results" / "staleness.md").write_text("\n".join(lines) + "\n")
        facts = common.machine_description(redis_binary=common.find_redis_server())
        (HERE / "results" / "staleness.json").write_text(json.dumps(
            {"command": command, "facts": facts, "args": vars(args), "results": results}, indent=2) + "\n")
    return 0


def _span(rounds: list[dict[str, Any]], name: str) -> str:
    values = [r[name] for r in rounds]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], command: str) -> list[str]:
    facts = common.machine_description(redis_binary=common.find_redis_server())
    sync_ms = args.sync * 1000
    lines = common.results_preamble(
        "Cross-server staleness: B's last answer from a copy A purged", facts, command,
        [f"{args.rounds} round(s) x {args.purges} purges per phase, one at a time on A; B under load from "
         f"{args.connections} keep-alive asyncio clients over {args.ids} ids; sync {args.sync:g} s (link bound "
         f"{max(0.05, min(1.0, args.sync / 4)) * 1000:.0f} ms); servers not pinned (a shared 2-core machine)",
         "staleness of a purge: B's CLOCK_MONOTONIC as it sent its last answer with an older version, minus A's as "
         "invalidate() returned (0 when B sent none after it); figures are median (min-max) over rounds",
         f"link cut: CLIENT KILL TYPE pubsub every {args.cut_every:g} s; redis paused: SIGSTOP for "
         f"{args.pause_for:g} s every {args.pause_every:g} s (purges sent meanwhile wait, or fail)"])
    lines += ["| phase | tracking | purges | p50 ms | p99 ms | max ms | purges with a stale answer after | "
              "answers past sync | purges failed | B answers | target |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rounds in results.items():
        if not rounds:
            continue
        worst_max = max(r["max_ms"] for r in rounds)
        past = sum(r["answers_past_sync"] for r in rounds)
        met = worst_max <= sync_ms and past == 0
        if name == "healthy":
            met = met and max(r["p99_ms"] for r in rounds) <= 10
            target = "p99 <= 10 ms, max <= sync, 0 past sync"
        else:
            target = "max <= sync, 0 past sync"
        lines.append(
            f"| {name} | {'on' if rounds[0]['tracking'] else 'off'} | {sum(r['purges'] for r in rounds)} | "
            f"{_span(rounds, 'p50_ms')} | {_span(rounds, 'p99_ms')} | {_span(rounds, 'max_ms')} | "
            f"{sum(r['stale_after_purge'] for r in rounds)} | {past} | {sum(r['failed_purges'] for r in rounds)} | "
            f"{sum(r['answers'] for r in rounds)} | {target}: {'met' if met else 'NOT met'} |")
    lines += ["", "App servers: `" + results[PHASES[0]][0]["command"] + "` (A and B alike)."]
    return lines


if __name__ == "__main__":
    raise SystemExit(common.exit_status(lambda: main()))
