"""The store contract: a handful of async byte operations.

Stores know nothing of HTTP: they keep opaque values under string keys for a
bounded time. Every driver failure crosses this boundary as ``StoreError`` so
the middleware can fail open with one ``except``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Store", "StoreError"]


class StoreError(Exception):
    """The store could not answer (down, slow, refused, full, or misused)."""


@runtime_checkable
class Store(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None if absent or expired. One round trip."""

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds (> 0), replacing any value."""

    async def delete(self, *keys: str) -> int:
        """Remove the keys; return how many existed."""

    async def aclose(self) -> None:
        """Release connections. The store is not used afterwards."""
