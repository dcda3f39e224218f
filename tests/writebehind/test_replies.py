"""Stream replies read back without Redis: what a flusher and ``status`` make of raw RESP2 lists."""

from __future__ import annotations

from cachemw.writebehind.replies import parse_dead_letter, parse_entry, parse_status


def test_a_stream_entry_becomes_the_write_it_carries() -> None:
    entry = parse_entry([b"1700000000000-0", [b"key", b"user:1", b"version", b"42", b"value", b'{"n":1}']])
    assert entry is not None
    assert (entry.id, entry.key, entry.version, entry.data) == ("1700000000000-0", "user:1", 42, b'{"n":1}')
    assert entry.deliveries == 1


def test_an_entry_deleted_while_pending_or_foreign_is_skipped() -> None:
    assert parse_entry([b"1-0", None]) is None, "deleted meanwhile: XAUTOCLAIM reports no fields"
    assert parse_entry([b"1-0", [b"other", b"x"]]) is None, "not a write: no key"


def test_an_unreadable_version_counts_as_the_oldest() -> None:
    entry = parse_entry([b"1-0", [b"key", b"k", b"version", b"soon"]])
    assert entry is not None and entry.version == 0 and entry.data == b""


def test_a_dead_letter_keeps_its_version_error_and_attempts() -> None:
    letter = parse_dead_letter([b"1700000005000-1", [b"key", b"k", b"version", b"7", b"value", b"v",
                                                     b"error", b"ValueError: no", b"attempts", b"3", b"id", b"9-0"]])
    assert (letter.key, letter.version, letter.data, letter.error, letter.attempts) == ("k", 7, b"v",
                                                                                        "ValueError: no", 3)
    assert letter.dead_at == 1700000005.0


def test_status_lag_is_the_oldest_writes_age_on_the_servers_clock() -> None:
    groups = [[b"name", b"other", b"consumers", 9, b"pending", 9],
              [b"name", b"cachemw", b"consumers", 2, b"pending", 3]]
    reply = [[b"1700000010", b"500000"], 5, [[b"1700000008000-0", []]], 1, [b"flushed", b"12", b"claimed", b"4"],
             groups]
    status = parse_status(reply, name="cart", backend="redis", group="cachemw")
    assert status.lag == 2.5
    assert (status.backlog, status.pending, status.flushers, status.dead) == (5, 3, 2, 1), "our group's, only"
    assert (status.flushed, status.claimed, status.retried) == (12, 4, 0), "a counter never bumped is 0"


def test_status_of_a_queue_nothing_was_ever_put_to() -> None:
    status = parse_status([[b"1700000010", b"0"], 0, [], 0, [], []], name="cart", backend="redis", group="cachemw")
    assert (status.backlog, status.lag, status.pending, status.flushers, status.flushed) == (0, 0.0, 0, 0, 0)
