"""The ASGI shell: match the route, look the key up once, answer or forward, store later.

Decisions live in the pure modules (policy, keys, http, entry); this module only
executes them. Per-request state lives in a small responder object, never on
the middleware.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cachemw import http
from cachemw.background import Supervisor
from cachemw.config import Settings, load_settings
from cachemw.entry import Entry, EntryDecodeError, decode_entry, encode_entry
from cachemw.keys import RequestHeaders, SessionIdentity, make_key, route_path
from cachemw.policy import ConfigError, Freshness, Policy, freshness
from cachemw.rules import RouteMatch, RuleTable, build_rule_table
from cachemw.store import Store, StoreError, store_from_url

__all__ = ["CacheMiddleware"]

logger = logging.getLogger(__name__)

_CACHED_METHODS = frozenset({"GET", "HEAD"})
_HIT = b"HIT"
_STALE = b"STALE"
_MISS = b"MISS"
_BYPASS = b"BYPASS"


class CacheMiddleware:
    """Answer requests from a cache by per-route freshness policies.

    ``config`` names a ``cachemw.toml`` or ``pyproject.toml``; ``redis_url``,
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
    ) -> None:
        self.app = app
        self._config = config
        self._redis_url = redis_url
        self._key_prefix = key_prefix
        self._custom_identity = identity
        self._given_settings = settings
        self.store: Store | None = store
        self._owns_store = store is None
        self.supervisor = supervisor or Supervisor()
        self.settings: Settings | None = None
        self.table: RuleTable | None = None
        self._identity: Callable[[RequestHeaders, Scope], str | None] = _no_identity
        self._prefix = "cachemw"
        self._warned_corrupt = False
        self.store_errors = 0

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
        routes = getattr(routes_owner, "routes", None)
        if routes is None:
            routes = getattr(self.app, "routes", [])
        table = build_rule_table(routes, settings)
        if self.store is None:
            try:
                self.store = store_from_url(
                    settings.redis_url, timeout=settings.store_timeout, memory_max_bytes=settings.memory_max_bytes
                )
            except ValueError as exc:
                raise ConfigError(f"{settings.source or 'settings'}: field 'redis_url': {exc}") from None
        self._prefix = settings.key_prefix
        if self._custom_identity is None:
            session = SessionIdentity(settings.session_cookie)
            self._identity = lambda headers, scope: session(headers)
        else:
            custom = self._custom_identity
            self._identity = lambda headers, scope: custom(HTTPConnection(scope))
        self.settings = settings
        self.table = table
        return table

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            table = self.table or self.prepare(scope.get("app"))
            match = table.match(route_path(scope), scope["method"]) if table.has_policies else None
            if match is None:
                await self.app(scope, receive, send)
                return
            await self._handle(scope, receive, send, match)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] == "lifespan.startup":
            try:
                self.prepare(scope.get("app"))
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
                # Pending fills finish before the app's own shutdown closes what they use.
                await self.supervisor.drain()
            return message

        try:
            async with self.supervisor.run():
                await self.app(scope, receive_with_drain, send)
        finally:
            if self._owns_store and self.store is not None:
                await self.store.aclose()
                self.store = None
                self.table = None

    async def _handle(self, scope: Scope, receive: Receive, send: Send, match: RouteMatch) -> None:
        policy = match.rule.policy
        assert policy is not None
        if scope["method"] not in _CACHED_METHODS:
            await self.app(scope, receive, _marking(send, _BYPASS, http.STATUS_BYPASS_METHOD))
            return
        if not policy.cacheable:
            await self.app(scope, receive, _marking(send, _BYPASS, http.STATUS_BYPASS))
            return
        headers = RequestHeaders(scope)
        identity = self._identity(headers, scope)
        if policy.private:
            if identity is None:  # nobody to key on: nothing may be shared
                await self.app(scope, receive, _marking(send, _BYPASS, http.STATUS_BYPASS_REQUEST))
                return
        elif identity is not None or headers.get(b"authorization") is not None:
            # Credentials on a shared route: never answered from, nor stored into, a shared entry.
            await self.app(scope, receive, _marking(send, _BYPASS, http.STATUS_BYPASS_REQUEST))
            return
        keyed = make_key(scope, headers, policy, match.rule.label, self._prefix, identity)
        if keyed.query_string is not None:
            scope = dict(scope, query_string=keyed.query_string)
        entry = await self._lookup(keyed.key)
        now = time.time()
        stale_entry: Entry | None = None
        if entry is not None:
            state = freshness(entry.stored_at, policy, now)
            if state is Freshness.FRESH:
                await _serve(entry, scope, headers, send, now, _HIT,
                             http.cache_status_hit(policy.ttl - (now - entry.stored_at)))
                return
            stale_entry = entry
        responder = _FillResponder(send, policy, head=scope["method"] == "HEAD",
                                   cache_status=http.STATUS_STALE_MISS if stale_entry else http.STATUS_MISS)
        await self.app(scope, receive, responder.send)
        fill = responder.entry(tags=_tags(policy, match))
        if fill is not None:
            await self._store_after_response(keyed.key, fill, policy)

    # -- store access ----------------------------------------------------------------------------

    async def _lookup(self, key: str) -> Entry | None:
        store = self.store
        if store is None:
            return None
        try:
            data = await store.get(key)
        except StoreError:
            self.store_errors += 1
            return None  # fail open: the app answers
        if data is None:
            return None
        try:
            return decode_entry(data)
        except EntryDecodeError as exc:
            if not self._warned_corrupt:
                self._warned_corrupt = True
                self.supervisor.submit("log", _log_corrupt, key, str(exc))
            return None  # a miss; the fill overwrites it

    async def _store_after_response(self, key: str, entry: Entry, policy: Policy) -> None:
        if self.supervisor.submit("fill", self._store_entry, key, entry, policy.usable_for, key=key):
            return
        if not self.supervisor.running:
            # No lifespan, so no task group to hand this to: store it here. The
            # client already has the whole response; only this ASGI task waits.
            await self._store_entry(key, entry, policy.usable_for)

    async def _store_entry(self, key: str, entry: Entry, ttl: float) -> None:
        store = self.store
        if store is None or ttl <= 0:
            return
        try:
            data = encode_entry(entry)
        except ValueError:
            return
        try:
            await store.set(key, data, ttl)
        except StoreError:
            self.store_errors += 1  # the store is down or slow: this fill is lost, the next miss refills


