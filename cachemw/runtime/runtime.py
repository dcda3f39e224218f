"""CacheRuntime: everything both shells share, built once from settings and a route table.

The ASGI and the WSGI shells only translate their protocol's requests into the
core's decisions and carry them out; the store, its guard, the background
supervisor, single-flight, fills, refreshes, invalidation, the L1, the metrics
and the access log live here, one set per middleware instance. ``observe/`` and
``cli/`` read a runtime, never a shell's internals.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.lowlevel import EventLoopToken, current_token

from cachemw.core import decide, http
from cachemw.core.breaker import CircuitBreaker
from cachemw.core.entry import DecodedMemo, Entry, EntryDecodeError, decode_entry
from cachemw.core.keys import KeyCache, RequestHeaders, Scope, SessionIdentity
from cachemw.core.metrics import Metrics, RouteMetrics
from cachemw.core.policy import Policy
from cachemw.core.rules import RouteMatch, RouteRule, RuleTable
from cachemw.core.settings import Settings, masked_url
from cachemw.runtime.accesslog import AccessLog
from cachemw.runtime.fills import Fills
from cachemw.runtime.flights import Flights
from cachemw.runtime.invalidation import Invalidator
from cachemw.runtime.locks import FillLocks
from cachemw.runtime.looplag import LoopLag
from cachemw.runtime.origin import OriginSlots
from cachemw.runtime.plan import Planner
from cachemw.runtime.supervisor import Supervisor
from cachemw.store.base import Store
from cachemw.store.guarded import GuardedStore
from cachemw.store.l1 import L1
from cachemw.store.opening import open_store

__all__ = ["CacheRuntime", "Identity", "origin_busy_answer"]

logger = logging.getLogger("cachemw.runtime")

Identity = Callable[[RequestHeaders, Scope], "str | None"]
"""The app's own ``identity``, as a shell hands it to the runtime: from the request's headers and scope."""

_PROBE_TIMEOUT = 2.0  # the startup probe of the store: a background job, not a request's budget

def origin_busy_answer(retry_after: int) -> Entry:
    """Our 503 past ``origin_concurrency``: made once at startup, replayed as is."""
    body = b"The service is busy; try again shortly.\n"
    return Entry(status=503, headers=(
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body)),
        (b"retry-after", b"%d" % retry_after), (b"cache-control", b"no-store")),
        body=body, stored_at=0.0, etag=b"", tags=())


def link_bound(table: RuleTable) -> float:
    """How long the announcement link may be silent before the L1 stops trusting it: a quarter of the smallest
    ``sync``, within 50 ms and 1 s."""
    syncs = [rule.policy.sync for rule in table.rules if rule.policy is not None and rule.policy.sync > 0]
    return min(1.0, max(0.05, min(syncs, default=4.0) / 4))


class CacheRuntime:
    """One cache: its store and everything that works on it, for one shell instance."""

    def __init__(self, settings: Settings, table: RuleTable, *, store: Store | None, supervisor: Supervisor,
                 metrics: Metrics, access_log: AccessLog, loop_lag: LoopLag) -> None:
        self.settings = settings
        self.table = table
        self.owns_store = store is None
        self.store: Store = open_store(settings) if store is None else store  # what `cachemw check` validates
        self.supervisor = supervisor
        self.metrics = metrics
        self.access_log = access_log
        self.loop_lag = loop_lag
        self.prefix = settings.key_prefix
        self.store_problem: str | None = None  # why the startup probe could not reach the store
        self.guarded = GuardedStore(self.store, budget=settings.store_timeout,
                                    background_budget=settings.background_timeout, metrics=metrics,
                                    recent_lag=lambda: loop_lag.recent, report=self._report)
        self.remote = self.guarded.remote
        self.lookup_locks = self.guarded.lookup_locks
        self.l1 = L1(max_bytes=settings.l1_max_bytes)
        self.locks = FillLocks(self.store, self.guarded, supervisor, lock_timeout=settings.lock_timeout)
        self.flights = Flights(self.locks.release)
        self.origin = OriginSlots(settings.origin_concurrency)
        for rule in table.rules:
            if rule.policy is not None:
                self.origin.bound_route(rule.template, rule.policy.origin_concurrency)
        self.origin_busy = origin_busy_answer(settings.retry_after)
        self.fills = Fills(self.store, self.guarded, self.locks, supervisor, self.l1, metrics, self.origin,
                           prefix=self.prefix, pass_ttl=settings.pass_ttl)
        self.planner = Planner(self.prefix)
        self.keys = KeyCache()
        self.decoded = DecodedMemo()
        self.missing = self.locks.missing  # the routes whose lookups try the lock too
        notifications = self.store.notifications
        notifications.on_invalidate.append(self.l1.drop_tags)
        notifications.on_lost.append(self.l1.lost_sync)
        notifications.on_connected.append(self.l1.lost_sync)  # what was read while deaf was never tracked
        notifications.on_evict.append(self.l1.evict)
        notifications.link_bound = link_bound(table)
        notifications.on_invalidate.append(self.flights.detach)
        self.invalidator = Invalidator(self.store, self.prefix, self.l1, on_local=self.flights.detach,
                                       timeout=settings.background_timeout)
        self.credentials = SessionIdentity(settings.session_cookie, settings.credentials)
        # A route's FastAPI security schemes (APIKeyHeader, APIKeyCookie, ...) are its credentials too.
        self._route_credentials = {id(rule): self.credentials.including(names)
                                   for rule in table.rules if (names := _credential_names(rule))}
        self._warned_corrupt = False
        # How code in other threads reaches this runtime's loop (a purge after a sync ORM commit):
        # anyio.from_thread.run(..., token=loop_token); noted when the supervisor starts.
        self.loop_token: EventLoopToken | None = None
        self.loop_thread = 0
        supervisor.add_service("notifications", self.store.listen)
        supervisor.add_service("releases", self.locks.send_pending_releases)
        supervisor.add_service("access-log", access_log.consume)
        supervisor.add_service("loop-lag", loop_lag.measure)
        supervisor.add_service("loop", self._note_loop)

    async def _note_loop(self, *, task_status: TaskStatus[None]) -> None:
        """Which loop and thread this runtime runs on; done at once (a token holds nothing that runs)."""
        self.loop_token, self.loop_thread = current_token(), threading.get_ident()
        task_status.started()

    # -- per request -------------------------------------------------------------------------------

    def credentials_of(self, rule: RouteRule) -> SessionIdentity:
        return self._route_credentials.get(id(rule), self.credentials)

    def identify(self, rule: RouteRule, policy: Policy, headers: RequestHeaders, scope: Scope,
                 identity_of: Identity | None) -> tuple[str | None, bytes | None]:
        """Who a request is for, and why it must bypass the cache (None: it may be answered from it).

        One place for both shells: a credentialed request never reaches a shared entry.
        ``identity_of``: the app's own identity function; None: the credentials are the identity.
        """
        credentials = self._route_credentials.get(id(rule), self.credentials)(headers, scope.get("query_string", b""))
        identity = credentials if identity_of is None else identity_of(headers, scope)
        return identity, decide.for_request(policy, identity, credentials, http.has_body(headers.values))

    def decode(self, key: str, data: bytes) -> Entry | None:
        entry = self.decoded.entries.get(data)
        if entry is not None:
            return entry
        try:
            entry = decode_entry(data)
        except EntryDecodeError as exc:
            if not self._warned_corrupt:
                self._warned_corrupt = True
                self.supervisor.submit("log", _log_corrupt, key, str(exc))
            return None  # a miss; the fill overwrites it
        self.decoded.put(data, entry)
        return entry

    def log(self, match: RouteMatch, key: str, state: str, status: int, origin: float | None, started: float,
            size: int, detail: str = "") -> None:
        """Count the request, and hand its access event to the log consumer: no I/O here."""
        rule = match.rule
        metrics = self.metrics.routes.get(rule.template)
        if metrics is None:
            policy = rule.policy
            metrics = self.metrics.route(rule.template, (policy.preset if policy else None) or "custom")
        elapsed = time.perf_counter() - started
        if state == "HIT":
            metrics.hit += 1
            metrics.hit_latency.observe(elapsed)
            if detail:  # "l1": answered from this process's L1
                metrics.l1_hits += 1
        elif state == "STALE":
            metrics.stale += 1
            if detail:
                metrics.stale_if_error += 1
            else:
                metrics.hit_latency.observe(elapsed)
        elif state == "MISS":
            metrics.miss += 1
            if detail:
                metrics.collapsed += 1
        else:
            metrics.bypass += 1
        if origin is not None:
            metrics.origin_latency.observe(origin)
        if self.access_log.enabled:
            key_hash = key[key.rfind("{") + 1 : key.rfind("}")] if key else "-"
            self.access_log.emit((rule.template, key_hash[:12] or "-", state, status, origin, elapsed, size))

    def route_metrics(self, rule: RouteRule) -> RouteMetrics:
        policy = rule.policy
        return self.metrics.route(rule.template, (policy.preset if policy else None) or "custom")

    # -- what the operator sees ------------------------------------------------------------------

    @property
    def breaker(self) -> CircuitBreaker:
        """The store's breaker (on a cluster, the one for keys no node could be found for)."""
        return self.guarded.breaker

    @property
    def node_breakers(self) -> dict[str, CircuitBreaker]:
        return self.guarded.node_breakers

    @property
    def store_errors(self) -> int:
        return self.guarded.errors

    @property
    def loop_lag_timeouts(self) -> int:
        """Store timeouts that were this process's lateness, not the store's."""
        return self.guarded.loop_lag_timeouts

    @property
    def late_replies(self) -> int:
        """Store replies after the budget that were used: this process's loop ran late, the store answered."""
        return self.guarded.late_replies

    # -- startup and shutdown ----------------------------------------------------------------------

    async def probe_store(self) -> None:
        """Connect to the store at startup, within ``_PROBE_TIMEOUT``; say once when it cannot be reached.

        The server hears that startup is complete only after this (at most those
        seconds), so the first requests find the connection open, not each spending
        the short request-path budget on connecting. Where the store cannot be reached
        (which one, password masked, and why), requests go to the app until it answers.
        """
        if not self.remote:
            return
        try:
            with anyio.fail_after(_PROBE_TIMEOUT):
                await self.store.connect(_PROBE_TIMEOUT)
        except Exception as exc:
            self.store_problem = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            logger.warning("cachemw: cannot reach the store at %s (%s); requests go to the app until it answers",
                           masked_url(self.settings.redis_url or ""), self.store_problem)
        else:
            self.store_problem = None

    def _report(self, what: str, *details: Any) -> None:
        """A store event to log: handed to the log job, never written on the request path."""
        self.supervisor.submit("log", _log_breaker if what == "breaker" else _log_loop_lag, *details)


