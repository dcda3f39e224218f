"""Redis replies read back into plain values: stream entries, dead letters, a status snapshot.

The scripts write a stream entry as fields ``key``, ``version``, ``value`` (a dead
letter adds ``error``, ``attempts`` and the original ``id``). Replies are parsed
here from raw RESP2 lists, not by redis-py, whose parsers differ between versions
and fail on entries deleted while pending. Pure: nothing here talks to Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cachemw.writebehind.backend import COUNTER_NAMES
from cachemw.writebehind.rules import StreamEntry, stream_time
from cachemw.writebehind.values import DeadLetter, WriteBehindStatus

__all__ = ["fields", "parse_dead_letter", "parse_entry", "parse_status", "text"]


def text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def fields(flat: Sequence[Any] | None) -> dict[str, bytes] | None:
    """``[field, value, ...]`` as a dict; None stays None (an entry deleted meanwhile)."""
    if flat is None:
        return None
    return {text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def parse_entry(raw: Sequence[Any]) -> StreamEntry | None:
    """A raw RESP2 stream entry ``[id, [field, value, ...]]``; None for one deleted meanwhile."""
    found = fields(raw[1])
    if found is None or "key" not in found:
        return None
    try:
        version = int(found.get("version", b"0"))
    except ValueError:
        version = 0
    return StreamEntry(text(raw[0]), text(found["key"]), version, found.get("value", b""))


def parse_dead_letter(raw: Sequence[Any]) -> DeadLetter:
    found = fields(raw[1]) or {}
    letter_id = text(raw[0])
    return DeadLetter(id=letter_id, key=text(found.get("key", b"")),
                      version=int(found.get("version", b"0") or 0), data=found.get("value", b""),
                      error=text(found.get("error", b"")),
                      attempts=int(found.get("attempts", b"0") or 0),
                      dead_at=stream_time(letter_id))


def parse_status(reply: Sequence[Any], *, name: str, backend: str, group: str) -> WriteBehindStatus:
    """The status script's snapshot ``[TIME, XLEN stream, oldest entry, XLEN dead, stats, XINFO GROUPS]``."""
    now, backlog, first, dead, stats, groups = reply
    pending = flushers = 0
    for info in map(fields, groups):  # none without a stream: nothing was ever put
        if info and text(info.get("name", b"")) == group:
            pending, flushers = int(info.get("pending", 0)), int(info.get("consumers", 0))
    server_now = int(now[0]) + int(now[1]) / 1_000_000
    lag = max(0.0, server_now - stream_time(text(first[0][0]))) if first else 0.0
    counts = {text(k): int(v) for k, v in (fields(stats) or {}).items()}
    return WriteBehindStatus(name=name, backend=backend, backlog=int(backlog), pending=pending, lag=lag,
                             dead=int(dead), flushers=flushers, **{f: counts.get(f, 0) for f in COUNTER_NAMES})
