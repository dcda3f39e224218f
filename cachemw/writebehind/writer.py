"""``WriteBehind``: a named queue's public face, ``put``/``get`` in requests and the flusher as a service.

It picks the backend (Redis, or this process's memory), checks what it is
given, and runs a ``Flusher`` under a supervisor; the flushing itself is there.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskStatus

from cachemw.runtime.supervisor import Supervisor
from cachemw.store.base import StoreError
from cachemw.writebehind.backend import Backend
from cachemw.writebehind.flusher import Flusher
from cachemw.writebehind.memory import MemoryBackend
from cachemw.writebehind.stream import RedisBackend, StreamKeys
from cachemw.writebehind.validation import check_key, check_name, check_tuning
from cachemw.writebehind.values import (
    DeadLetter,
    FlushFunction,
    JsonSerializer,
    Serializer,
    VersionConflict,
    WriteBehindStatus,
)

__all__ = ["WriteBehind"]

logger = logging.getLogger("cachemw.writebehind")  # one logger for the whole package, as before it was split

V = TypeVar("V")


class WriteBehind(Generic[V]):
    """A named write-behind queue: ``put``/``get`` in requests, ``flush`` batches later.

    ``flush`` may be None in processes that only put (a flusher runs elsewhere).
    Without ``redis_url`` it takes the one it is attached with (the middleware's);
    None there means the in-process memory backend (see the package docstring).

    Tuning: ``batch_size`` writes or ``batch_delay`` seconds make a batch;
    ``max_attempts`` failures alone (while others succeed) dead-letter a write;
    retries wait ``retry_backoff`` doubling up to ``max_backoff``; a flusher's
    writes are claimed by another after ``claim_idle`` seconds without sign of
    life; a flush taking longer than ``flush_timeout`` failed; at most
    ``max_in_flight`` writes are held in memory (the rest waits in Redis);
    ``retain`` seconds after its latest version reached the database a value
    expires from Redis (None: kept), after which ``get`` returns None and the
    database has it; ``timeout`` bounds ``put``/``get``; ``grace_period`` bounds
    the last flush at shutdown (default: the supervisor's).
    """

    def __init__(
        self,
        name: str,
        flush: FlushFunction[V] | None = None,
        *,
        redis_url: str | None = None,
        key_prefix: str | None = None,
        serializer: Serializer[V] | None = None,
        batch_size: int = 100,
        batch_delay: float = 0.05,
        max_attempts: int = 10,
        retry_backoff: float = 0.1,
        max_backoff: float = 30.0,
        claim_idle: float = 30.0,
        flush_timeout: float = 30.0,
        max_in_flight: int | None = None,
        retain: float | None = None,
        timeout: float = 1.0,
        grace_period: float | None = None,
    ) -> None:
        check_name("write-behind name", name)
        if key_prefix is not None:
            check_name("key_prefix", key_prefix)
        check_tuning(batch_size=batch_size, batch_delay=batch_delay, max_attempts=max_attempts,
                     retry_backoff=retry_backoff, max_backoff=max_backoff, claim_idle=claim_idle,
                     flush_timeout=flush_timeout, retain=retain, timeout=timeout, grace_period=grace_period)
        self.name = name
        self._flush = flush
        self.serializer: Serializer[V] = serializer if serializer is not None else JsonSerializer()
        self.batch_size = batch_size
        self.batch_delay = batch_delay
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.max_backoff = max(max_backoff, retry_backoff)
        self.claim_idle = claim_idle
        self.flush_timeout = flush_timeout
        self.max_in_flight = max(max_in_flight if max_in_flight is not None else 10 * batch_size, batch_size)
        self.retain = retain
        self.timeout = timeout
        self.grace_period = grace_period
        self._grace = 10.0 if grace_period is None else grace_period
        self._explicit_url = redis_url
        self._explicit_prefix = key_prefix
        self._settings: tuple[str | None, str] | None = None
        self._backend: Backend | None = None
        # One consumer name per object: a flusher restarted in this process finds its own pending writes.
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._stop_scope: anyio.CancelScope | None = None
        self._stopped: anyio.Event | None = None
        self._stopping = False
        if redis_url is not None:
            self._configure(None, None)

    # -- wiring ----------------------------------------------------------------------------------

    def _configure(self, redis_url: str | None, key_prefix: str | None) -> None:
        url = self._explicit_url if self._explicit_url is not None else redis_url
        prefix = self._explicit_prefix or key_prefix or "cachemw"
        if self._settings is not None:
            if self._settings != (url, prefix):
                raise ValueError(
                    f"write-behind {self.name!r} already uses {'Redis' if self._settings[0] else 'memory'} with "
                    f"prefix {self._settings[1]!r}; it cannot switch to another store or prefix. HINT: create one "
                    "WriteBehind per app, or pass redis_url= and key_prefix= to WriteBehind itself.")
            return
        if url is not None:
            self._backend = RedisBackend(url, StreamKeys(prefix, self.name), self.consumer, self.timeout)
        else:
            self._backend = MemoryBackend()
        self._settings = (url, prefix)

    @property
    def backend(self) -> str | None:
        """``"redis"``, ``"memory"``, or None before it is attached."""
        return None if self._backend is None else self._backend.kind

    def attach(self, supervisor: Supervisor, *, redis_url: str | None = None, key_prefix: str | None = None) -> None:
        """Run the flusher as a service of ``supervisor``; take its app's Redis unless given one.

        ``CacheMiddleware(write_behind=[...])`` calls this with its settings.
        """
        self._configure(redis_url, key_prefix)
        self._stopping = False
        if self.grace_period is None:
            self._grace = supervisor.grace_period
        if self._flush is not None:
            supervisor.add_service(f"writebehind:{self.name}", self.run_flusher)

    @asynccontextmanager
    async def running(self, *, redis_url: str | None = None,
                      key_prefix: str | None = None) -> AsyncIterator[WriteBehind[V]]:
        """For apps without the middleware: ``async with carts.running(redis_url=...):`` in the lifespan.

        The flusher runs (restarted if it fails) until the block ends, then flushes
        what it can within the grace period.
        """
        supervisor = Supervisor(grace_period=self._grace)
        self.attach(supervisor, redis_url=redis_url, key_prefix=key_prefix)
        try:
            async with supervisor.run():
                yield self
                await self.stop()
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()

    def _require_backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError(
                f"write-behind {self.name!r} has no store yet. HINT: pass it to CacheMiddleware(write_behind=[...]), "
                "call attach(supervisor, redis_url=...), use `async with writes.running(redis_url=...)`, or give "
                "WriteBehind a redis_url.")
        return self._backend

    async def run_flusher(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The flusher, until cancelled or ``stop()``; then it flushes what it can within the grace period."""
        flush = self._flush
        if flush is None:
            raise RuntimeError(f"write-behind {self.name!r} has no flush function. HINT: WriteBehind(name, "
                               "flush=save_batch) in the process that runs the flusher.")
        if self._stop_scope is not None:
            raise RuntimeError(f"the flusher of write-behind {self.name!r} is already running")
        backend = self._require_backend()
        if self._stopping:
            task_status.started()
            return
        await backend.join()
        flusher = Flusher(self, backend, flush)
        scope = self._stop_scope = anyio.CancelScope()
        stopped = self._stopped = anyio.Event()
        task_status.started()
        try:
            with scope:
                await flusher.run()
        finally:
            self._stop_scope = None
            with anyio.CancelScope(shield=True):
                await self._finish(flusher, backend)
                stopped.set()

    async def _finish(self, flusher: Flusher[V], backend: Backend) -> None:
        with anyio.move_on_after(self._grace):
            try:
                await flusher.finish()
            except StoreError as exc:
                logger.warning("cachemw: write-behind %s: last flush at shutdown failed: %s", self.name, exc)
        try:
            left = await backend.leave()
        except StoreError as exc:
            logger.warning("cachemw: write-behind %s: %s", self.name, exc)
            return
        if left and backend.kind == "memory":
            logger.warning("cachemw: write-behind %s: %d writes were never flushed and are lost with this "
                           "process (memory backend)", self.name, left)
        elif left:
            logger.info("cachemw: write-behind %s: %d writes left in Redis; another flusher takes them over after "
                        "%.0fs", self.name, left, self.claim_idle)

    async def stop(self) -> None:
        """Stop the flusher after one last flush (within the grace period); returns when it is done."""
        self._stopping = True
        scope, stopped = self._stop_scope, self._stopped
        if scope is None or stopped is None:
            return
        scope.cancel()
        await stopped.wait()

    async def aclose(self) -> None:
        """Close the Redis connections (they reopen if used again)."""
        if self._backend is not None:
            await self._backend.aclose()

    # -- reading and writing ---------------------------------------------------------------------

    async def put(self, key: str, value: V, *, if_version: int | None = None) -> int:
        """Store ``value``: readable at once from every server, durable in Redis, flushed later.

        Returns the write's version. ``if_version`` writes only if the key is at
        that version (0: absent), else raises ``VersionConflict``. A ``StoreError``
        (Redis down or slow) leaves it unknown whether the write happened:
        putting the same value again is safe.
        """
        check_key(key)
        data = self.serializer.dumps(value)
        done, version = await self._require_backend().put(key, data, if_version)
        if not done:
            raise VersionConflict(key, if_version or 0, version)
        return version

    async def get(self, key: str) -> V | None:
        """The latest value put, from any server; None if there is none (or ``retain`` let it expire)."""
        value, _ = await self.get_versioned(key)
        return value

    async def get_versioned(self, key: str) -> tuple[V | None, int]:
        """The value and its version (0 when absent), for ``put(..., if_version=...)``."""
        check_key(key)
        data, version = await self._require_backend().get(key)
        if data is None:
            return None, 0
        return self.serializer.loads(data), version

    async def update(self, key: str, change: Callable[[V | None], Awaitable[V]], *, attempts: int = 16) -> V:
        """Read, ``change``, put if nobody wrote the key meanwhile, else again: no lost updates across servers.

        ``change`` gets None when the key is absent (load it from the database then).
        """
        for attempt in range(max(1, attempts)):
            current, version = await self.get_versioned(key)
            value = await change(current)
            try:
                await self.put(key, value, if_version=version)
            except VersionConflict:
                if attempt + 1 >= attempts:
                    raise
                continue
            return value
        raise AssertionError("unreachable")  # pragma: no cover

    # -- operating -------------------------------------------------------------------------------

    async def status(self) -> WriteBehindStatus:
        """Backlog, lag and counters, shared by every process on this Redis."""
        return await self._require_backend().status(self.name)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters."""
        return await self._require_backend().dead_letters(limit)

    async def retry_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        """Move dead letters (all, or these ids) back to the stream; returns how many moved.

        Each keeps its version, so one superseded meanwhile cannot overwrite the newer value.
        """
        return await self._require_backend().requeue(ids)
