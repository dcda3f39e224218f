"""Does a Redis outage ever reach the user? Load the sample shop while its Redis is killed, restarted, frozen.

Issue 6. Target: 100% 2xx while Redis is down or restarting; p99 during the outage
within the app's own latency plus the Redis budget (``store_timeout``, 50 ms).

    .venv/bin/python bench/faults.py              # ~1.5 min
    .venv/bin/python bench/faults.py --help       # phase lengths, connections, output, ...

Starts a private redis-server (CPU 0) and the sample shop under uvicorn
(``sample_app:app``, CPU 0) with ``CACHEMW_REDIS_URL`` pointing at that Redis and
``SAMPLE_DB_DELAY=0.02`` (a 20 ms "database"), warms ``/products/1..5`` (the shop
has five products; higher ids answer 404) until they answer HIT, then measures:

1. the app's own latency, without any cache: the same route with an
   ``Authorization`` header, which cachemw never answers from nor stores into a
   shared entry (X-Cache: BYPASS, no Redis call), first with one connection
   (unloaded), then with the same 64 connections as the fault run;
2. (calibration) the HIT path with wrk and with this script's load generator,
   so the generator's own overhead on the latencies is known;
3. the fault timeline, one continuous load of 64 keep-alive connections (CPU 1):

   ====  ======================================  =======
   A     healthy                                  10 s
   B     Redis killed (SIGKILL)                   10 s
   C     Redis restarted, empty (same port)       10 s
   D1    Redis frozen (SIGSTOP)                    5 s
   D2    Redis thawed (SIGCONT)                    5 s
   ====  ======================================  =======

The load generator (``python bench/faults.py loadgen``, asyncio + uvloop +
httptools, closed loop like wrk) records every request: start time, latency,
status, X-Cache; connection errors and timeouts with their time. A request belongs
to the phase in which it was sent. Per phase: requests, req/s, 2xx rate, non-2xx,
errors, p50/p99/max, the X-Cache mix, CPU of the app and Redis, the breaker's
transitions as logged by the app; plus a per-second timeline, the slowest requests
and how long the cache took to refill.

Writes ``bench/results/faults.md``. Exit status: 0 when it measured (target met or
not: the verdict is printed and written), 1 when it could not (a process did not
start, the cache never warmed, the load generator failed).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import contextlib
import json
import math
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import AppProcess, HarnessError

SAMPLE_CONFIG = common.REPO_ROOT / "sample_app" / "cachemw.toml"
PATHS_LUA = common.BENCH_DIR / "wrk" / "paths.lua"
BYPASS_HEADER = "Authorization: Bearer faults-bench"  # credentials: cachemw bypasses the cache entirely

XCACHE_CODES = {b"HIT": 1, b"MISS": 2, b"STALE": 3, b"BYPASS": 4}
XCACHE_NAMES = {0: "none", 1: "HIT", 2: "MISS", 3: "STALE", 4: "BYPASS", 5: "other"}


@dataclass(frozen=True)
class Phase:
    name: str
    label: str
    seconds: float


# -- a Redis we can kill, restart on the same port, freeze and thaw -------------------------------


class FaultRedis(common.RedisProcess):
    """``common.RedisProcess`` that can be killed, restarted on the same port (empty), frozen and thawed."""

    def __init__(self, workdir: Path, *, cpu: str | None) -> None:
        super().__init__(workdir, cpu=cpu)
        self.port = common.free_port()  # known before the start: the app keeps this URL across restarts
        self.frozen = False

    def display_command(self) -> str:
        return shlex.join(["R" if a == str(self.port) else ("DIR" if a == str(self.workdir) else a)
                           for a in self.args()])

    def start(self) -> None:
        super().start()
        self.frozen = False

    def kill(self) -> None:
        """SIGKILL, as an OOM killer or a crash would: no goodbye to the clients."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
        self.stop()
        self.frozen = False

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.frozen = False


# -- the load generator: every request recorded ---------------------------------------------------
#
# wrk's Lua cannot tie a response to its request, so it cannot say which phase a
# latency belongs to. This generator is closed loop like wrk (each connection sends
# its next request when the previous response is complete) and keeps, per request,
# start (CLOCK_MONOTONIC, comparable across processes), latency, status and X-Cache.


class _Client(asyncio.Protocol):
    __slots__ = ("load", "n", "parser", "started", "transport", "xc")

    def __init__(self, load: _Load, index: int) -> None:
        self.load = load
        self.n = index * 7
        self.transport: asyncio.Transport | None = None
        self.parser: Any = None
        self.started = 0  # start of the request in flight (ns), 0 when idle
        self.xc = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import httptools

        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        self.parser = httptools.HttpResponseParser(self)
        if self.load.running:
            self.send()

    def send(self) -> None:
        load = self.load
        now = time.monotonic_ns()
        if now >= load.deadline_ns or load.stopping or self.transport is None:
            self.started = 0
            return
        self.n += 1
        self.xc = 0
        self.started = now
        self.transport.write(load.requests[self.n % len(load.requests)])

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.started:
                self.load.errors.append((self.started, "parse"))
                self.started = 0
            if self.transport is not None:
                self.transport.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-cache":
            self.xc = XCACHE_CODES.get(value, 5)

    def on_message_complete(self) -> None:
        started = self.started
        if not started:
            return  # the watchdog gave up on it already
        load = self.load
        load.starts.append(started)
        load.latencies.append(time.monotonic_ns() - started)
        load.statuses.append(self.parser.get_status_code())
        load.xcache.append(self.xc)
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.started:
            self.load.errors.append((self.started, "reset" if exc else "closed"))
            self.started = 0
        if not self.load.stopping:
            self.load.reconnect(self)


