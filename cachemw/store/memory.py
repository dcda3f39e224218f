"""In-process store: an LRU bounded in bytes, for one process and for trying cachemw out.

Also the building block of the per-process L1 in front of Redis, so ``get`` is kept
to a dict lookup, one clock read and a ``move_to_end``. Everything runs on one event
loop and nothing awaits inside a method, so no locks are needed.
"""

from __future__ import annotations

import fnmatch
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import anyio
from anyio.abc import TaskStatus

from cachemw.store.base import LockResult, Notifications

__all__ = ["MemoryStore", "MemoryStoreStats"]

V = TypeVar("V")


@dataclass(frozen=True)
class MemoryStoreStats:
    """A snapshot of a MemoryStore's counters (for metrics and the CLI)."""

    entries: int
    bytes_used: int
    max_bytes: int
    evictions: int  # entries dropped to make room (LRU)
    expirations: int  # expired entries dropped when touched
    rejected: int  # values not stored because they alone exceed max_bytes


class MemoryStore:
    """LRU store bounded by ``max_bytes`` (key length + value length per entry).

    Expired entries are dropped when touched, and otherwise age out through the LRU:
    the byte bound holds either way. ``clock`` is injectable so tests control time.
    """

    __slots__ = ("_clock", "_data", "_generations", "_locks", "_tag_sets", "bytes_used", "evictions", "expirations",
                 "max_bytes", "notifications", "rejected")

    def __init__(
        self,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._clock = clock
        # key -> (value, expires_at on ``clock``); order = recency, oldest first.
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.bytes_used = 0
        self.evictions = 0
        self.expirations = 0
        self.rejected = 0
        # Fill locks, tag index and generations: apps sharing this store in one process
        # coordinate through it exactly as processes do through Redis.
        self._locks: _SweptDict[tuple[str, float]] = _SweptDict()
        self._tag_sets: _SweptDict[_SweptDict[float]] = _SweptDict()
        self._generations: dict[str, int] = {}
        self.notifications = Notifications()

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        # Without this an empty store would be falsy (because of __len__), and
        # ``store or default`` would silently swap it out.
        return True

    @property
    def stats(self) -> MemoryStoreStats:
        return MemoryStoreStats(
            entries=len(self._data),
            bytes_used=self.bytes_used,
            max_bytes=self.max_bytes,
            evictions=self.evictions,
            expirations=self.expirations,
            rejected=self.rejected,
        )

    async def get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._data[key]
            self.bytes_used -= len(key) + len(entry[0])
            self.expirations += 1
            return None
        self._data.move_to_end(key)
        return entry[0]

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        # Any earlier value is replaced, even when the new one is not kept: a
        # failed replacement must not leave the older value readable.
        self._discard(key)
        if not ttl > 0:  # also catches NaN
            return
        size = len(key) + len(value)
        if size > self.max_bytes:
            self.rejected += 1
            return
        data = self._data
        while data and self.bytes_used + size > self.max_bytes:
            old_key, (old_value, _) = data.popitem(last=False)
            self.bytes_used -= len(old_key) + len(old_value)
            self.evictions += 1
        data[key] = (bytes(value), self._clock() + ttl)
        self.bytes_used += size

    async def delete(self, *keys: str) -> int:
        now = self._clock()
        existed = 0
        for key in keys:
            entry = self._discard(key)
            if entry is not None and entry[1] > now:
                existed += 1
        return existed

    async def lock(self, key: str, ttl: float, generation_keys: Sequence[str], token: str | None = None, *,
                   timeout: float | None = None) -> LockResult:
        value = await self.get(key)
        generations = tuple(self._generations.get(g, 0) for g in generation_keys)
        held = self._locks.get(key)
        now = self._clock()
        if held is not None and held[1] > now:
            return None, value, generations
        token = token or secrets.token_hex(8)
        self._locks[key] = (token, now + ttl)
        if self._locks.due():
            # Locks whose release never came (a shed job, a cancelled request) go once expired.
            for stale in [k for k, (_, until) in self._locks.items() if until <= now]:
                del self._locks[stale]
            self._locks.swept()
        return token, value, generations

    async def fill(self, key: str, value: bytes, ttl: float, token: str | None, tag_sets: Sequence[str],
                   generation_keys: Sequence[str], generations: Sequence[int], *, timeout: float | None = None
                   ) -> bool:
        current = tuple(self._generations.get(g, 0) for g in generation_keys)
        stored = current == tuple(generations)
        if stored:
            await self.set(key, value, ttl)
            now = self._clock()
            for tag_set in tag_sets:
                members = self._tag_sets.get(tag_set)
                if members is None:
                    if self._tag_sets.due():
                        # Most tag sets name one URL (``path:`` tags): drop those whose entries are all gone.
                        for name in [n for n, m in self._tag_sets.items() if not self._prune(m, now)]:
                            del self._tag_sets[name]
                        self._tag_sets.swept()
                    members = self._tag_sets[tag_set] = _SweptDict()
                members[key] = now + ttl
                if members.due():
                    self._prune(members, now)
                    members.swept()
        if token is not None:
            await self.unlock(key, token)
        self.notifications.filled(key)
        return stored

    async def unlock(self, key: str, token: str, *, timeout: float | None = None) -> None:
        held = self._locks.get(key)
        if held is not None and held[0] == token:
            del self._locks[key]
            self.notifications.filled(key)  # waiters find no entry and call the app themselves

    async def invalidate(self, tag_sets: Sequence[str], generation_keys: Sequence[str], message: str, *,
                         timeout: float | None = None) -> int:
        for generation_key in generation_keys:
            self._generations[generation_key] = self._generations.get(generation_key, 0) + 1
        keys: set[str] = set()
        for tag_set in tag_sets:
            keys.update(self._tag_sets.pop(tag_set, {}))
        dropped = await self.delete(*keys)
        await self.publish_invalidation(message)
        return dropped

    async def purge(self, pattern: str, generation_key: str, message: str, *, timeout: float | None = None) -> int:
        self._generations[generation_key] = self._generations.get(generation_key, 0) + 1
        dropped = await self.delete(*[key for key in list(self._data) if fnmatch.fnmatchcase(key, pattern)])
        await self.publish_invalidation(message)
        return dropped

    async def publish_invalidation(self, message: str) -> None:
        self.notifications.invalidated(json.loads(message))

    @property
    def listening(self) -> bool:
        return True  # one process: announcements are calls, never lost

    async def listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def aclose(self) -> None:
        self._data.clear()
        self._locks.clear()
        self._tag_sets.clear()
        self.bytes_used = 0

    def _prune(self, members: dict[str, float], now: float) -> int:
        """Forget expired or evicted members of a tag set; how many are left."""
        for member in [m for m, expires in members.items() if expires <= now or m not in self._data]:
            del members[member]
        return len(members)

    def _discard(self, key: str) -> tuple[bytes, float] | None:
        entry = self._data.pop(key, None)
        if entry is not None:
            self.bytes_used -= len(key) + len(entry[0])
        return entry


class _SweptDict(dict[str, V]):
    """A map swept of dead items whenever it has grown by half since its last sweep (and at 64).

    Whatever mix of inserts, refills and deletes it sees, a sweep then costs O(1) per
    insert, amortised: the map must grow by half of what the sweep left before the next.
    """

    __slots__ = ("_sweep_at",)

    def __init__(self) -> None:
        super().__init__()
        self._sweep_at = 64

    def due(self) -> bool:
        return len(self) >= self._sweep_at

    def swept(self) -> None:
        self._sweep_at = max(64, len(self) + len(self) // 2)
