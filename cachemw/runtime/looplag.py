"""How late this process's event loop runs: measured, so our own lateness is not blamed on the store.

A CPU-saturated server runs its timers late. A store call whose 50 ms deadline
fires after 120 ms timed out because we were busy, not because Redis was slow;
counting it against the circuit breaker would send every request of the process to
the app just when it is overloaded. A timer armed every ``interval`` seconds
measures how late it wakes; the worst lag of the last second or two is what a
failing call is judged by.
"""

from __future__ import annotations

import time

import anyio
from anyio.abc import TaskStatus

from cachemw.core.metrics import Histogram

__all__ = ["LoopLag"]


class LoopLag:
    """The event loop's lateness: a histogram of samples and the worst of the last ``window`` seconds."""

    __slots__ = ("_current_max", "_previous_max", "_window_started", "histogram", "interval", "window")

    def __init__(self, *, interval: float = 0.05, window: float = 1.0) -> None:
        self.interval = interval
        self.window = window
        self.histogram = Histogram()
        self._window_started = time.perf_counter()
        self._current_max = 0.0
        self._previous_max = 0.0

    @property
    def recent(self) -> float:
        """The worst lag seen in the current and the previous window (seconds)."""
        if time.perf_counter() - self._window_started > 2 * self.window:
            return 0.0  # not measured lately (no lifespan, or the loop stopped): no claim
        return max(self._current_max, self._previous_max)

    def record(self, lag: float) -> None:
        now = time.perf_counter()
        if now - self._window_started >= self.window:
            self._previous_max = self._current_max if now - self._window_started < 2 * self.window else 0.0
            self._current_max = 0.0
            self._window_started = now
        if lag > self._current_max:
            self._current_max = lag
        self.histogram.observe(lag)

    async def measure(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """A service: sample the lag until cancelled."""
        task_status.started()
        interval = self.interval
        while True:
            began = time.perf_counter()
            await anyio.sleep(interval)
            self.record(max(0.0, time.perf_counter() - began - interval))