class _Load:
    def __init__(self, port: int, requests: list[bytes], connections: int, duration: float, timeout: float) -> None:
        self.port = port
        self.requests = requests
        self.connections = connections
        self.duration = duration
        self.timeout_ns = int(timeout * 1e9)
        self.deadline_ns = 0
        self.running = False
        self.stopping = False
        self.starts = array.array("q")
        self.latencies = array.array("q")
        self.statuses = array.array("H")
        self.xcache = array.array("B")
        self.errors: list[tuple[int, str]] = []
        self.clients: list[_Client] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self, client: _Client, *, deadline: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            try:
                await loop.create_connection(lambda: client, "127.0.0.1", self.port)
                return
            except OSError:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                if self.running:
                    self.errors.append((time.monotonic_ns(), "connect"))
                await asyncio.sleep(0.05)

    def reconnect(self, client: _Client) -> None:
        task = asyncio.get_running_loop().create_task(self.connect(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic_ns()
            for client in self.clients:
                if client.started and now - client.started > self.timeout_ns:
                    self.errors.append((client.started, "timeout"))
                    client.started = 0
                    if client.transport is not None:
                        client.transport.abort()

    async def run(self) -> int:
        self.clients = [_Client(self, i) for i in range(self.connections)]
        until = time.monotonic() + 10.0
        await asyncio.gather(*(self.connect(c, deadline=until) for c in self.clients))
        t0 = time.monotonic_ns()
        self.deadline_ns = t0 + int(self.duration * 1e9)
        self.running = True
        print(f"READY {t0}", flush=True)
        for client in self.clients:
            client.send()
        watchdog = asyncio.get_running_loop().create_task(self.watchdog())
        await asyncio.sleep(max(0.0, (self.deadline_ns - time.monotonic_ns()) / 1e9))
        drain_until = time.monotonic_ns() + self.timeout_ns + 1_000_000_000
        while any(c.started for c in self.clients) and time.monotonic_ns() < drain_until:
            await asyncio.sleep(0.01)
        self.stopping = True
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        for task in list(self._tasks):
            task.cancel()
        for client in self.clients:
            if client.transport is not None:
                client.transport.close()
        await asyncio.sleep(0.05)
        return t0


def _loadgen_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python bench/faults.py loadgen",
                                     description="closed-loop keep-alive HTTP/1.1 load, every request recorded")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--variants", type=lambda v: [int(x) for x in v.split(",")], default=[1, 100],
                        help="scenarios, comma-separated: V spreads the requests over ids x V cache keys with "
                             "?v=0..V-1 (default: 1,100: 5 keys, then 500 keys)")
    parser.add_argument("--timeout", type=float, default=10.0, help="a request slower than this is an error")
    parser.add_argument("--header", action="append", default=[], help="extra request header, 'Name: value'")
    parser.add_argument("--out", type=Path, required=True, help="pickle of the records")
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    if args.port == common.FORBIDDEN_PORT:
        parser.error("not that port")
    extra = "".join(f"{h}\r\n" for h in args.header)
    requests = [f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n{extra}\r\n".encode() for p in args.paths]
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    load = _Load(args.port, requests, args.connections, args.duration, args.timeout)
    cpu0 = os.times()
    t0 = asyncio.run(load.run())
    cpu1 = os.times()
    data = {
        "t0": t0, "duration": args.duration, "connections": args.connections,
        "starts": load.starts, "latencies": load.latencies, "statuses": load.statuses, "xcache": load.xcache,
        "errors": load.errors, "cpu_seconds": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
    }  # fmt: skip
    with open(args.out, "wb") as fh:
        pickle.dump(data, fh)
    print(json.dumps({"requests": len(load.starts), "errors": len(load.errors)}), flush=True)
    return 0


@dataclass
class Records:
    t0: int
    duration: float
    starts: array.array[int]
    latencies: array.array[int]
    statuses: array.array[int]
    xcache: array.array[int]
    errors: list[tuple[int, str]]
    cpu_seconds: float
    command: str = ""
    _order: list[int] | None = None
    _sorted: list[int] | None = None

    def between(self, lo_ns: int, hi_ns: int) -> list[int]:
        """Indices of the requests sent in [lo_ns, hi_ns)."""
        if self._order is None:
            self._order = sorted(range(len(self.starts)), key=self.starts.__getitem__)
            self._sorted = [self.starts[i] for i in self._order]
        assert self._sorted is not None
        return self._order[bisect.bisect_left(self._sorted, lo_ns) : bisect.bisect_left(self._sorted, hi_ns)]


class LoadProcess:
    """``python bench/faults.py loadgen`` in a subprocess on the load generator's CPU."""

    def __init__(self, port: int, paths: Sequence[str], *, out: Path, connections: int, duration: float,
                 timeout: float, cpu: str | None, headers: Sequence[str] = ()) -> None:
        self.args = [
            *common.taskset_prefix(cpu), sys.executable, str(Path(__file__).resolve()), "loadgen",
            "--port", str(port), "--connections", str(connections), "--duration", f"{duration:g}",
            "--timeout", f"{timeout:g}", "--out", str(out), *(a for h in headers for a in ("--header", h)), *paths,
        ]  # fmt: skip
        self.port = port
        self.npaths = len(paths)
        self.out = out
        self.duration = duration
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.t0 = 0

    def display_command(self) -> str:
        shown: list[str] = []
        paths = self.args[len(self.args) - self.npaths :]
        args = self.args if self.npaths <= 10 else [*self.args[: -self.npaths], *paths[:3], "..."]
        for a in args:
            if a == str(self.port):
                a = "P"
            elif a == str(self.out):
                a = "OUT"
            elif a.startswith(str(common.REPO_ROOT)):
                a = os.path.relpath(a, common.REPO_ROOT)
            elif a == sys.executable:
                a = ".venv/bin/python"
            shown.append(a)
        text = shlex.join(shown)
        return text.replace(" ...", f" ... ({self.npaths} paths)") if self.npaths > 10 else text

    def start(self) -> int:
        """Start it; returns t0 (monotonic ns) once every connection is open and the load begins."""
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the generator gives up connecting after 10 s
        if not line.startswith("READY "):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise HarnessError(f"the load generator did not start: {self.display_command()}\n{line}{err}")
        self.t0 = int(line.split()[1])
        return self.t0

    def finish(self) -> Records:
        proc = self.proc
        assert proc is not None
        try:
            _, err = proc.communicate(timeout=self.duration + self.timeout + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
            raise HarnessError(f"the load generator did not finish: {self.display_command()}") from None
        if proc.returncode != 0:
            raise HarnessError(f"the load generator failed ({proc.returncode}): {self.display_command()}\n{err}")
        if err.strip():
            raise HarnessError(f"the load generator complained: {self.display_command()}\n{err[-3000:]}")
        with open(self.out, "rb") as fh:
            data = pickle.load(fh)
        if not data["starts"]:
            raise HarnessError(f"the load generator completed no request: {self.display_command()}")
        return Records(data["t0"], data["duration"], data["starts"], data["latencies"], data["statuses"],
                       data["xcache"], data["errors"], data["cpu_seconds"], self.display_command())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


def run_load(port: int, paths: Sequence[str], *, out: Path, connections: int, duration: float, timeout: float,
             cpu: str | None, headers: Sequence[str] = ()) -> Records:
    load = LoadProcess(port, paths, out=out, connections=connections, duration=duration, timeout=timeout, cpu=cpu,
                       headers=headers)
    try:
        load.start()
        return load.finish()
    finally:
        load.kill()


# -- statistics -----------------------------------------------------------------------------------


def pct(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


@dataclass
class Stats:
    name: str
    label: str
    start_s: float  # from t0
    seconds: float
    requests: int  # complete responses
    rps: float
    ok: int  # 2xx
    non_2xx: int
    statuses: dict[str, int]  # non-2xx by status
    errors: dict[str, int]  # connection errors and timeouts, by kind
    ok_rate: float  # 2xx / (responses + errors)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    x_cache: dict[str, int]
    over_1s: int = 0  # responses that took 1 s or more
    cpu: dict[str, float] = field(default_factory=dict)
    log: dict[str, int] = field(default_factory=dict)
    slowest: list[tuple[float, float, str, int]] = field(default_factory=list)  # (start s, ms, X-Cache, status)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def summarise(rec: Records, name: str, label: str, lo_ns: int, hi_ns: int, *, slowest: int = 0) -> Stats:
    lat: list[float] = []
    xc: dict[str, int] = {}
    statuses: dict[str, int] = {}
    ok = 0
    worst: list[tuple[int, int]] = []
    for i in rec.between(lo_ns, hi_ns):
        lat.append(rec.latencies[i] / 1e6)
        status = rec.statuses[i]
        if 200 <= status < 300:
            ok += 1
        else:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        label_x = XCACHE_NAMES[rec.xcache[i]]
        xc[label_x] = xc.get(label_x, 0) + 1
        if slowest:
            worst.append((rec.latencies[i], i))
    errors: dict[str, int] = {}
    for at, kind in rec.errors:
        if lo_ns <= at < hi_ns:
            errors[kind] = errors.get(kind, 0) + 1
    lat.sort()
    seconds = (hi_ns - lo_ns) / 1e9
    total = len(lat) + sum(errors.values())
    worst.sort(reverse=True)
    return Stats(
        name=name, label=label, start_s=(lo_ns - rec.t0) / 1e9, seconds=seconds, requests=len(lat),
        rps=len(lat) / seconds if seconds > 0 else math.nan, ok=ok, non_2xx=len(lat) - ok, statuses=statuses,
        errors=errors, ok_rate=ok / total if total else math.nan, p50_ms=pct(lat, 50), p90_ms=pct(lat, 90),
        p99_ms=pct(lat, 99), p999_ms=pct(lat, 99.9), max_ms=lat[-1] if lat else math.nan, x_cache=xc,
        over_1s=len(lat) - bisect.bisect_left(lat, 1000.0),
        slowest=[((rec.starts[i] - rec.t0) / 1e9, ns / 1e6, XCACHE_NAMES[rec.xcache[i]], rec.statuses[i])
                 for ns, i in worst[:slowest]],
    )  # fmt: skip


def timeline(rec: Records, step: float, until_s: float) -> list[Stats]:
    rows = []
    n = math.ceil(until_s / step - 1e-9)
    for k in range(n):
        lo = rec.t0 + int(k * step * 1e9)
        hi = rec.t0 + int(min((k + 1) * step, until_s) * 1e9)
        rows.append(summarise(rec, f"{k * step:g}", "", lo, hi))
    return rows


def refilled_after(rec: Records, since_ns: int, until_ns: int, *, window: float = 0.25,
                   share: float = 0.99) -> float | None:
    """Seconds from ``since_ns`` to the start of the first window after which every window has >= ``share`` HIT."""
    step = int(window * 1e9)
    windows: list[tuple[int, float]] = []
    lo = since_ns
    while lo < until_ns:
        hi = min(lo + step, until_ns)
        inside = rec.between(lo, hi)
        n = len(inside)
        hits = sum(rec.xcache[i] == 1 for i in inside)
        windows.append((lo, hits / n if n else 0.0))
        lo = hi
    found: int | None = None
    for lo, ratio in windows:
        if ratio >= share:
            if found is None:
                found = lo
        else:
            found = None
    return None if found is None else (found - since_ns) / 1e9


def first_hit_after(rec: Records, since_ns: int, until_ns: int) -> float | None:
    for i in rec.between(since_ns, until_ns):
        if rec.xcache[i] == 1:
            return (rec.starts[i] - since_ns) / 1e9
    return None


# -- CPU and the app's log per phase ---------------------------------------------------------------


def process_ticks(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])


def busy_ticks() -> int:
    """Busy jiffies of all CPUs (everything but idle and iowait) from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(x) for x in fh.readline().split()[1:]]
    return sum(values[:8]) - values[3] - values[4]


@dataclass
class Mark:
    """What the harness saw at a phase boundary."""

    name: str
    t_ns: int
    ticks: dict[str, tuple[int | None, int | None]]  # name -> (pid, ticks)
    log_offset: int
    busy: int = 0
    own: float = 0.0  # this harness's CPU seconds


def mark(name: str, pids: dict[str, int | None], log: Path) -> Mark:
    t = time.monotonic_ns()
    ticks = {k: (pid, process_ticks(pid)) for k, pid in pids.items()}
    try:
        offset = log.stat().st_size
    except OSError:
        offset = 0
    own = os.times()
    return Mark(name, t, ticks, offset, busy_ticks(), own.user + own.system)


def cpu_between(a: Mark, b: Mark) -> dict[str, float]:
    hz = os.sysconf("SC_CLK_TCK")
    seconds = (b.t_ns - a.t_ns) / 1e9
    shares: dict[str, float] = {}
    for name, (pid_b, ticks_b) in b.ticks.items():
        pid_a, ticks_a = a.ticks.get(name, (None, None))
        if ticks_b is None or pid_b is None:
            continue
        start = ticks_a if pid_a == pid_b and ticks_a is not None else 0  # a new process started at 0
        shares[name] = (ticks_b - start) / hz / seconds
    shares["harness"] = (b.own - a.own) / seconds
    # Everything else on the machine: other people's work is noise worth knowing about.
    shares["others"] = max(0.0, (b.busy - a.busy) / hz / seconds - sum(shares.values()))
    return shares


LOG_PATTERNS = {
    "breaker opened": "circuit open",
    "breaker closed": "circuit closed",
    "tracebacks": "Traceback",
    "ERROR lines": "ERROR",
}


def log_between(log: Path, a: Mark, b: Mark) -> tuple[dict[str, int], list[str]]:
    try:
        with open(log, "rb") as fh:
            fh.seek(a.log_offset)
            text = fh.read(max(0, b.log_offset - a.log_offset)).decode(errors="replace")
    except OSError:
        return {}, []
    counts = {k: sum(pattern in line for line in text.splitlines()) for k, pattern in LOG_PATTERNS.items()}
    return counts, text.splitlines()


# -- --diagnose / --gc-freeze: the sample app wrapped, run by uvicorn as ``faults:diagnosed_app`` -------
#
# Outside the measured code: a gc callback records every collection of the oldest
# generation and every pause of 5 ms or more, and a task records event-loop stalls
# (a 10 ms sleep waking 20 ms or more late), each with its CLOCK_MONOTONIC time, so
# the report can put them in their phase. With FAULTS_GC_FREEZE=1 it also calls
# gc.freeze() once the app's startup is complete (an experiment: it changes the app).

DIAG_GC_MIN_MS = 5.0
DIAG_STALL_MIN_MS = 20.0


def diagnosed_app() -> Any:
    import gc

    from sample_app.app import app as inner

    out = open(os.environ["FAULTS_DIAG_LOG"], "a", buffering=1)  # noqa: SIM115 - lives as long as the app
    freeze = os.environ.get("FAULTS_GC_FREEZE") == "1"
    began = [0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter_ns()
            return
        ms = (time.perf_counter_ns() - began[0]) / 1e6
        if info["generation"] == 2 or ms >= DIAG_GC_MIN_MS:
            out.write(f"{time.monotonic_ns()} gc {info['generation']} {ms:.3f}\n")

    gc.callbacks.append(on_gc)
    _trace_cachemw_waits(out)
    tasks: set[asyncio.Task[None]] = set()

    async def watch_loop() -> None:
        while True:
            t = time.perf_counter_ns()
            await asyncio.sleep(0.01)
            late = (time.perf_counter_ns() - t) / 1e6 - 10.0
            if late >= DIAG_STALL_MIN_MS:
                out.write(f"{time.monotonic_ns()} stall - {late:.3f}\n")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await inner(scope, receive, send)
            return

        async def send_wrapped(message: Any) -> None:
            if message["type"] == "lifespan.startup.complete":
                if freeze:
                    gc.collect()
                    gc.freeze()
                    out.write(f"{time.monotonic_ns()} freeze - {gc.get_freeze_count()}\n")
                task = asyncio.get_running_loop().create_task(watch_loop())
                tasks.add(task)
            await send(message)

        try:
            await inner(scope, receive, send_wrapped)
        finally:
            for task in tasks:
                task.cancel()

    return app


def _trace_cachemw_waits(out: IO[str]) -> None:
    """Wrap a few of cachemw's private miss-path methods to log long waits; skipped if their names changed.

    Lines (a wait with the time it began): ``<ns> lockbusy - 0`` (a miss found the key's fill lock
    taken), ``<ns> fillwait <woken 0|1> <ms>`` (waited 1 s or more for another's fill announcement), ``<ns> flightwait
    <got 0|1> <ms>`` (waited 1 s or more for this process's own fill of the key), ``<ns>
    filldropped - 0`` (a fill given up while the breaker was open, its lock left to expire).
    """
    try:
        from cachemw.runtime import fills, flights, locks
        from cachemw.store import base as store_base

        flight_cls: Any = flights.Flight
        waiter_cls: Any = store_base.FillWaiter
        locks_cls: Any = locks.FillLocks
        fills_cls: Any = fills.Fills
        originals = (flight_cls.wait, waiter_cls.wait, locks_cls.lock, fills_cls.fill)
    except (ImportError, AttributeError) as exc:
        out.write(f"{time.monotonic_ns()} notrace - 0 {exc!r}\n")
        return
    flight_wait, fill_wait, lock, fill = originals

    async def traced_flight_wait(self: Any, timeout: float) -> bool:
        t = time.monotonic_ns()
        got: bool = await flight_wait(self, timeout)
        ms = (time.monotonic_ns() - t) / 1e6
        if ms >= 1000:
            out.write(f"{t} flightwait {int(got and self.entry is not None)} {ms:.3f}\n")
        return got

    async def traced_fill_wait(self: Any, timeout: float) -> bool:
        t = time.monotonic_ns()
        woken: bool = await fill_wait(self, timeout)
        ms = (time.monotonic_ns() - t) / 1e6
        if ms >= 1000:
            out.write(f"{t} fillwait {int(woken)} {ms:.3f}\n")
        return woken

    async def traced_lock(self: Any, plan: Any, **kwargs: Any) -> Any:
        result = await lock(self, plan, **kwargs)
        if result is not None and result[0] is None:
            out.write(f"{time.monotonic_ns()} lockbusy - 0\n")
        return result

    async def traced_fill(self: Any, plan: Any, entry: Any) -> Any:
        dropped = plan.token is not None and self.guarded.is_open(plan.key)
        try:
            return await fill(self, plan, entry)
        finally:
            if dropped:
                out.write(f"{time.monotonic_ns()} filldropped - 0\n")

    flight_cls.wait = traced_flight_wait
    waiter_cls.wait = traced_fill_wait
    locks_cls.lock = traced_lock
    fills_cls.fill = traced_fill


@dataclass
class Diagnosis:
    gen2: int = 0  # collections of the oldest generation
    gen2_ms: float = 0.0
    pauses: int = 0  # collections of any generation taking >= DIAG_GC_MIN_MS
    max_pause_ms: float = 0.0
    stalls: int = 0  # event-loop stalls >= DIAG_STALL_MIN_MS
    max_stall_ms: float = 0.0
    lock_busy: int = 0  # misses that found the key's fill lock taken
    fill_waits: int = 0  # waits of 1 s or more for another's fill announcement
    fill_waits_unwoken: int = 0  # ... that ran out without one
    flight_waits: int = 0  # waits of 1 s or more for this process's own fill of the key
    fills_dropped: int = 0  # fills given up while the breaker was open, holding the key's lock
    traced: bool = True


def diagnose_between(lines: list[tuple[int, str, str, float]], lo_ns: int, hi_ns: int) -> Diagnosis:
    d = Diagnosis()
    for t, kind, gen, ms in lines:
        if not lo_ns <= t < hi_ns:
            continue
        if kind == "gc":
            if gen == "2":
                d.gen2 += 1
                d.gen2_ms += ms
            if ms >= DIAG_GC_MIN_MS:
                d.pauses += 1
                d.max_pause_ms = max(d.max_pause_ms, ms)
        elif kind == "stall":
            d.stalls += 1
            d.max_stall_ms = max(d.max_stall_ms, ms)
        elif kind == "lockbusy":
            d.lock_busy += 1
        elif kind == "fillwait":
            d.fill_waits += 1
            d.fill_waits_unwoken += gen == "0"
        elif kind == "flightwait":
            d.flight_waits += 1
        elif kind == "filldropped":
            d.fills_dropped += 1
    d.traced = not any(kind == "notrace" for _, kind, _, _ in lines)
    return d


def read_diagnosis(path: Path) -> list[tuple[int, str, str, float]]:
    rows = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[1] in ("gc", "stall", "lockbusy", "fillwait", "flightwait", "filldropped",
                                                 "notrace"):
                rows.append((int(parts[0]), parts[1], parts[2], float(parts[3])))
    return rows


def tree_digest(*dirs: str) -> str:
    """sha256 of the Python and TOML files under ``dirs``: the exact code measured, committed or not."""
    import hashlib

    digest = hashlib.sha256()
    for name in dirs:
        for path in sorted((common.REPO_ROOT / name).rglob("*")):
            if path.suffix in (".py", ".toml") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(common.REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# -- the benchmark ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--healthy", type=float, default=10.0, help="phase A, s (default: %(default)s)")
    parser.add_argument("--killed", type=float, default=10.0, help="phase B, s (default: %(default)s)")
    parser.add_argument("--restarted", type=float, default=10.0, help="phase C, s (default: %(default)s)")
    parser.add_argument("--frozen", type=float, default=5.0, help="phase D1, s (default: %(default)s)")
    parser.add_argument("--thawed", type=float, default=5.0, help="phase D2, s (default: %(default)s)")
    parser.add_argument("--baseline", type=float, default=10.0,
                        help="seconds of uncached load at --connections, and half of it with one connection "
                             "(default: %(default)s)")
    parser.add_argument("--db-delay", type=float, default=0.02, help="SAMPLE_DB_DELAY (default: %(default)s)")
    parser.add_argument("--ids", type=int, default=5,
                        help="load /products/1..N (default: %(default)s; the shop has 5 products, more answer 404)")
    parser.add_argument("--variants", type=lambda v: [int(x) for x in v.split(",")], default=[1, 100],
                        help="scenarios, comma-separated: V spreads the requests over ids x V cache keys with "
                             "?v=0..V-1 (default: 1,100: 5 keys, then 500 keys)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="a request slower than this counts as an error (default: %(default)s)")
    parser.add_argument("--no-calibrate", action="store_true", help="skip the wrk vs. generator comparison")
    parser.add_argument("--calibrate-seconds", type=float, default=5.0, help="(default: %(default)s)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs with taskset")
    parser.add_argument("--output", type=Path, default=common.RESULTS_DIR / "faults.md",
                        help="Markdown results file (default: bench/results/faults.md)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and redis files after the run")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before starting, wait up to SECONDS until the machine's other CPU use stays below "
                             "0.25 of a core for 3 s (a shared machine); the report says how it went (default: 0)")
    parser.add_argument("--diagnose", action="store_true",
                        help="run the app wrapped (faults:diagnosed_app) to record GC pauses and event-loop stalls "
                             "per phase; the wrapper costs little but it is not the plain sample app")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="experiment (implies --diagnose): gc.freeze() once the app has started; "
                             "this changes the app, so its figures are not the plain sample app's")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the app with py-spy (--nonblocking) during the fault timeline into this "
                             "collapsed-stack file; the figures of such a run are disturbed")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.ids < 1 or min(args.healthy, args.killed, args.restarted, args.frozen,
                                                   args.thawed, args.baseline) <= 0:
        parser.error("connections, ids and phase lengths must be positive")
    if not args.variants or min(args.variants) < 1:
        parser.error("--variants: positive integers, comma-separated")
    if args.gc_freeze:
        args.diagnose = True
    return args


def wait_quiet(limit: float) -> str:
    """Wait until the machine is nearly idle for 3 s, at most ``limit`` seconds; say what happened."""
    hz = os.sysconf("SC_CLK_TCK")
    began = time.monotonic()
    last = math.nan
    while True:
        b0 = busy_ticks()
        time.sleep(3.0)
        last = (busy_ticks() - b0) / hz / 3.0
        if last < 0.25:
            return f"waited {time.monotonic() - began:.0f} s for a quiet machine (other CPU use {last:.2f} cores)"
        if time.monotonic() - began >= limit:
            return (f"the machine stayed busy: other CPU use {last:.2f} cores after waiting "
                    f"{time.monotonic() - began:.0f} s; started anyway")


def warm(app: AppProcess, paths: Sequence[str], deadline: float = 30.0) -> None:
    """Every path answers 200 and X-Cache: HIT (16 requests at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    until = time.monotonic() + deadline

    def one(path: str) -> None:
        while True:
            reply = common.http_get(app.port, path)
            if reply.status != 200:
                raise HarnessError(f"GET {path} answered {reply.status}: {reply.body[:200]!r}")
            if reply.header("x-cache") == "HIT":
                return
            if time.monotonic() > until:
                raise HarnessError(f"the cache never warmed: {path} does not answer HIT")
            time.sleep(0.02)

    with ThreadPoolExecutor(16) as pool:
        for done in [pool.submit(one, p) for p in paths]:
            done.result()


def run_wrk(port: int, paths: Sequence[str], *, connections: int, seconds: float,
            cpu: str | None) -> dict[str, Any]:
    wrk = common.wrk_path()
    if wrk is None:
        raise HarnessError(f"wrk not found; {common.WRK_INSTALL_HINT}")
    args = [*common.taskset_prefix(cpu), wrk, "-c", str(connections), "-t", "2", "-d", f"{seconds:g}s",
            "--timeout", "5s", "--latency", "-s", str(PATHS_LUA), f"http://127.0.0.1:{port}", "--", *paths]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise HarnessError(f"wrk failed ({done.returncode}): {shlex.join(args)}\n{done.stdout}\n{done.stderr}")
    parsed = common.parse_wrk(done.stdout)
    shown = [a.replace(f":{port}", ":P") for a in args]
    shown = [os.path.relpath(a, common.REPO_ROOT) if a.startswith(str(common.REPO_ROOT)) else a for a in shown]
    parsed["command"] = shlex.join(shown)
    return parsed


def run(args: argparse.Namespace) -> int:
    from cachemw.core.settings import load_settings

    settings = load_settings(SAMPLE_CONFIG)
    budget_ms = settings.store_timeout * 1000
    args.lock_timeout_s = settings.lock_timeout
    server_cpu, client_cpu = (None, None) if args.no_pin else common.default_cpus()
    quiet = ""
    if args.wait_quiet > 0:
        quiet = wait_quiet(args.wait_quiet)
        print(quiet, flush=True)
    facts = common.machine_description(redis_binary=common.find_redis_server())
    facts["measured code (sha256 of cachemw/ and sample_app/ sources)"] = tree_digest("cachemw", "sample_app")
    if quiet:
        facts["quiet machine"] = quiet
    reports: list[Report] = []
    for variants in args.variants:
        try:
            reports.append(run_scenario(args, variants, budget_ms, server_cpu, client_cpu))
        except HarnessError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            return 1
        print(reports[-1].console(), flush=True)
    text = render(reports, facts, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"\nwrote {os.path.relpath(args.output, Path.cwd())}")
    if args.json is not None:
        args.json.write_text(json.dumps({"facts": facts, "scenarios": [r.as_json() for r in reports]}, indent=2,
                                        default=str))
    return 0


def run_scenario(args: argparse.Namespace, variants: int, budget_ms: float, server_cpu: str | None,
                 client_cpu: str | None) -> Report:
    """One fault timeline on a fresh Redis and app, requests spread over ``ids`` x ``variants`` cache keys."""
    phases = [
        Phase("A", "healthy", args.healthy),
        Phase("B", "Redis killed (SIGKILL)", args.killed),
        Phase("C", "Redis restarted, empty", args.restarted),
        Phase("D1", "Redis frozen (SIGSTOP)", args.frozen),
        Phase("D2", "Redis thawed (SIGCONT)", args.thawed),
    ]
    total = sum(p.seconds for p in phases)
    products = [f"/products/{i}" for i in range(1, args.ids + 1)]
    # ?v=N: the same handler and answer, another cache key (the rule keys on every query parameter).
    paths = products if variants == 1 else [f"{p}?v={v}" for v in range(variants) for p in products]
    title = (f"{len(paths)} cache keys (`/products/1..{args.ids}`)" if variants == 1 else
             f"{len(paths)} cache keys (`/products/1..{args.ids}?v=0..{variants - 1}`)")
    print(f"== scenario: {title}", flush=True)
    wd = common.workdir("cachemw-faults-")
    print(f"workdir {wd}", flush=True)
    redis = FaultRedis(wd / "redis", cpu=server_cpu)
    env = {"CACHEMW_REDIS_URL": "redis://127.0.0.1:R/0", "SAMPLE_DB_DELAY": f"{args.db_delay:g}"}
    diag_log = wd / "diagnosis.log"
    if args.diagnose:
        env["FAULTS_DIAG_LOG"] = str(diag_log)
        if args.gc_freeze:
            env["FAULTS_GC_FREEZE"] = "1"
        app = AppProcess("faults:diagnosed_app", workdir=wd / "app", cpu=server_cpu, app_dir=common.BENCH_DIR,
                         ready_path="/", env=env, extra_args=["--factory"])
    else:
        app = AppProcess("sample_app:app", workdir=wd / "app", cpu=server_cpu, app_dir=common.REPO_ROOT,
                         ready_path="/", env=env)
    load: LoadProcess | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        redis.start()
        app.env["CACHEMW_REDIS_URL"] = redis.url
        app.start()
        app_command = app.display_command().replace(redis.url, "redis://127.0.0.1:R/0").replace(
            str(diag_log), "DIAG.log")
        warm(app, paths)
        if redis.dbsize() == 0:
            raise HarnessError("the products answer HIT but Redis holds nothing: is the app using our Redis?")
        print("warm: every product answers HIT", flush=True)

        # 1. the app's own latency, no cache at all (BYPASS: no Redis call)
        print(f"baseline: {args.baseline / 2:g} s with 1 connection, {args.baseline:g} s with "
              f"{args.connections}, uncached (Authorization header -> BYPASS)", flush=True)
        unloaded = run_load(app.port, paths, out=wd / "base1.pickle", connections=1, duration=args.baseline / 2,
                            timeout=args.timeout, cpu=client_cpu, headers=[BYPASS_HEADER])
        loaded = run_load(app.port, paths, out=wd / "base64.pickle", connections=args.connections,
                          duration=args.baseline, timeout=args.timeout, cpu=client_cpu, headers=[BYPASS_HEADER])
        base1 = summarise(unloaded, "base1", "no cache, 1 connection", unloaded.t0,
                          unloaded.t0 + int(unloaded.duration * 1e9) + 1)
        base = summarise(loaded, "base", f"no cache, {args.connections} connections", loaded.t0,
                         loaded.t0 + int(loaded.duration * 1e9) + 1)
        warm(app, paths)

        # 2. how much the generator itself adds, against wrk, on the HIT path
        calibration: dict[str, Any] = {}
        if not args.no_calibrate and common.wrk_path() is not None:
            print(f"calibration: {args.calibrate_seconds:g} s wrk, {args.calibrate_seconds:g} s generator, HIT path",
                  flush=True)
            calibration["wrk"] = run_wrk(app.port, paths, connections=args.connections,
                                         seconds=args.calibrate_seconds, cpu=client_cpu)
            gen = run_load(app.port, paths, out=wd / "calib.pickle", connections=args.connections,
                           duration=args.calibrate_seconds, timeout=args.timeout, cpu=client_cpu)
            calibration["generator"] = summarise(gen, "calib", "generator", gen.t0,
                                                 gen.t0 + int(gen.duration * 1e9) + 1)
            calibration["generator_cpu"] = gen.cpu_seconds / gen.duration
        warm(app, paths)

        # 3. the fault timeline
        print(f"timeline: {' | '.join(f'{p.name} {p.label} {p.seconds:g} s' for p in phases)}", flush=True)
        dbsize_before = redis.dbsize()
        load = LoadProcess(app.port, paths, out=wd / "timeline.pickle", connections=args.connections,
                           duration=total, timeout=args.timeout, cpu=client_cpu)
        t0 = load.start()
        assert load.proc is not None
        pids: dict[str, int | None] = {"app": app.proc.pid if app.proc else None, "redis": redis.pid,
                                       "loadgen": load.proc.pid}
        if args.profile is not None:
            spy = subprocess.Popen([*common.taskset_prefix(client_cpu), str(Path(sys.executable).parent / "py-spy"),
                                    "record", "--pid", str(pids["app"]), "--duration", str(math.ceil(total) + 5),
                                    "--rate", "200", "--format", "raw", "--nonblocking", "--output",
                                    str(args.profile)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log = app.log_path
        marks = [mark("A", pids, log)]
        events: list[tuple[str, float]] = [("load starts (A: healthy)", 0.0)]
        ends = [t0 + int(sum(p.seconds for p in phases[: k + 1]) * 1e9) for k in range(len(phases))]

        def at(deadline_ns: int) -> None:
            time.sleep(max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9))

        def rel(t_ns: int) -> float:
            return (t_ns - t0) / 1e9

        extra: dict[str, Any] = {"dbsize_before": dbsize_before, "t0_monotonic_ns": t0}
        at(ends[0])
        redis.kill()
        pids["redis"] = None
        marks.append(mark("B", pids, log))
        events.append(("SIGKILL redis-server (B)", rel(marks[-1].t_ns)))
        at(ends[1])
        marks.append(mark("C", pids, log))
        begin = marks[-1].t_ns
        redis.start()
        ready = time.monotonic_ns()
        pids["redis"] = redis.pid
        marks[-1].ticks["redis"] = (redis.pid, process_ticks(redis.pid))
        events.append(("redis-server started again, same port, empty (C)", rel(begin)))
        events.append(("... answers PING", rel(ready)))
        extra["restart_ms"] = (ready - begin) / 1e6
        extra["dbsize_after_restart"] = redis.dbsize()
        at(ends[2] - 50_000_000)
        extra["dbsize_end_of_c"] = redis.dbsize()
        at(ends[2])
        redis.freeze()
        marks.append(mark("D1", pids, log))
        events.append(("SIGSTOP redis-server (D1)", rel(marks[-1].t_ns)))
        at(ends[3])
        redis.thaw()
        marks.append(mark("D2", pids, log))
        events.append(("SIGCONT redis-server (D2)", rel(marks[-1].t_ns)))
        at(ends[4])
        marks.append(mark("end", pids, log))
        events.append(("load stops", rel(marks[-1].t_ns)))
        records = load.finish()
        if spy is not None:
            _, err = spy.communicate(timeout=60)
            if spy.returncode != 0:
                print(f"py-spy failed: {err.decode(errors='replace')}", file=sys.stderr)
            spy = None
        time.sleep(0.5)  # let the app log what happened last
        final_log = mark("final", pids, log)
        after = {p: common.http_get(app.port, p).header("x-cache") or "none" for p in paths[:10]}
        extra["x_cache_after"] = after
        extra["dbsize_after"] = redis.dbsize()

        stats: list[Stats] = []
        logs: dict[str, list[str]] = {}
        for k, phase in enumerate(phases):
            a, b = marks[k], marks[k + 1]
            s = summarise(records, phase.name, phase.label, a.t_ns, b.t_ns, slowest=5)
            s.cpu = cpu_between(a, b)
            s.log, logs[phase.name] = log_between(log, a, b if k + 1 < len(phases) else final_log)
            stats.append(s)
        whole = summarise(records, "all", "whole timeline", t0, marks[-1].t_ns + 1)
        extra["refill_c_s"] = refilled_after(records, marks[2].t_ns, marks[3].t_ns)
        extra["first_hit_c_s"] = first_hit_after(records, marks[2].t_ns, marks[3].t_ns)
        extra["refill_d2_s"] = refilled_after(records, marks[4].t_ns, marks[5].t_ns)
        extra["first_hit_d2_s"] = first_hit_after(records, marks[4].t_ns, marks[5].t_ns)
        extra["loadgen_cpu"] = records.cpu_seconds / records.duration
        per_second = timeline(records, 1.0, rel(marks[-1].t_ns))
        app_log_tail = app.log_tail(60)
        diagnosis: dict[str, Diagnosis] = {}
        if args.diagnose:
            rows = read_diagnosis(diag_log)
            diagnosis["0"] = diagnose_between(rows, loaded.t0, loaded.t0 + int(loaded.duration * 1e9))
            for k, phase in enumerate(phases):
                diagnosis[phase.name] = diagnose_between(rows, marks[k].t_ns, marks[k + 1].t_ns)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.communicate(timeout=10)
        if load is not None:
            load.kill()
        app.stop()
        redis.stop()
        if not args.keep_workdir:
            import shutil

            shutil.rmtree(wd, ignore_errors=True)

    return Report(args=args, title=title, budget_ms=budget_ms, phases=phases, stats=stats, whole=whole,
                  base1=base1, base=base, calibration=calibration, events=events, extra=extra,
                  per_second=per_second, logs=logs, app_log_tail=app_log_tail, app_command=app_command,
                  redis_command=redis.display_command(), load_command=records.command, paths=paths,
                  server_cpu=server_cpu, client_cpu=client_cpu, diagnosis=diagnosis,
                  lock_timeout_s=args.lock_timeout_s)


# -- the report ------------------------------------------------------------------------------------


def _ms(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _mix(x_cache: dict[str, int]) -> str:
    total = sum(x_cache.values())
    if not total:
        return "-"
    order = ["HIT", "STALE", "MISS", "BYPASS", "none", "other"]
    return " ".join(f"{k} {100 * x_cache[k] / total:.1f}%" for k in order if x_cache.get(k))


def _errs(s: Stats) -> str:
    if not s.errors:
        return "0"
    return f"{s.error_count} (" + ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) + ")"


def _rate(v: float) -> str:
    if math.isnan(v):
        return "-"
    if v == 1.0:
        return "100%"
    return f"{100 * v:.3f}%"


@dataclass
class Report:
    """One scenario's figures."""

    args: argparse.Namespace
    title: str
    budget_ms: float
    phases: list[Phase]
    stats: list[Stats]
    whole: Stats
    base1: Stats
    base: Stats
    calibration: dict[str, Any]
    events: list[tuple[str, float]]
    extra: dict[str, Any]
    per_second: list[Stats]
    logs: dict[str, list[str]]
    app_log_tail: str
    app_command: str
    redis_command: str
    load_command: str
    paths: list[str]
    server_cpu: str | None
    client_cpu: str | None
    diagnosis: dict[str, Diagnosis] = field(default_factory=dict)
    lock_timeout_s: float = 5.0

    @property
    def bound_ms(self) -> float:
        return self.base.p99_ms + self.budget_ms

    @property
    def strict_bound_ms(self) -> float:
        return self.base1.p99_ms + self.budget_ms

    def verdicts(self) -> tuple[bool, bool, list[str]]:
        ok_all = all(s.ok_rate == 1.0 for s in self.stats)
        p99_all = all(s.p99_ms <= self.bound_ms for s in self.stats[1:])
        lines = []
        for s in self.stats:
            two = "met" if s.ok_rate == 1.0 else "MISSED"
            p99 = "met" if s.p99_ms <= self.bound_ms else "MISSED"
            strict = "within" if s.p99_ms <= self.strict_bound_ms else "above"
            lines.append(f"| {s.name} {s.label} | {_rate(s.ok_rate)} | **{two}** | {_ms(s.p99_ms)} | "
                         f"{'**' + p99 + '**' if s.name != 'A' else '(healthy: ' + p99 + ')'} | {strict} |")
        return ok_all, p99_all, lines

    def table(self) -> list[str]:
        rows = ["| phase | s | requests | req/s | 2xx rate | non-2xx | errors | p50 ms | p99 ms | max ms | ≥ 1 s | "
                "X-Cache |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in [self.base, *self.stats]:
            name = f"0 {s.label}" if s is self.base else f"{s.name} {s.label}"
            rows.append(f"| {name} | {s.seconds:.1f} | {s.requests} | {s.rps:.0f} | {_rate(s.ok_rate)} | "
                        f"{s.non_2xx} | {_errs(s)} | {_ms(s.p50_ms)} | {_ms(s.p99_ms)} | {_ms(s.max_ms)} | "
                        f"{s.over_1s} | {_mix(s.x_cache)} |")
        return rows

    def console(self) -> str:
        ok_all, p99_all, _ = self.verdicts()
        lines = self.table()
        lines.append("")
        lines.append(f"app's own latency (no cache, {self.args.connections} conns): p99 {_ms(self.base.p99_ms)} ms;"
                     f" + budget {self.budget_ms:g} ms = bound {_ms(self.bound_ms)} ms")
        lines.append(f"100% 2xx in every phase: {'MET' if ok_all else 'MISSED'}; "
                     f"p99 of B, C, D1, D2 within the bound: {'MET' if p99_all else 'MISSED'}")
        return "\n".join(lines)

    def body(self) -> str:
        a = self.args
        _, _, verdict_rows = self.verdicts()
        out: list[str] = []
        w = out.append
        w(f"## Scenario: {self.title}")
        w("")
        w(f"Requests round robin over {len(self.paths)} paths: "
          + (", ".join(f"`{p}`" for p in self.paths) if len(self.paths) <= 10 else
             f"`{self.paths[0]}`, `{self.paths[1]}`, ... `{self.paths[-1]}`") + ". "
          + ("Five keys: while Redis is away, in-process single-flight collapses the 64 concurrent requests onto "
             "at most five database queries at a time." if len(self.paths) <= 10 else
             "Every variant is its own cache key (the rule keys on all query parameters), so while Redis is "
             "away nearly every request runs its own database query, as in a shop with many products."))
        w("")
        findings = self.findings()
        if findings:
            w("What the figures say (computed from them):")
            w("")
            for line in findings:
                w(f"- {line}")
            w("")
        w(f"Server: `{self.app_command}`. Load generator: `{self.load_command}`.")
        w("")
        w("### Result")
        w("")
        w("Latencies in ms. *2xx rate*: 2xx responses / (responses + connection errors and timeouts). "
          "Phase 0 is the app's own latency: the same requests with an `Authorization` header, which cachemw "
          "passes to the app without any store call (X-Cache: BYPASS).")
        w("")
        out.extend(self.table())
        w("")
        w(f"App's own latency, no cache: with {a.connections} connections p50 {_ms(self.base.p50_ms)}, p99 "
          f"{_ms(self.base.p99_ms)} ms; with one connection (unloaded) p50 {_ms(self.base1.p50_ms)}, p99 "
          f"{_ms(self.base1.p99_ms)} ms ({self.base1.requests} requests, {_mix(self.base1.x_cache)}).")
        w("")
        w("### Verdicts")
        w("")
        w(f"Bound for p99: the app's own p99 at the same load ({_ms(self.base.p99_ms)} ms) + the Redis budget "
          f"({self.budget_ms:g} ms) = **{_ms(self.bound_ms)} ms**. Stricter reading, for information: the "
          f"unloaded app's p99 ({_ms(self.base1.p99_ms)} ms) + {self.budget_ms:g} ms = {_ms(self.strict_bound_ms)} ms.")
        w("")
        w("| phase | 2xx rate | 100% 2xx | p99 ms | p99 within the bound | within the stricter bound |")
        w("|---|---|---|---|---|---|")
        out.extend(verdict_rows)
        w("")
        w("### Events and recovery")
        w("")
        w(f"t = 0 is CLOCK_MONOTONIC {self.extra['t0_monotonic_ns']} ns.")
        w("")
        w("| t (s) | event |")
        w("|---|---|")
        for what, t in self.events:
            w(f"| {t:.3f} | {what} |")
        w("")
        e = self.extra

        def secs(v: float | None) -> str:
            return "never within the phase" if v is None else f"{v:.2f} s"

        w(f"- Redis keys before the timeline: {e['dbsize_before']}; right after the restart: "
          f"{e['dbsize_after_restart']} (empty); 50 ms before the freeze: {e['dbsize_end_of_c']}; after the run: "
          f"{e['dbsize_after']}. The restart took {e['restart_ms']:.0f} ms until PING answered.")
        w(f"- C (restarted empty): first HIT {secs(e['first_hit_c_s'])} after the restart; every 250 ms window "
          f"≥ 99% HIT from {secs(e['refill_c_s'])} after it to the end of the phase.")
        w(f"- D2 (thawed): first HIT {secs(e['first_hit_d2_s'])} after SIGCONT; every 250 ms window ≥ 99% HIT from "
          f"{secs(e['refill_d2_s'])} after it.")
        w(f"- X-Cache of one request per path after the run (at most 10 paths): "
          f"{', '.join(f'{p} {v}' for p, v in e['x_cache_after'].items())}.")
        w("")
        w("### Per phase: CPU and the app's log")
        w("")
        w("CPU: share of one core (1.00 = one core busy); *others*: everything else on the machine (other "
          "people's work: noise; this machine has " + str(common.cpu_count()) + " CPUs). "
          "Log: lines of the app's log written during the phase "
          "(cachemw logs breaker transitions once each, from a background task).")
        w("")
        w("| phase | app CPU | redis CPU | generator CPU | others CPU | p90 ms | p99.9 ms | breaker opened | "
          "breaker closed | tracebacks | ERROR lines |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for s in self.stats:
            c = s.cpu
            w(f"| {s.name} | {c.get('app', math.nan):.2f} | "
              f"{'-' if 'redis' not in c else format(c['redis'], '.2f')} | {c.get('loadgen', math.nan):.2f} | "
              f"{c.get('others', math.nan):.2f} | {_ms(s.p90_ms)} | {_ms(s.p999_ms)} | "
              f"{s.log.get('breaker opened', 0)} | {s.log.get('breaker closed', 0)} | "
              f"{s.log.get('tracebacks', 0)} | {s.log.get('ERROR lines', 0)} |")
        w("")
        if self.diagnosis:
            w("### GC pauses and event-loop stalls in the app (`--diagnose`)")
            w("")
            w(f"Collections of the oldest generation (gen 2), pauses of any generation of {DIAG_GC_MIN_MS:g} ms or "
              f"more, and event-loop stalls (a 10 ms sleep waking {DIAG_STALL_MIN_MS:g} ms or more late). Phase 0 "
              "is the uncached baseline.")
            w("")
            w("| phase | gen-2 collections | gen-2 ms per s | GC pauses | longest GC pause ms | loop stalls | "
              "longest stall ms |")
            w("|---|---|---|---|---|---|---|")
            for name, d in self.diagnosis.items():
                secs_ = self.base.seconds if name == "0" else next(s.seconds for s in self.stats if s.name == name)
                w(f"| {name} | {d.gen2} | {d.gen2_ms / secs_:.1f} | {d.pauses} | {_ms(d.max_pause_ms)} | "
                  f"{d.stalls} | {_ms(d.max_stall_ms)} |")
            w("")
            if all(d.traced for d in self.diagnosis.values()):
                w("Waits in cachemw's miss path (its private methods wrapped: `_lock`, `_fill`, `FillWaiter.wait`, "
                  "`Flight.wait`): *fills dropped*: a fill given up because the breaker was open, while "
                  "holding the key's fill lock, which is left to expire (`lock_timeout`); *lock busy*: a miss "
                  "found the key's fill lock taken; *fill waits*: waits of 1 s or more for another's fill "
                  "announcement (in parentheses: how many ran out without one); *flight waits*: waits of 1 s "
                  "or more for this process's own fill of the same key.")
                w("")
                w("| phase | fills dropped holding the lock | lock busy | fill waits ≥ 1 s (unwoken) | "
                  "flight waits ≥ 1 s |")
                w("|---|---|---|---|---|")
                for name, d in self.diagnosis.items():
                    w(f"| {name} | {d.fills_dropped} | {d.lock_busy} | {d.fill_waits} ({d.fill_waits_unwoken}) | "
                      f"{d.flight_waits} |")
                w("")
        w("### Slowest requests per phase")
        w("")
        w("| phase | t (s) sent, ms, X-Cache, status (5 slowest) |")
        w("|---|---|")
        for s in self.stats:
            w(f"| {s.name} | " + "; ".join(f"{t:.3f}: {ms:.1f} ms {x} {st}" for t, ms, x, st in s.slowest) + " |")
        w("")
        w("### Per second")
        w("")
        w("By the second in which requests were sent (t from the start of the load).")
        w("")
        w("| t (s) | phase | requests | non-2xx | errors | p50 ms | p99 ms | max ms | X-Cache |")
        w("|---|---|---|---|---|---|---|---|---|")
        bounds = [(s.start_s, s.start_s + s.seconds, s.name) for s in self.stats]
        for row in self.per_second:
            t = float(row.name)
            names = [n for lo, hi, n in bounds if lo < t + 1 and hi > t]
            w(f"| {t:g} | {'/'.join(names)} | {row.requests} | {row.non_2xx} | {_errs(row)} | {_ms(row.p50_ms)} | "
              f"{_ms(row.p99_ms)} | {_ms(row.max_ms)} | {_mix(row.x_cache)} |")
        w("")
        if self.calibration:
            cal = self.calibration
            g: Stats = cal["generator"]
            w("### Calibration: the generator against wrk")
            w("")
            w(f"The HIT path, {a.calibrate_seconds:g} s each, same connections and CPU. The generator's own "
              "cost per request adds to its latencies; read the fault phases' figures against its row, not "
              "against wrk's.")
            w("")
            w("| load generator | requests | req/s | p50 ms | p99 ms | errors | non-2xx | X-Cache | generator CPU |")
            w("|---|---|---|---|---|---|---|---|---|")
            wr = cal["wrk"]
            w(f"| wrk (`{wr['command']}`) | {wr['requests']} | {wr['rps']:.0f} | {_ms(wr['p50_ms'])} | "
              f"{_ms(wr['p99_ms'])} | {wr['errors']} | {wr['non_2xx']} | {_mix(wr['x_cache'])} | - |")
            w(f"| this generator | {g.requests} | {g.rps:.0f} | {_ms(g.p50_ms)} | {_ms(g.p99_ms)} | {_errs(g)} | "
              f"{g.non_2xx} | {_mix(g.x_cache)} | {cal['generator_cpu']:.2f} |")
            w("")
        w("### The app's log during the timeline")
        w("")
        w("```")
        shown = 0
        for s in self.stats:
            for line in self.logs.get(s.name, []):
                if shown < 40:
                    w(f"[{s.name}] {line}")
                shown += 1
        if shown == 0:
            w("(nothing)")
        elif shown > 40:
            w(f"... {shown - 40} more lines")
        w("```")
        w("")
        return "\n".join(out)

    def summary_row(self) -> str:
        ok_all, p99_all, _ = self.verdicts()
        worst = max(self.stats[1:], key=lambda s: s.p99_ms)
        slowest = max(self.stats[1:], key=lambda s: s.max_ms)
        return (f"| {self.title} | {sum(s.requests for s in self.stats)} | "
                f"{'**met**' if ok_all else '**MISSED**'} | {_ms(self.base.p99_ms)} + {self.budget_ms:g} = "
                f"{_ms(self.bound_ms)} | {worst.name} {_ms(worst.p99_ms)} | {'**met**' if p99_all else '**MISSED**'} | "
                f"{slowest.name} {_ms(slowest.max_ms)} | {sum(s.over_1s for s in self.stats)} |")

    def findings(self) -> list[str]:
        out = []
        by = {s.name: s for s in self.stats}
        bad = [s for s in self.stats if s.ok_rate != 1.0]
        if bad:
            out.append("Not every answer was a 2xx: " + "; ".join(
                f"{s.name}: {s.non_2xx} non-2xx {s.statuses}, errors {_errs(s)}" for s in bad) + ".")
        else:
            out.append(f"Every one of the {sum(s.requests for s in self.stats)} requests of the timeline got a 2xx; "
                       "no connection error, no timeout.")
        worst = max(self.stats[1:], key=lambda s: s.p99_ms)
        out.append(f"Highest p99 of a fault phase: {worst.name} ({worst.label}) {_ms(worst.p99_ms)} ms, against the "
                   f"bound {_ms(self.bound_ms)} ms (the app's own p99 at this load {_ms(self.base.p99_ms)} + "
                   f"{self.budget_ms:g}); stricter bound (unloaded app {_ms(self.base1.p99_ms)} + {self.budget_ms:g}) "
                   f"{_ms(self.strict_bound_ms)} ms.")
        slow = [s for s in self.stats if s.over_1s]
        if slow:
            out.append("Requests that took 1 s or more: " + "; ".join(
                f"{s.name}: {s.over_1s} (max {s.max_ms / 1000:.2f} s)" for s in slow)
                + f". cachemw's `lock_timeout` is {self.lock_timeout_s:g} s: see the README for the mechanism.")
        a = by.get("A")
        if a is not None and a.log.get("breaker opened", 0):
            miss = a.x_cache.get("MISS", 0)
            out.append(f"While Redis was healthy (A) the circuit breaker opened {a.log['breaker opened']} time(s): "
                       f"{miss} requests ({100 * miss / max(1, a.requests):.2f}%) went to the database as MISS. "
                       "Store calls timed out on a Redis that was answering: see the README for why.")
        c = by.get("C")
        if c is not None:
            first = self.extra.get("first_hit_c_s")
            out.append("After the restart (C) the first HIT came "
                       + ("never" if first is None else f"{first:.2f} s") + " after Redis was back; "
                       f"C served {_mix(c.x_cache)}. Until the breaker lets a probe through (its cool-down doubles "
                       "on every failed probe while Redis is down), nothing is read from or stored into the "
                       "restarted Redis.")
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title, "paths": self.paths, "budget_ms": self.budget_ms, "bound_ms": self.bound_ms,
            "baseline": asdict(self.base), "baseline_unloaded": asdict(self.base1),
            "phases": [asdict(s) for s in self.stats], "events": self.events, "extra": self.extra,
            "per_second": [asdict(s) for s in self.per_second],
            "calibration": {k: (asdict(v) if isinstance(v, Stats) else v) for k, v in self.calibration.items()},
        }  # fmt: skip


def render(reports: list[Report], facts: dict[str, str], args: argparse.Namespace) -> str:
    first = reports[0]
    met = all(all(r.verdicts()[:2]) for r in reports)
    out: list[str] = []
    w = out.append
    w("# Redis faults under load: killed, restarted empty, frozen")
    w("")
    w("Does a Redis outage ever reach the user? The sample shop under load while its Redis is killed "
      "(SIGKILL), restarted empty, frozen (SIGSTOP) and thawed (SIGCONT). Target (issue 6): **100% 2xx "
      "while Redis is down or restarting; p99 during the outage within the app's own latency plus the "
      f"Redis budget** (`store_timeout`, {first.budget_ms:g} ms).")
    w("")
    slow = sum(s.over_1s for r in reports for s in r.stats)
    w(f"**Target {'MET' if met else 'MISSED'}**" + (
        f", by the letter (p99) only: {slow} requests of the timelines took 1 s or more (see the scenarios)."
        if slow else "."))
    w("")
    w("| scenario | requests in the timeline | 100% 2xx in every phase | p99 bound ms: app's own p99 + budget | "
      "highest p99 of a fault phase (ms) | p99 within the bound | slowest request of a fault phase (ms) | "
      "requests ≥ 1 s |")
    w("|---|---|---|---|---|---|---|---|")
    for r in reports:
        w(r.summary_row())
    w("")
    w("The app's own p99 is measured in the same run, on the same requests, with cachemw bypassed (no store "
      "call), at the same 64 connections. Generated by `bench/faults.py`; see `bench/README.md`.")
    w("")
    if args.gc_freeze:
        w("**Experiment, not the plain sample app**: `--gc-freeze` ran the app wrapped "
          "(`faults:diagnosed_app`), with `gc.freeze()` once its startup was complete.")
        w("")
    elif args.diagnose:
        w("Run with `--diagnose`: the app ran wrapped (`faults:diagnosed_app`) to record GC pauses and "
          "event-loop stalls; otherwise the plain sample app.")
        w("")
    w("## Setup")
    w("")
    for k, v in facts.items():
        w(f"- {k}: {v}")
    w("")
    a = args
    w(f"- server: `{first.app_command}` (CPU {first.server_cpu or 'any'})")
    w(f"- redis-server: `{first.redis_command}` (private port R, no persistence, CPU {first.server_cpu or 'any'});"
      " restarted on the same port, so it comes back empty")
    w(f"- load generator: `python bench/faults.py loadgen` (CPU {first.client_cpu or 'any'}): {a.connections} "
      "keep-alive HTTP/1.1 connections, closed loop (each sends its next request when the previous response is "
      "complete), asyncio + uvloop + httptools; every request recorded (start, latency, status, X-Cache); "
      f"a request slower than {a.timeout:g} s would be an error (timeout); a request belongs to the phase "
      "in which it was sent")
    w("- route: `/products/{id}`, `@cache(\"minutes\")` (ttl 2m, swr 10m, stale-if-error 1h, no L1); the sample "
      "shop has 5 products (higher ids answer 404); each scenario warms all its keys to HIT first")
    w(f"- database: `SAMPLE_DB_DELAY={a.db_delay:g}` (each query sleeps {a.db_delay * 1000:g} ms in a worker "
      "thread; anyio's default limit is 40 threads)")
    w(f"- cachemw settings: `store_timeout` {first.budget_ms:g} ms (the budget of every request-path store "
      "call), circuit breaker defaults (opens after 5 consecutive failures, cool-down 0.5 s doubling per "
      "failed probe up to 15 s)")
    w("- each scenario: a fresh Redis and app; the app's own latency (phase 0: the same requests with an "
      "`Authorization` header, which cachemw passes to the app without any store call, X-Cache: BYPASS), "
      "with one connection then with 64; a wrk vs. generator calibration on the HIT path; then the timeline")
    w("")
    w("Command:")
    w("")
    w("```")
    w(".venv/bin/python bench/faults.py" + _argv_suffix(args))
    w("```")
    w("")
    for r in reports:
        out.append(r.body())
    return "\n".join(out)


def _argv_suffix(args: argparse.Namespace) -> str:
    argv = sys.argv[1:]
    return (" " + shlex.join(argv)) if argv else ""


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "loadgen":
        return _loadgen_main(argv[1:])
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
