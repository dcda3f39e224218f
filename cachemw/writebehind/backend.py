"""The contract between the flusher and where writes live: Redis, or this process's memory.

The flusher and ``WriteBehind`` see only this, so both backends behave alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from cachemw.writebehind.rules import StreamEntry
from cachemw.writebehind.values import DeadLetter, WriteBehindStatus

__all__ = ["COUNTER_NAMES", "Backend", "Counts"]


@dataclasses.dataclass(slots=True)
class Counts:
    """The counters a queue keeps, added up over every process (see ``WriteBehindStatus``)."""

    flushed: int = 0
    failed_flushes: int = 0
    retried: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    requeued: int = 0


COUNTER_NAMES: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(Counts))


class Backend(Protocol):
    kind: str

    async def put(self, key: str, data: bytes, if_version: int | None) -> tuple[bool, int]: ...
    async def get(self, key: str) -> tuple[bytes | None, int]: ...
    async def join(self) -> None: ...
    async def own_pending(self, count: int) -> list[StreamEntry]: ...
    async def read(self, count: int, block: float) -> list[StreamEntry]: ...
    async def claim(self, count: int, min_idle: float) -> list[StreamEntry]: ...
    async def keepalive(self, ids: Sequence[str]) -> None: ...
    async def ack(self, entries: Sequence[StreamEntry], winners: Sequence[StreamEntry],
                  retain: float | None) -> None: ...
    async def dead_letter(self, winner: StreamEntry, others: Sequence[StreamEntry], error: str,
                          attempts: int) -> None: ...
    async def count(self, **fields: int) -> None: ...
    async def status(self, name: str) -> WriteBehindStatus: ...
    async def dead_letters(self, limit: int) -> list[DeadLetter]: ...
    async def requeue(self, ids: Sequence[str] | None) -> int: ...
    async def leave(self) -> int: ...
    async def aclose(self) -> None: ...
