"""The L1's evictions by key, and the tickets that keep a read in flight from putting an evicted copy back."""

from __future__ import annotations

from cachemw.core.entry import Entry
from cachemw.store.l1 import L1


def _entry(body: bytes = b"old", tags: tuple[str, ...] = ("item:1",)) -> Entry:
    return Entry(200, (), body, 0.0, b"", tags=tags)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_evict_drops_the_named_keys_and_none_drops_everything() -> None:
    l1 = L1()
    l1.put("a}", _entry(), 30)
    l1.put("b}", _entry(), 30)
    l1.evict(["a}", "not-kept}"])
    assert l1.get("a}") is None and l1.get("b}") is not None
    l1.evict(None)  # FLUSHDB / FLUSHALL
    assert len(l1) == 0


def test_a_read_in_flight_when_its_key_was_evicted_is_not_kept() -> None:
    l1 = L1()
    ticket = l1.seq  # the GET is sent...
    l1.evict(["a}"])  # ...Redis deletes the key and says so before the GET's caller resumes
    l1.put("a}", _entry(), 30, ticket)
    assert l1.get("a}") is None
    l1.put("a}", _entry(b"new"), 30, l1.seq)  # a read after the eviction is kept
    assert l1.get("a}") is not None


def test_a_read_in_flight_when_its_tag_was_purged_is_not_kept() -> None:
    l1 = L1()
    ticket = l1.seq
    l1.drop_tags(["item:1"])
    l1.put("a}", _entry(), 30, ticket)
    l1.put("b}", _entry(tags=("item:2",)), 30, ticket)  # another key, another tag: kept
    assert l1.get("a}") is None and l1.get("b}") is not None


def test_a_read_in_flight_across_a_lost_link_or_many_evictions_is_not_kept() -> None:
    l1 = L1()
    ticket = l1.seq
    l1.lost_sync()
    l1.put("a}", _entry(), 30, ticket)
    assert l1.get("a}") is None
    ticket = l1.seq
    l1.evict([f"k{n}}}" for n in range(10_000)])  # more than it remembers: the oldest are forgotten
    l1.put("k0}", _entry(), 30, ticket)
    assert l1.get("k0}") is None


def test_the_last_resort_past_sync_only_when_asked() -> None:
    clock = Clock()
    l1 = L1(clock=clock)
    l1.put("a}", _entry(), 1.0)
    assert l1.last_resort("a}", within_sync=True) is not None
    clock.now += 2
    assert l1.last_resort("a}", within_sync=True) is None  # another server may have purged it meanwhile
    assert l1.last_resort("a}") is not None  # a rule with stale_if_error agreed to this
    clock.now -= 2
    l1.lost_sync()
    assert l1.last_resort("a}", within_sync=True) is None
