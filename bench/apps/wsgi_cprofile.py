"""A gunicorn config file (``gunicorn -c bench/apps/wsgi_cprofile.py ...``): cProfile in every thread of a worker.

``bench/wsgi.py --profile`` runs one worker under it. Each thread of the worker
(gunicorn's main thread, its request threads, cachemw's loop thread) gets its own
``cProfile.Profile`` timed by ``time.thread_time`` (CPU time of that thread, not wall
time: a thread waiting for the GIL, a queue or a socket costs nothing); at the
worker's exit the profiles are merged into ``$BENCH_PROFILE_DIR/<pid>.pstats``.
cProfile slows Python code down (several times for call-heavy code), so the
profiled run's req/s is not a figure; the shares of CPU time are what it is for.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import threading
import time
from typing import Any

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _start_here() -> None:
    profile = cProfile.Profile(time.thread_time)
    with _lock:
        _profiles.append(profile)
    profile.enable()


def _on_first_event(frame: Any, event: str, arg: Any) -> None:
    # threading.setprofile's hook runs once in each new thread: hand the thread to its own profiler.
    _start_here()


def post_worker_init(worker: Any) -> None:
    threading.setprofile(_on_first_event)  # threads started from now on
    _start_here()  # the worker's main thread


def worker_exit(server: Any, worker: Any) -> None:
    directory = os.environ.get("BENCH_PROFILE_DIR")
    with _lock:
        profiles = list(_profiles)
    if not directory or not profiles:
        return
    for profile in profiles:
        profile.disable()  # this thread's; the others only stop being read
        profile.create_stats()
    stats = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
        stats.add(profile)
    stats.dump_stats(os.path.join(directory, f"{os.getpid()}.pstats"))
