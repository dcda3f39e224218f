"""What a write-behind's users handle: the writes ``flush`` gets, dead letters, status, errors.

Plain values only, so the flusher, both backends and the CLI share them without
importing one another.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar

__all__ = [
    "DeadLetter",
    "FlushFunction",
    "JsonSerializer",
    "Serializer",
    "VersionConflict",
    "Write",
    "WriteBehindStatus",
]

V = TypeVar("V")


class Serializer(Protocol[V]):
    """How values become bytes in Redis and back; ``loads`` may raise for bytes it cannot read."""

    def dumps(self, value: V) -> bytes: ...

    def loads(self, data: bytes) -> V: ...


class JsonSerializer:
    """The default: compact UTF-8 JSON, readable with any Redis tool."""

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


@dataclass(frozen=True, slots=True)
class Write(Generic[V]):
    """One key's latest write in a batch handed to ``flush``.

    ``version`` orders the writes of a key: store it, and ignore a write whose
    version is not above the stored one. ``superseded`` counts the older writes
    of the key in the batch this one replaces.
    """

    key: str
    value: V
    version: int
    written_at: float  # Unix time of the put (the Redis server's clock)
    superseded: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A write ``flush`` kept refusing, parked with its last error until someone retries it."""

    id: str
    key: str
    version: int
    data: bytes  # the serialized value
    error: str
    attempts: int
    dead_at: float


@dataclass(frozen=True, slots=True)
class WriteBehindStatus:
    """What an operator watches: how far behind the database is, and why.

    ``backlog`` counts writes put and not yet acknowledged (``pending`` of them
    are held by a flusher right now); ``lag`` is the age in seconds of the oldest
    of them (0 when there are none). The counters add up over every process.
    """

    name: str
    backend: str  # "redis" or "memory"
    backlog: int
    pending: int
    lag: float
    dead: int
    flushers: int
    flushed: int  # writes acknowledged after a successful flush (superseded ones included)
    failed_flushes: int  # flush calls that raised or timed out
    retried: int  # writes handed to flush again after a failure
    dead_lettered: int
    claimed: int  # writes taken over from a flusher that stopped
    requeued: int  # dead letters moved back by ``retry_dead_letters``

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class VersionConflict(Exception):
    """``put(..., if_version=n)`` found another version: someone else wrote the key meanwhile."""

    def __init__(self, key: str, expected: int, current: int) -> None:
        super().__init__(f"write-behind key {key!r} is at version {current}, not {expected}")
        self.key = key
        self.expected = expected
        self.current = current


FlushFunction = Callable[[list[Write[V]]], Awaitable[object]]