def _credential_names(rule: RouteRule) -> tuple[str, ...]:
    """A route's credentials as the ``credentials`` setting names them ("x-api-key", "cookie:NAME")."""
    return tuple(name if where == "header" else f"{where}:{name}" for where, name in rule.credentials)


async def _log_loop_lag(lag: float, late_replies: int, lag_timeouts: int, errors: int) -> None:
    logger.warning("cachemw: event loop lagging (%.0f ms late): this process's own lateness, not the store's. So "
                   "far %d store replies came well after the budget and were still used (the store grace), and %d "
                   "store timeouts were this lateness, which the circuit breaker does not count (of %d store errors)",
                   lag * 1000, late_replies, lag_timeouts, errors)


async def _log_breaker(previous: str, state: str, errors: int, lag_timeouts: int) -> None:
    if state == "closed":
        logger.warning("cachemw: store is answering again; circuit closed (%d store errors so far, %d of them "
                       "timeouts of our own loop lag)", errors, lag_timeouts)
    elif previous == "closed":
        logger.warning("cachemw: store is failing; circuit open, requests go to the app (%d store errors so far, "
                       "%d of them timeouts of our own loop lag, not counted)", errors, lag_timeouts)


async def _log_corrupt(key: str, reason: str) -> None:
    logger.warning("cachemw: value under %s is not a cachemw entry (%s); treated as a miss and overwritten. "
                   "Further such values are not logged.", key, reason)

