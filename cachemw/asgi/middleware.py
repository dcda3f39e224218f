"""The ASGI shell: match the route, look the key up once, answer or forward, store later.

Decisions live in the pure modules (policy, keys, http, entry); this module only
executes them. Per-request state lives in small responder objects, never on the
middleware. Everything that does not shape the response (storing fills,
refreshing stale entries, releasing locks, access logging) is handed to the
supervisor and runs after the response is sent.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from random import getrandbits
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskStatus
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cachemw.asgi.routes import build_rule_table, routes_behind
from cachemw.core import http
from cachemw.core.breaker import CircuitBreaker
from cachemw.core.entry import DecodedMemo, Entry, EntryDecodeError, decode_entry, encode_entry, entry_cost
from cachemw.core.keys import (
    ALL_TAG,
    KeyCache,
    RequestHeaders,
    SessionIdentity,
    mounted_at,
    path_tag,
    route_tag,
    tag_keys,
)
from cachemw.core.policy import ConfigError, Freshness, Policy, freshness
from cachemw.core.rules import RouteMatch, RouteRule, RuleTable, normalise_template
from cachemw.core.settings import Settings, load_settings, masked_url
from cachemw.observe import enable_fleet_metrics, enable_history
from cachemw.runtime.accesslog import AccessLog
from cachemw.runtime.invalidation import Invalidator, format_tags, targets_for_unsafe_request
from cachemw.runtime.looplag import LoopLag
from cachemw.runtime.metrics import Metrics, RouteMetrics
from cachemw.runtime.origin import OriginSlots
from cachemw.runtime.supervisor import Supervisor
from cachemw.store import MemoryStore, Store, StoreError
from cachemw.store.base import FillWaiter, LockResult, unsupported_event_loop
from cachemw.store.l1 import L1
from cachemw.store.opening import open_store
from cachemw.store.retrying import within_deadline
from cachemw.writebehind import WriteBehind


@dataclass(frozen=True)
class MiddlewareOptions:
    """What a CacheMiddleware was given, for tools that read an app's cache setup without its internals."""

    config: str | os.PathLike[str] | None
    settings: Settings | None
    key_prefix: str | None
    redis_url: str | None
    identity: Callable[[HTTPConnection], str | None] | None


__all__ = ["CacheMiddleware", "current_cache", "invalidate"]

logger = logging.getLogger(__name__)

_CACHED_METHODS = frozenset({"GET", "HEAD"})
# Only these may invalidate: OPTIONS (a CORS preflight anyone can send), TRACE and
# unknown methods are passed through untouched, never cached and never purging.
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_BODY_NEEDS_HEADERS = frozenset({"1.0", "1.1"})  # where a request body must announce itself in its headers
_HIT = b"HIT"
_STALE = b"STALE"
_MISS = b"MISS"
_BYPASS = b"BYPASS"


_PROBE_TIMEOUT = 2.0  # the startup probe of the store: a background job, not a request's budget
_LAG_LOG_INTERVAL = 60.0  # seconds: at most one loop-lag warning per interval
_RELEASES_AT_ONCE = 64  # shed lock releases sent concurrently by the release service
_RELEASE_TIMEOUT = 2.0  # one shed lock release: past it the lock expires by itself

_current: ContextVar[CacheMiddleware] = ContextVar("cachemw_cache")
T = TypeVar("T")


def current_cache() -> CacheMiddleware:
    """The CacheMiddleware handling the current request."""
    cache = _current.get(None)
    if cache is None:
        raise RuntimeError("no CacheMiddleware is handling this request. HINT: call this from a handler of an app "
                           "with app.add_middleware(CacheMiddleware, ...), or use CacheMiddleware.invalidator.")
    return cache


async def invalidate(*, tags: tuple[str, ...] | list[str] = (), routes: tuple[str, ...] | list[str] = (),
                     urls: tuple[str, ...] | list[str] = (), everything: bool = False) -> int:
    """Drop entries from a handler: by tag, route template, URL, or all. Returns how many were dropped.

    Done in the shared store and this process's L1 before it returns; other
    processes drop theirs when the broadcast reaches them (at most ``sync`` later).
    """
    invalidator = current_cache().invalidator
    if invalidator is None:
        return 0
    if everything:
        return await invalidator.everything()
    wanted = [*tags, *(route_tag(normalise_template(r)) for r in routes)]
    dropped = await invalidator.tags(*wanted) if wanted else 0
    return dropped + (await invalidator.urls(*urls) if urls else 0)


# What a queued fill holds besides its entry: the plan, its tag and generation key strings, the route
# match. Measured with tracemalloc on CPython 3.11 (bench/memory.py's /item/{id} route): about 930 B.
_FILL_PLAN_BYTES = 1024


@dataclass(slots=True)
class _Plan:
    """What a fill of one key needs to be stored safely: its tags and the generations seen at its start."""

    key: str
    policy: Policy
    match: RouteMatch
    tags: tuple[str, ...]
    generation_keys: tuple[str, ...]
    generations: tuple[int, ...] | None = None  # unknown: the fill is served but never stored
    token: str | None = None
    # A lookup that found nothing and tried the lock in the same round trip: its result,
    # and the waiter registered before it (so a fill announced meanwhile is not missed).
    looked_up: LockResult | None = None
    waiter: FillWaiter | None = None
    filling: bool = False  # the lock went to a fill job, which releases it


class CoalescedFailure(Exception):
    """Raised in the requests that waited on one whose app call raised: the failure is shared, not retried N times."""


class _Flight:
    """One in-process fill of a key that other requests for the key wait on.

    The event is made only when a second request waits: most fills have nobody
    waiting, and making an anyio Event costs a backend lookup.
    """

    __slots__ = ("_done", "_event", "entry", "failed", "failure", "plan", "raised")

    def __init__(self, plan: _Plan) -> None:
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

    async def wait(self, timeout: float) -> bool:
        if not self._done:
            if self._event is None:
                self._event = anyio.Event()
            with anyio.move_on_after(timeout):
                await self._event.wait()
        return self._done


