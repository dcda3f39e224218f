"""The store as the request path sees it: within a time budget, behind a breaker per node, never raising.

A store that is slow or down must cost a request at most its budget and then
answer "failed", so the app answers instead (fail open); a store failing for a
while is not called at all (the breaker), so it is not hammered while it recovers
and requests do not each wait out the budget. Work after the response has its own,
longer deadline and retries (``within_deadline``). A timeout while this process's
own event loop runs late is this process's lateness, not the store's: counted
apart, and not held against the store's breaker. Where the store waits a grace for
a reply our lateness delayed (the pipelined connection), a reply that came half
a budget or more past the budget and was used is counted too (``late_replies``):
a hit served, not an origin call. A timeout while a fresh process makes its first connection is not
held against the breaker either: the first burst after a deploy must not open it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio

from cachemw.core.breaker import CircuitBreaker
from cachemw.core.metrics import Metrics
from cachemw.store.base import LockResult, Store, StoreTimeout
from cachemw.store.retrying import within_deadline

__all__ = ["GuardedStore", "Report"]

T = TypeVar("T")

_LAG_LOG_INTERVAL = 60.0  # seconds: at most one loop-lag report per interval

Report = Callable[..., object]
"""``report(what, *details)``: hands an event ("breaker", "loop lag") to be logged off the request path."""


class GuardedStore:
    """Budget, breakers and failure accounting around one store; built once per runtime."""

    def __init__(self, store: Store, *, budget: float, background_budget: float, metrics: Metrics,
                 recent_lag: Callable[[], float], report: Report) -> None:
        self.store = store
        capabilities = store.capabilities
        self.remote = capabilities.remote  # only a remote store needs a time budget and a breaker
        self.keeps_budget = capabilities.keeps_budget  # then no deadline of ours around its calls
        self.lookup_locks = capabilities.lookup_locks
        self._sharded = capabilities.sharded
        self.budget = budget
        self.background_budget = background_budget
        self.metrics = metrics
        self._recent_lag = recent_lag
        self._report = report
        self.breaker = CircuitBreaker(on_transition=self._breaker_moved)
        self.node_breakers: dict[str, CircuitBreaker] = {}
        self.errors = 0
        self.loop_lag_timeouts = 0  # store timeouts that were this process's lateness, not the store's
        self.late_replies = 0  # replies after the budget, still used: the loop ran late, the store answered
        # A reply half a budget past the budget was waited for because our loop ran late: an
        # overdue call is failed at the first look after its deadline unless that look, or the
        # writing of its command, came half a budget late (then it was given the grace).
        self._late = 1.5 * budget
        self.first_connect_timeouts = 0  # timeouts of a fresh process's first connect: not the store's failure
        self._lag_reported_at = -float("inf")
        store.notifications.on_connected.append(self._reconnected)

    async def get(self, key: str) -> tuple[bytes | None, bool]:
        """The stored value, and whether the store failed (then the app answers: fail open)."""
        store = self.store
        if not self.remote:
            return await store.get(key), False
        breaker = self.breaker_for(key) if self._sharded else self.breaker  # every hit: no call for one breaker
        if not breaker.allow(time.monotonic()):
            return None, True
        began = time.perf_counter()
        try:
            value = await store.get(key) if self.keeps_budget else await self._within_budget(store.get(key))
        except Exception as exc:  # whatever the driver raises (another loop, trio, a bug): the app answers
            self.failed(breaker, exc, began)
            return None, True
        elapsed = time.perf_counter() - began
        self.metrics.store_latency.observe(elapsed)
        if elapsed >= self._late:
            self._late_reply(elapsed)
        breaker.success()
        return value, False

    async def lock(self, key: str, ttl: float, generation_keys: Sequence[str], token: str, *, lookup: bool = False,
                   background: bool = False, release: Callable[[str, str], None]) -> LockResult | None:
        """A miss's lock attempt under the same budget and breaker as a lookup; None if it failed.

        ``lookup``: ``get_or_lock``, which answers the value instead when there is one.
        ``background``: a refresh's, under the deadline of work after the response.
        ``release(key, token)`` gives the lock back when the attempt failed after Redis may
        have taken it (a timeout, a cancelled request): others must not wait for a fill
        that never comes.
        """
        store = self.store
        if not self.remote:
            return await store.lock(key, ttl, generation_keys, token)
        breaker = self.breaker_for(key)
        if not breaker.allow(time.monotonic()):
            return None
        began = time.perf_counter()
        try:
            result: LockResult
            if background:
                result = await self.in_background(key, lambda left: store.lock(key, ttl, generation_keys, token,
                                                                               timeout=left))
            else:
                call = (store.get_or_lock(key, ttl, generation_keys, token) if lookup
                        else store.lock(key, ttl, generation_keys, token))
                result = await call if self.keeps_budget else await self._within_budget(call)
        except BaseException as exc:
            release(key, token)
            if not isinstance(exc, Exception):
                raise
            if not background:  # a background call's attempts were each counted already
                self.failed(breaker, exc, began)  # as in get: any store failure sends the request to the app
            return None
        if not background:
            elapsed = time.perf_counter() - began
            if lookup:
                self.metrics.store_latency.observe(elapsed)
            if elapsed >= self._late:
                self._late_reply(elapsed)
        breaker.success()
        return result

    async def in_background(self, key: str, call: Callable[[float | None], Awaitable[T]]) -> T:
        """A store call for ``key`` after the response: its own deadline, retried within it on a blip.

        Each failed attempt is counted and heard by the key's breaker like a request's, and
        the retries end once that breaker opens: a store that is down is not hammered for
        the rest of the deadline, and a request that runs its jobs itself (no lifespan)
        is not held for it.
        """
        if not self.remote:
            return await call(None)
        breaker = self.breaker_for(key)

        async def attempt(left: float) -> T:
            began = time.perf_counter()
            try:
                return await call(left)
            except Exception as exc:
                self.failed(breaker, exc, began, budget=left)
                raise

        return await within_deadline(attempt, self.background_budget, scoped=not self.keeps_budget,
                                     given_up=lambda: breaker.state == "open")

    async def _within_budget(self, call: Awaitable[T]) -> T:
        """A request-path store call, failing with TimeoutError after the budget whatever the driver does."""
        with anyio.fail_after(self.budget):
            return await call

    def is_open(self, key: str) -> bool:
        """Is the key's node given up on for now? Background work then does not hammer it."""
        return self.remote and self.breaker_for(key).state == "open"

    def breaker_for(self, key: str) -> CircuitBreaker:
        """On a cluster each node has its own breaker: one node down fails only its slots."""
        if not self._sharded:
            return self.breaker
        name = self.store.shard(key)
        breaker = self.node_breakers.get(name)
        if breaker is None:
            breaker = self.node_breakers[name] = CircuitBreaker(on_transition=self._breaker_moved)
        return breaker

    def failed(self, breaker: CircuitBreaker | None = None, error: Exception | None = None, began: float = 0.0,
               *, key: str | None = None, budget: float | None = None) -> None:
        """Count a failed store call; the breaker hears it unless our own loop's lateness explains it.

        ``budget``: the call's own deadline when it was not the request path's budget.
        """
        self.errors += 1
        self.metrics.store_errors += 1
        if breaker is None:
            breaker = self.breaker if key is None else self.breaker_for(key)
        if isinstance(error, StoreTimeout) and error.first_connect:
            # A fresh process connecting (startup connects first; without a lifespan, the first burst
            # does): a connect slower than a request's budget is not a failing store.
            self.first_connect_timeouts += 1
            return
        if began and isinstance(error, TimeoutError):
            now = time.perf_counter()
            # How late our own loop ran: as the store measured it while this call waited (the
            # pipelined connection: when it wrote the command, when it looked at the deadline), or
            # else the deadline's own overshoot; or what the lag monitor saw lately (a process that
            # lagged a moment ago runs on a saturated machine, where a slow reply is no dead store).
            lag = error.lateness if isinstance(error, StoreTimeout) else None
            if lag is None:
                lag = now - began - (self.budget if budget is None else budget)
            lag = max(lag, self._recent_lag())
            if lag >= self.budget / 2:
                # This process's event loop was saturated, not (or not only) the store slow. The
                # request still goes to the app, but opening the breaker would send every other one
                # there too, just when the process is overloaded.
                self.loop_lag_timeouts += 1
                self._lagged(now, lag)
                return
        breaker.failure(time.monotonic())

    def _late_reply(self, elapsed: float) -> None:
        """A reply well after the budget, used: the store answered, our loop was late (the grace waited)."""
        self.late_replies += 1
        self._lagged(time.perf_counter(), elapsed - self.budget)

    def _lagged(self, now: float, lag: float) -> None:
        if now - self._lag_reported_at >= _LAG_LOG_INTERVAL:
            self._lag_reported_at = now
            self._report("loop lag", lag, self.late_replies, self.loop_lag_timeouts, self.errors)

    def count_error(self) -> None:
        """A store failure off the request path (a purge after a write): counted, not held against the breaker."""
        self.errors += 1

    def breakers(self) -> tuple[CircuitBreaker, ...]:
        return (self.breaker, *self.node_breakers.values())

    def _reconnected(self) -> None:
        for breaker in self.breakers():
            breaker.probe_now()

    def _breaker_moved(self, previous: str, state: str) -> None:
        self._report("breaker", previous, state, self.errors, self.loop_lag_timeouts)
