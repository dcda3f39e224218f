"""Single-flight in one process: one fill per key, the other requests for it wait and share its outcome."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio

from cachemw.core.entry import Entry
from cachemw.core.keyspace import ALL_TAG
from cachemw.runtime.plan import FillPlan

__all__ = ["CoalescedFailure", "Flight", "Flights"]


class CoalescedFailure(Exception):
    """Raised in the requests that waited on one whose app call raised: the failure is shared, not retried N times."""


class Flight:
    """One in-process fill of a key that other requests for the key wait on.

    The event is made only when a second request waits: most fills have nobody
    waiting, and making an anyio Event costs a backend lookup.
    """

    __slots__ = ("_done", "_event", "entry", "failed", "failure", "plan", "raised")

    def __init__(self, plan: FillPlan) -> None:
        self.plan = plan  # its tags: an invalidation of one detaches the flight from later requests
        self._done = False
        self._event: anyio.Event | None = None
        self.entry: Entry | None = None
        self.failed = False
        self.failure: Entry | None = None  # the origin's 5xx answer, for the waiters to share
        self.raised = False  # the origin raised: the waiters fail too

    def finish(self, entry: Entry | None, failed: bool = False, failure: Entry | None = None,
               raised: bool = False) -> None:
        if not self._done:
            self._done = True
            self.entry = entry
            self.failed = failed
            self.failure = failure
            self.raised = raised
            if self._event is not None:
                self._event.set()

    async def wait(self, within: float) -> bool:
        """True once the flight is done; False if ``within`` seconds pass first."""
        if not self._done:
            if self._event is None:
                self._event = anyio.Event()
            with anyio.move_on_after(within):
                await self._event.wait()
        return self._done


class Flights:
    """The fills in flight in this process, by key."""

    __slots__ = ("_release", "active")

    def __init__(self, release: Callable[[str, str | None], None]) -> None:
        self.active: dict[str, Flight] = {}
        self._release = release  # gives a detached fill's lock back at once

    def get(self, key: str) -> Flight | None:
        return self.active.get(key)

    def start(self, plan: FillPlan) -> Flight:
        flight = self.active[plan.key] = Flight(plan)
        return flight

    def end(self, flight: Flight) -> None:
        key = flight.plan.key
        if self.active.get(key) is flight:  # not detached by an invalidation meanwhile
            del self.active[key]
        flight.finish(None)

    def detach(self, tags: Sequence[str]) -> None:
        """Requests that start after an invalidation must not join a fill that began before it.

        Those already waiting keep their flight: they began before the write. The
        detached fill is not stored (the generations would refuse it anyway), and
        its lock is released now, so the next request's fill need not wait for it.
        """
        if not self.active:
            return
        dropped = set(tags)
        everything = ALL_TAG in dropped
        for key, flight in list(self.active.items()):
            plan = flight.plan
            if everything or not dropped.isdisjoint(plan.tags):
                del self.active[key]
                token, plan.token, plan.generations = plan.token, None, None
                self._release(key, token)
