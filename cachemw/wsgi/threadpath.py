"""The request thread's own path: fresh hits answered, and the usual miss led, without a hop to the cache's loop.

A hop to the loop and back costs a WSGI request more than a hit itself (two thread
wake-ups). So the request thread looks up the key itself (the process's L1, then one
command on a plain blocking Redis client) and, when the core says ``SERVE``, answers.
For a route that has been missing, that one command is the lookup that also tries
the fill lock: when it took the lock, the thread leads the miss (``LedMiss``).
Everything else (the lock held elsewhere, a stale entry, a store that fails, a
bypass) goes to the loop, which decides again from the start and does the
accounting: this path changes no shared state but through the loop (its log, its L1
copy and its fill are handed there).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from starlette.types import Message

from cachemw.asgi.responses import HIT, serve
from cachemw.core import decide, http
from cachemw.core.decide import Step
from cachemw.core.entry import Entry, EntryDecodeError, decode_entry
from cachemw.core.keys import RequestHeaders
from cachemw.core.policy import Policy
from cachemw.core.rules import RouteMatch
from cachemw.runtime.locks import new_token
from cachemw.runtime.runtime import CacheRuntime, Identity
from cachemw.store.blocking import BlockingRedis
from cachemw.wsgi.exchange import StartResponse, respond, run_now
from cachemw.wsgi.lead import LedMiss, WSGIApp
from cachemw.wsgi.loop import BackgroundLoop

__all__ = ["ThreadPath", "blocking_client"]


_PLAIN_SCHEMES = ("redis://", "rediss://", "unix://")


def blocking_client(runtime: CacheRuntime) -> BlockingRedis | None:
    """A blocking client on the runtime's own Redis, within the request budget; None where there is none.

    Only for one plain server (``redis://``, ``rediss://``, ``unix://``) the runtime
    opened itself: a cluster, Sentinel or a store given by the app is reached through the loop.
    """
    url = runtime.settings.redis_url or ""
    if not runtime.owns_store or not runtime.remote or not url.startswith(_PLAIN_SCHEMES):
        return None
    return BlockingRedis(url, runtime.settings.store_timeout)


class ThreadPath:
    """``answer`` a request in the calling thread (a fresh hit, or a miss it leads), or say None (the loop takes it)."""

    def __init__(self, app: WSGIApp, runtime: CacheRuntime, client: BlockingRedis | None, loop: BackgroundLoop,
                 identity: Identity | None) -> None:
        self.app = app
        self.runtime = runtime
        self.client = client
        self.loop = loop
        self.identity = identity
        self._leads = client is not None and runtime.lookup_locks

    def answer(self, environ: dict[str, Any], scope: dict[str, Any], match: RouteMatch,
               start_response: StartResponse) -> Iterable[bytes] | None:
        runtime = self.runtime
        policy = match.rule.policy
        if policy is None or decide.for_method(scope["method"], policy)[0] is not Step.LOOK_UP:
            return None
        started = time.perf_counter()
        headers = RequestHeaders(scope)
        identity, bypass = runtime.identify(match.rule, policy, headers, scope, self.identity)
        if bypass is not None:
            return None
        keyed = runtime.keys.key(scope, headers, policy, match.rule.label, runtime.prefix, identity)
        key = keyed.key
        now = time.time()
        entry = runtime.l1.get(key) if policy.sync > 0 and runtime.store.listening else None
        tier = "l1"
        if entry is None or decide.for_entry(entry.stored_at, policy, now) is not Step.SERVE:
            tier = ""
            if match.rule.template in runtime.missing:
                if not self._leads or keyed.query_string is not None:
                    return None  # the loop's lookup takes the lock in the same round trip
                return self._look_up_or_lead(environ, scope, match, policy, headers, key, started, start_response)
            ticket = runtime.l1.seq  # read in this thread: an eviction since keeps the copy out (L1.put)
            entry = self._stored(key)
            if entry is None or decide.for_stored(entry.stored_at, policy, now, False) is not Step.SERVE:
                return None
            if policy.sync > 0:
                self.loop.later(runtime.l1.put, key, entry, policy.sync, ticket)
        return self._serve(entry, scope, headers, match, policy, key, now, started, start_response, tier)

    def _serve(self, entry: Entry, scope: dict[str, Any], headers: RequestHeaders, match: RouteMatch,
               policy: Policy, key: str, now: float, started: float, start_response: StartResponse,
               tier: str = "") -> list[bytes]:
        messages: list[Message] = []
        status = run_now(serve(entry, scope, headers, _collector(messages), now, HIT,
                               http.cache_status_hit(policy.ttl - (now - entry.stored_at))))
        self.loop.later(self.runtime.log, match, key, "HIT", status, None, started, len(entry.body), tier)
        return respond(messages, start_response)

    def _look_up_or_lead(self, environ: dict[str, Any], scope: dict[str, Any], match: RouteMatch, policy: Policy,
                         headers: RequestHeaders, key: str, started: float, start_response: StartResponse
                         ) -> Iterable[bytes] | None:
        """A route that has been missing: one command looks the key up and, where it holds nothing, takes the lock."""
        runtime, client, loop = self.runtime, self.client, self.loop
        assert client is not None
        if runtime.guarded.is_open(key):
            return None
        plan = runtime.planner.plan(key, policy, match, scope["path"])
        token = new_token()
        ticket = runtime.l1.seq
        try:
            taken, data, plan.generations = client.get_or_lock(key, runtime.locks.lock_timeout,
                                                               plan.generation_keys, token)
        except Exception:  # the loop tries again and counts it; the lock may be Redis's already
            loop.notify(runtime.locks.release, key, token)
            return None
        if data is not None:
            loop.later(runtime.missing.discard, match.rule.template)
            entry = self._decoded(data)
            now = time.time()
            if entry is None or decide.for_stored(entry.stored_at, policy, now, False) is not Step.SERVE:
                return None
            if policy.sync > 0:
                loop.later(runtime.l1.put, key, entry, policy.sync, ticket)
            return self._serve(entry, scope, headers, match, policy, key, now, started, start_response)
        if taken is None:
            return None  # another request fills it: the loop waits for that fill
        slot = runtime.origin.take_in_thread(match.rule.template)
        if slot is None:  # the origin is at its bound: the loop waits for a slot, or answers 503
            loop.notify(runtime.locks.release, key, taken)
            return None
        plan.token = taken
        return LedMiss(self.app, environ, scope, plan, slot, runtime, loop, started, start_response)

    def _stored(self, key: str) -> Entry | None:
        client = self.client
        if client is None or self.runtime.guarded.is_open(key):
            return None
        try:
            data = client.get(key)
        except Exception:  # the loop tries again, counts the failure and falls back as it does for ASGI
            return None
        return None if data is None else self._decoded(data)

    def _decoded(self, data: bytes) -> Entry | None:
        memo = self.runtime.decoded
        entry = memo.entries.get(data)
        if entry is None:
            try:
                entry = decode_entry(data)
            except EntryDecodeError:
                return None  # the loop's path says so in the log, and the fill overwrites it
            self.loop.later(memo.put, data, entry)  # the next hit of this value skips decoding
        return entry


def _collector(messages: list[Message]) -> Callable[[Message], Any]:
    async def collect(message: Message) -> None:
        messages.append(message)

    return collect
