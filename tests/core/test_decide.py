"""The decisions both shells dispatch on, checked as plain values: no event loop, no store."""

from __future__ import annotations

import pytest

from cachemw.core import decide, http
from cachemw.core.decide import Step
from cachemw.core.policy import Policy

POLICY = Policy(ttl=60, stale_while_revalidate=30, stale_if_error=600)
NOW = 1_000_000.0


@pytest.mark.parametrize(("method", "policy", "expected"), [
    ("GET", POLICY, (Step.LOOK_UP, b"")),
    ("HEAD", POLICY, (Step.LOOK_UP, b"")),
    ("GET", Policy(ttl=0), (Step.BYPASS, http.STATUS_BYPASS)),  # the realtime preset: never answered from a cache
    ("POST", POLICY, (Step.BYPASS, http.STATUS_BYPASS_METHOD)),  # nothing declared to invalidate
    ("POST", Policy(ttl=60, invalidates=("cart",)), (Step.INVALIDATE, b"")),
    ("delete", Policy(invalidates=("cart",)), (Step.INVALIDATE, b"")),  # h11 passes the method as sent
    ("OPTIONS", Policy(invalidates=("cart",)), (Step.BYPASS, http.STATUS_BYPASS_METHOD)),  # a CORS preflight
    ("TRACE", POLICY, (Step.BYPASS, http.STATUS_BYPASS_METHOD)),
])
def test_the_method_decides_between_lookup_invalidation_and_bypass(method: str, policy: Policy,
                                                                    expected: tuple[Step, bytes]) -> None:
    assert decide.for_method(method, policy) == expected


def test_a_shared_route_never_answers_a_request_that_carries_credentials() -> None:
    assert decide.for_request(POLICY, None, None, has_body=False) is None
    assert decide.for_request(POLICY, "alice", None, has_body=False) == http.STATUS_BYPASS_REQUEST
    assert decide.for_request(POLICY, None, "session=1", has_body=False) == http.STATUS_BYPASS_REQUEST


def test_a_private_route_needs_someone_to_key_on() -> None:
    private = Policy(ttl=60, private=True)
    assert decide.for_request(private, None, None, has_body=False) == http.STATUS_BYPASS_REQUEST
    assert decide.for_request(private, "alice", "session=1", has_body=False) is None


def test_a_request_body_is_never_answered_from_the_cache() -> None:
    assert decide.for_request(POLICY, None, None, has_body=True) == http.STATUS_BYPASS_REQUEST


@pytest.mark.parametrize(("age", "expected"), [
    (0, Step.SERVE), (59.9, Step.SERVE),
    (60, Step.SERVE_STALE), (89.9, Step.SERVE_STALE),  # within stale_while_revalidate
    (90, Step.FILL_WITH_FALLBACK), (659.9, Step.FILL_WITH_FALLBACK),  # only within stale_if_error
    (660, Step.FILL),
])
def test_an_entry_found_is_served_fresh_stale_or_kept_as_fallback_by_its_age(age: float, expected: Step) -> None:
    assert decide.for_stored(NOW - age, POLICY, NOW, store_failed=False) is expected


@pytest.mark.parametrize("age", [0, 60, 90, 659.9])
def test_while_the_store_fails_any_entry_within_stale_if_error_answers(age: float) -> None:
    assert decide.for_stored(NOW - age, POLICY, NOW, store_failed=True) is Step.SERVE_FALLBACK


def test_with_nothing_usable_the_origin_answers_even_while_the_store_fails() -> None:
    assert decide.for_stored(None, POLICY, NOW, store_failed=True) is Step.FILL
    assert decide.for_stored(NOW - 660, POLICY, NOW, store_failed=True) is Step.FILL


def test_waiters_share_the_fill_they_waited_on_its_success_and_its_failure() -> None:
    assert decide.after_wait(True, True, False, False, False, False) is Step.SHARE
    assert decide.after_wait(True, False, True, True, True, False) is Step.SERVE_FALLBACK  # the stale entry first
    assert decide.after_wait(True, False, True, False, True, False) is Step.REPLAY_FAILURE  # its 5xx, not N calls
    assert decide.after_wait(True, False, True, False, False, True) is Step.FAIL  # it raised: so do we


def test_a_waiter_goes_to_the_origin_only_when_the_wait_tells_it_nothing() -> None:
    assert decide.after_wait(False, False, False, False, False, False) is Step.FORWARD  # waited past the bound
    assert decide.after_wait(True, False, False, False, False, False) is Step.FORWARD  # detached, nothing stored


@pytest.mark.parametrize("failure", ["status", "exception", "timeout"])
def test_a_failing_origin_is_answered_from_the_fallback_when_there_is_one(failure: str) -> None:
    assert decide.after_origin(failure, has_fallback=True) is Step.SERVE_FALLBACK
    assert decide.after_origin(failure, has_fallback=False) is Step.FILL
    assert decide.after_origin(None, has_fallback=True) is Step.FILL