class CacheMiddleware:
    """Answer requests from a cache by per-route freshness policies.

    ``config`` names a ``cachemw.toml`` or ``pyproject.toml``; ``redis_url`` and
    ``key_prefix`` override it; ``store`` replaces the store it would build.
    ``identity`` returns who a request is for (keys ``private`` entries, and
    keeps credentialed requests off shared ones); by default the session
    cookie, else the ``Authorization`` header.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: str | os.PathLike[str] | None = None,
        redis_url: str | None = None,
        store: Store | None = None,
        key_prefix: str | None = None,
        identity: Callable[[HTTPConnection], str | None] | None = None,
        settings: Settings | None = None,
        supervisor: Supervisor | None = None,
        access_log_json: bool = False,
        write_behind: Sequence[WriteBehind[Any]] = (),
    ) -> None:
        self.app = app
        self.write_behinds = tuple(write_behind)
        self._config = config
        self._redis_url = redis_url
        self._key_prefix = key_prefix
        self._custom_identity = identity
        self._given_settings = settings
        self._given_supervisor = supervisor
        self.store: Store | None = store
        self._owns_store = store is None
        self.supervisor = supervisor or Supervisor()
        self.access_log = AccessLog(json_lines=access_log_json)
        self.settings: Settings | None = None
        self.table: RuleTable | None = None
        self._identity: Callable[[RequestHeaders, Scope], str | None] | None = None  # None: the credentials
        self._credentials = SessionIdentity()
        self._route_credentials: dict[int, SessionIdentity] = {}
        self._prefix = "cachemw"
        self._lock_timeout = 5.0
        self._flights: dict[str, _Flight] = {}
        self._keys = KeyCache()
        self._decoded = DecodedMemo()
        self._decoded_entries = self._decoded.entries  # the hit path's one dict lookup
        self._refreshing: set[str] = set()
        # Routes whose last lookup missed: their next lookup also tries the lock (one round trip).
        self._missing: set[str] = set()
        # Per route template, once: its route tag and that tag's generation key, and the generation
        # key of everything (ALL_TAG). A miss adds only its path's tag (and the rule's own tags).
        self._route_tags: dict[str, tuple[str, str, str]] = {}
        self._lookup_locks = False
        self.l1 = L1()
        self.invalidator: Invalidator | None = None
        self.breaker = CircuitBreaker(on_transition=self._breaker_moved)
        self.node_breakers: dict[str, CircuitBreaker] = {}
        self._shard: Callable[[str], str] | None = None
        self.metrics = Metrics()
        self._budget = 0.05
        self._remote = False  # only a remote store needs a time budget and a breaker
        self._bounded = False  # the store keeps the time budget itself: no deadline of ours around its calls
        self._store_job_timeout = math.inf
        self._background_budget = 2.0
        self._warned_corrupt = False
        self.store_errors = 0
        self.loop_lag_timeouts = 0  # store timeouts that were this process's lateness, not the store's
        self.loop_lag = LoopLag()
        self._lag_logged_at = -math.inf
        self.store_problem: str | None = None  # why the startup probe could not reach the store
        self._origin = OriginSlots(0)
        self._origin_wait = 5.0
        self._origin_busy = _origin_busy_answer(Settings().retry_after)
        self._pending_releases: dict[str, str] = {}  # lock releases a full queue shed: key -> token
        self._releases_wanted: anyio.Event | None = None

    @property
    def options(self) -> MiddlewareOptions:
        """The arguments it was given, before ``prepare`` applies them (what an operator command recomputes)."""
        return MiddlewareOptions(config=self._config, settings=self._given_settings, key_prefix=self._key_prefix,
                                 redis_url=self._redis_url, identity=self._custom_identity)

    # -- startup ---------------------------------------------------------------------------------

    def prepare(self, routes_owner: Any) -> RuleTable:
        """Load settings and build the rule table once; raises ConfigError for bad configuration."""
        if self.table is not None:
            return self.table
        settings = self._given_settings or load_settings(self._config)
        if self._redis_url is not None:
            settings = replace(settings, redis_url=self._redis_url)
        if self._key_prefix is not None:
            settings = replace(settings, key_prefix=self._key_prefix)
        routes, why = routes_behind(self, routes_owner)
        if routes is None:
            logger.warning("cachemw: %s", why)
        table = build_rule_table(routes or (), settings)
        for warning in table.warnings:  # routes the table cannot model: what may reach them is never cached
            logger.warning("cachemw: %s", warning)
        if self.store is None:
            self.store = open_store(settings)  # exactly what `cachemw check` validates
        if self._given_supervisor is None:
            self.supervisor = Supervisor(queue_size=settings.queue_size, queue_max_bytes=settings.queue_max_bytes,
                                         concurrency=settings.concurrency,
                                         grace_period=settings.grace_period,
                                         lanes={"refresh": settings.refresh_concurrency})
        self.supervisor.add_service("notifications", self.store.listen)
        self.supervisor.add_service("releases", self._send_pending_releases)
        enable_history(self)  # the dashboard's chart: a short ring buffer of per-route counts
        if settings.metrics_interval and settings.redis_url:
            enable_fleet_metrics(self, interval=settings.metrics_interval)
        for writes in self.write_behinds:
            try:
                writes.attach(self.supervisor, redis_url=settings.redis_url, key_prefix=settings.key_prefix)
            except ValueError as exc:  # another store or prefix than before, or an unsupported URL
                raise ConfigError(f"{settings.source or 'settings'}: write_behind {writes.name!r}: {exc}") from None
        self.l1 = L1(max_bytes=settings.l1_max_bytes)
        self.store.notifications.on_invalidate.append(self.l1.drop_tags)
        self.store.notifications.on_lost.append(self.l1.lost_sync)
        self.store.notifications.on_connected.append(self._store_reconnected)
        self.store.notifications.on_invalidate.append(self._detach_flights)
        self.invalidator = Invalidator(self.store, settings.key_prefix, self.l1, on_local=self._detach_flights,
                                       timeout=settings.background_timeout)
        self._origin = OriginSlots(settings.origin_concurrency)
        for rule in table.rules:
            if rule.policy is not None:
                self._origin.bound_route(rule.template, rule.policy.origin_concurrency)
        self._origin_wait = settings.origin_wait
        self._origin_busy = _origin_busy_answer(settings.retry_after)
        self.supervisor.add_service("access-log", self.access_log.consume)
        self.supervisor.add_service("loop-lag", self.loop_lag.measure)
        self._prefix = settings.key_prefix
        self._lock_timeout = settings.lock_timeout
        self._budget = settings.store_timeout
        self._remote = not isinstance(self.store, MemoryStore)
        self._bounded = bool(getattr(self.store, "bounded", False))
        self._lookup_locks = bool(getattr(self.store, "lookup_locks", False))
        # Fills and lock releases keep their own deadline (_in_background): no job timeout around them.
        self._store_job_timeout = math.inf
        self._background_budget = settings.background_timeout
        self._shard = self.store.shard if getattr(self.store, "cluster", False) else None  # type: ignore[attr-defined]
        self._credentials = SessionIdentity(settings.session_cookie, settings.credentials)
        # A route's FastAPI security schemes (APIKeyHeader, APIKeyCookie, ...) are its credentials too.
        self._route_credentials = {id(rule): self._credentials.including(rule_credentials)
                                   for rule in table.rules
                                   if (rule_credentials := _credential_names(rule))}
        if self._custom_identity is not None:
            custom = self._custom_identity
            self._identity = lambda headers, scope: custom(HTTPConnection(scope))
        self.settings = settings
        self.table = table
        return table

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            table = self.table or self.prepare(scope.get("app"))
            supervisor = self.supervisor
            supervisor.bind()
            _current.set(self)
            # A route without a policy goes straight to the app: no frame of ours in between.
            match = table.match_scope(scope)
            if supervisor.running:
                await (self.app(scope, receive, send) if match is None else self._http(scope, receive, send, match))
            else:
                async with supervisor.inline_after_response():
                    await (self.app(scope, receive, send) if match is None
                           else self._http(scope, receive, send, match))
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] == "lifespan.startup":
            try:
                self.prepare(scope.get("app"))
                problem = unsupported_event_loop(self.store)  # the Redis store on trio
                if problem is not None:
                    raise ConfigError(problem)
            except ConfigError as exc:
                # Reported as a failed startup: uvicorn would take an exception for
                # "lifespan unsupported" and serve with the bad configuration.
                await send({"type": "lifespan.startup.failed", "message": f"cachemw: {exc}"})
                return
        replayed = False

        async def receive_with_drain() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                # Pending fills and the last write-behind flush finish before the app's own
                # shutdown closes what they use (its database).
                await self.supervisor.drain()
                for writes in self.write_behinds:
                    await writes.stop()
            return message

        shutdown_reply: Message | None = None

        async def send_to_server(message: Message) -> None:
            nonlocal shutdown_reply
            kind = message["type"]
            if kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                # Held until our own cleanup is done: a server that hears "complete" may tear
                # the loop down at once (uvicorn on Ctrl-C), cancelling whatever we still await.
                shutdown_reply = message
                return
            if kind == "lifespan.startup.complete":
                await self._probe_store()
                if self.settings is not None and self.settings.gc_freeze and self.table is not None \
                        and self.table.has_policies:
                    _freeze_startup_objects()
            await send(message)

        app_error: Exception | None = None
        try:
            async with self.supervisor.run():
                try:
                    await self.app(scope, receive_with_drain, send_to_server)
                except Exception as exc:
                    # The app's own exception, as it raised it: not wrapped in our task group's ExceptionGroup.
                    app_error = exc
        finally:
            with anyio.CancelScope(shield=True):
                for writes in self.write_behinds:
                    await writes.aclose()
                if self._owns_store and self.store is not None:
                    await _quietly(self.store.aclose())
                    self.store = None
                    self.table = None
        if shutdown_reply is not None:
            await send(shutdown_reply)
        if app_error is not None:
            raise app_error

    async def _probe_store(self) -> None:
        """Connect to the store at startup, within ``_PROBE_TIMEOUT``; say once when it cannot be reached.

        The server hears that startup is complete only after this (at most those
        seconds), so the first requests find the connection open, not each spending
        the short request-path budget on connecting. Where the store cannot be reached
        (which one, password masked, and why), requests go to the app until it answers.
        """
        store, settings = self.store, self.settings
        if store is None or settings is None or not self._remote:
            return
        connect = getattr(store, "connect", None)
        try:
            with anyio.fail_after(_PROBE_TIMEOUT):
                await (store.get(f"{self._prefix}:probe") if connect is None else connect(_PROBE_TIMEOUT))
        except Exception as exc:
            self.store_problem = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            logger.warning("cachemw: cannot reach the store at %s (%s); requests go to the app until it answers",
                           masked_url(settings.redis_url or ""), self.store_problem)
        else:
            self.store_problem = None

    async def _http(self, scope: Scope, receive: Receive, send: Send, match: RouteMatch) -> None:
        policy = match.rule.policy
        assert policy is not None
        method = scope["method"]
        if method not in _CACHED_METHODS:
            if method.upper() in _UNSAFE_METHODS:  # h11 passes a lowercase method through; apps upper it
                await self._unsafe(scope, receive, send, match, policy)
            else:
                await self._bypass(scope, receive, send, match, http.STATUS_BYPASS_METHOD)
            return
        if not policy.cacheable:
            await self._bypass(scope, receive, send, match, http.STATUS_BYPASS)
            return
        headers = RequestHeaders(scope)
        credentials = self._credentials_of(match)(headers, scope.get("query_string", b""))
        identity = credentials if self._identity is None else self._identity(headers, scope)
        if policy.private:
            if identity is None:  # nobody to key on: nothing may be shared
                await self._bypass(scope, receive, send, match, http.STATUS_BYPASS_REQUEST)
                return
        elif identity is not None or credentials is not None:
            # Credentials on a shared route: never answered from, nor stored into, a shared entry.
            await self._bypass(scope, receive, send, match, http.STATUS_BYPASS_REQUEST)
            return
        if http.has_body(headers.values):
            # A body the app may read but the key cannot cover: not ours to answer or store.
            await self._bypass(scope, receive, send, match, http.STATUS_BYPASS_REQUEST)
            return
        if scope.get("http_version", "1.1") not in _BODY_NEEDS_HEADERS:
            # HTTP/2 and 3 frame a body without announcing it: look at the first message (given to the
            # app again after) to know there is none.
            first = await receive()
            receive = _replaying(first, receive)
            if first.get("body") or first.get("more_body"):
                await self._bypass(scope, receive, send, match, http.STATUS_BYPASS_REQUEST)
                return
        started = time.perf_counter()
        keyed = self._keys.key(scope, headers, policy, match.rule.label, self._prefix, identity)
        key = keyed.key
        if keyed.query_string is not None:
            scope = dict(scope, query_string=keyed.query_string)
        store = self.store
        if policy.sync > 0 and self._remote and store is not None and store.listening:
            entry = self.l1.get(key)
            if entry is not None:
                now = time.time()
                if freshness(entry.stored_at, policy, now) is Freshness.FRESH:
                    status = await _serve(entry, scope, headers, send, now, _HIT,
                                          http.cache_status_hit(policy.ttl - (now - entry.stored_at)))
                    self._log(match, key, "HIT", status, None, started, len(entry.body))
                    return
        template = match.rule.template
        plan: _Plan | None = None
        if self._lookup_locks and template in self._missing:
            plan = self._plan(key, policy, match, scope)
            data, failed = await self._get_or_lock(plan)
            if data is not None:
                self._missing.discard(template)
        else:
            data, failed = await self._get(key)
        entry = None if data is None else self._decode(key, data)
        if failed and policy.sync > 0 and self._remote:
            entry = self.l1.last_resort(key)  # the store is down: the L1 may still answer within stale_if_error
        fallback: Entry | None = None
        if entry is not None:
            now = time.time()
            state = freshness(entry.stored_at, policy, now)
            if failed and state is not Freshness.EXPIRED:
                await self._serve_fallback(entry, scope, headers, send, None, match, key, started)
                return
            if state is Freshness.FRESH:
                if policy.sync > 0 and self._remote:
                    self.l1.put(key, entry, policy.sync)
                status = await _serve(entry, scope, headers, send, now, _HIT,
                                      http.cache_status_hit(policy.ttl - (now - entry.stored_at)))
                self._log(match, key, "HIT", status, None, started, len(entry.body))
                return
            if state is Freshness.STALE:
                status = await _serve(entry, scope, headers, send, now, _STALE,
                                      http.cache_status_hit(policy.ttl - (now - entry.stored_at)))
                self._refresh_later(key, policy, match, scope)
                self._log(match, key, "STALE", status, None, started, len(entry.body))
                return
            if state is Freshness.STALE_IF_ERROR:
                fallback = entry
        if self._lookup_locks:
            self._missing.add(template)
        await self._miss(scope, receive, send, plan or self._plan(key, policy, match, scope), headers, fallback,
                         started)

    def _credentials_of(self, match: RouteMatch) -> SessionIdentity:
        return self._route_credentials.get(id(match.rule), self._credentials)

    def _plan(self, key: str, policy: Policy, match: RouteMatch, scope: Scope) -> _Plan:
        prefix = self._prefix
        template = match.rule.template
        fixed = self._route_tags.get(template)
        if fixed is None:
            route = route_tag(normalise_template(template))
            fixed = self._route_tags[template] = (route, tag_keys(prefix, route)[1], tag_keys(prefix, ALL_TAG)[1])
        route, route_generation, all_generation = fixed
        path = path_tag(scope["path"])
        path_generation = tag_keys(prefix, path)[1]
        if not policy.tags:
            return _Plan(key, policy, match, (route, path), (route_generation, path_generation, all_generation))
        own = format_tags(policy.tags, match.path_params)
        return _Plan(key, policy, match, (*own, route, path),
                     (*(tag_keys(prefix, tag)[1] for tag in own), route_generation, path_generation, all_generation))

    # -- misses: one fill per key, in this process and across processes ---------------------------

    async def _miss(self, scope: Scope, receive: Receive, send: Send, plan: _Plan, headers: RequestHeaders,
                    fallback: Entry | None, started: float) -> None:
        key = plan.key
        scope = _without_unkeyed_overrides(scope, plan.policy)
        flight = self._flights.get(key)
        if flight is not None:
            # Another request of this process is filling the key: wait (bounded) and share its result,
            # a failure included: a failing origin is called once for the herd, not once per request.
            self._drop_lookup_lock(plan)
            self.metrics.waiting_on_fills += 1
            try:
                done = await flight.wait(self._lock_timeout)
            finally:
                self.metrics.waiting_on_fills -= 1
            if done:
                if flight.entry is not None:
                    status = await _serve(flight.entry, scope, headers, send, time.time(), _MISS,
                                          http.STATUS_COLLAPSED)
                    self._log(plan.match, key, "MISS", status, None, started, len(flight.entry.body), "collapsed")
                    return
                if flight.failed:
                    if fallback is not None:
                        await self._serve_fallback(fallback, scope, headers, send, None, plan.match, key, started)
                        return
                    if flight.failure is not None:
                        status = await _replay_failure(flight.failure, scope, send)  # its Cache-Status: collapsed
                        self._log(plan.match, key, "MISS", status, None, started, len(flight.failure.body),
                                  "collapsed")
                        return
                    if flight.raised:
                        raise CoalescedFailure(f"the request for {scope['path']!r} this one waited on failed; "
                                               "the app was not called again for it")
            await self._forward(scope, receive, send, headers, plan, fallback, started)  # unknown generations
            return
        flight = self._flights[key] = _Flight(plan)
        try:
            shared = await self._lock_or_wait(plan)
            if shared is not None:
                flight.finish(shared)
                status = await _serve(shared, scope, headers, send, time.time(), _MISS, http.STATUS_COLLAPSED)
                self._log(plan.match, key, "MISS", status, None, started, len(shared.body), "collapsed")
                return
            try:
                entry, failed, failure = await self._forward(scope, receive, send, headers, plan, fallback, started,
                                                             flight)
            except BaseException as exc:
                # The app raised, or this request was cancelled (the client left, waiting for a slot or
                # the app): the lock goes at once, not after lock_timeout, unless a fill job has it.
                if not plan.filling:
                    self._give_up_lock(plan)
                flight.finish(None, failed=True, raised=isinstance(exc, Exception))
                raise
            flight.finish(entry, failed, failure)
        finally:
            if self._flights.get(key) is flight:  # not detached by an invalidation meanwhile
                del self._flights[key]
            flight.finish(None)

    def _detach_flights(self, tags: Sequence[str]) -> None:
        """Requests that start after an invalidation must not join a fill that began before it.

        Those already waiting keep their flight: they began before the write. The
        detached fill is not stored (the generations would refuse it anyway), and
        its lock is released now, so the next request's fill need not wait for it.
        """
        if not self._flights:
            return
        dropped = set(tags)
        everything = ALL_TAG in dropped
        for key, flight in list(self._flights.items()):
            plan = flight.plan
            if everything or not dropped.isdisjoint(plan.tags):
                del self._flights[key]
                token, plan.token, plan.generations = plan.token, None, None
                self._release(key, token)

    async def _lock_or_wait(self, plan: _Plan) -> Entry | None:
        """Take the key's fill lock, or wait for the process holding it.

        Returns an entry another process stored meanwhile; None when the app
        must be called (with the lock in ``plan.token``, or without it when the
        owner died or the store is down).
        """
        store = self.store
        if store is None:
            return None
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
        deadline = time.monotonic() + self._lock_timeout
        pause = 0.05 if store.listening else 0.01
        try:
            while True:
                if locked is None:
                    locked = await self._lock(plan)
                    if locked is None:
                        return None  # the store is failing: the app answers
                token, current, plan.generations = locked
                locked = None
                entry = self._fresh(current, plan.policy)
                if entry is not None:
                    # Filled since our lookup: nothing to do but release the lock if we took it.
                    self._release(plan.key, token)
                    return entry
                if token is not None:
                    plan.token = token  # ours (first try, or the holder gave up or died): this request fills
                    return None
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

    async def _forward(self, scope: Scope, receive: Receive, send: Send, headers: RequestHeaders, plan: _Plan,
                       fallback: Entry | None, started: float, flight: _Flight | None = None
                       ) -> tuple[Entry | None, bool, Entry | None]:
        """Call the app within the bound on origin calls; past it, the stale entry or a 503 with Retry-After."""
        template = plan.match.rule.template
        slot = self._origin.take_nowait(template)
        if slot is None:
            if fallback is None:
                slot = await self._origin.take(template, self._origin_wait)
            if slot is None:
                self._give_up_lock(plan)
                self._route_metrics(plan).origin_busy += 1
                if fallback is not None:
                    await self._serve_fallback(fallback, scope, headers, send, None, plan.match, plan.key, started)
                    return None, True, None
                busy = self._origin_busy
                status = await _replay_failure(busy, scope, send, http.STATUS_ORIGIN_BUSY)
                self._log(plan.match, plan.key, "MISS", status, None, started, len(busy.body))
                return None, True, busy
        try:
            return await self._call_origin(scope, receive, send, headers, plan, fallback, started, flight)
        finally:
            slot.release()

    async def _call_origin(self, scope: Scope, receive: Receive, send: Send, headers: RequestHeaders, plan: _Plan,
                           fallback: Entry | None, started: float, flight: _Flight | None
                           ) -> tuple[Entry | None, bool, Entry | None]:
        """Call the app, streaming its response to the client; store the copy afterwards.

        With a ``fallback`` (an entry within stale_if_error) a 5xx, an exception
        or no response start within ``origin_timeout`` serves the fallback instead.
        Returns the entry to share, whether the origin failed, and its 5xx answer.
        """
        policy = plan.policy
        responder = _FillResponder(send, policy, head=scope["method"] == "HEAD",
                                   cache_status=http.STATUS_STALE_MISS if fallback else http.STATUS_MISS,
                                   hold_errors=fallback is not None)
        if flight is not None:
            # The waiters get the response as soon as it is complete, not when the app returns:
            # a Starlette BackgroundTask runs inside the app call, after the last body message.
            responder.flight = flight
        origin_started = time.perf_counter()
        failure: str | None = None
        try:
            if fallback is None:
                await self.app(scope, receive, responder.send)
            else:
                with anyio.move_on_after(policy.origin_timeout) as deadline:
                    responder.deadline = deadline
                    await self.app(scope, receive, responder.send)
                if deadline.cancelled_caught and not responder.started:
                    failure = "timeout"
        except Exception:
            if fallback is None or responder.started:
                raise  # the lock is given up by _miss
            failure = "exception"
        origin_time = time.perf_counter() - origin_started
        if responder.failed_status:
            failure = "status"
        if failure is not None and fallback is not None:
            self._give_up_lock(plan)
            await self._serve_fallback(fallback, scope, headers, send, responder.failed_status, plan.match,
                                       plan.key, started)
            return None, True, None
        entry = responder.entry(tags=plan.tags)
        if entry is not None and plan.generations is not None:
            plan.filling = self.supervisor.submit(
                "fill", self._fill, plan, entry, key=plan.key, timeout=self._store_job_timeout,
                size=entry_cost(entry) + _FILL_PLAN_BYTES)
            if not plan.filling and self.supervisor.running:
                self._route_metrics(plan).fills_shed += 1  # the queue was full
        if not plan.filling:
            self._give_up_lock(plan)
        self._log(plan.match, plan.key, "MISS", responder.status, origin_time, started, responder.size)
        failed = responder.status >= 500
        return entry, failed, responder.failure() if failed else None

    async def _serve_fallback(self, entry: Entry, scope: Scope, headers: RequestHeaders, send: Send,
                              origin_status: int | None, match: RouteMatch, key: str, started: float) -> None:
        status = await _serve(entry, scope, headers, send, time.time(), _STALE,
                              http.cache_status_stale_if_error(origin_status))
        self._log(match, key, "STALE", status, None, started, len(entry.body), "stale-if-error")

    # -- stale-while-revalidate ------------------------------------------------------------------

    def _refresh_later(self, key: str, policy: Policy, match: RouteMatch, scope: Scope) -> None:
        if key in self._refreshing:
            return  # one refresh per key in this process; the lock makes it one across processes
        self._refreshing.add(key)
        plan = self._plan(key, policy, match, scope)
        refresh_scope = _refresh_scope(scope, policy, self._credentials_of(match).header_names)
        if not self.supervisor.submit("refresh", self._refresh, plan, refresh_scope, key=key,
                                      timeout=policy.origin_timeout + self._lock_timeout):
            self._refreshing.discard(key)

    async def _refresh(self, plan: _Plan, scope: Scope) -> None:
        store = self.store
        # The stale entry keeps answering meanwhile: with the origin saturated, a later request retries.
        slot = self._origin.take_nowait(plan.match.rule.template)
        try:
            if store is None or slot is None:
                return
            locked = await self._lock(plan, background=True)
            if locked is None:
                return
            token, current, generations = locked
            if token is None:
                return  # another process is refreshing it
            plan.token, plan.generations = token, generations
            if self._fresh(current, plan.policy) is not None:
                await self._unlock(plan.key, token)
                return
            entry: Entry | None = None
            try:
                with anyio.fail_after(plan.policy.origin_timeout):
                    entry = await self._call_app(scope, plan)
            finally:
                if entry is None:
                    await self._unlock(plan.key, token)  # a failed refresh keeps the old entry
            if entry is not None:
                await self._fill(plan, entry)
                self._route_metrics(plan).refresh_ok += 1
            else:
                self._route_metrics(plan).refresh_failed += 1
        except Exception:
            self._route_metrics(plan).refresh_failed += 1
            raise
        finally:
            if slot is not None:
                slot.release()
            self._refreshing.discard(plan.key)

    def _route_metrics(self, plan: _Plan) -> RouteMetrics:
        return self.metrics.route(plan.match.rule.template, plan.policy.preset or "custom")

    async def _call_app(self, scope: Scope, plan: _Plan) -> Entry | None:
        """Run the app for a request nobody waits on; the entry if its response may be stored."""
        done = anyio.Event()
        requested = False

        async def receive() -> Message:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        responder = _FillResponder(_discard, plan.policy, head=False, cache_status=http.STATUS_MISS,
                                   hold_errors=False)
        try:
            await self.app(scope, receive, responder.send)
        finally:
            done.set()
        if responder.status >= 500:
            return None
        return responder.entry(tags=plan.tags)

    # -- unsafe methods ----------------------------------------------------------------------------

    async def _unsafe(self, scope: Scope, receive: Receive, send: Send, match: RouteMatch, policy: Policy) -> None:
        """Never answered from the cache; a success invalidates what the rule declares, before it completes.

        The last body message is held until the shared store has dropped the
        entries: once the client has the whole response, no server serves them
        from the store again (read-your-writes).
        """
        if not policy.invalidates or self.invalidator is None:
            await self._bypass(scope, receive, send, match, http.STATUS_BYPASS_METHOD)
            return
        invalidator = self.invalidator
        tags = targets_for_unsafe_request(policy.invalidates, match.path_params, mounted_at(scope))
        marker = _Marker(send, _BYPASS, http.STATUS_BYPASS_METHOD)

        async def send_after_invalidating(message: Message) -> None:
            if (message["type"] == "http.response.body" and not message.get("more_body", False)
                    and 200 <= marker.status < 400 and tags):
                try:
                    await invalidator.tags(*tags)
                except Exception:
                    self.store_errors += 1  # the entries expire by themselves; the response still goes out
            await marker.send(message)

        started = time.perf_counter()
        await self.app(scope, receive, send_after_invalidating)
        self._log(match, "", "BYPASS", marker.status, time.perf_counter() - started, started, marker.size)

    # -- store access ----------------------------------------------------------------------------

    async def _get(self, key: str) -> tuple[bytes | None, bool]:
        """The stored value, and whether the store failed (then the app answers: fail open)."""
        store = self.store
        if store is None:
            return None, False
        if not self._remote:
            return await store.get(key), False
        breaker = self._breaker(key)
        if not breaker.allow(time.monotonic()):
            return None, True
        began = time.perf_counter()
        try:
            value = await store.get(key) if self._bounded else await self._within_budget(store.get(key))
        except Exception as exc:  # whatever the driver raises (another loop, trio, a bug): the app answers
            self._store_failed(breaker, exc, began)
            return None, True
        self.metrics.store_latency.observe(time.perf_counter() - began)
        breaker.success()
        return value, False

    async def _get_or_lock(self, plan: _Plan) -> tuple[bytes | None, bool]:
        """``_get`` for a route that has been missing: where the key holds nothing, the lock is tried too.

        That attempt's result waits in ``plan.looked_up`` for ``_lock_or_wait``.
        """
        store = self.store
        assert store is not None
        waiter = store.notifications.waiter(plan.key)  # before the attempt: no announcement slips past
        result = await self._lock(plan, lookup=True)
        if result is None or result[1] is not None:
            waiter.close()
            return (None, True) if result is None else (result[1], False)
        plan.looked_up, plan.waiter = result, waiter
        return None, False

    def _drop_lookup_lock(self, plan: _Plan) -> None:
        """The lookup's lock attempt is not needed after all (another request of this process fills)."""
        if plan.looked_up is not None:
            self._release(plan.key, plan.looked_up[0])
            plan.looked_up = None
        if plan.waiter is not None:
            plan.waiter.close()
            plan.waiter = None

    async def _lock(self, plan: _Plan, *, lookup: bool = False, background: bool = False) -> LockResult | None:
        """The lock attempt of a miss, under the same budget and breaker as a lookup; None if it failed.

        ``lookup``: the store's ``get_or_lock``, which answers the value instead when there is one.
        ``background``: a refresh's, under the deadline of work after the response instead.
        """
        store = self.store
        if store is None:
            return None
        if not self._remote:
            return await store.lock(plan.key, self._lock_timeout, plan.generation_keys, _token())
        breaker = self._breaker(plan.key)
        if not breaker.allow(time.monotonic()):
            return None
        token = _token()
        attempt = store.get_or_lock if lookup else store.lock  # type: ignore[attr-defined]
        began = time.perf_counter()
        try:
            result: LockResult
            if background:
                result = await self._in_background(lambda left: store.lock(
                    plan.key, self._lock_timeout, plan.generation_keys, token, timeout=left))
            else:
                call = attempt(plan.key, self._lock_timeout, plan.generation_keys, token)
                result = await call if self._bounded else await self._within_budget(call)
        except BaseException as exc:
            # Redis may have taken the lock after we stopped waiting (a timeout, or this request
            # cancelled): release it (if it is ours) rather than leave others waiting for a fill
            # that never comes.
            self._release(plan.key, token)
            if not isinstance(exc, Exception):
                raise
            self._store_failed(breaker, exc, began)  # as in _get: any store failure sends the request to the app
            return None
        if lookup:
            self.metrics.store_latency.observe(time.perf_counter() - began)
        breaker.success()
        return result

    async def _in_background(self, call: Callable[[float | None], Awaitable[T]]) -> T:
        """A store call after the response: its own deadline, retried within it on a blip."""
        if not self._remote:
            return await call(None)
        return await within_deadline(call, self._background_budget, scoped=not self._bounded)

    async def _within_budget(self, call: Awaitable[T]) -> T:
        """A request-path store call, failing with TimeoutError after the budget whatever the driver does."""
        if self._bounded:  # the store keeps the budget itself, without a cancel scope per call
            return await call
        with anyio.fail_after(self._budget):
            return await call

    def _breaker(self, key: str) -> CircuitBreaker:
        """On a cluster each node has its own breaker: one node down fails only its slots."""
        shard = self._shard
        if shard is None:
            return self.breaker
        name = shard(key)
        breaker = self.node_breakers.get(name)
        if breaker is None:
            breaker = self.node_breakers[name] = CircuitBreaker(on_transition=self._breaker_moved)
        return breaker

    def _store_failed(self, breaker: CircuitBreaker, error: Exception | None = None, began: float = 0.0) -> None:
        self.store_errors += 1
        self.metrics.store_errors += 1
        if began and isinstance(error, TimeoutError):
            now = time.perf_counter()
            # How late our own loop ran: the deadline's own overshoot, or what the lag monitor saw lately.
            lag = max(now - began - self._budget, self.loop_lag.recent)
            if lag >= self._budget / 2:
                # This process's event loop was saturated, not (or not only) the store slow. The
                # request still goes to the app, but opening the breaker would send every other one
                # there too, just when the process is overloaded.
                self.loop_lag_timeouts += 1
                if now - self._lag_logged_at >= _LAG_LOG_INTERVAL:
                    self._lag_logged_at = now
                    self.supervisor.submit("log", _log_loop_lag, lag, self.loop_lag_timeouts, self.store_errors)
                return
        breaker.failure(time.monotonic())

    def _store_reconnected(self) -> None:
        for breaker in (self.breaker, *self.node_breakers.values()):
            breaker.probe_now()

    def _breaker_moved(self, previous: str, state: str) -> None:
        self.supervisor.submit("log", _log_breaker, previous, state, self.store_errors, self.loop_lag_timeouts)

    def _decode(self, key: str, data: bytes) -> Entry | None:
        entry = self._decoded_entries.get(data)
        if entry is not None:
            return entry
        try:
            entry = decode_entry(data)
        except EntryDecodeError as exc:
            if not self._warned_corrupt:
                self._warned_corrupt = True
                self.supervisor.submit("log", _log_corrupt, key, str(exc))
            return None  # a miss; the fill overwrites it
        self._decoded.put(data, entry)
        return entry

    def _fresh(self, data: bytes | None, policy: Policy) -> Entry | None:
        if data is None:
            return None
        try:
            entry = decode_entry(data)
        except EntryDecodeError:
            return None
        if freshness(entry.stored_at, policy, time.time()) is Freshness.FRESH:
            return entry
        return None

    async def _fill(self, plan: _Plan, entry: Entry) -> None:
        store = self.store
        if store is None or plan.generations is None:
            return
        try:
            data = encode_entry(entry)
        except ValueError:
            if plan.token is not None:
                await self._unlock(plan.key, plan.token)
            return
        tag_sets = [tag_keys(self._prefix, tag)[0] for tag in entry.tags]
        if self._remote and self._breaker(plan.key).state == "open":
            # Don't hammer a store that is down: the next miss after it recovers refills. The
            # lock is still released (one small command), or its waiters would wait it out.
            if plan.token is not None:
                await self._unlock(plan.key, plan.token)
            return
        generations, token, ttl = plan.generations, plan.token, plan.policy.usable_for
        try:
            stored = await self._in_background(lambda left: store.fill(
                plan.key, data, ttl, token, tag_sets, plan.generation_keys, generations, timeout=left))
        except Exception:
            self._store_failed(self._breaker(plan.key))  # this fill is lost; the next miss refills
            if plan.token is not None:
                await self._unlock(plan.key, plan.token)  # a lost fill must not leave its lock to expire
            return
        if stored:
            route_metrics = self._route_metrics(plan)
            route_metrics.stored_entries += 1
            route_metrics.stored_bytes += len(data)
        if stored and plan.policy.sync > 0 and self._remote:
            self.l1.put(plan.key, entry, plan.policy.sync)

    async def _unlock(self, key: str, token: str) -> None:
        store = self.store
        if store is None:
            return
        try:
            await self._in_background(lambda left: store.unlock(key, token, timeout=left))
        except Exception:
            self._store_failed(self._breaker(key))  # the lock expires by itself

    def _give_up_lock(self, plan: _Plan) -> None:
        """Release the plan's fill lock (once): this response will not be stored."""
        token, plan.token = plan.token, None
        self._release(plan.key, token)

    def _release(self, key: str, token: str | None) -> None:
        if token is None:
            return
        if not self.supervisor.submit("unlock", self._unlock, key, token, key=key, timeout=self._store_job_timeout) \
                and self.supervisor.running:
            # Shed with a full queue: a release is never dropped, or every request for the key
            # would wait out the lock. The pending set is bounded by the locks this process holds.
            self._pending_releases[key] = token
            if self._releases_wanted is not None:
                self._releases_wanted.set()

    async def _send_pending_releases(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """A service: the releases a full queue could not take, sent as soon as they come."""
        self._releases_wanted = anyio.Event()
        task_status.started()
        while True:
            if not self._pending_releases:  # some may have come before this (re)start: send them now
                await self._releases_wanted.wait()
            self._releases_wanted = anyio.Event()
            pending, self._pending_releases = self._pending_releases, {}
            # Many at once (one round trip each, pipelined): a backlog of thousands drains in
            # moments, not one round trip after another, and holds little memory meanwhile.
            items = list(pending.items())
            for start in range(0, len(items), _RELEASES_AT_ONCE):
                async with anyio.create_task_group() as releases:
                    for key, token in items[start : start + _RELEASES_AT_ONCE]:
                        releases.start_soon(self._release_now, key, token)

    async def _release_now(self, key: str, token: str) -> None:
        with anyio.move_on_after(_RELEASE_TIMEOUT):
            await self._unlock(key, token)

    # -- bypass and logging ----------------------------------------------------------------------

    async def _bypass(self, scope: Scope, receive: Receive, send: Send, match: RouteMatch,
                      cache_status: bytes) -> None:
        marker = _Marker(send, _BYPASS, cache_status)
        started = time.perf_counter()
        await self.app(scope, receive, marker.send)
        self._log(match, "", "BYPASS", marker.status, time.perf_counter() - started, started, marker.size)

    def _log(self, match: RouteMatch, key: str, state: str, status: int, origin: float | None, started: float,
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


_frozen = False


def _freeze_startup_objects() -> None:
    """Collect startup's garbage, then move every object alive now out of the collector's view; once a process.

    What is alive once the app has started (modules, routes, the app's own state)
    mostly lives as long as the process; a full collection would walk all of it
    each time, pausing every request in flight. ``gc.freeze()`` leaves it out, so
    full collections only walk what requests made. Only the first startup: a
    process that starts apps many times (a test suite) would otherwise never free
    what was alive at each later one.
    """
    global _frozen
    if _frozen:
        return
    _frozen = True
    gc.collect()
    gc.freeze()


def _token() -> str:
    """A lock token: 64 random bits, without a system call (``random`` reseeds in a forked child)."""
    return f"{getrandbits(64):016x}"


def _origin_busy_answer(retry_after: int) -> Entry:
    """Our 503 past ``origin_concurrency``: made once at startup, replayed as is."""
    body = b"The service is busy; try again shortly.\n"
    return Entry(status=503, headers=(
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body)),
        (b"retry-after", b"%d" % retry_after), (b"cache-control", b"no-store")),
        body=body, stored_at=0.0, etag=b"", tags=())


