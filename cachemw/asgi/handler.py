"""One ASGI request through the cache: the core decides, this carries the decision out.

Everything a request needs is in its arguments, its locals and its plan; the
handler itself holds only the app, the runtime and the identity function, built
once when the middleware starts.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cachemw.asgi.responses import (
    BYPASS,
    HIT,
    MISS,
    STALE,
    FillResponder,
    StatusMarker,
    discard,
    refresh_scope,
    replay_failure,
    replaying,
    serve,
    without_unkeyed_overrides,
)
from cachemw.core import decide, http
from cachemw.core.decide import Step
from cachemw.core.entry import Entry, is_pass_marker
from cachemw.core.keys import RequestHeaders, mounted_at
from cachemw.core.policy import Policy
from cachemw.core.rules import RouteMatch
from cachemw.runtime.flights import CoalescedFailure, Flight
from cachemw.runtime.invalidation import targets_for_unsafe_request
from cachemw.runtime.locks import PassThrough
from cachemw.runtime.plan import FillPlan
from cachemw.runtime.runtime import CacheRuntime, Identity

__all__ = ["RequestHandler"]

_BODY_NEEDS_HEADERS = frozenset({"1.0", "1.1"})  # where a request body must announce itself in its headers


# The hits' steps as module globals: an Enum class's attribute goes through its metaclass (CPython 3.11:
# ~930 instructions a read under callgrind, against a handful for a global), and every request compares with these.
_LOOK_UP = Step.LOOK_UP
_SERVE = Step.SERVE


class RequestHandler:
    """Carries out the core's steps for the requests of routes with a policy."""

    __slots__ = ("app", "identity", "runtime")

    def __init__(self, app: ASGIApp, runtime: CacheRuntime, identity: Identity | None) -> None:
        self.app = app
        self.runtime = runtime
        self.identity = identity  # None: the credentials are the identity

    def http(self, scope: Scope, receive: Receive, send: Send, match: RouteMatch) -> Coroutine[Any, Any, None]:
        """The request's next step, as the coroutine to await.

        Not a coroutine itself: the one it returns is awaited by the middleware
        directly, so a request's await chain (resumed once per store reply) holds one
        frame of ours fewer.
        """
        policy = match.rule.policy
        assert policy is not None
        step, reason = decide.for_method(scope["method"], policy)
        if step is not _LOOK_UP:
            if step is Step.INVALIDATE:
                return self.unsafe(scope, receive, send, match)
            return self.bypass(scope, receive, send, match, reason)
        headers = RequestHeaders(scope)
        identity, bypass = self.runtime.identify(match.rule, policy, headers, scope, self.identity)
        if bypass is not None:
            return self.bypass(scope, receive, send, match, bypass)
        if scope.get("http_version", "1.1") not in _BODY_NEEDS_HEADERS:
            return self.look_up_without_body(scope, receive, send, match, policy, headers, identity)
        return self.look_up(scope, receive, send, match, policy, headers, identity)

    async def look_up_without_body(self, scope: Scope, receive: Receive, send: Send, match: RouteMatch,
                                   policy: Policy, headers: RequestHeaders, identity: str | None) -> None:
        """HTTP/2 and 3 frame a body without announcing it: the first message (given to the app again
        after) tells there is none, or the request bypasses."""
        first = await receive()
        receive = replaying(first, receive)
        if first.get("body") or first.get("more_body"):
            await self.bypass(scope, receive, send, match, http.STATUS_BYPASS_REQUEST)
            return
        await self.look_up(scope, receive, send, match, policy, headers, identity)

    async def look_up(self, scope: Scope, receive: Receive, send: Send, match: RouteMatch, policy: Policy,
                      headers: RequestHeaders, identity: str | None) -> None:
        """One store read (none on an L1 hit), then the core's step: serve, serve stale, fall back, or fill.

        The hits, from the L1 and from the store, are answered inline: each call and
        coroutine of ours on their path is paid by every hit.
        """
        runtime = self.runtime
        started = time.perf_counter()
        keyed = runtime.keys.key(scope, headers, policy, match.rule.label, runtime.prefix, identity)
        key = keyed.key
        if keyed.query_string is not None:
            scope = dict(scope, query_string=keyed.query_string)
        remote_l1 = policy.sync > 0 and runtime.remote
        if remote_l1 and runtime.store.listening:
            entry = runtime.l1.get(key)
            if entry is not None:
                now = time.time()
                if decide.for_entry(entry.stored_at, policy, now) is _SERVE:
                    status = await serve(entry, scope, headers, send, now, HIT,
                                         http.cache_status_hit(policy.ttl - (now - entry.stored_at)))
                    runtime.log(match, key, "HIT", status, None, started, len(entry.body), "l1")
                    return
        plan: FillPlan | None = None
        ticket = runtime.l1.seq  # an eviction heard while the read is in flight keeps its copy out of the L1
        if runtime.lookup_locks and match.rule.template in runtime.missing:
            # A route that has been missing: where the key holds nothing, the lock is tried in the
            # same round trip (inline: a coroutine of its own would be one more frame per miss).
            plan = runtime.planner.plan(key, policy, match, scope["path"])
            data, failed = await runtime.locks.get_or_lock(plan)
        else:
            data, failed = await runtime.guarded.get(key)
        if is_pass_marker(data):
            await self.pass_to_app(scope, receive, send, match, policy, key, started, plan)
            return
        entry = None if data is None else runtime.decode(key, data)
        if failed and remote_l1:
            # The store is down: the L1 may still answer within stale_if_error (past sync only if the rule says so).
            entry = runtime.l1.last_resort(key, within_sync=not policy.stale_if_error)
        now = time.time()
        step = decide.for_stored(None if entry is None else entry.stored_at, policy, now, failed)
        if step is _SERVE and entry is not None:
            if remote_l1:
                runtime.l1.put(key, entry, policy.sync, ticket)
            status = await serve(entry, scope, headers, send, now, HIT,
                                 http.cache_status_hit(policy.ttl - (now - entry.stored_at)))
            runtime.log(match, key, "HIT", status, None, started, len(entry.body))
            return
        if entry is not None and step is not Step.FILL and step is not Step.FILL_WITH_FALLBACK:
            await self.answer_stale(step, entry, scope, headers, send, match, key, started, now)
            return
        if runtime.lookup_locks:
            runtime.missing.add(match.rule.template)
        await self.miss(scope, receive, send, plan or runtime.planner.plan(key, policy, match, scope["path"]),
                        headers, entry if step is Step.FILL_WITH_FALLBACK else None, started)

    async def answer_stale(self, step: Step, entry: Entry, scope: Scope, headers: RequestHeaders, send: Send,
                           match: RouteMatch, key: str, started: float, now: float) -> None:
        """Answer from a stored entry that is not fresh: stale (one refresh starts), or as the fallback of a
        failing store."""
        runtime = self.runtime
        policy = match.rule.policy
        assert policy is not None
        if step is Step.SERVE_FALLBACK:
            await self.serve_fallback(entry, scope, headers, send, None, match, key, started)
            return
        status = await serve(entry, scope, headers, send, now, STALE,
                             http.cache_status_hit(policy.ttl - (now - entry.stored_at)))
        self.refresh_later(key, policy, match, scope)
        runtime.log(match, key, "STALE", status, None, started, len(entry.body))

    # -- misses: one fill per key, in this process and across processes ---------------------------

    async def miss(self, scope: Scope, receive: Receive, send: Send, plan: FillPlan, headers: RequestHeaders,
                   fallback: Entry | None, started: float) -> None:
        runtime = self.runtime
        key = plan.key
        scope = without_unkeyed_overrides(scope, plan.policy)
        flights = runtime.flights
        flight = flights.get(key)
        if flight is not None:
            await self.join(flight, scope, receive, send, plan, headers, fallback, started)
            return
        flight = flights.start(plan)
        try:
            shared = await runtime.locks.lock_or_wait(plan)
            if isinstance(shared, PassThrough):
                flight.finish(None)  # this process's waiters go to the app too, at once
                await self.pass_to_app(scope, receive, send, plan.match, plan.policy, key, started, None)
                return
            if shared is not None:
                flight.finish(shared)
                status = await serve(shared, scope, headers, send, time.time(), MISS, http.STATUS_COLLAPSED)
                runtime.log(plan.match, key, "MISS", status, None, started, len(shared.body), "collapsed")
                return
            try:
                entry, failed, failure = await self.forward(scope, receive, send, headers, plan, fallback, started,
                                                            flight)
            except BaseException as exc:
                # The app raised, or this request was cancelled (the client left, waiting for a slot or
                # the app): the lock goes at once, not after lock_timeout, unless a fill job has it.
                if not plan.filling:
                    runtime.locks.give_up(plan)
                flight.finish(None, failed=True, raised=isinstance(exc, Exception))
                raise
            flight.finish(entry, failed, failure)
        finally:
            flights.end(flight)

    async def join(self, flight: Flight, scope: Scope, receive: Receive, send: Send, plan: FillPlan,
                   headers: RequestHeaders, fallback: Entry | None, started: float) -> None:
        """Another request of this process fills the key: wait (bounded) and share its outcome, a failure too."""
        runtime = self.runtime
        key = plan.key
        runtime.locks.drop_lookup_lock(plan)
        runtime.metrics.waiting_on_fills += 1
        try:
            done = await flight.wait(runtime.locks.lock_timeout)
        finally:
            runtime.metrics.waiting_on_fills -= 1
        step = decide.after_wait(done, flight.entry is not None, flight.failed, fallback is not None,
                                 flight.failure is not None, flight.raised)
        if step is Step.SHARE:
            assert flight.entry is not None
            status = await serve(flight.entry, scope, headers, send, time.time(), MISS, http.STATUS_COLLAPSED)
            runtime.log(plan.match, key, "MISS", status, None, started, len(flight.entry.body), "collapsed")
        elif step is Step.SERVE_FALLBACK:
            assert fallback is not None
            await self.serve_fallback(fallback, scope, headers, send, None, plan.match, key, started)
        elif step is Step.REPLAY_FAILURE:
            assert flight.failure is not None
            status = await replay_failure(flight.failure, scope, send)  # its Cache-Status: collapsed
            runtime.log(plan.match, key, "MISS", status, None, started, len(flight.failure.body), "collapsed")
        elif step is Step.FAIL:
            raise CoalescedFailure(f"the request for {scope['path']!r} this one waited on failed; "
                                   "the app was not called again for it")
        else:
            await self.forward(scope, receive, send, headers, plan, fallback, started)  # unknown generations

    async def forward(self, scope: Scope, receive: Receive, send: Send, headers: RequestHeaders, plan: FillPlan,
                      fallback: Entry | None, started: float, flight: Flight | None = None
                      ) -> tuple[Entry | None, bool, Entry | None]:
        """Call the app within the bound on origin calls; past it, the stale entry or a 503 with Retry-After."""
        runtime = self.runtime
        template = plan.match.rule.template
        slot = runtime.origin.take_nowait(template)
        if slot is None:
            if fallback is None:
                slot = await runtime.origin.take(template, runtime.settings.origin_wait)
            if slot is None:
                runtime.locks.give_up(plan)
                runtime.route_metrics(plan.match.rule).origin_busy += 1
                if fallback is not None:
                    await self.serve_fallback(fallback, scope, headers, send, None, plan.match, plan.key, started)
                    return None, True, None
                busy = runtime.origin_busy
                status = await replay_failure(busy, scope, send, http.STATUS_ORIGIN_BUSY)
                runtime.log(plan.match, plan.key, "MISS", status, None, started, len(busy.body))
                return None, True, busy
        try:
            return await self.call_origin(scope, receive, send, headers, plan, fallback, started, flight)
        finally:
            slot.release()

    async def call_origin(self, scope: Scope, receive: Receive, send: Send, headers: RequestHeaders,
                          plan: FillPlan, fallback: Entry | None, started: float, flight: Flight | None
                          ) -> tuple[Entry | None, bool, Entry | None]:
        """Call the app, streaming its response to the client; store the copy afterwards.

        With a ``fallback`` (an entry within stale_if_error) a 5xx, an exception
        or no response start within ``origin_timeout`` serves the fallback instead.
        Returns the entry to share, whether the origin failed, and its 5xx answer.
        """
        runtime = self.runtime
        policy = plan.policy
        responder = FillResponder(send, policy, head=scope["method"] == "HEAD",
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
                raise  # the lock is given up by miss()
            failure = "exception"
        origin_time = time.perf_counter() - origin_started
        if responder.failed_status:
            failure = "status"
        if decide.after_origin(failure, fallback is not None) is Step.SERVE_FALLBACK:
            assert fallback is not None
            runtime.locks.give_up(plan)
            await self.serve_fallback(fallback, scope, headers, send, responder.failed_status, plan.match,
                                      plan.key, started)
            return None, True, None
        entry = responder.entry(tags=plan.tags)
        if entry is not None:
            runtime.fills.submit(plan, entry)
        elif responder.uncacheable:
            runtime.fills.pass_through(plan)
        else:
            runtime.locks.give_up(plan)
        runtime.log(plan.match, plan.key, "MISS", responder.status, origin_time, started, responder.size)
        failed = responder.status >= 500
        return entry, failed, responder.failure() if failed else None

    async def pass_to_app(self, scope: Scope, receive: Receive, send: Send, match: RouteMatch, policy: Policy,
                          key: str, started: float, plan: FillPlan | None) -> None:
        """A key whose last response could not be stored: to the app, within the origin bound, no lock, no
        flight, nothing stored (hit-for-pass, until the marker expires or a purge drops it).

        ``plan``: the lookup's, whose waiter registration is dropped (its lookup found the marker, no lock).
        """
        runtime = self.runtime
        if plan is not None:
            runtime.locks.drop_lookup_lock(plan)
        template = match.rule.template
        slot = runtime.origin.take_nowait(template) or await runtime.origin.take(template, runtime.settings.origin_wait)
        if slot is None:
            runtime.route_metrics(match.rule).origin_busy += 1
            busy = runtime.origin_busy
            status = await replay_failure(busy, scope, send, http.STATUS_ORIGIN_BUSY)
            runtime.log(match, key, "MISS", status, None, started, len(busy.body))
            return
        marker = StatusMarker(send, MISS, http.STATUS_PASS)
        origin_started = time.perf_counter()
        try:
            await self.app(without_unkeyed_overrides(scope, policy), receive, marker.send)
        finally:
            slot.release()
        runtime.log(match, key, "MISS", marker.status, time.perf_counter() - origin_started, started, marker.size)

    async def serve_fallback(self, entry: Entry, scope: Scope, headers: RequestHeaders, send: Send,
                             origin_status: int | None, match: RouteMatch, key: str, started: float) -> None:
        status = await serve(entry, scope, headers, send, time.time(), STALE,
                             http.cache_status_stale_if_error(origin_status))
        self.runtime.log(match, key, "STALE", status, None, started, len(entry.body), "stale-if-error")

    # -- stale-while-revalidate ------------------------------------------------------------------

    def refresh_later(self, key: str, policy: Policy, match: RouteMatch, scope: Scope) -> None:
        runtime = self.runtime
        if key in runtime.fills.refreshing:
            return  # one refresh per key in this process; the lock makes it one across processes
        plan = runtime.planner.plan(key, policy, match, scope["path"])
        refresh = refresh_scope(scope, policy, runtime.credentials_of(match.rule).header_names)

        async def call_origin() -> Entry | None:
            return await self.call_app(refresh, plan)

        runtime.fills.refresh_later(plan, call_origin)

    async def call_app(self, scope: Scope, plan: FillPlan) -> Entry | None:
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

        responder = FillResponder(discard, plan.policy, head=False, cache_status=http.STATUS_MISS,
                                  hold_errors=False)
        try:
            await self.app(scope, receive, responder.send)
        finally:
            done.set()
        if responder.status >= 500:
            return None
        return responder.entry(tags=plan.tags)

    # -- unsafe methods and bypasses ---------------------------------------------------------------

    async def unsafe(self, scope: Scope, receive: Receive, send: Send, match: RouteMatch) -> None:
        """Never answered from the cache; a success invalidates what the rule declares, before it completes.

        The last body message is held until the shared store has dropped the
        entries: once the client has the whole response, no server serves them
        from the store again (read-your-writes).
        """
        runtime = self.runtime
        policy = match.rule.policy
        assert policy is not None
        invalidator = runtime.invalidator
        params, mounted = match.path_params, mounted_at(scope)
        tags = targets_for_unsafe_request(policy.invalidates, params, mounted)
        # A target both rules name (a path and its route, say) goes hard: the harder purge wins.
        soft_tags = [tag for tag in targets_for_unsafe_request(policy.invalidates_soft, params, mounted)
                     if tag not in tags]
        marker = StatusMarker(send, BYPASS, http.STATUS_BYPASS_METHOD)

        async def send_after_invalidating(message: Message) -> None:
            if (message["type"] == "http.response.body" and not message.get("more_body", False)
                    and 200 <= marker.status < 400 and (tags or soft_tags)):
                try:
                    if tags:
                        await invalidator.tags(*tags)
                    if soft_tags:
                        await invalidator.tags(*soft_tags, soft=True)
                except Exception:
                    runtime.guarded.count_error()  # the entries expire by themselves; the response still goes out
            await marker.send(message)

        started = time.perf_counter()
        await self.app(scope, receive, send_after_invalidating)
        runtime.log(match, "", "BYPASS", marker.status, time.perf_counter() - started, started, marker.size)

    async def bypass(self, scope: Scope, receive: Receive, send: Send, match: RouteMatch,
                     cache_status: bytes) -> None:
        marker = StatusMarker(send, BYPASS, cache_status)
        started = time.perf_counter()
        await self.app(scope, receive, marker.send)
        self.runtime.log(match, "", "BYPASS", marker.status, time.perf_counter() - started, started, marker.size)

