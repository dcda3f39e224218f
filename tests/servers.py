"""Real uvicorn processes on the private Redis, as several servers behind one load balancer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def uvicorns(app: str, redis_url: str, *, count: int = 2, workers: int = 1, ready: str = "/ready",
             start_timeout: float = 30.0, env: dict[str, str] | None = None, loop: str = "auto"
             ) -> Iterator[list[str]]:
    """``count`` uvicorn servers of ``app`` (``module:attribute``), each with ``workers``; yields their base URLs.

    ``loop`` is uvicorn's ``--loop``: "auto" is uvloop when installed (as with uvicorn[standard]).

    Each answers ``ready`` with 200 before this yields; all get SIGTERM (then SIGKILL) after.
    """
    environment = {**os.environ, "CACHEMW_REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), **(env or {})}
    ports = [free_port() for _ in range(count)]
    processes = [
        subprocess.Popen([sys.executable, "-m", "uvicorn", app, "--port", str(port), "--workers", str(workers),
                          "--loop", loop, "--log-level", "warning"], cwd=ROOT, env=environment)
        for port in ports
    ]
    try:
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        deadline = time.monotonic() + start_timeout
        for base, process in zip(bases, processes, strict=True):
            wait_ready(base + ready, process, f"uvicorn {app}", deadline)
        yield bases
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def gunicorn(app: str, redis_url: str, *, worker_class: str = "sync", workers: int = 2, threads: int = 1,
             ready: str = "/ready", start_timeout: float = 30.0, env: dict[str, str] | None = None,
             preload: bool = False) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """One gunicorn master of ``app`` with ``workers`` (``sync`` or ``gthread``); yields its base URL and process.

    Answers ``ready`` with 200 before this yields; gets SIGTERM (a graceful stop: workers finish and exit)
    after, then SIGKILL if it does not stop.
    """
    environment = {**os.environ, "CACHEMW_REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), **(env or {})}
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
               "--worker-class", worker_class, "--threads", str(threads), "--log-level", "warning",
               "--graceful-timeout", "20"]
    if preload:
        command.append("--preload")
    process = subprocess.Popen(command, cwd=ROOT, env=environment)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base + ready, process, f"gunicorn {app}", time.monotonic() + start_timeout)
        yield base, process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_ready(url: str, process: subprocess.Popen[bytes], what: str, deadline: float) -> None:
    """Until ``url`` answers 200; fails if the process exits or the deadline passes first."""
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, f"{what} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.05)


def answers_through_a_kill(base: str, paths: dict[str, dict[str, Any]], kill: Callable[[], None], *,
                           rounds: int = 40, kill_at: int = 15) -> None:
    """Request every path ``rounds`` times, ``kill()`` the store at ``kill_at``: each answer is 200 with the
    JSON fields its path names."""
    for round_ in range(rounds):
        if round_ == kill_at:
            kill()
        for path, right in paths.items():
            answer = httpx.get(base + path, timeout=30)
            assert answer.status_code == 200, (path, answer.status_code, answer.text)
            assert answer.json().items() >= right.items(), (path, answer.text)
