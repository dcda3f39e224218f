"""The flusher: the anyio loop that reads writes from a backend, flushes them in batches and acknowledges them.

It owns the timing and the I/O; what to batch, retry, split or dead-letter is
decided by ``rules``. Delivery is at least once: see the package docstring.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

import anyio

from cachemw.store.base import StoreError
from cachemw.writebehind.backend import Backend
from cachemw.writebehind.rules import (
    FlushGroup,
    StreamEntry,
    coalesce,
    delivered_too_often,
    describe_failure,
    drop_entries,
    failed_alone,
    resume_groups,
    retry_delay,
    split_in_halves,
    stream_time,
    superseded,
    unfinished,
    with_superseded,
)
from cachemw.writebehind.stream import MAX_BLOCK, group_lost
from cachemw.writebehind.values import FlushFunction, Serializer, Write

__all__ = ["Flusher", "QueueSettings"]

logger = logging.getLogger("cachemw.writebehind")  # one logger for the whole package, as before it was split

V = TypeVar("V")


class QueueSettings(Protocol[V]):
    """What the flusher reads of its ``WriteBehind``, at each use (so it sees the queue's current tuning)."""

    name: str
    serializer: Serializer[V]
    batch_size: int
    batch_delay: float
    max_attempts: int
    retry_backoff: float
    max_backoff: float
    claim_idle: float
    flush_timeout: float
    max_in_flight: int
    retain: float | None


class Flusher(Generic[V]):
    """One run of a flusher: the entries it holds, and the loop that reads, flushes and acknowledges them."""

    def __init__(self, settings: QueueSettings[V], backend: Backend, flush: FlushFunction[V]) -> None:
        self.settings = settings
        self.backend = backend
        self.flush = flush
        self.groups: list[FlushGroup] = []
        self.held: dict[str, StreamEntry] = {}  # delivered to us, neither acknowledged nor dead-lettered
        self.successes = 0
        self.failing = 0  # flushes failed since the last success: an outage is logged once
        self.next_claim = 0.0
        self.next_warning = -math.inf

    def hold(self, entries: Sequence[StreamEntry], due: float, group: FlushGroup | None = None) -> FlushGroup | None:
        """Track entries the moment they are delivered: a cancelled read must not forget them."""
        new = [entry for entry in entries if entry.id not in self.held]
        for entry in new:
            entry.seen = self.successes
            self.held[entry.id] = entry
        if group is not None:
            group.entries.extend(new)
        elif new:
            group = FlushGroup(new, due)
            self.groups.append(group)
        return group

    async def run(self) -> None:
        settings = self.settings
        # After a restart in this process: what this consumer was given before.
        self.hold(await self.backend.own_pending(settings.max_in_flight), 0.0)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._keepalive)
            backoff = settings.retry_backoff
            lost = False
            while True:
                try:
                    if lost:
                        # A read whose reply was lost delivered writes we never saw: they are ours.
                        self.hold(await self.backend.own_pending(settings.max_in_flight), 0.0)
                        lost = False
                    await self._cycle()
                    backoff = settings.retry_backoff
                except StoreError as exc:
                    # Redis is down or slow: everything held stays held, the stream keeps the rest.
                    logger.warning("cachemw: write-behind %s: %s; trying again in %.2fs", settings.name, exc,
                                   backoff)
                    lost = True
                    if group_lost(exc):
                        # What Redis still has (and puts since) would wait for ever: read it from the start.
                        with contextlib.suppress(StoreError):
                            await self.backend.join()
                            logger.warning("cachemw: write-behind %s: Redis lost the consumer group, and with it "
                                           "any writes it did not keep; made it again", settings.name)
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, settings.max_backoff)

    async def _cycle(self) -> None:
        now = anyio.current_time()
        if now >= self.next_claim:
            self.next_claim = now + self.settings.claim_idle / 2
            await self._claim()
        await self._read()
        now = anyio.current_time()
        for group in [g for g in self.groups if g.due <= now]:
            if group in self.groups:  # not emptied by a newer write of its keys meanwhile
                await self._flush_group(group)

    async def _claim(self) -> None:
        settings = self.settings
        room = settings.max_in_flight - len(self.held)
        if room <= 0:
            return
        claimed = [e for e in await self.backend.claim(room, settings.claim_idle) if e.id not in self.held]
        if not claimed:
            return
        logger.info("cachemw: write-behind %s: took over %d writes from a flusher that stopped", settings.name,
                    len(claimed))
        await self.backend.count(claimed=len(claimed))
        fresh = []
        for entry in claimed:
            if delivered_too_often(entry, settings.max_attempts):
                await self._bury(entry, [], f"delivered {entry.deliveries} times: each flusher holding it stopped "
                                 "(crashed or hung) before acknowledging it", entry.deliveries)
            else:
                fresh.append(entry)
        self.hold(fresh, 0.0)

    async def _read(self) -> None:
        """Read new writes into a group: until ``batch_size`` or ``batch_delay`` after the first came."""
        settings = self.settings
        room = min(settings.batch_size, settings.max_in_flight - len(self.held))
        now = anyio.current_time()
        wake = min([g.due for g in self.groups] + [self.next_claim, now + MAX_BLOCK])
        wait = max(0.0, wake - now)
        if room <= 0:
            await anyio.sleep(wait)  # holding all we may: nothing to do until a retry is due
            return
        group = self.hold(await self.backend.read(room, wait), 0.0)
        if group is None or settings.batch_delay <= 0:
            return
        deadline = anyio.current_time() + settings.batch_delay
        while len(group.entries) < room:
            left = deadline - anyio.current_time()
            if left < 0.001:
                return
            more = await self.backend.read(room - len(group.entries), left)
            if not more:
                return
            self.hold(more, 0.0, group)

    async def _keepalive(self) -> None:
        while True:
            await anyio.sleep(max(0.01, self.settings.claim_idle / 3))
            if self.held:
                try:
                    await self.backend.keepalive(list(self.held))
                except StoreError as exc:
                    logger.debug("cachemw: write-behind %s: keepalive failed: %s", self.settings.name, exc)

    async def _flush_group(self, group: FlushGroup) -> None:
        self.groups.remove(group)
        try:
            await self._flush_entries(group)
        except StoreError:
            # Whatever was neither acknowledged nor regrouped goes back, to be flushed again.
            left = unfinished(group, self.held, self.groups)
            if left:
                due = anyio.current_time() + self.settings.retry_backoff
                self.groups.append(FlushGroup(left, due, group.failures))
            raise

    async def _flush_entries(self, group: FlushGroup) -> None:
        settings = self.settings
        winners, older = coalesce(group.entries)
        writes: list[Write[V]] = []
        flushed: list[StreamEntry] = []
        for entry in winners:
            try:
                value = settings.serializer.loads(entry.data)
            except Exception as exc:  # undecodable now means undecodable for ever: nothing to retry
                await self._bury(entry, older[entry.key], f"cannot decode the value: {exc!r}"[:1000], 0)
                continue
            flushed.append(entry)
            writes.append(Write(entry.key, value, entry.version, stream_time(entry.id), len(older[entry.key])))
        if not writes:
            return
        entries = with_superseded(flushed, older)
        try:
            with anyio.fail_after(settings.flush_timeout):
                await self.flush(writes)
        except Exception as exc:  # the barrier: the database's failure is ours to retry
            await self._failed(FlushGroup(entries, 0.0, group.failures), describe_failure(exc, settings.flush_timeout),
                               exc)
            return
        self.successes += 1
        recovered, self.failing = self.failing, 0
        if recovered:
            logger.info("cachemw: write-behind %s: flushing works again (after %d failed flushes)", settings.name,
                        recovered)
        # Flushed but not acknowledged (Redis failed here) means flushed again later: at least once.
        await self.backend.ack(entries, flushed, settings.retain)
        for entry in entries:
            del self.held[entry.id]
        await self._drop_superseded({w.key: w.version for w in flushed})
        self._resume(recovered > 0)

    def _resume(self, recovered: bool) -> None:
        """The database takes writes: what waits for a retry goes now, re-batched after an outage."""
        if self.groups:
            self.groups = resume_groups(self.groups, anyio.current_time(), rebatch=recovered,
                                        batch_size=self.settings.batch_size)

    async def _drop_superseded(self, flushed: dict[str, int]) -> None:
        """Held entries older than a version just flushed are done: acknowledge them without flushing."""
        stale = superseded(self.groups, flushed)
        if not stale:
            return
        await self.backend.ack(stale, [], None)
        gone = {e.id for e in stale}
        self.groups = drop_entries(self.groups, gone)
        for entry_id in gone:
            del self.held[entry_id]

    async def _failed(self, group: FlushGroup, error: str, exc: Exception) -> None:
        settings = self.settings
        self.failing += 1
        now = anyio.current_time()
        if now >= self.next_warning:  # an outage (or a poison write) would log every retry otherwise
            self.next_warning = now + 30.0
            logger.warning("cachemw: write-behind %s: flush failed (%s); retrying with backoff", settings.name,
                           error, exc_info=not isinstance(exc, TimeoutError))
        else:
            logger.debug("cachemw: write-behind %s: flush failed again (%s)", settings.name, error)
        entries = group.entries
        for entry in entries:
            entry.failures += 1
        failures = group.failures + 1
        due = now + retry_delay(failures, settings.retry_backoff, settings.max_backoff)
        retried = len(entries)
        halves = split_in_halves(entries)
        if halves is not None:
            self.groups += [FlushGroup(half, due, failures) for half in halves]
        else:
            winners, older = coalesce(entries)
            winner = winners[0]
            if failed_alone(winner, self.successes, settings.max_attempts):
                retried = 0
                await self._bury(winner, older[winner.key], error, winner.failures)
            else:
                self.groups.append(FlushGroup(entries, due, failures))
        with contextlib.suppress(StoreError):  # a metric: not worth failing the loop for
            await self.backend.count(failed_flushes=1, retried=retried)

    async def _bury(self, winner: StreamEntry, older: Sequence[StreamEntry], error: str, attempts: int) -> None:
        await self.backend.dead_letter(winner, older, error, attempts)
        for entry in (winner, *older):
            self.held.pop(entry.id, None)
        logger.warning("cachemw: write-behind %s: the write of key %r (version %d) moved to the dead-letter stream "
                       "after %d attempts: %s", self.settings.name, winner.key, winner.version, attempts, error)

    async def finish(self) -> None:
        """At shutdown: one more try for what is held, then what is left in the stream while flushes work."""
        # A read cancelled by the shutdown may have been delivered without us seeing the reply.
        self.hold(await self.backend.own_pending(self.settings.max_in_flight), 0.0)
        tried_ok = not self.groups
        for group in list(self.groups):
            if group in self.groups:
                before = self.successes
                await self._flush_group(group)
                tried_ok = tried_ok or self.successes > before
        if not tried_ok:
            return
        while True:
            entries = await self.backend.read(self.settings.batch_size, 0)
            if not entries:
                return
            self.hold(entries, 0.0)
            before = self.successes
            await self._flush_group(self.groups[-1])
            if self.successes == before:
                return  # the database refuses: the rest stays in the stream for the next start
