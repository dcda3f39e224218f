"""``python -m sample_app [ARGS]`` in a subprocess on a free port, for the sample shops' end-to-end tests.

What a user does after reading the README: the real server (uvicorn, or gunicorn and
Werkzeug for ``--flask``), the real middleware and store, spoken to over real HTTP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import eventually_sync
from tests.redis_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
START_DEADLINE = 30.0  # seconds for the server to answer after spawning
STOP_DEADLINE = 10.0  # seconds for a graceful shutdown before SIGKILL
DB_DELAY = "0.05"
KEY_PREFIX = "cachemw-sample"  # sample_app/cachemw.toml


@dataclass(frozen=True)
class Server:
    url: str
    log_path: Path
    redis_url: str | None  # None: the in-process memory store

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10.0)

    def queries(self) -> dict[str, int]:
        with self.client() as client:
            response = client.get("/debug/queries")
        assert response.status_code == 200, response.text
        assert "x-cache" not in response.headers, "/debug/queries must never be cached"
        counts: dict[str, int] = response.json()
        return counts


def wait_until_ready(proc: subprocess.Popen[bytes], server: Server) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sample app exited with {proc.returncode} before answering:\n{server.log()}")
        try:
            if httpx.get(server.url + "/debug/queries", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # a poll interval, not a wait for readiness
    pytest.fail(f"sample app did not answer within {START_DEADLINE}s:\n{server.log()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sample_env(workdir: Path, redis_url: str | None) -> dict[str, str]:
    """The sample's environment: a quick database in ``workdir``; Redis only if asked, never the caller's."""
    env = dict(os.environ, SAMPLE_DB_DELAY=DB_DELAY, SAMPLE_DB_PATH=str(workdir / "sample.sqlite3"))
    env.pop("CACHEMW_REDIS_URL", None)
    if redis_url is not None:
        env["CACHEMW_REDIS_URL"] = redis_url
    return env


@contextmanager
def run_sample_app(workdir: Path, redis_url: str | None = None, args: Sequence[str] = (),
                   stopped: str | None = "Application shutdown complete") -> Iterator[Server]:
    """Serve the sample app on a free port; always stopped (and killed if it hangs) on exit.

    ``stopped``: the line the server logs once its graceful shutdown is done (None: it logs none).
    """
    port = free_port()
    server = Server(url=f"http://127.0.0.1:{port}", log_path=workdir / "server.log", redis_url=redis_url)
    with server.log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sample_app", *args, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=sample_env(workdir, redis_url),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_ready(proc, server)
            yield server
        finally:
            _stop(proc)
    # Reached only when the test passed: a clean shutdown is part of the contract.
    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully.
    clean = (0, -signal.SIGTERM)
    assert proc.returncode in clean, f"sample app exited with {proc.returncode}:\n{server.log()}"
    assert stopped is None or stopped in server.log(), server.log()
    assert "Traceback" not in server.log(), server.log()


def answers_until_hit(client: httpx.Client, path: str, within: float) -> list[httpx.Response]:
    """GET ``path`` until the answer is a HIT (the copy is stored after the response, in the background)."""
    answers: list[httpx.Response] = []

    def answered_from_the_cache() -> bool:
        answers.append(client.get(path))
        state: str | None = answers[-1].headers.get("x-cache")
        return state == "HIT"

    eventually_sync(answered_from_the_cache, within=within, what=f"a HIT for {path}")
    return answers
