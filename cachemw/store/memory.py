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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import anyio
from anyio.abc import TaskStatus

from cachemw.core.entry import soften
from cachemw.core.sizes import DICT_SLOT, FLOAT, LRU_SLOT, SET, SET_MEMBER, alloc, bytes_cost, str_cost, tuple_cost
from cachemw.store.base import LOCAL, LockResult, Notifications, StoreCapabilities

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
    """LRU store bounded by ``max_bytes`` of what its entries, tag index and locks cost the process.

    An entry counts its key and value objects, its record and its slots in the LRU
    and the tag index (``cachemw.core.sizes``), computed once when stored. Expired
    entries are dropped when touched, and otherwise age out through the LRU: the
    byte bound holds either way. ``clock`` is injectable so tests control time.
    """

    __slots__ = ("_clock", "_data", "_generations", "_locks", "_tag_sets", "bytes_used", "evictions", "expirations",
                 "max_bytes", "notifications", "rejected")

    capabilities: StoreCapabilities = LOCAL

    def __init__(
        self,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._clock = clock
        # key -> (value, expires_at on ``clock``, accounted size, tag sets); order = recency, oldest first.
        self._data: OrderedDict[str, _Item] = OrderedDict()
        self.bytes_used = 0
        self.evictions = 0
        self.expirations = 0
        self.rejected = 0
        # Fill locks, tag index and generations: apps sharing this store in one process
        # coordinate through it exactly as processes do through Redis. The tag index
        # holds live entries only (kept as entries come and go), and counts in the bound.
        self._locks: _SweptDict[tuple[str, float]] = _SweptDict()
        self._tag_sets: dict[str, set[str]] = {}
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
            self._discard(key)
            self.expirations += 1
            return None
        self._data.move_to_end(key)
        return entry[0]

    async def connect(self, timeout: float) -> None:
        """Nothing to connect: the store is this process's memory."""

    def shard(self, key: str) -> str:
        return ""

    async def get_or_lock(self, key: str, ttl: float, generation_keys: Sequence[str], token: str) -> LockResult:
        value = await self.get(key)
        if value is not None:
            return None, value, ()
        return await self.lock(key, ttl, generation_keys, token)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._put(key, value, ttl, ())

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
        if held is not None:
            self.bytes_used -= _lock_cost(key, held[0])
        self._locks[key] = (token, now + ttl)
        self.bytes_used += _lock_cost(key, token)
        if self._locks.due():
            self._sweep_locks(now)
        self._shrink()
        return token, value, generations

    async def fill(self, key: str, value: bytes, ttl: float, token: str | None, tag_sets: Sequence[str],
                   generation_keys: Sequence[str], generations: Sequence[int], *, timeout: float | None = None
                   ) -> bool:
        current = tuple(self._generations.get(g, 0) for g in generation_keys)
        stored = current == tuple(generations)
        if stored:
            self._put(key, value, ttl, tuple(tag_sets))
        if token is not None:
            await self.unlock(key, token)
        self.notifications.filled(key)
        return stored

    async def unlock(self, key: str, token: str, *, timeout: float | None = None) -> None:
        held = self._locks.get(key)
        if held is not None and held[0] == token:
            del self._locks[key]
            self.bytes_used -= _lock_cost(key, token)
            self.notifications.filled(key)  # waiters find no entry and call the app themselves

    async def invalidate(self, tag_sets: Sequence[str], generation_keys: Sequence[str], message: str, *,
                         timeout: float | None = None, stale_from: float | None = None) -> int:
        for generation_key in generation_keys:
            self._generations[generation_key] = self._generations.get(generation_key, 0) + 1
        keys: set[str] = set()
        for tag_set in tag_sets:
            keys.update(self._tag_sets.get(tag_set, ()))
        dropped = await self.delete(*keys) if stale_from is None else self._soften(keys, stale_from)
        await self.publish_invalidation(message)
        return dropped

    async def purge(self, pattern: str, generation_key: str, message: str, *, timeout: float | None = None,
                    stale_from: float | None = None) -> int:
        self._generations[generation_key] = self._generations.get(generation_key, 0) + 1
        keys = [key for key in list(self._data) if fnmatch.fnmatchcase(key, pattern)]
        dropped = await self.delete(*keys) if stale_from is None else self._soften(keys, stale_from)
        await self.publish_invalidation(message)
        return dropped

    def _soften(self, keys: Iterable[str], stale_from: float) -> int:
        """A soft purge: each live entry marked stale as of ``stale_from`` in place, or dropped (``soften``)."""
        now = self._clock()
        touched = 0
        for key in keys:
            item = self._data.get(key)
            if item is None or item[1] <= now:
                continue
            softened = soften(item[0], stale_from)
            if softened is None:
                self._discard(key)
            elif softened is not item[0]:
                self._data[key] = (softened, *item[1:])  # as long as before: its accounted size holds
            touched += 1
        return touched

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

    def _put(self, key: str, value: bytes, ttl: float, tag_sets: tuple[str, ...]) -> None:
        # Any earlier value is replaced, even when the new one is not kept: a
        # failed replacement must not leave the older value readable.
        self._discard(key)
        if not ttl > 0:  # also catches NaN
            return
        value = bytes(value)
        size = _entry_cost(key, value, tag_sets)
        if size > self.max_bytes:
            self.rejected += 1
            return
        self._data[key] = (value, self._clock() + ttl, size, tag_sets)
        self.bytes_used += size
        for name in tag_sets:
            members = self._tag_sets.get(name)
            if members is None:
                members = self._tag_sets[name] = set()
                self.bytes_used += _tag_set_cost(name)
            members.add(key)
        self._shrink()

    def _shrink(self) -> None:
        """Evict least recently used entries, then expired and oldest locks, until within the bound."""
        data = self._data
        while self.bytes_used > self.max_bytes and data:
            self._discard(next(iter(data)))
            self.evictions += 1
        if self.bytes_used > self.max_bytes:
            self._sweep_locks(self._clock())
        while self.bytes_used > self.max_bytes and self._locks:
            # Only locks are left: the oldest goes (its fill still stores; it just no longer excludes others).
            key = next(iter(self._locks))
            self.bytes_used -= _lock_cost(key, self._locks.pop(key)[0])

    def _sweep_locks(self, now: float) -> None:
        """Locks whose release never came (a shed job, a cancelled request) go once expired."""
        for stale in [k for k, (_, until) in self._locks.items() if until <= now]:
            self.bytes_used -= _lock_cost(stale, self._locks.pop(stale)[0])
        self._locks.swept()

    def _discard(self, key: str) -> _Item | None:
        entry = self._data.pop(key, None)
        if entry is None:
            return None
        self.bytes_used -= entry[2]
        for name in entry[3]:
            members = self._tag_sets.get(name)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._tag_sets[name]
                    self.bytes_used -= _tag_set_cost(name)
        return entry


# value, expires_at, accounted size, tag sets
_Item = tuple[bytes, float, int, tuple[str, ...]]
_ITEM = tuple_cost(4) + FLOAT + alloc(28) + LRU_SLOT  # the record, its float and int (28 B), its LRU slot


def _entry_cost(key: str, value: bytes, tag_sets: tuple[str, ...]) -> int:
    size = _ITEM + str_cost(key) + bytes_cost(value)
    if tag_sets:
        size += tuple_cost(len(tag_sets)) + sum(str_cost(name) + SET_MEMBER for name in tag_sets)
    return size


def _tag_set_cost(name: str) -> int:
    return SET + DICT_SLOT + str_cost(name)


def _lock_cost(key: str, token: str) -> int:
    return DICT_SLOT + tuple_cost(2) + FLOAT + str_cost(key) + str_cost(token)


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