def _replaying(first: Message, receive: Receive) -> Receive:
    """``receive`` with ``first`` given back once, before what follows."""
    pending: list[Message] = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _credential_names(rule: RouteRule) -> tuple[str, ...]:
    """A route's credentials as the ``credentials`` setting names them ("x-api-key", "cookie:NAME")."""
    return tuple(name if where == "header" else f"{where}:{name}" for where, name in rule.credentials)


async def _quietly(closing: Any) -> None:
    with contextlib.suppress(StoreError):
        await closing


async def _discard(message: Message) -> None:
    pass


async def _log_loop_lag(lag: float, lag_timeouts: int, errors: int) -> None:
    logger.warning("cachemw: event loop lagging (%.0f ms late): a store timeout was this process's own lateness, "
                   "not the store's; the circuit breaker does not count it (%d of %d store errors so far)",
                   lag * 1000, lag_timeouts, errors)


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


def _without_unkeyed_overrides(scope: Scope, policy: Policy) -> Scope:
    """Headers that make apps answer for another host, scheme, URL or method never reach them unkeyed."""
    headers = scope.get("headers", ())
    if not any(name in http.OVERRIDE_HEADERS for name, _ in headers):
        return scope
    keyed = {name.encode("latin-1") for name in policy.vary_headers}
    kept = [(name, value) for name, value in headers if name not in http.OVERRIDE_HEADERS or name in keyed]
    return dict(scope, headers=kept)


