"""A write-behind queue in this process's memory: the Redis backend's contract, without Redis.

For the memory store, tests and trying things out: a write is only as durable as
the process, and one process means one flusher (nothing to claim from another).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict

import anyio

from cachemw.writebehind.backend import Counts
from cachemw.writebehind.rules import StreamEntry, stream_time
from cachemw.writebehind.values import DeadLetter, WriteBehindStatus

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """The same contract in this process: for the memory store, tests and trying things out."""

    kind = "memory"

    def __init__(self) -> None:
        self._values: dict[str, tuple[int, bytes, float]] = {}  # key -> version, data, expiry (monotonic)
        self._unacked: dict[str, StreamEntry] = {}  # oldest first, like the stream
        self._queue: deque[StreamEntry] = deque()  # not yet delivered
        self._dead: dict[str, DeadLetter] = {}
        self._counts = Counts()
        self._version = 0
        self._last_id = (0, 0)
        self._arrived: anyio.Event | None = None
        self._flushers = 0

    def _next_id(self) -> str:
        ms = int(time.time() * 1000)
        last_ms, seq = self._last_id
        ms, seq = (last_ms, seq + 1) if ms <= last_ms else (ms, 0)
        self._last_id = (ms, seq)
        return f"{ms}-{seq}"

    def _append(self, key: str, version: int, data: bytes) -> None:
        entry = StreamEntry(self._next_id(), key, version, data)
        self._unacked[entry.id] = entry
        self._queue.append(entry)
        if self._arrived is not None:
            self._arrived.set()

    async def put(self, key: str, data: bytes, if_version: int | None) -> tuple[bool, int]:
        _, current = await self.get(key)
        if if_version is not None and current != if_version:
            return False, current
        self._version = max(self._version + 1, time.time_ns() // 1000)
        self._values[key] = (self._version, data, math.inf)
        self._append(key, self._version, data)
        return True, self._version

    async def get(self, key: str) -> tuple[bytes | None, int]:
        found = self._values.get(key)
        if found is None:
            return None, 0
        if found[2] <= time.monotonic():
            del self._values[key]
            return None, 0
        return found[1], found[0]

    async def join(self) -> None:
        self._flushers = 1

    async def own_pending(self, count: int) -> list[StreamEntry]:
        queued = {entry.id for entry in self._queue}
        held = [entry for entry in self._unacked.values() if entry.id not in queued][:count]
        return [StreamEntry(e.id, e.key, e.version, e.data, deliveries=e.deliveries + 1) for e in held]

    async def read(self, count: int, block: float) -> list[StreamEntry]:
        if not self._queue and block > 0:
            self._arrived = anyio.Event()
            with anyio.move_on_after(block):
                await self._arrived.wait()
            self._arrived = None
        out: list[StreamEntry] = []
        while self._queue and len(out) < count:
            entry = self._queue.popleft()
            out.append(StreamEntry(entry.id, entry.key, entry.version, entry.data))
        return out

    async def claim(self, count: int, min_idle: float) -> list[StreamEntry]:
        return []  # one process, one flusher: nobody else's work to take over

    async def keepalive(self, ids: Sequence[str]) -> None:
        pass

    async def ack(self, entries: Sequence[StreamEntry], winners: Sequence[StreamEntry], retain: float | None) -> None:
        for entry in entries:
            if self._unacked.pop(entry.id, None) is not None:
                self._counts.flushed += 1
        if retain is not None:
            for winner in winners:
                found = self._values.get(winner.key)
                if found is not None and found[0] == winner.version:
                    self._values[winner.key] = (found[0], found[1], time.monotonic() + retain)

    async def dead_letter(self, winner: StreamEntry, others: Sequence[StreamEntry], error: str, attempts: int) -> None:
        for entry in (winner, *others):
            self._unacked.pop(entry.id, None)
        letter_id = self._next_id()
        self._dead[letter_id] = DeadLetter(id=letter_id, key=winner.key, version=winner.version, data=winner.data,
                                           error=error, attempts=attempts, dead_at=time.time())
        self._counts.dead_lettered += 1

    async def count(self, **fields: int) -> None:
        for name, n in fields.items():
            setattr(self._counts, name, getattr(self._counts, name) + n)

    async def status(self, name: str) -> WriteBehindStatus:
        first = next(iter(self._unacked), None)
        lag = max(0.0, time.time() - stream_time(first)) if first is not None else 0.0
        return WriteBehindStatus(name=name, backend=self.kind, backlog=len(self._unacked),
                                 pending=len(self._unacked) - len(self._queue), lag=lag, dead=len(self._dead),
                                 flushers=self._flushers, **asdict(self._counts))

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        return list(self._dead.values())[:limit]

    async def requeue(self, ids: Sequence[str] | None) -> int:
        moved = 0
        for letter_id in list(self._dead) if ids is None else ids:
            letter = self._dead.pop(letter_id, None)
            if letter is not None:
                self._append(letter.key, letter.version, letter.data)
                moved += 1
        self._counts.requeued += moved
        return moved

    async def leave(self) -> int:
        self._flushers = 0
        return len(self._unacked) - len(self._queue)

    async def aclose(self) -> None:
        pass
