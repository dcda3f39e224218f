"""The store contract: a handful of async operations on opaque values.

Stores know nothing of HTTP: they keep bytes under string keys for a bounded
time, and coordinate fills of one key across processes (a short lock, and a
wake-up for those waiting on it). Every driver failure crosses this boundary as
``StoreError`` so the middleware can fail open with one ``except``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import anyio
from anyio.abc import TaskStatus

__all__ = ["FillWaiter", "LockResult", "Store", "StoreError"]


class StoreError(Exception):
    """The store could not answer (down, slow, refused, full, or misused)."""


LockResult = tuple["str | None", "bytes | None"]
"""``(token, value)``: ``token`` is set if the fill lock was taken; ``value`` is what the key holds now."""


class FillWaiter:
    """Registered before a lock attempt, so a fill announced meanwhile is not missed."""

    __slots__ = ("_event", "_key", "_registry")

    def __init__(self, registry: dict[str, set[anyio.Event]], key: str) -> None:
        self._registry = registry
        self._key = key
        self._event = anyio.Event()
        registry.setdefault(key, set()).add(self._event)

    async def wait(self, timeout: float) -> bool:
        """True if a fill of the key was announced within ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            await self._event.wait()
        return self._event.is_set()

    def close(self) -> None:
        events = self._registry.get(self._key)
        if events is not None:
            events.discard(self._event)
            if not events:
                del self._registry[self._key]


def wake(registry: dict[str, set[anyio.Event]], key: str) -> None:
    for event in registry.pop(key, ()):
        event.set()


@runtime_checkable
class Store(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None if absent or expired. One round trip."""

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds (> 0), replacing any value."""

    async def delete(self, *keys: str) -> int:
        """Remove the keys; return how many existed."""

    async def lock(self, key: str, ttl: float) -> LockResult:
        """Try to take ``key``'s fill lock for ``ttl`` seconds; also return the key's value, in one round trip."""

    async def fill(self, key: str, value: bytes, ttl: float, token: str | None) -> None:
        """Store a fill, release the lock ``token`` if still held, and wake those waiting for ``key``."""

    async def unlock(self, key: str, token: str) -> None:
        """Release the fill lock without a fill (the response could not be stored)."""

    def waiter(self, key: str) -> FillWaiter:
        """Start listening for a fill of ``key`` (announced by ``fill`` in any process)."""

    async def listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run for the app's lifetime: receive fill announcements from other processes."""

    async def aclose(self) -> None:
        """Release connections. The store is not used afterwards."""
