"""A private PostgreSQL server for tests: its own loopback port, its own directory, never the machine's.

The binaries come from, in this order: ``$CACHEMW_TEST_POSTGRES_BIN`` (a directory
holding ``initdb`` and ``postgres``), the ``pgserver`` wheel the test extra installs
(it ships them), the machine's ``/usr/lib/postgresql/N/bin``, or ``initdb`` on
``PATH``. PostgreSQL refuses to run as root: under root (CI, these machines) the
server runs as ``nobody`` in a directory handed to it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import psycopg

try:  # tests/ is a package
    from tests.redis_server import free_port
except ImportError:  # tests/ as a plain directory (see conftest.py)
    from redis_server import free_port  # type: ignore[no-redef,import-not-found]

__all__ = ["PostgresServer", "PostgresServerNotFound", "find_postgres_bin"]

ENV_VAR = "CACHEMW_TEST_POSTGRES_BIN"
INSTALL_HINT = ("install the test extra (pip install -e '.[test]', which brings the pgserver wheel and its "
                "PostgreSQL binaries) or apt-get install postgresql")
_FORBIDDEN_PORT = 5432  # the machine's own PostgreSQL, if any: never touch it


class PostgresServerNotFound(RuntimeError):
    """No PostgreSQL binaries could be found."""


def _usable(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in ("initdb", "postgres"))


def find_postgres_bin() -> Path:
    """The directory of ``initdb`` and ``postgres`` to test with (see the module's docstring)."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        if not _usable(Path(configured)):
            raise PostgresServerNotFound(f"{ENV_VAR}={configured!r} holds no executable initdb and postgres")
        return Path(configured)
    candidates: list[Path] = []
    # Found, not imported: importing pgserver reads platformdirs, which warns without XDG_RUNTIME_DIR.
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(where) / "pginstall" / "bin" for where in spec.submodule_search_locations)
    machine = Path("/usr/lib/postgresql")
    if machine.is_dir():
        versions = sorted((p for p in machine.iterdir() if p.name.isdigit()), key=lambda p: int(p.name),
                          reverse=True)
        candidates.extend(p / "bin" for p in versions)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    for candidate in candidates:
        if _usable(candidate):
            return candidate
    raise PostgresServerNotFound(f"no PostgreSQL binaries found (looked at ${ENV_VAR}, the pgserver package, "
                                 f"/usr/lib/postgresql/*/bin, PATH); {INSTALL_HINT}")


class PostgresServer:
    """One ``postgres`` child process on 127.0.0.1, its data in a fresh temporary directory."""

    def __init__(self, binaries: Path | None = None) -> None:
        self.binaries = binaries if binaries is not None else find_postgres_bin()
        self.port = 0
        self.workdir = Path(tempfile.mkdtemp(prefix="cachemw-postgres-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._databases = 0
        # PostgreSQL will not run as root: hand the directory to an unprivileged user.
        self._user = "nobody" if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)

    @property
    def log_path(self) -> Path:
        return self.workdir / "postgres.log"

    def _run(self, *args: str) -> None:
        done = subprocess.run([str(self.binaries / args[0]), *args[1:]], capture_output=True, user=self._user,
                              timeout=120, check=False, cwd=self.workdir)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")

    def start(self, deadline: float) -> None:
        data = self.workdir / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        while self.port in (0, _FORBIDDEN_PORT):
            self.port = free_port()
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [str(self.binaries / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.workdir),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=self._log, stderr=subprocess.STDOUT, user=self._user, cwd=self.workdir)
        give_up = time.monotonic() + deadline
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self._proc.returncode}); log:\n{self._tail()}")
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=1):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > give_up:
                    raise RuntimeError(f"postgres did not answer within {deadline}s; log:\n{self._tail()}") from None
                time.sleep(0.05)

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh empty database; returns its name."""
        self._databases += 1
        name = f"test_{os.getpid()}_{self._databases}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return name

    def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(deadline: float) -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start(deadline)
        yield server
    finally:
        server.stop()
