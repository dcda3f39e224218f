"""The suite's time budgets, in one place: how long a test waits for what must happen.

A budget is a deadline, never a sleep: tests poll a condition until it holds or the
budget runs out. On a busy machine (both cores loaded, CI) everything takes longer,
so every budget scales with ``CACHEMW_TEST_TIME_SCALE`` (default 1; ``.ci/run``
and the CPU hog runs may raise it). Tests get them from the ``budgets`` fixture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Budgets", "current_budgets"]


@dataclass(frozen=True, slots=True)
class Budgets:
    scale: float
    condition: float
    """Longest wait for something that must happen soon (a fill stored, a message heard)."""
    store_timeout: float
    """The request-path store budget for tests that need a healthy Redis to answer in time."""
    process_start: float
    """Longest wait for a process (redis-server, uvicorn, gunicorn) to come up or go down."""
    lock_timeout: float
    """A fill lock that must outlive everything a test does while holding it."""


def current_budgets() -> Budgets:
    scale = float(os.environ.get("CACHEMW_TEST_TIME_SCALE", "1") or 1)
    if not scale > 0:
        raise ValueError(f"CACHEMW_TEST_TIME_SCALE must be > 0, got {scale!r}")
    return Budgets(scale=scale, condition=10.0 * scale, store_timeout=2.0 * scale, process_start=30.0 * scale,
                   lock_timeout=60.0 * scale)
