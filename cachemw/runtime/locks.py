"""Fill locks across processes: take the key's lock, or wait for the process that holds it; never leave one behind.

A lock left behind makes every server's requests for its key wait out its
lifetime and then all call the origin: so a lock whose fill will not happen is
released at once, and a release is never dropped, not even when the background
queue is full (those wait in a small set that a service of its own drains).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Coroutine
from random import getrandbits
from typing import Any

import anyio
from anyio.abc import TaskStatus

from cachemw.core import decide
from cachemw.core.decide import Step
from cachemw.core.entry import Entry, EntryDecodeError, decode_entry, is_pass_marker
from cachemw.core.policy import Policy
from cachemw.runtime.plan import FillPlan
from cachemw.runtime.supervisor import Supervisor
from cachemw.store.base import LockResult, Store
from cachemw.store.guarded import GuardedStore

__all__ = ["PASS_THROUGH", "FillLocks", "PassThrough", "fresh_entry", "new_token"]

_RELEASES_AT_ONCE = 64  # shed lock releases sent concurrently by the release service
_RELEASE_TIMEOUT = 2.0  # one shed lock release: past it the lock expires by itself


class PassThrough:
    """``lock_or_wait``'s answer for a key remembered as uncacheable: call the app, without the lock, store nothing."""

    __slots__ = ()


PASS_THROUGH = PassThrough()


def new_token() -> str:
    """A lock token: 64 random bits, without a system call (``random`` reseeds in a forked child)."""
    return f"{getrandbits(64):016x}"


def fresh_entry(data: bytes | None, policy: Policy) -> Entry | None:
    """The entry ``data`` holds if it is fresh now; None for nothing, a foreign value or a stale one."""
    if data is None:
        return None
    try:
        entry = decode_entry(data)
    except EntryDecodeError:
        return None
    if decide.for_entry(entry.stored_at, policy, time.time()) is Step.SERVE:
        return entry
    return None


