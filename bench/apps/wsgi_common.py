"""What every WSGI app of ``bench/wsgi.py`` shares: the body, the "database", the view counters.

Every app serves ``GET /item/<id>`` with the ~1 KB JSON document of ``peer_common``
(the same bytes as the ASGI benchmarks'); its view reads the "database" first:
``time.sleep(BENCH_DB_SECONDS)`` (default 2 ms), so a request that reaches the view
pays it. ``/fast/<id>`` is the same view without the sleep and without a cache
(what the framework itself costs per request).

Gunicorn runs each app in two worker processes, so a counter in one process's
memory would see half the views. Each view run appends one byte to
``$BENCH_CALLS_DIR/<name>.calls`` instead (``O_APPEND``: a write is atomic across
processes); the harness reads the file sizes before and after a run. The append
costs the same few microseconds in every app, cached or not.
"""

from __future__ import annotations

import os
import time

import peer_common

DB_SECONDS = float(os.environ.get("BENCH_DB_SECONDS", "0.002"))
CONTENT_TYPE = "application/json"

_fds: dict[tuple[int, str], int] = {}


def redis_url() -> str:
    url = os.environ.get("BENCH_REDIS_URL")
    if not url:
        raise RuntimeError("BENCH_REDIS_URL is not set (bench/wsgi.py sets it to its private redis-server)")
    return url


def count(name: str) -> None:
    """One view run of ``name``, counted across the server's worker processes."""
    key = (os.getpid(), name)  # a descriptor opened before a fork is shared: each process opens its own
    fd = _fds.get(key)
    if fd is None:
        directory = os.environ.get("BENCH_CALLS_DIR")
        if not directory:
            return
        fd = _fds[key] = os.open(os.path.join(directory, f"{name}.calls"), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                 0o644)
    os.write(fd, b"x")


def database(name: str) -> None:
    """The view's read from the database: counted, then ``DB_SECONDS`` of blocking wait."""
    count(name)
    if DB_SECONDS > 0:
        time.sleep(DB_SECONDS)


def body(item_id: int) -> bytes:
    return peer_common.payload_bytes(item_id)
