"""Storing what the origin answered, after the response, and refreshing stale entries in the background.

A fill runs as a supervised job, so the response never waits for the store; a
fill that cannot be queued (the queue is full) is counted per route and its lock
released. A refresh keeps the stale entry answering meanwhile, takes the key's
lock so one process refreshes it, and calls the origin through the shell.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import anyio

from cachemw.core.entry import PASS_MARKER, Entry, encode_entry, entry_cost
from cachemw.core.keyspace import tag_keys
from cachemw.core.metrics import Metrics, RouteMetrics
from cachemw.core.sizes import bytes_cost
from cachemw.runtime.locks import FillLocks, fresh_entry
from cachemw.runtime.origin import OriginSlots
from cachemw.runtime.plan import FILL_PLAN_BYTES, FillPlan
from cachemw.runtime.supervisor import Supervisor
from cachemw.store.base import FillSender, ScriptMissing, Store, StoreError
from cachemw.store.guarded import GuardedStore
from cachemw.store.l1 import L1

__all__ = ["Fills"]

_SENT_BYTES = 512  # a sent fill's command beyond its value: the keys, the arguments, the connection's future

OriginCall = Callable[[], Awaitable["Entry | None"]]
"""Runs the app for a request nobody waits on: the entry if its response may be stored, else None."""


class Fills:
    """Fills and refreshes of one runtime."""

    def __init__(self, store: Store, guarded: GuardedStore, locks: FillLocks, supervisor: Supervisor, l1: L1,
                 metrics: Metrics, origin: OriginSlots, *, prefix: str, pass_ttl: float) -> None:
        self.store = store
        self.guarded = guarded
        self.locks = locks
        self.supervisor = supervisor
        self.l1 = l1
        self.metrics = metrics
        self.origin = origin
        self.prefix = prefix
        self.pass_ttl = pass_ttl
        self.refreshing: set[str] = set()  # keys with a refresh queued or running in this process
        self._l1_on = guarded.remote  # only a remote store has an L1 in front of it
        self.sender = cast(FillSender, store) if store.capabilities.sends_fills else None

    def route_metrics(self, plan: FillPlan) -> RouteMetrics:
        return self.metrics.route(plan.match.rule.template, plan.policy.preset or "custom")

    def submit(self, plan: FillPlan, entry: Entry) -> None:
        """Send or queue the fill of a response just sent; with the queue full, count it shed and give the
        lock back."""
        if plan.generations is not None:
            size = entry_cost(entry) + FILL_PLAN_BYTES
            plan.filling = self._send(plan, entry, size) or self.supervisor.submit(
                "fill", self.fill, plan, entry, key=plan.key, timeout=math.inf, size=size)
            if not plan.filling and self.supervisor.running:
                self.route_metrics(plan).fills_shed += 1  # the queue was full
        if not plan.filling:
            self.locks.give_up(plan)

    def _send(self, plan: FillPlan, entry: Entry, size: int) -> bool:
        """The usual fill, written to the store now and finished by a callback: no job, no coroutine held
        across its round trip. False where it must be a job (not sendable so, traced, breaker open)."""
        sender = self.sender
        supervisor = self.supervisor
        if sender is None or supervisor.wrap_job is not None or self.guarded.is_open(plan.key):
            return False
        policy = plan.policy
        try:
            data = encode_entry(entry, ttl=policy.ttl, stale_while_revalidate=policy.stale_while_revalidate)
        except Exception:  # runs in the request's task: whatever it is, the job meets it behind its barrier
            return False  # (and releases the lock)
        # In flight, the encoded entry and the command that carries it are held too (until the reply):
        # the bytes bound counts them, or a slow Redis would hold three times what it says.
        size += _SENT_BYTES + 2 * bytes_cost(data)
        if not supervisor.start_detached("fill", size):
            return False
        assert plan.generations is not None
        began = time.perf_counter()
        try:
            sent = sender.fill_nowait(plan.key, data, policy.usable_for, plan.token,
                                      [tag_keys(self.prefix, tag)[0] for tag in entry.tags], plan.generation_keys,
                                      plan.generations)
        except Exception:  # the connection closed, too many commands in flight: the job waits its turn
            sent = None
        if sent is None:
            supervisor.end_detached("fill", size, done=None)
            return False
        sent.add_done_callback(functools.partial(self._sent, plan, entry, size, len(data), self.l1.seq, began))
        return True

    def _sent(self, plan: FillPlan, entry: Entry, size: int, stored_bytes: int, ticket: int, began: float,
              reply: asyncio.Future[Any]) -> None:
        """A sent fill's reply: counted as a job's; a failure is retried by a job, within its own deadline."""
        supervisor = self.supervisor
        failure = StoreError("the fill's connection was closed") if reply.cancelled() else reply.exception()
        error = failure if failure is None or isinstance(failure, Exception) else StoreError(repr(failure))
        if error is None:
            supervisor.end_detached("fill", size)
            if reply.result():
                self._stored(plan, entry, stored_bytes, ticket)
            return
        if not isinstance(error, ScriptMissing):  # a restart's lost script is sent again in full, not a failure
            self.guarded.failed(self.guarded.breaker_for(plan.key), error, began, budget=self.guarded.background_budget)
        supervisor.end_detached("fill", size, done=None)
        if not supervisor.submit("fill", self.fill, plan, entry, key=plan.key, timeout=math.inf, size=size):
            self.locks.give_up(plan)  # shutting down, or the queue is full: the lock goes now

    async def fill(self, plan: FillPlan, entry: Entry) -> None:
        if plan.generations is None:
            return
        try:
            policy = plan.policy
            data = encode_entry(entry, ttl=policy.ttl, stale_while_revalidate=policy.stale_while_revalidate)
        except ValueError:
            if plan.token is not None:
                await self.locks.unlock(plan.key, plan.token)
            return
        ticket = self.l1.seq
        if await self._store(plan, data, plan.policy.usable_for, entry.tags):
            self._stored(plan, entry, len(data), ticket)

    def _stored(self, plan: FillPlan, entry: Entry, stored_bytes: int, ticket: int) -> None:
        route_metrics = self.route_metrics(plan)
        route_metrics.stored_entries += 1
        route_metrics.stored_bytes += stored_bytes
        if plan.policy.sync > 0 and self._l1_on:
            self.l1.put(plan.key, entry, plan.policy.sync, ticket)

    def pass_through(self, plan: FillPlan) -> None:
        """The key's response could not be stored: remember that for ``pass_ttl`` (hit-for-pass).

        Its next requests, here and on every other server, go to the app at once
        instead of taking the lock one after another; the marker is stored by the same
        script as a fill, so it releases the lock, wakes the waiters (who find it and
        go to the app), and a purge of the key's tags forgets it.
        """
        if plan.generations is None or plan.token is None or self.pass_ttl <= 0 or not self.supervisor.submit(
                "fill", self.store_pass, plan, key=plan.key, timeout=math.inf, size=FILL_PLAN_BYTES):
            self.locks.give_up(plan)
            return
        plan.filling = True

    async def store_pass(self, plan: FillPlan) -> None:
        await self._store(plan, PASS_MARKER, self.pass_ttl, plan.tags)

    async def _store(self, plan: FillPlan, data: bytes, ttl: float, tags: tuple[str, ...]) -> bool:
        """``data`` under the plan's key unless a generation moved; the lock is released either way."""
        store, guarded = self.store, self.guarded
        assert plan.generations is not None
        if guarded.is_open(plan.key):
            # Don't hammer a store that is down: the next miss after it recovers refills. The
            # lock is still released (one small command), or its waiters would wait it out.
            if plan.token is not None:
                await self.locks.unlock(plan.key, plan.token)
            return False
        tag_sets = [tag_keys(self.prefix, tag)[0] for tag in tags]
        generations, token = plan.generations, plan.token
        try:
            return await guarded.in_background(plan.key, lambda left: store.fill(
                plan.key, data, ttl, token, tag_sets, plan.generation_keys, generations, timeout=left))
        except Exception:  # counted by the guarded store; this fill is lost, the next miss refills
            if plan.token is not None:
                await self.locks.unlock(plan.key, plan.token)  # a lost fill must not leave its lock to expire
            return False

    # -- stale-while-revalidate ------------------------------------------------------------------

    def refresh_later(self, plan: FillPlan, call_origin: OriginCall) -> None:
        """One refresh per key in this process (``refreshing``); the lock makes it one across processes."""
        key = plan.key
        self.refreshing.add(key)
        if not self.supervisor.submit("refresh", self.refresh, plan, call_origin, key=key,
                                      timeout=plan.policy.origin_timeout + self.locks.lock_timeout):
            self.refreshing.discard(key)

    async def refresh(self, plan: FillPlan, call_origin: OriginCall) -> None:
        # The stale entry keeps answering meanwhile: with the origin saturated, a later request retries.
        slot = self.origin.take_nowait(plan.match.rule.template)
        try:
            if slot is None:
                return
            locked = await self.locks.lock(plan, background=True)
            if locked is None:
                return
            token, current, generations = locked
            if token is None:
                return  # another process is refreshing it
            plan.token, plan.generations = token, generations
            if fresh_entry(current, plan.policy) is not None:
                await self.locks.unlock(plan.key, token)
                return
            entry: Entry | None = None
            try:
                with anyio.fail_after(plan.policy.origin_timeout):
                    entry = await call_origin()
            finally:
                if entry is None:
                    await self.locks.unlock(plan.key, token)  # a failed refresh keeps the old entry
            if entry is not None:
                await self.fill(plan, entry)
                self.route_metrics(plan).refresh_ok += 1
            else:
                self.route_metrics(plan).refresh_failed += 1
        except Exception:
            self.route_metrics(plan).refresh_failed += 1
            raise
        finally:
            if slot is not None:
                slot.release()
            self.refreshing.discard(plan.key)