class FillLocks:
    """The lock side of fills, under the guarded store's budget and breaker."""

    def __init__(self, store: Store, guarded: GuardedStore, supervisor: Supervisor, *, lock_timeout: float) -> None:
        self.store = store
        self.guarded = guarded
        self.supervisor = supervisor
        self.lock_timeout = lock_timeout
        self.pending_releases: dict[str, str] = {}  # lock releases a full queue shed: key -> token
        # Routes whose last lookup missed: their next lookup also tries the lock (one round trip);
        # a route leaves when a lookup finds a value.
        self.missing: set[str] = set()
        self._releases_wanted: anyio.Event | None = None

    def lock(self, plan: FillPlan, *, lookup: bool = False, background: bool = False
             ) -> Coroutine[Any, Any, LockResult | None]:
        """The plan's lock attempt, to await; None if the store failed (the app answers).

        Not a coroutine itself: a miss's lookup awaits the guarded store's directly, one frame fewer.
        """
        return self.guarded.lock(plan.key, self.lock_timeout, plan.generation_keys, new_token(), lookup=lookup,
                                       background=background, release=self.release)

    async def get_or_lock(self, plan: FillPlan) -> tuple[bytes | None, bool]:
        """A lookup for a route that has been missing: where the key holds nothing, the lock is tried too.

        That attempt's result waits in ``plan.looked_up`` for ``lock_or_wait``.
        """
        waiter = self.store.notifications.waiter(plan.key)  # before the attempt: no announcement slips past
        result = await self.lock(plan, lookup=True)
        if result is None or result[1] is not None:
            waiter.close()
            if result is None:
                return None, True
            self.missing.discard(plan.match.rule.template)
            return result[1], False
        plan.looked_up, plan.waiter = result, waiter
        return None, False

    def drop_lookup_lock(self, plan: FillPlan) -> None:
        """The lookup's lock attempt is not needed after all (another request of this process fills)."""
        if plan.looked_up is not None:
            self.release(plan.key, plan.looked_up[0])
            plan.looked_up = None
        if plan.waiter is not None:
            plan.waiter.close()
            plan.waiter = None

    async def lock_or_wait(self, plan: FillPlan) -> Entry | PassThrough | None:
        """Take the key's fill lock, or wait for the process holding it.

        Returns an entry another process stored meanwhile; ``PASS_THROUGH`` when the
        fill waited on found the response not storable; None when the app must be
        called (with the lock in ``plan.token``, or without it when the owner died
        or the store is down).
        """
        store = self.store
        locked = plan.looked_up
        if locked is not None and locked[0] is not None and locked[1] is None:
            # The lookup took the lock (a miss's usual case): nothing to wait for or look at.
            if plan.waiter is not None:
                plan.waiter.close()
            plan.looked_up = plan.waiter = None
            plan.token, _, plan.generations = locked
            return None
        locked, waiter = plan.looked_up, plan.waiter or store.notifications.waiter(plan.key)
        plan.looked_up = plan.waiter = None
        deadline = time.monotonic() + self.lock_timeout
        pause = 0.05 if store.listening else 0.01
        holder_seen = False
        try:
            while True:
                if locked is None:
                    locked = await self.lock(plan)
                if locked is None:
                    if not holder_seen or self.guarded.is_open(plan.key):
                        return None  # the store is failing: the app answers
                    # One poll lost (a blip, or this process late) while another process fills the
                    # key: calling the app now would add to the load the lock spares the origin.
                else:
                    token, current, plan.generations = locked
                    locked = None
                    if is_pass_marker(current):
                        self.release(plan.key, token)
                        return PASS_THROUGH
                    entry = fresh_entry(current, plan.policy)
                    if entry is not None:
                        # Filled since our lookup: nothing to do but release the lock if we took it.
                        self.release(plan.key, token)
                        return entry
                    if token is not None:
                        plan.token = token  # ours (first try, or the holder gave up or died): this request fills
                        return None
                    holder_seen = True
                # Another process holds the lock. Wait to be woken by its fill (or release),
                # and look again now and then ourselves: an announcement can be lost, and a
                # holder can vanish without one (its lock then expires, and we take it).
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if await waiter.wait(min(pause, left)):
                    waiter.close()
                    waiter = store.notifications.waiter(plan.key)  # registered again before the next attempt
                pause = min(pause * 2, 0.5)
        finally:
            waiter.close()

    async def unlock(self, key: str, token: str) -> None:
        store, guarded = self.store, self.guarded
        with contextlib.suppress(Exception):  # counted by the guarded store; the lock expires by itself
            await guarded.in_background(key, lambda left: store.unlock(key, token, timeout=left))

    def give_up(self, plan: FillPlan) -> None:
        """Release the plan's fill lock (once): this response will not be stored."""
        token, plan.token = plan.token, None
        self.release(plan.key, token)

    def release(self, key: str, token: str | None) -> None:
        if token is None:
            return
        if not self.supervisor.submit("unlock", self.unlock, key, token, key=key, timeout=math.inf) \
                and self.supervisor.running:
            # Shed with a full queue: a release is never dropped, or every request for the key
            # would wait out the lock. The pending set is bounded by the locks this process holds.
            self.pending_releases[key] = token
            if self._releases_wanted is not None:
                self._releases_wanted.set()

    async def send_pending_releases(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """A service: the releases a full queue could not take, sent as soon as they come."""
        self._releases_wanted = anyio.Event()
        task_status.started()
        while True:
            if not self.pending_releases:  # some may have come before this (re)start: send them now
                await self._releases_wanted.wait()
            self._releases_wanted = anyio.Event()
            pending, self.pending_releases = self.pending_releases, {}
            # Many at once (one round trip each, pipelined): a backlog of thousands drains in
            # moments, not one round trip after another, and holds little memory meanwhile.
            items = list(pending.items())
            for start in range(0, len(items), _RELEASES_AT_ONCE):
                async with anyio.create_task_group() as releases:
                    for key, token in items[start : start + _RELEASES_AT_ONCE]:
                        releases.start_soon(self._release_now, key, token)

    async def _release_now(self, key: str, token: str) -> None:
        with anyio.move_on_after(_RELEASE_TIMEOUT):
            await self.unlock(key, token)
