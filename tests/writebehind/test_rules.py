"""The write-behind's pure rules, without Redis or an event loop: what a batch becomes, when a write is poison."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from cachemw.writebehind import rules
from cachemw.writebehind.rules import FlushGroup, StreamEntry
from cachemw.writebehind.validation import MAX_KEY_LENGTH, check_key, check_name, check_tuning

_ids = itertools.count(1)


def entry(key: str, version: int) -> StreamEntry:
    return StreamEntry(f"1700000000000-{next(_ids)}", key, version, b"%d" % version)


def keys(entries: list[StreamEntry]) -> list[str]:
    return [e.key for e in entries]


# -- coalescing: one write per key reaches flush ---------------------------------------------------


def test_a_later_version_of_a_key_supersedes_the_earlier_ones_in_a_batch() -> None:
    a1, b1, a2, a3 = entry("a", 1), entry("b", 2), entry("a", 3), entry("a", 4)
    winners, older = rules.coalesce([a1, b1, a2, a3])
    assert winners == [b1, a3]
    assert older == {"a": [a1, a2], "b": []}
    assert rules.with_superseded(winners, older) == [b1, a3, a1, a2], "a flush acknowledges the superseded too"


def test_the_highest_version_wins_even_when_delivered_first() -> None:
    newer, stale = entry("a", 9), entry("a", 5)  # two flushers may deliver a key's writes in either order
    winners, older = rules.coalesce([newer, stale])
    assert winners == [newer] and older == {"a": [stale]}


def test_winners_are_handed_over_oldest_version_first() -> None:
    c, a, b = entry("c", 30), entry("a", 10), entry("b", 20)
    winners, _ = rules.coalesce([c, a, b])
    assert keys(winners) == ["a", "b", "c"]


# -- a failed batch is split until the poison write is alone ---------------------------------------


def test_a_failed_batch_splits_in_halves_keeping_each_keys_writes_together() -> None:
    batch = [entry("a", 1), entry("b", 2), entry("a", 3), entry("c", 4), entry("d", 5)]
    halves = rules.split_in_halves(batch)
    assert halves is not None
    first, second = halves
    assert keys(first) == ["a", "b", "a"] and keys(second) == ["c", "d"]
    assert sorted(first + second, key=lambda e: e.version) == batch, "nothing lost, nothing twice"


def test_a_batch_of_one_key_cannot_be_split() -> None:
    assert rules.split_in_halves([entry("a", 1), entry("a", 2)]) is None


def test_splitting_isolates_the_poison_write_in_a_few_rounds() -> None:
    group = [entry(f"k{n}", n) for n in range(16)]
    rounds = 0
    while (halves := rules.split_in_halves(group)) is not None:
        group = next(half for half in halves if "k11" in keys(half))
        rounds += 1
    assert keys(group) == ["k11"]
    assert rounds == math.ceil(math.log2(16))


# -- poison or outage ------------------------------------------------------------------------------


def test_failures_while_nothing_succeeds_are_an_outage_and_never_dead_letter() -> None:
    poison = entry("bad", 1)
    successes = 0  # the database accepted nothing meanwhile
    assert not any(rules.failed_alone(poison, successes, max_attempts=3) for _ in range(100))
    assert poison.counted == 0


def test_a_write_failing_alone_while_others_succeed_is_dead_lettered_after_max_attempts() -> None:
    poison = entry("bad", 1)
    verdicts = []
    for successes in range(1, 4):  # between each of its failures, another write was flushed
        verdicts.append(rules.failed_alone(poison, successes, max_attempts=3))
    assert verdicts == [False, False, True]


def test_only_failures_with_success_in_between_count_toward_max_attempts() -> None:
    poison = entry("bad", 1)
    assert not rules.failed_alone(poison, 1, max_attempts=2)
    assert not rules.failed_alone(poison, 1, max_attempts=2), "no other write flushed since: not counted"
    assert rules.failed_alone(poison, 2, max_attempts=2)


def test_a_write_whose_flushers_keep_dying_is_poison_after_max_attempts_deliveries() -> None:
    crashy = entry("crashy", 1)
    crashy.deliveries = 3
    assert not rules.delivered_too_often(crashy, max_attempts=3)
    crashy.deliveries = 4
    assert rules.delivered_too_often(crashy, max_attempts=3)


# -- retry backoff ---------------------------------------------------------------------------------


def test_retry_delay_doubles_per_failure_up_to_the_cap() -> None:
    def longest(low: float, high: float) -> float:
        return high

    delays = [rules.retry_delay(n, 0.1, 1.0, uniform=longest) for n in range(1, 7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert rules.retry_delay(10_000, 0.1, 30.0, uniform=longest) == 30.0, "no overflow after very many failures"


def test_retry_delay_is_spread_between_half_and_all_of_the_backoff() -> None:
    def shortest(low: float, high: float) -> float:
        return low

    assert rules.retry_delay(3, 0.1, 30.0, uniform=shortest) == pytest.approx(0.2)
    assert all(0.2 <= rules.retry_delay(3, 0.1, 30.0) <= 0.4 for _ in range(200))


# -- after a success: what waits goes now ----------------------------------------------------------


def test_after_an_outage_split_groups_merge_into_batches_of_at_most_batch_size() -> None:
    singles = [FlushGroup([entry(f"k{n}", n)], due=100.0, failures=4) for n in range(7)]
    groups = rules.resume_groups(singles, now=5.0, rebatch=True, batch_size=3)
    assert [keys(g.entries) for g in groups] == [["k0", "k1", "k2"], ["k3", "k4", "k5"], ["k6"]]
    assert all(g.due == 5.0 and g.failures == 0 for g in groups)


def test_a_suspect_write_stays_alone_when_groups_merge_again() -> None:
    suspect = entry("bad", 1)
    suspect.counted = 1  # failed alone while the database took other writes
    groups = rules.resume_groups([FlushGroup([suspect], 100.0, 2), FlushGroup([entry("a", 2)], 100.0, 2),
                            FlushGroup([entry("b", 3)], 100.0, 2)], now=5.0, rebatch=True, batch_size=10)
    assert [keys(g.entries) for g in groups] == [["bad"], ["a", "b"]]
    assert groups[0].failures == 2, "its backoff history is kept"


def test_without_an_outage_groups_stay_as_they_are_but_are_due_now() -> None:
    early, late = FlushGroup([entry("a", 1)], 1.0), FlushGroup([entry("b", 2)], 100.0)
    groups = rules.resume_groups([early, late], now=5.0, rebatch=False, batch_size=10)
    assert groups == [early, late]
    assert (early.due, late.due) == (1.0, 5.0)


def test_held_writes_no_newer_than_one_just_flushed_are_done_without_a_flush() -> None:
    a_old, a_same, a_new, b = entry("a", 1), entry("a", 5), entry("a", 9), entry("b", 2)
    groups = [FlushGroup([a_old, b], 0.0), FlushGroup([a_same], 0.0), FlushGroup([a_new], 0.0)]
    stale = rules.superseded(groups, {"a": 5})
    assert stale == [a_old, a_same]
    left = rules.drop_entries(groups, {e.id for e in stale})
    assert [g.entries for g in left] == [[b], [a_new]], "an emptied group is gone"


def test_what_a_broken_off_flush_still_holds_goes_back_unless_grouped_again() -> None:
    acked, regrouped, pending = entry("a", 1), entry("b", 2), entry("c", 3)
    group = FlushGroup([acked, regrouped, pending], 0.0)
    held = {regrouped.id, pending.id}
    assert rules.unfinished(group, held, [FlushGroup([regrouped], 0.0)]) == [pending]


# -- what a dead letter and a write say ------------------------------------------------------------


def test_a_write_is_dated_by_its_stream_id() -> None:
    assert rules.stream_time("1700000000123-7") == 1700000000.123
    assert rules.stream_time("not-an-id") == 0.0


def test_a_flush_timeout_is_described_in_words_and_errors_are_bounded() -> None:
    assert rules.describe_failure(TimeoutError(), 2.5) == "flush did not return within 2.5s"
    assert rules.describe_failure(ValueError("bad row"), 2.5) == "ValueError: bad row"
    assert len(rules.describe_failure(ValueError("x" * 5000), 2.5)) == 1000


# -- what a queue accepts --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cart", "a.b:c-d_1", "x" * 64])
def test_names_safe_in_a_redis_key_are_accepted(name: str) -> None:
    check_name("write-behind name", name)


@pytest.mark.parametrize("name", ["", "x" * 65, "{cart}", "has space", "ünï"])
def test_names_that_would_break_the_hash_tag_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(ValueError, match=r"write-behind name .*: expected 1 to 64 of A-Z a-z 0-9 _ \. : -"):
        check_name("write-behind name", name)


def test_keys_are_1_to_max_characters() -> None:
    check_key("k")
    check_key("k" * MAX_KEY_LENGTH)
    for bad in ("", "k" * (MAX_KEY_LENGTH + 1)):
        with pytest.raises(ValueError, match="strings of 1 to 1024 characters"):
            check_key(bad)


_TUNING: dict[str, Any] = dict(  # what WriteBehind passes by default
    batch_size=100, batch_delay=0.05, max_attempts=10, retry_backoff=0.1, max_backoff=30.0, claim_idle=30.0,
    flush_timeout=30.0, retain=None, timeout=1.0, grace_period=None)


@pytest.mark.parametrize(("option", "value", "reason"), [
    ("batch_delay", -1.0, "batch_delay must be a number of seconds >= 0"),
    ("max_backoff", math.inf, "max_backoff must be a number of seconds >= 0"),
    ("claim_idle", 0.0, "claim_idle must be a number of seconds > 0"),
    ("flush_timeout", math.nan, "flush_timeout must be a number of seconds > 0"),
    ("retain", 0.0, "retain must be None or a number of seconds > 0"),
    ("grace_period", -0.5, "grace_period must be None or a number of seconds >= 0"),
    ("batch_size", 0, "batch_size and max_attempts must be at least 1"),
    ("max_attempts", 0, "batch_size and max_attempts must be at least 1"),
])
def test_bad_tuning_is_refused_with_the_reason(option: str, value: Any, reason: str) -> None:
    check_tuning(**_TUNING)
    with pytest.raises(ValueError, match=reason):
        check_tuning(**{**_TUNING, option: value})


def test_zero_delays_are_allowed_where_they_mean_at_once() -> None:
    check_tuning(**{**_TUNING, "batch_delay": 0.0, "retry_backoff": 0.0, "grace_period": 0.0})