def _no_identity(headers: RequestHeaders, scope: Scope) -> str | None:
    return None


async def _log_corrupt(key: str, reason: str) -> None:
    logger.warning("cachemw: value under %s is not a cachemw entry (%s); treated as a miss and overwritten. "
                   "Further such values are not logged.", key, reason)


def _tags(policy: Policy, match: RouteMatch) -> tuple[str, ...]:
    if not policy.tags:
        return ()
    params = match.path_params
    try:
        return tuple(tag.format_map(params) for tag in policy.tags)
    except (KeyError, IndexError, ValueError):
        return tuple(policy.tags)


async def _serve(entry: Entry, scope: Scope, headers: RequestHeaders, send: Send, now: float,
                 x_cache: bytes, cache_status: bytes) -> None:
    age = now - entry.stored_at
    if_none_match = headers.get(b"if-none-match")
    if if_none_match is not None and http.etag_matches(if_none_match, entry.etag):
        await send({"type": "http.response.start", "status": 304,
                    "headers": http.hit_headers(http.not_modified_headers(entry.headers), age, x_cache,
                                                cache_status)})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": entry.status,
                "headers": http.hit_headers(entry.headers, age, x_cache, cache_status)})
    body = b"" if scope["method"] == "HEAD" else entry.body
    await send({"type": "http.response.body", "body": body})


def _marking(send: Send, x_cache: bytes, cache_status: bytes) -> Send:
    """Pass the response through, adding only the cache headers."""

    async def marked(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = [*message.get("headers", ()), (http.X_CACHE, x_cache),
                                  (http.CACHE_STATUS, cache_status)]
        await send(message)

    return marked


class _FillResponder:
    """Streams the app's response to the client while keeping a copy to store.

    A storable response's start is held until the first body chunk: when that
    chunk is the whole body the ETag can be sent on the miss too.
    """

    __slots__ = (
        "_chunks",
        "_head",
        "_headers",
        "_held",
        "_policy",
        "_send",
        "_size",
        "_status",
        "cache_status",
        "complete",
        "storable",
        "stored_at",
    )

    def __init__(self, send: Send, policy: Policy, *, head: bool, cache_status: bytes) -> None:
        self._send = send
        self._policy = policy
        self._head = head
        self.cache_status = cache_status
        self._chunks: list[bytes] = []
        self._size = 0
        self._held: dict[str, Any] | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self.storable = False
        self.complete = False
        self.stored_at = 0.0

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.stored_at = time.time()
            self._status = message["status"]
            raw_headers = list(message.get("headers", ()))
            self._headers = raw_headers
            self.storable = not self._head and http.not_storable_reason(
                self._status, raw_headers, self._policy) is None
            start: dict[str, Any] = dict(message)
            start["headers"] = [*raw_headers, (http.X_CACHE, _MISS), (http.CACHE_STATUS, self.cache_status)]
            if self.storable:
                self._held = start
                return
            await self._send(start)
            return
        if kind == "http.response.body":
            body: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            if self.storable:
                self._size += len(body)
                if self._size > self._policy.max_body:
                    self.storable = False
                    self._chunks = []
                else:
                    self._chunks.append(body)
            if self._held is not None:
                held, self._held = self._held, None
                if not more and self.storable and http.response_etag(self._headers) is None:
                    held["headers"].append((b"etag", http.make_etag(body)))
                await self._send(held)
            await self._send(message)
            if not more:
                self.complete = True
            return
        # Trailers, pathsend, anything new: not ours to copy.
        self.storable = False
        if self._held is not None:
            held, self._held = self._held, None
            await self._send(held)
        await self._send(message)

    def entry(self, *, tags: tuple[str, ...]) -> Entry | None:
        """The entry to store, once the whole response went out; None if it must not be stored."""
        if not (self.complete and self.storable):
            return None
        body = b"".join(self._chunks)
        etag = http.response_etag(self._headers) or http.make_etag(body)
        return Entry(
            status=self._status,
            headers=http.stored_headers(self._headers, etag, len(body)),
            body=body,
            stored_at=self.stored_at,
            etag=etag,
            tags=tags,
        )
