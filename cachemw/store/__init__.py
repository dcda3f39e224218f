"""Stores: where cached entries live. The middleware only sees the ``Store`` protocol."""

from __future__ import annotations

from urllib.parse import urlsplit

from cachemw.core.keyspace import entry_prefix, fill_channel, invalidation_channel
from cachemw.store.base import Store, StoreError, requires_asyncio, unsupported_event_loop
from cachemw.store.memory import MemoryStore
from cachemw.store.redis import RedisStore

__all__ = ["MemoryStore", "RedisStore", "Store", "StoreError", "requires_asyncio", "store_from_url",
           "unsupported_event_loop"]

_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel")


def store_from_url(url: str | None, *, timeout: float, memory_max_bytes: int, prefix: str = "cachemw",
                   background_timeout: float = 2.0, grace: float | None = None, tracking: bool = True) -> Store:
    """The store a configuration names: no URL means the in-process memory store.

    ``tracking``: Redis reports changes to the entry keys, where it can (``redis_pubsub``).
    """
    if url is None:
        return MemoryStore(max_bytes=memory_max_bytes)
    scheme = urlsplit(url).scheme.lower()
    if scheme in _REDIS_SCHEMES:
        # Announcements under the prefix: apps sharing a Redis don't hear each other.
        store = RedisStore.from_url(url, timeout=timeout, background_timeout=background_timeout, grace=grace)
        store.channel = fill_channel(prefix)
        store.invalidation_channel = invalidation_channel(prefix)
        store.track(entry_prefix(prefix) if tracking else None)
        return store
    accepted = ", ".join(f"{s}://" for s in _REDIS_SCHEMES)
    # Don't echo the whole URL: it may carry a password.
    raise ValueError(
        f"unsupported store URL scheme {scheme + '://' if scheme else '(none)'}: "
        f"accepted are {accepted}, or no URL for the in-process memory store"
    )
