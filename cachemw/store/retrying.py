"""Store calls after the response: their own deadline, and brief retries within it.

A fill, a lock release, a refresh's lock or a purge has nobody waiting on the
request path's 50 ms budget, but a lot waiting on its outcome: a lost fill leaves
its key cold, a lost release leaves other servers waiting out the lock. A restart
that flushed the scripts, a failover, a dropped connection or a second of paused
writes is over long before such a deadline, so the call is tried again until the
deadline rather than given up at the first error.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from cachemw.store.base import StoreError

__all__ = ["FIRST_PAUSE", "MAX_PAUSE", "within_deadline"]

T = TypeVar("T")

FIRST_PAUSE = 0.01
"""Seconds before the first retry; each later pause is four times longer, up to ``MAX_PAUSE``."""
MAX_PAUSE = 0.25


async def within_deadline(call: Callable[[float], Awaitable[T]], budget: float, *, scoped: bool = True,
                          given_up: Callable[[], bool] | None = None) -> T:
    """``call(seconds_left)`` until it answers or ``budget`` seconds have passed; then its last error.

    Retries on ``StoreError`` and ``TimeoutError``. ``scoped=False`` for a store that
    keeps the deadline it is given itself (no cancel scope per attempt); otherwise each
    attempt is cancelled when the deadline passes. ``given_up()`` true after a failure
    ends the retries early: a store that is down (its breaker open) is not hammered
    for the rest of the deadline, and work run at the end of a request does not hold it.
    """
    deadline = time.monotonic() + budget
    pause = FIRST_PAUSE
    while True:
        left = deadline - time.monotonic()
        try:
            if not scoped:
                return await call(left)
            with anyio.fail_after(left):
                return await call(left)
        except (StoreError, TimeoutError):
            if deadline - time.monotonic() <= pause or (given_up is not None and given_up()):
                raise
        await anyio.sleep(pause)
        pause = min(pause * 4, MAX_PAUSE)
