"""A circuit breaker for the store: stop calling a dead Redis, probe it, recover by itself.

Pure: the caller passes the monotonic ``now``. Closed, it lets every call
through and counts consecutive failures; at ``threshold`` it opens for a
cool-down (doubling on each failed probe, up to ``max_cooldown``), during which
no call is made; then one probe goes through, and its success closes it.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["CircuitBreaker"]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class CircuitBreaker:
    __slots__ = ("_cooldown", "_failures", "_on_transition", "_open_until", "_probe_started", "_probing",
                 "base_cooldown",
                 "max_cooldown", "state", "threshold", "transitions")

    def __init__(self, *, threshold: int = 5, cooldown: float = 0.5, max_cooldown: float = 5.0,
                 on_transition: Callable[[str, str], None] | None = None) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.state = CLOSED
        self.transitions = 0
        self._cooldown = cooldown
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self._probe_started = 0.0
        self._on_transition = on_transition

    def allow(self, now: float) -> bool:
        """May a call be made now? In half-open state only the one probe may."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if now < self._open_until:
                return False
            self._move(HALF_OPEN)
        if self._probing and now - self._probe_started < self._cooldown:
            return False  # one probe at a time; a probe that never reported (cancelled) is replaced
        self._probing = True
        self._probe_started = now
        return True

    def probe_now(self) -> None:
        """The store showed a sign of life (a subscription came back): let the next call probe it."""
        if self.state == OPEN:
            self._open_until = 0.0
            self._cooldown = self.base_cooldown

    def success(self) -> None:
        self._failures = 0
        if self.state != CLOSED:
            self._probing = False
            self._cooldown = self.base_cooldown
            self._move(CLOSED)

    def failure(self, now: float) -> None:
        if self.state == HALF_OPEN:
            self._probing = False
            self._cooldown = min(self._cooldown * 2, self.max_cooldown)
            self._open(now)
            return
        if self.state == OPEN:
            return
        self._failures += 1
        if self._failures >= self.threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self._open_until = now + self._cooldown
        self._move(OPEN)

    def _move(self, state: str) -> None:
        previous, self.state = self.state, state
        self.transitions += 1
        if self._on_transition is not None:
            self._on_transition(previous, state)
