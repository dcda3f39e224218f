"""A CPU hog: N processes spinning for D seconds, so a benchmark or the test suite sees a busy machine.

    python bench/hog.py --procs 2 --seconds 600      # both cores of a 2-core machine, 10 minutes
    python bench/hog.py                               # one process per CPU, until killed

Standard library only. The children die with the parent however it ends: SIGTERM,
SIGINT (Ctrl-C) and SIGHUP stop them, and each child also watches its parent (on
Linux ``PR_SET_PDEATHSIG``; everywhere a check that the parent is still the one that
started it), so a ``kill -9`` of the hog leaves no spinning orphans behind.
``--nice`` lowers the hog's priority (default 0: it competes as an equal, the point).

Exit status 0 when the time ran out or it was stopped by a signal.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import time
from types import FrameType

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this child when its parent exits, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spin(seconds: float, parent: int) -> None:
    """Busy-loop until ``seconds`` pass or the parent is gone (the portable fallback to PDEATHSIG)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    deadline = time.monotonic() + seconds
    x = 0
    while time.monotonic() < deadline:
        for _ in range(200_000):  # ~10 ms of work between checks
            x = (x * 31 + 7) & 0xFFFFFFFF
        if os.getppid() != parent:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="spin N processes for D seconds (a CPU hog)")
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="processes (default: one per CPU)")
    parser.add_argument("--seconds", type=float, default=86400.0, help="how long (default: a day, i.e. until killed)")
    parser.add_argument("--nice", type=int, default=0, help="niceness increment for the hog (default 0)")
    args = parser.parse_args(argv)
    if args.procs < 1 or args.seconds <= 0:
        parser.error("--procs must be >= 1 and --seconds > 0")
    if args.nice:
        os.nice(args.nice)
    me = os.getpid()
    children = [multiprocessing.Process(target=spin, args=(args.seconds, me), daemon=True) for _ in range(args.procs)]

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        for child in children:
            child.start()
        print(f"hog: {args.procs} process(es) spinning for {args.seconds:g} s (pid {me}; kill it to stop them)",
              flush=True)
        for child in children:
            child.join()
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
        for child in children:
            child.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