def _refresh_scope(scope: Scope, policy: Policy, credential_headers: Sequence[bytes]) -> dict[str, Any]:
    """A bodiless GET with only the headers that form the key: what the entry was made of."""
    keep = {b"host", *(name.encode("latin-1") for name in policy.vary_headers)}
    if policy.private or policy.vary_cookies:
        keep |= {b"cookie", *credential_headers}
    refresh = dict(scope)
    refresh["method"] = "GET"
    refresh["headers"] = [(name, value) for name, value in scope.get("headers", ()) if name in keep]
    refresh["extensions"] = {}
    return refresh


async def _serve(entry: Entry, scope: Scope, headers: RequestHeaders, send: Send, now: float,
                 x_cache: bytes, cache_status: bytes) -> int:
    age = now - entry.stored_at
    if_none_match = headers.get(b"if-none-match")
    if if_none_match is not None and http.etag_matches(if_none_match, entry.etag):
        await send({"type": "http.response.start", "status": 304,
                    "headers": http.hit_headers(http.not_modified_headers(entry.headers), age, x_cache,
                                                cache_status)})
        await send({"type": "http.response.body", "body": b""})
        return 304
    await send({"type": "http.response.start", "status": entry.status,
                "headers": http.hit_headers(entry.headers, age, x_cache, cache_status)})
    body = b"" if scope["method"] == "HEAD" else entry.body
    await send({"type": "http.response.body", "body": body})
    return entry.status


