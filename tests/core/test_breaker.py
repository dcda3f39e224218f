"""The circuit breaker, with the clock passed in."""

from __future__ import annotations

from cachemw.core.breaker import CircuitBreaker


def test_it_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=1.0)
    for _ in range(2):
        breaker.failure(0.0)
    breaker.success()  # a success resets the count
    breaker.failure(0.0)
    breaker.failure(0.0)
    assert breaker.state == "closed" and breaker.allow(0.0)
    breaker.failure(0.0)
    assert breaker.state == "open" and not breaker.allow(0.5)


def test_after_the_cooldown_one_probe_decides() -> None:
    moves: list[tuple[str, str]] = []
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, on_transition=lambda a, b: moves.append((a, b)))
    breaker.failure(10.0)
    assert not breaker.allow(10.9)
    assert breaker.allow(11.0) and breaker.state == "half-open"
    assert not breaker.allow(11.0)  # one probe at a time
    breaker.success()
    assert breaker.state == "closed" and breaker.allow(11.1)
    assert moves == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_failed_probes_double_the_cooldown_up_to_a_cap() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, max_cooldown=3.0)
    now = 0.0
    breaker.failure(now)
    waits = []
    for _ in range(4):
        opened = now
        while not breaker.allow(now):
            now += 0.25
        waits.append(now - opened)
        breaker.failure(now)
    assert waits == [1.0, 2.0, 3.0, 3.0]


def test_a_probe_that_never_reports_is_replaced() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=1.0)
    breaker.failure(0.0)
    assert breaker.allow(1.0)  # the probe is cancelled and never reports
    assert not breaker.allow(1.5)
    assert breaker.allow(2.0)


def test_a_sign_of_life_lets_the_next_call_probe_at_once() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=4.0)
    breaker.failure(0.0)
    assert not breaker.allow(0.1)
    breaker.probe_now()
    assert breaker.allow(0.2) and breaker.state == "half-open"
