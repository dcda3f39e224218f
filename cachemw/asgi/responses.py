"""ASGI messages for the cache: answering from an entry, marking what passes through, copying a miss.

Per-request state lives in these small objects (and in locals of the handler),
never on the middleware, which only holds its configuration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import anyio
from starlette.types import Message, Receive, Scope, Send

from cachemw.core import http
from cachemw.core.entry import Entry
from cachemw.core.keys import RequestHeaders
from cachemw.core.policy import Policy
from cachemw.runtime.flights import Flight

__all__ = [
    "BYPASS",
    "HIT",
    "MISS",
    "STALE",
    "FillResponder",
    "StatusMarker",
    "discard",
    "refresh_scope",
    "replay_failure",
    "replaying",
    "serve",
    "without_unkeyed_overrides",
]

HIT = b"HIT"
STALE = b"STALE"
MISS = b"MISS"
BYPASS = b"BYPASS"


def without_unkeyed_overrides(scope: Scope, policy: Policy) -> Scope:
    """Headers that make apps answer for another host, scheme, URL or method never reach them unkeyed."""
    headers = scope.get("headers", ())
    if not any(name in http.OVERRIDE_HEADERS for name, _ in headers):
        return scope
    keyed = {name.encode("latin-1") for name in policy.vary_headers}
    kept = [(name, value) for name, value in headers if name not in http.OVERRIDE_HEADERS or name in keyed]
    return dict(scope, headers=kept)


def refresh_scope(scope: Scope, policy: Policy, credential_headers: Sequence[bytes]) -> dict[str, Any]:
    """A bodiless GET with only the headers that form the key: what the entry was made of."""
    keep = {b"host", *(name.encode("latin-1") for name in policy.vary_headers)}
    if policy.private or policy.vary_cookies:
        keep |= {b"cookie", *credential_headers}
    refresh = dict(scope)
    refresh["method"] = "GET"
    refresh["headers"] = [(name, value) for name, value in scope.get("headers", ()) if name in keep]
    refresh["extensions"] = {}
    return refresh


async def serve(entry: Entry, scope: Scope, headers: RequestHeaders, send: Send, now: float,
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


async def replay_failure(failure: Entry, scope: Scope, send: Send, cache_status: bytes = http.STATUS_COLLAPSED
                          ) -> int:
    """An error answer not from the app (the leader's, or ours when the origin is saturated): never a 304."""
    await send({"type": "http.response.start", "status": failure.status,
                "headers": [*failure.headers, (http.X_CACHE, MISS), (http.CACHE_STATUS, cache_status)]})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else failure.body})
    return failure.status

def replaying(first: Message, receive: Receive) -> Receive:
    """``receive`` with ``first`` given back once, before what follows."""
    pending: list[Message] = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay

async def discard(message: Message) -> None:
    pass

class StatusMarker:
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


class FillResponder:
    """Streams the app's response to the client while keeping a copy to store.

    A storable response's start is held until the first body chunk: when that
    chunk is the whole body the ETag can be sent on the miss too. With
    ``hold_errors`` a 5xx is swallowed, so a stale entry can answer instead.
    """

    __slots__ = ("_chunks", "_entry", "_etag", "_failure_chunks", "_given_etag", "_head", "_headers", "_held",
                 "_hold_errors", "_policy", "_send", "cache_status", "complete", "deadline", "failed_status", "flight",
                 "response_tags", "size", "started", "status", "storable", "stored_at")

    def __init__(self, send: Send, policy: Policy, *, head: bool, cache_status: bytes, hold_errors: bool) -> None:
        self._send = send
        self._policy = policy
        self._head = head
        self._hold_errors = hold_errors
        self.cache_status = cache_status
        self._chunks: list[bytes] = []
        self._failure_chunks: list[bytes] | None = None  # a copy of a 5xx answer, for the waiters to share
        self._entry: Entry | None = None
        self._etag: bytes | None = None  # made here, from the body
        self._given_etag: bytes | None = None  # the app's own
        # Finished with the entry once the whole response went out. Not a callback: a closure over the
        # responder would make a reference cycle of every miss, left to the garbage collector to free.
        self.flight: Flight | None = None
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
            start = self._start(message)
            if start is not None:
                await self._send(start)
            return
        if kind == "http.response.body":
            await self._body(message)
            return
        # Trailers, pathsend, anything new: not ours to copy.
        self.storable = False
        if self._held is not None:
            held, self._held = self._held, None
            await self._send(held)
        await self._send(message)

    def _start(self, message: Message) -> Message | None:
        """The start to send now, marked as a miss; None when it waits (a 5xx to replace, or held for the ETag)."""
        self.stored_at = time.time()
        self.status = message["status"]
        if self._hold_errors and self.status >= 500:
            self.failed_status = self.status
            return None
        if self.deadline is not None:
            self.deadline.deadline = math.inf  # answered in time: let the body take what it takes
        # One pass over the app's headers for all that the copy needs from them.
        raw_headers: list[tuple[bytes, bytes]] = []
        tagged = announced = False
        for name, value in message.get("headers", ()):
            lowered = name.lower()
            if lowered == http.CACHE_TAG:
                tagged = True
                continue
            if lowered == b"content-length":
                announced = True
            elif lowered == b"etag" and self._given_etag is None:
                self._given_etag = value
            raw_headers.append((name, value))
        if tagged:
            # Tags the handler adds to its own entry; the client never sees the header.
            self.response_tags = http.parse_cache_tags(message["headers"])
        self._headers = raw_headers
        self.storable = not self._head and http.not_storable_reason(self.status, raw_headers, self._policy) is None
        if self.status >= 500 and not self.storable:
            self._failure_chunks = []
        start: dict[str, Any] = dict(message)
        start["headers"] = [*raw_headers, (http.X_CACHE, MISS), (http.CACHE_STATUS, self.cache_status)]
        self.started = True
        # A response that announces its length (Starlette's Response) sends its body at once:
        # hold the start to add the ETag. A stream may wait long for its first chunk (events,
        # long polls): its start goes out now, without an ETag on this miss.
        if self.storable and announced:
            self._held = start
            return None
        return start

    async def _body(self, message: Message) -> None:
        body: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        self.size += len(body)
        self._copy(body)
        if self._held is not None:
            held, self._held = self._held, None
            if not more and self.storable and self._given_etag is None:
                self._etag = http.make_etag(body)  # the entry's too: the body is this one chunk
                held["headers"].append((b"etag", self._etag))
            await self._send(held)
        await self._send(message)
        if not more:
            self.complete = True
            if self.flight is not None and self.storable:
                self.flight.finish(self.entry(tags=self.flight.plan.tags))

    def _copy(self, body: bytes) -> None:
        """Keep the chunk for the entry (or a 5xx for the waiters), up to ``max_body``; past it, nothing."""
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

    @property
    def uncacheable(self) -> bool:
        """The whole response went out, and it may not be stored (a Set-Cookie, private, no-store, too large,
        a status outside ``statuses``): the key passes to the app for a while. A 5xx and HEAD are not that."""
        return self.complete and not self.storable and not self._head and self.status < 500

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
        etag = self._etag or self._given_etag or http.make_etag(body)
        self._entry = Entry(
            status=self.status,
            headers=http.stored_headers(self._headers, etag, len(body), self.status),
            body=body,
            stored_at=self.stored_at,
            etag=etag,
            tags=(*tags, *self.response_tags),
        )
        return self._entry
