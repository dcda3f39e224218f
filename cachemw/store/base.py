"""The store contract: a handful of async operations on opaque values.

Stores know nothing of HTTP: they keep bytes under string keys for a bounded
time, and coordinate fills of one key across processes (a short lock, and a
wake-up for those waiting on it). Every driver failure crosses this boundary as
``StoreError`` so the middleware can fail open with one ``except``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio
from anyio.abc import TaskStatus

__all__ = [
    "LOCAL",
    "MAX_FILL_MESSAGE",
    "MAX_INVALIDATION_MESSAGE",
    "FillWaiter",
    "LockResult",
    "Notifications",
    "Store",
    "StoreCapabilities",
    "StoreError",
    "StoreTimeout",
    "decode_fill",
    "decode_invalidation",
    "decode_tracked_keys",
    "requires_asyncio",
    "unsupported_event_loop",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_INVALIDATION_MESSAGE = 1 << 20
"""Longest invalidation announcement read (bytes): a JSON list of tags. Longer ones are dropped unread."""
MAX_FILL_MESSAGE = 64 << 10
"""Longest fill announcement read (bytes): one entry key."""


class StoreError(Exception):
    """The store could not answer (down, slow, refused, full, or misused)."""


class StoreTimeout(StoreError, TimeoutError):
    """The store did not answer within its time budget (a store that keeps the budget itself raises it).

    ``lateness``: how late this process's own event loop ran while the call waited, as the
    store measured it (None: not measured); ``first_connect``: it ran out while the
    process made its first connection to the store. Either way not the store's failure
    alone, for the breaker to weigh.
    """

    def __init__(self, message: str, *, lateness: float | None = None, first_connect: bool = False) -> None:
        super().__init__(message)
        self.lateness = lateness
        self.first_connect = first_connect


class ScriptMissing(StoreError):
    """The server does not know a script (it restarted, failed over, or its scripts were flushed): sent
    again in full, not a failing store."""


@dataclass(frozen=True, slots=True)
class StoreCapabilities:
    """What the runtime may rely on, declared by each store instead of probed for.

    ``remote``: another process answers, so calls get a time budget and a breaker.
    ``keeps_budget``: the store bounds its own calls by the budget (no cancel scope of ours).
    ``lookup_locks``: ``get_or_lock`` is one round trip (a miss's lookup also tries the lock).
    ``sharded``: keys live on several nodes (``shard`` names one): a breaker per node.
    ``sends_fills``: the store is a ``FillSender`` too (``fill_nowait``).
    """

    remote: bool = False
    keeps_budget: bool = False
    lookup_locks: bool = False
    sharded: bool = False
    sends_fills: bool = False


LOCAL = StoreCapabilities()
"""An in-process store: no budget, no breaker, nothing to shard."""


class FillSender(Protocol):
    """A store that can send a fill without a coroutine around it (``StoreCapabilities.sends_fills``)."""

    def fill_nowait(self, key: str, value: bytes, ttl: float, token: str | None, tag_sets: Sequence[str],
                    generation_keys: Sequence[str], generations: Sequence[int]) -> asyncio.Future[Any] | None:
        """``fill``, written at once with the background budget: a future of its reply (true: stored), or
        None where it cannot be sent so (not connected yet, another loop); the caller then awaits ``fill``.

        A miss's fill awaited in a job of its own holds that job's frames across the round
        trip, and the collector walks them: this is a third of what a miss costs.
        """


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


def decode_invalidation(data: object) -> list[str] | None:
    """The tags an invalidation announcement names, or None for anything else.

    The channel is attacker-writable: the size is bounded before anything is parsed,
    the bytes must be UTF-8, the JSON a flat list of strings. Never raises (deep
    nesting is a ``RecursionError`` inside ``json.loads``: caught like the rest).
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_INVALIDATION_MESSAGE:
        return None
    try:
        tags = json.loads(bytes(data).decode("utf-8"))
        if not isinstance(tags, list) or not all(type(tag) is str for tag in tags):
            return None
        "".join(tags).encode("utf-8")  # no lone surrogates from "\ud800" escapes
    except (ValueError, RecursionError, MemoryError):  # UnicodeError and JSONDecodeError are ValueErrors
        return None
    return tags


MAX_TRACKED_KEYS = 1 << 16
"""Most keys one tracking message may name; a longer list is dropped (and the L1 flushed: see ``keys_message``)."""


def decode_tracked_keys(data: object) -> list[str] | None:
    """The keys a tracking invalidation names (Redis sends a list of key names), or None for anything else.

    ``__redis__:invalidate`` is an ordinary channel anyone may publish to: bounded, UTF-8, a flat list.
    """
    if not isinstance(data, list) or len(data) > MAX_TRACKED_KEYS:
        return None
    keys: list[str] = []
    for item in data:
        if not isinstance(item, bytes) or len(item) > MAX_FILL_MESSAGE:
            return None
        try:
            keys.append(item.decode("utf-8"))
        except ValueError:
            return None
    return keys


def decode_fill(data: object) -> str | None:
    """The entry key a fill announcement names, or None for anything else (bounded, UTF-8)."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_FILL_MESSAGE:
        return None
    try:
        return bytes(data).decode("utf-8")
    except ValueError:
        return None


class Notifications:
    """What a store hears from other processes (or its own): fills, invalidations, losing the line.

    ``rejected`` counts announcements dropped because they did not decode (see
    ``decode_invalidation``), and those whose handling failed: the channel is
    untrusted input, and the subscription survives all of them.
    """

    def __init__(self) -> None:
        self.waiters: dict[str, set[FillWaiter]] = {}
        self.on_invalidate: list[Callable[[Sequence[str]], None]] = []
        self.on_lost: list[Callable[[], None]] = []
        self.on_connected: list[Callable[[], None]] = []
        # Keys Redis says changed (client-side caching): the L1 evicts them; None is a flush of everything.
        self.on_evict: list[Callable[[Sequence[str] | None], None]] = []
        self.link_bound = 0.25
        """How long the announcement link may stay silent (no PING answer) before what it carried no longer
        counts as heard: the runtime sets a fraction of its smallest ``sync``."""
        self.rejected = 0
        self._warned = False

    def invalidation_message(self, data: object) -> None:
        """An invalidation announcement as it arrived on the channel: decoded, checked, acted on."""
        self._deliver(data, decode_invalidation, self.invalidated, "an invalidation announcement")

    def fill_message(self, data: object) -> None:
        """A fill announcement as it arrived on the channel."""
        self._deliver(data, decode_fill, self.filled, "a fill announcement")

    def _deliver(self, data: object, decode: Callable[[object], _T | None], handle: Callable[[_T], None],
                 what: str) -> None:
        value = decode(data)
        if value is None:
            self._reject(f"{what} that does not decode", data)
            return
        try:
            handle(value)
        except Exception:
            self._reject(f"{what} whose handling failed", data, exc_info=True)

    def _reject(self, what: str, data: object, *, exc_info: bool = False) -> None:
        self.rejected += 1
        if not self._warned:  # once: anyone who can publish could otherwise fill the log
            self._warned = True
            size = len(data) if isinstance(data, (bytes, bytearray, memoryview, str)) else None
            logger.warning("cachemw: dropped %s (%s bytes; counted in notifications.rejected, logged once)",
                           what, size, exc_info=exc_info)

    def keys_message(self, data: object) -> None:
        """A tracking invalidation as it arrived: ``None`` (Redis flushed the database) evicts everything.

        One that does not decode is counted as rejected and evicts everything too: it might have named
        our keys, and an L1 that forgets is only slower, never wrong.
        """
        keys = None if data is None else decode_tracked_keys(data)
        if keys is None and data is not None:
            self._reject("a tracking message that does not decode", data)
        for callback in self.on_evict:
            try:
                callback(keys)
            except Exception:
                self._reject("a tracking message whose handling failed", data, exc_info=True)

    def waiter(self, key: str) -> FillWaiter:
        return FillWaiter(self.waiters, key)

    def filled(self, key: str) -> None:
        wake(self.waiters, key)

    def invalidated(self, tags: Sequence[str]) -> None:
        """Every callback hears it, even after one failed (the L1 dropping its copies, the fills detaching)."""
        failed: Exception | None = None
        for callback in self.on_invalidate:
            try:
                callback(tags)
            except Exception as exc:
                failed = exc
        if failed is not None:
            raise failed  # counted and logged once as a message whose handling failed

    def lost(self) -> None:
        for callback in self.on_lost:
            callback()

    def connected(self) -> None:
        for callback in self.on_connected:
            callback()


def requires_asyncio(store: object) -> bool:
    """True if ``store`` works only on an asyncio event loop (asyncio or uvloop): the Redis store."""
    return bool(getattr(store, "requires_asyncio", False))


def unsupported_event_loop(store: object) -> str | None:
    """Why ``store`` cannot work in the async library running now (trio), or None if it can.

    For a check at startup (the lifespan runs in the app's event loop): refuse the
    configuration with this message instead of failing every store call.
    """
    if not requires_asyncio(store):
        return None
    from cachemw.store.loops import NEEDS_ASYNCIO, current_library

    library = current_library()
    if library in (None, "asyncio"):
        return None
    return f"{NEEDS_ASYNCIO}; this app runs on {library}: use the memory store (no redis_url) or run on asyncio"


@runtime_checkable
class Store(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None if absent or expired. One round trip."""

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds (> 0), replacing any value."""

    async def delete(self, *keys: str) -> int:
        """Remove the keys; return how many existed."""

    notifications: Notifications

    @property
    def capabilities(self) -> StoreCapabilities:
        """What the runtime may rely on; read-only here, so a wrapper may derive it from its inner store."""

    async def connect(self, timeout: float) -> None:
        """Open the connection now (the startup probe), within ``timeout``; a local store has nothing to open."""

    def shard(self, key: str) -> str:
        """The node ``key`` lives on (for a breaker per node); one name for an unsharded store."""

    async def get_or_lock(self, key: str, ttl: float, generation_keys: Sequence[str], token: str) -> LockResult:
        """``get``, and where the key holds nothing, ``lock`` too: one round trip where ``lookup_locks``."""

    async def lock(self, key: str, ttl: float, generation_keys: Sequence[str], token: str | None = None, *,
                   timeout: float | None = None) -> LockResult:
        """Try to take ``key``'s fill lock for ``ttl`` seconds; also read the key and the generations.

        ``key`` (here, in ``get_or_lock``, ``fill`` and ``unlock``) is an entry key as
        ``keyspace.entry_key`` makes them: on a sharded store the lock and the wait flag
        beside it must live in its slot, which its hash tag ensures (a Redis Cluster
        refuses a script over keys of several slots).

        ``timeout`` (here and below): the call's own time budget, for work after the
        response (a refresh, a fill, a release, a purge), which may wait longer than a
        request may; None: the store's request-path budget. A store without one ignores it.
        """

    async def fill(self, key: str, value: bytes, ttl: float, token: str | None, tag_sets: Sequence[str],
                   generation_keys: Sequence[str], generations: Sequence[int], *, timeout: float | None = None
                   ) -> bool:
        """Store a fill, index it under ``tag_sets``, release the lock ``token``, wake waiters.

        If a generation moved since ``generations`` were read (an invalidation ran
        while the response was made), the value is removed again and False returned:
        an invalidated entry never comes back.
        """

    async def invalidate(self, tag_sets: Sequence[str], generation_keys: Sequence[str], message: str, *,
                         timeout: float | None = None, stale_from: float | None = None) -> int:
        """Bump the generations, delete every entry indexed under the tag sets, publish ``message``.

        ``stale_from`` (a soft purge; passed only then): instead of deleting, mark each entry
        stale as of that time (``cachemw.core.entry.soften``), deleting those that cannot be
        served stale. Either way, how many entries it touched.
        """

    async def purge(self, pattern: str, generation_key: str, message: str, *, timeout: float | None = None,
                    stale_from: float | None = None) -> int:
        """Bump ``generation_key``, delete (``stale_from``: soften) every entry whose key matches ``pattern``,
        publish ``message``."""

    async def publish_invalidation(self, message: str) -> None:
        """Tell other processes (their L1) what was invalidated."""

    async def unlock(self, key: str, token: str, *, timeout: float | None = None) -> None:
        """Release the fill lock without a fill (the response could not be stored)."""

    @property
    def listening(self) -> bool:
        """True while announcements from other processes reach ``notifications``."""

    async def listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run for the app's lifetime: receive fill and invalidation announcements."""

    async def aclose(self) -> None:
        """Release connections. The store is not used afterwards."""
