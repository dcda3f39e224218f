"""The store contract: a handful of async operations on opaque values.

Stores know nothing of HTTP: they keep bytes under string keys for a bounded
time, and coordinate fills of one key across processes (a short lock, and a
wake-up for those waiting on it). Every driver failure crosses this boundary as
``StoreError`` so the middleware can fail open with one ``except``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import anyio
from anyio.abc import TaskStatus

__all__ = ["FillWaiter", "LockResult", "Notifications", "Store", "StoreError", "StoreTimeout"]


class StoreError(Exception):
    """The store could not answer (down, slow, refused, full, or misused)."""


class StoreTimeout(StoreError, TimeoutError):
    """The store did not answer within its time budget (a store that keeps the budget itself raises it)."""


LockResult = tuple["str | None", "bytes | None", tuple[int, ...]]
"""``(token, value, generations)``: ``token`` is set if the fill lock was taken, ``value`` is
what the key holds now, ``generations`` the current values of the generation keys asked for."""


class FillWaiter:
    """Registered before a lock attempt, so a fill announced meanwhile is not missed.

    The event is made only when someone actually waits: most lock attempts take the
    lock, and an anyio Event costs a backend lookup to make.
    """

    __slots__ = ("_event", "_fired", "_key", "_registry")

    def __init__(self, registry: dict[str, set[FillWaiter]], key: str) -> None:
        self._registry = registry
        self._key = key
        self._fired = False
        self._event: anyio.Event | None = None
        registry.setdefault(key, set()).add(self)

    def fire(self) -> None:
        self._fired = True
        if self._event is not None:
            self._event.set()

    async def wait(self, timeout: float) -> bool:
        """True if a fill of the key was announced within ``timeout`` seconds."""
        if not self._fired:
            self._event = event = anyio.Event()
            with anyio.move_on_after(timeout):
                await event.wait()
        return self._fired

    def close(self) -> None:
        waiters = self._registry.get(self._key)
        if waiters is not None:
            waiters.discard(self)
            if not waiters:
                del self._registry[self._key]


def wake(registry: dict[str, set[FillWaiter]], key: str) -> None:
    for waiter in registry.pop(key, ()):
        waiter.fire()


class Notifications:
    """What a store hears from other processes (or its own): fills, invalidations, losing the line."""

    def __init__(self) -> None:
        self.waiters: dict[str, set[FillWaiter]] = {}
        self.on_invalidate: list[Callable[[Sequence[str]], None]] = []
        self.on_lost: list[Callable[[], None]] = []
        self.on_connected: list[Callable[[], None]] = []

    def waiter(self, key: str) -> FillWaiter:
        return FillWaiter(self.waiters, key)

    def filled(self, key: str) -> None:
        wake(self.waiters, key)

    def invalidated(self, tags: Sequence[str]) -> None:
        for callback in self.on_invalidate:
            callback(tags)

    def lost(self) -> None:
        for callback in self.on_lost:
            callback()

    def connected(self) -> None:
        for callback in self.on_connected:
            callback()


@runtime_checkable
class Store(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None if absent or expired. One round trip."""

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds (> 0), replacing any value."""

    async def delete(self, *keys: str) -> int:
        """Remove the keys; return how many existed."""

    notifications: Notifications

    async def lock(self, key: str, ttl: float, generation_keys: Sequence[str], token: str | None = None
                   ) -> LockResult:
        """Try to take ``key``'s fill lock for ``ttl`` seconds; also read the key and the generations."""

    async def fill(self, key: str, value: bytes, ttl: float, token: str | None, tag_sets: Sequence[str],
                   generation_keys: Sequence[str], generations: Sequence[int]) -> bool:
        """Store a fill, index it under ``tag_sets``, release the lock ``token``, wake waiters.

        If a generation moved since ``generations`` were read (an invalidation ran
        while the response was made), the value is removed again and False returned:
        an invalidated entry never comes back.
        """

    async def invalidate(self, tag_sets: Sequence[str], generation_keys: Sequence[str], message: str) -> int:
        """Bump the generations, delete every entry indexed under the tag sets, publish ``message``."""

    async def purge(self, pattern: str, generation_key: str, message: str) -> int:
        """Bump ``generation_key``, delete every entry whose key matches ``pattern``, publish ``message``."""

    async def publish_invalidation(self, message: str) -> None:
        """Tell other processes (their L1) what was invalidated."""

    async def unlock(self, key: str, token: str) -> None:
        """Release the fill lock without a fill (the response could not be stored)."""

    @property
    def listening(self) -> bool:
        """True while announcements from other processes reach ``notifications``."""

    async def listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run for the app's lifetime: receive fill and invalidation announcements."""

    async def aclose(self) -> None:
        """Release connections. The store is not used afterwards."""
