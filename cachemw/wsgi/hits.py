"""Fresh hits answered in the request's own thread: no hop to the cache's loop, one Redis GET or none.

A hop to the loop and back costs a WSGI hit more than the hit itself (two thread
wake-ups). So the request thread looks up the key itself (the process's L1, then one
GET on a plain blocking Redis client) and, when the core says ``SERVE``, answers.
Everything else (a miss, a stale entry, a store that fails, a bypass) goes to the
loop, which decides again from the start and does the accounting: this path changes
no shared state but through the loop (its log and its L1 copy are handed there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.types import Message

from cachemw.asgi.responses import HIT, serve
from cachemw.core import decide, http
from cachemw.core.decide import Step
from cachemw.core.entry import Entry, EntryDecodeError, decode_entry
from cachemw.core.keys import RequestHeaders
from cachemw.core.rules import RouteMatch
from cachemw.runtime.runtime import CacheRuntime, Identity
from cachemw.store.blocking import BlockingGet
from cachemw.wsgi.exchange import StartResponse, respond
from cachemw.wsgi.loop import BackgroundLoop

__all__ = ["ThreadHits", "blocking_client"]


_PLAIN_SCHEMES = ("redis://", "rediss://", "unix://")


def blocking_client(runtime: CacheRuntime) -> BlockingGet | None:
    """A blocking client on the runtime's own Redis, within the request budget; None where there is none.

    Only for one plain server (``redis://``, ``rediss://``, ``unix://``) the runtime
    opened itself: a cluster, Sentinel or a store given by the app is reached through the loop.
    """
    url = runtime.settings.redis_url or ""
    if not runtime.owns_store or not runtime.remote or not url.startswith(_PLAIN_SCHEMES):
        return None
    return BlockingGet(url, runtime.settings.store_timeout)


class ThreadHits:
    """``answer`` a request from a fresh entry in the calling thread, or say None (the loop takes it)."""

    def __init__(self, runtime: CacheRuntime, client: BlockingGet | None, loop: BackgroundLoop,
                 identity: Identity | None) -> None:
        self.runtime = runtime
        self.client = client
        self.loop = loop
        self.identity = identity

    def answer(self, scope: dict[str, Any], match: RouteMatch, start_response: StartResponse) -> list[bytes] | None:
        runtime = self.runtime
        policy = match.rule.policy
        if policy is None or decide.for_method(scope["method"], policy)[0] is not Step.LOOK_UP:
            return None
        started = time.perf_counter()
        headers = RequestHeaders(scope)
        identity, bypass = runtime.identify(match.rule, policy, headers, scope, self.identity)
        if bypass is not None:
            return None
        key = runtime.keys.key(scope, headers, policy, match.rule.label, runtime.prefix, identity).key
        now = time.time()
        entry = runtime.l1.get(key) if policy.sync > 0 and runtime.store.listening else None
        if entry is None or decide.for_entry(entry.stored_at, policy, now) is not Step.SERVE:
            if match.rule.template in runtime.missing:
                return None  # the route has been missing: the loop's lookup also takes the lock, one round trip
            entry = self._stored(key)
            if entry is None or decide.for_stored(entry.stored_at, policy, now, False) is not Step.SERVE:
                return None
            if policy.sync > 0:
                self.loop.later(runtime.l1.put, key, entry, policy.sync)
        messages: list[Message] = []
        coroutine = serve(entry, scope, headers, _collector(messages), now, HIT,
                          http.cache_status_hit(policy.ttl - (now - entry.stored_at)))
        status = _run_now(coroutine)
        self.loop.later(runtime.log, match, key, "HIT", status, None, started, len(entry.body))
        return respond(messages, start_response)

    def _stored(self, key: str) -> Entry | None:
        client = self.client
        if client is None or self.runtime.guarded.is_open(key):
            return None
        try:
            data = client.get(key)
        except Exception:  # the loop tries again, counts the failure and falls back as it does for ASGI
            return None
        if data is None:
            return None
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


def _run_now(coroutine: Any) -> int:
    """Run a coroutine that never waits (``serve`` into a list) to its end, here, without a loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: int = done.value
        return result
    coroutine.close()
    raise RuntimeError("cachemw: serving a stored entry waited on something")