async def _replay_failure(failure: Entry, scope: Scope, send: Send, cache_status: bytes = http.STATUS_COLLAPSED
                          ) -> int:
    """An error answer not from the app (the leader's, or ours when the origin is saturated): never a 304."""
    await send({"type": "http.response.start", "status": failure.status,
                "headers": [*failure.headers, (http.X_CACHE, _MISS), (http.CACHE_STATUS, cache_status)]})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else failure.body})
    return failure.status


class _Marker:
    """Pass the response through, adding only the cache headers."""

    __slots__ = ("_cache_status", "_send", "_x_cache", "size", "status")

    def __init__(self, send: Send, x_cache: bytes, cache_status: bytes) -> None:
        self._send = send
        self._x_cache = x_cache
        self._cache_status = cache_status
        self.status = 0
        self.size = 0

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message = dict(message)
            message["headers"] = [*message.get("headers", ()), (http.X_CACHE, self._x_cache),
                                  (http.CACHE_STATUS, self._cache_status)]
        elif message["type"] == "http.response.body":
            self.size += len(message.get("body", b""))
        await self._send(message)


class _FillResponder:
    """Streams the app's response to the client while keeping a copy to store.

    A storable response's start is held until the first body chunk: when that
    chunk is the whole body the ETag can be sent on the miss too. With
    ``hold_errors`` a 5xx is swallowed, so a stale entry can answer instead.
    """

    __slots__ = ("_chunks", "_entry", "_etag", "_failure_chunks", "_head", "_headers", "_held", "_hold_errors",
                 "_policy", "_send", "cache_status", "complete", "deadline", "failed_status", "flight", "response_tags",
                 "size", "started", "status", "storable", "stored_at")

    def __init__(self, send: Send, policy: Policy, *, head: bool, cache_status: bytes, hold_errors: bool) -> None:
        self._send = send
        self._policy = policy
        self._head = head
        self._hold_errors = hold_errors
        self.cache_status = cache_status
        self._chunks: list[bytes] = []
        self._failure_chunks: list[bytes] | None = None  # a copy of a 5xx answer, for the waiters to share
        self._entry: Entry | None = None
        self._etag: bytes | None = None
        # Finished with the entry once the whole response went out. Not a callback: a closure over the
        # responder would make a reference cycle of every miss, left to the garbage collector to free.
        self.flight: _Flight | None = None
        self._held: dict[str, Any] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self.size = 0
        self.status = 0
        self.failed_status: int | None = None
        self.storable = False
        self.started = False  # something went to the client: no way back to a fallback
        self.complete = False
        self.stored_at = 0.0
        self.deadline: anyio.CancelScope | None = None
        self.response_tags: tuple[str, ...] = ()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.failed_status is not None:
            return  # the app's error response is replaced by the fallback
        if kind == "http.response.start":
            self.stored_at = time.time()
            self.status = message["status"]
            if self._hold_errors and self.status >= 500:
                self.failed_status = self.status
                return
            if self.deadline is not None:
                self.deadline.deadline = math.inf  # answered in time: let the body take what it takes
            raw_headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != http.CACHE_TAG]
            if len(raw_headers) != len(message.get("headers", ())):
                # Tags the handler adds to its own entry; the client never sees the header.
                self.response_tags = http.parse_cache_tags(message["headers"])
            self._headers = raw_headers
            self.storable = not self._head and http.not_storable_reason(self.status, raw_headers, self._policy) is None
            if self.status >= 500 and not self.storable:
                self._failure_chunks = []
            start: dict[str, Any] = dict(message)
            start["headers"] = [*raw_headers, (http.X_CACHE, _MISS), (http.CACHE_STATUS, self.cache_status)]
            self.started = True
            # A response that announces its length (Starlette's Response) sends its body at once:
            # hold the start to add the ETag. A stream may wait long for its first chunk (events,
            # long polls): its start goes out now, without an ETag on this miss.
            if self.storable and http.header_values(raw_headers, b"content-length"):
                self._held = start
                return
            await self._send(start)
            return
        if kind == "http.response.body":
            body: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            self.size += len(body)
            if self.storable:
                if self.size > self._policy.max_body:
                    self.storable = False
                    self._chunks = []
                else:
                    self._chunks.append(body)
            elif self._failure_chunks is not None:
                if self.size > self._policy.max_body:
                    self._failure_chunks = None
                else:
                    self._failure_chunks.append(body)
            if self._held is not None:
                held, self._held = self._held, None
                if not more and self.storable and http.response_etag(self._headers) is None:
                    self._etag = http.make_etag(body)  # the entry's too: the body is this one chunk
                    held["headers"].append((b"etag", self._etag))
                await self._send(held)
            await self._send(message)
            if not more:
                self.complete = True
                if self.flight is not None and self.storable:
                    self.flight.finish(self.entry(tags=self.flight.plan.tags))
            return
        # Trailers, pathsend, anything new: not ours to copy.
        self.storable = False
        if self._held is not None:
            held, self._held = self._held, None
            await self._send(held)
        await self._send(message)

    def failure(self) -> Entry | None:
        """The app's whole 5xx answer, to replay (never store) to the requests that waited on this one."""
        if not self.complete or self._failure_chunks is None:
            return None
        body = b"".join(self._failure_chunks)
        headers = http.stored_headers(self._headers, None, len(body), self.status)
        return Entry(status=self.status, headers=headers, body=body, stored_at=self.stored_at, etag=b"", tags=())

    def entry(self, *, tags: tuple[str, ...]) -> Entry | None:
        """The entry to store, once the whole response went out; None if it must not be stored."""
        if not (self.complete and self.storable):
            return None
        if self._entry is not None:
            return self._entry
        body = b"".join(self._chunks)
        etag = self._etag or http.response_etag(self._headers) or http.make_etag(body)
        self._entry = Entry(
            status=self.status,
            headers=http.stored_headers(self._headers, etag, len(body), self.status),
            body=body,
            stored_at=self.stored_at,
            etag=etag,
            tags=(*tags, *self.response_tags),
        )
        return self._entry
