"""The flusher's rules over plain values: batching, coalescing, retry backoff, poison and dead letters.

No I/O, no clock, no event loop: the flusher passes ``now`` and its success count
in, and does what these functions decide. So each rule can be checked on its own,
without Redis or a running loop.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "FlushGroup",
    "StreamEntry",
    "coalesce",
    "delivered_too_often",
    "describe_failure",
    "drop_entries",
    "failed_alone",
    "resume_groups",
    "retry_delay",
    "split_in_halves",
    "stream_time",
    "superseded",
    "unfinished",
    "with_superseded",
]


@dataclass(slots=True, eq=False)
class StreamEntry:
    """A stream entry a flusher holds until it is acknowledged or dead-lettered."""

    id: str
    key: str
    version: int
    data: bytes
    deliveries: int = 1
    failures: int = 0  # failed flushes it was part of
    counted: int = 0  # failed alone while the database accepted other writes: toward max_attempts
    seen: int = 0  # the flusher's success count when it was read or last failed alone


@dataclass(slots=True, eq=False)
class FlushGroup:
    """Entries flushed together; a failed group is retried as two halves, so poison ends up alone."""

    entries: list[StreamEntry]
    due: float  # the flusher's clock
    failures: int = 0


def stream_time(entry_id: str) -> float:
    """Unix time of a stream id ``<ms>-<seq>``: when Redis took the write (0 for a foreign id)."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000
    except ValueError:
        return 0.0


def coalesce(entries: Sequence[StreamEntry]) -> tuple[list[StreamEntry], dict[str, list[StreamEntry]]]:
    """Each key's latest entry (by version, oldest first), and the older ones it supersedes."""
    latest: dict[str, StreamEntry] = {}
    for entry in entries:
        current = latest.get(entry.key)
        if current is None or entry.version > current.version:
            latest[entry.key] = entry
    older: dict[str, list[StreamEntry]] = {key: [] for key in latest}
    for entry in entries:
        if entry is not latest[entry.key]:
            older[entry.key].append(entry)
    return sorted(latest.values(), key=lambda e: e.version), older


def with_superseded(winners: Sequence[StreamEntry], older: Mapping[str, Sequence[StreamEntry]]) -> list[StreamEntry]:
    """The winners and the entries they supersede: what one successful flush acknowledges."""
    return [e for w in winners for e in (w, *older[w.key])]


def split_in_halves(entries: Sequence[StreamEntry]) -> tuple[list[StreamEntry], list[StreamEntry]] | None:
    """A failed group's two halves by key (a key's writes stay together); None for a group of one key."""
    keys = list(dict.fromkeys(e.key for e in entries))
    if len(keys) <= 1:
        return None
    first = set(keys[: len(keys) // 2])
    return [e for e in entries if e.key in first], [e for e in entries if e.key not in first]


def failed_alone(entry: StreamEntry, successes: int, max_attempts: int) -> bool:
    """Count a failure of ``entry`` flushed alone; True when it is poison, to be dead-lettered.

    Poison or outage? Only a failure while the database accepted other writes
    (``successes`` grew since the entry was last seen) counts toward ``max_attempts``.
    """
    if successes > entry.seen:
        entry.counted += 1
    entry.seen = successes
    return entry.counted >= max_attempts


def delivered_too_often(entry: StreamEntry, max_attempts: int) -> bool:
    """Each flusher holding it stopped (crashed, hung) before acknowledging it: poison too."""
    return entry.deliveries > max_attempts


def retry_delay(failures: int, retry_backoff: float, max_backoff: float, *,
                uniform: Callable[[float, float], float] = random.uniform) -> float:
    """Exponential backoff after ``failures`` failures, capped, with jitter that spreads many flushers' retries."""
    delay = min(max_backoff, retry_backoff * math.pow(2, min(failures - 1, 60)))
    return delay * uniform(0.5, 1.0)


def resume_groups(groups: Sequence[FlushGroup], now: float, *, rebatch: bool, batch_size: int) -> list[FlushGroup]:
    """The database takes writes: every group is due now; after an outage (``rebatch``) split groups merge again.

    Groups without a suspect (an entry that failed alone while others flowed)
    become batches of ``batch_size``; suspects stay alone.
    """
    result = list(groups)
    if rebatch:
        merged = [e for g in result if all(e.counted == 0 for e in g.entries) for e in g.entries]
        merged_ids = {e.id for e in merged}
        result = [g for g in result if not any(e.id in merged_ids for e in g.entries)]
        result += [FlushGroup(merged[i:i + batch_size], now) for i in range(0, len(merged), batch_size)]
    for group in result:
        group.due = min(group.due, now)
    return result


def superseded(groups: Sequence[FlushGroup], flushed: Mapping[str, int]) -> list[StreamEntry]:
    """Entries waiting in ``groups`` no newer than a version just flushed (key -> version): done without a flush."""
    return [e for g in groups for e in g.entries if flushed.get(e.key, -1) >= e.version]


def drop_entries(groups: Sequence[FlushGroup], ids: Collection[str]) -> list[FlushGroup]:
    """``groups`` without the entries ``ids``, and without the groups left empty."""
    for group in groups:
        group.entries = [e for e in group.entries if e.id not in ids]
    return [g for g in groups if g.entries]


def unfinished(group: FlushGroup, held: Collection[str], groups: Sequence[FlushGroup]) -> list[StreamEntry]:
    """What of a group whose flush broke off is still ``held`` and in no other group: it must go back."""
    grouped = {e.id for g in groups for e in g.entries}
    return [e for e in group.entries if e.id in held and e.id not in grouped]


def describe_failure(exc: BaseException, timeout: float) -> str:
    """The error a dead letter keeps: short, and saying what a bare timeout means."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"flush did not return within {timeout:g}s"
    return f"{type(exc).__name__}: {exc}"[:1000]
