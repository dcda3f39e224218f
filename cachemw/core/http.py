"""HTTP semantics: what may be stored, what is replayed, ETag/304, Age, Cache-Status.

Pure functions over raw ASGI header lists (lowercase byte names), so they are
tested without a server and cost nothing to call.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

from cachemw.core.policy import Policy

__all__ = [
    "RawHeaders",
    "etag_matches",
    "hit_headers",
    "make_etag",
    "not_storable_reason",
    "stored_headers",
]

RawHeaders = Sequence[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Never replayed: per-connection, per-response-time, or ours to set.
_NOT_REPLAYED = HOP_BY_HOP | {b"set-cookie", b"date", b"age", b"x-cache", b"cache-status", b"etag"}
_UNCACHEABLE_DIRECTIVES = frozenset({"private", "no-store", "no-cache"})
STREAMING_TYPES = (b"text/event-stream",)

X_CACHE = b"x-cache"
CACHE_STATUS = b"cache-status"


def header_values(headers: RawHeaders, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def _directives(values: Iterable[bytes]) -> set[str]:
    found = set()
    for value in values:
        for part in value.decode("latin-1").split(","):
            found.add(part.split("=", 1)[0].strip().lower())
    return found


def not_storable_reason(
    status: int, headers: RawHeaders, policy: Policy, request_vary: Sequence[str] = ()
) -> str | None:
    """Why this response must not become an entry, or None if it may.

    A response ``Vary`` is honoured by refusing to store unless the policy keys on
    every header it names: the key was fixed before the response existed.
    """
    if status not in policy.statuses:
        return f"status {status}"
    vary: list[str] = []
    for key, value in headers:
        name = key.lower()
        if name == b"vary":
            vary.extend(v.strip().lower() for v in value.decode("latin-1").split(",") if v.strip())
        elif (reason := _header_refusal(name, value, policy)) is not None:
            return reason
    if "*" in vary:
        return "vary"
    keyed = set(policy.vary_headers) | set(request_vary)
    if any(v not in keyed for v in vary):
        return "vary"
    return None


def _header_refusal(name: bytes, value: bytes, policy: Policy) -> str | None:
    """Why one response header (``name`` lowercased) keeps the response out of the cache, if it does."""
    if name == b"set-cookie":
        return "set-cookie"
    if name == b"cache-control":
        directives = _directives([value])
        # A private rule keys per user, so "private" is what its responses should say.
        if directives & (_UNCACHEABLE_DIRECTIVES - {"private"} if policy.private else _UNCACHEABLE_DIRECTIVES):
            return "cache-control"
    if name == b"content-type" and value.lower().startswith(STREAMING_TYPES):
        return "streaming"
    if name == b"content-length":
        try:
            if int(value) > policy.max_body:
                return "size"
        except ValueError:
            return "content-length"
    return None


def stored_headers(headers: RawHeaders, etag: bytes | None, body_length: int, status: int = 200
                   ) -> tuple[tuple[bytes, bytes], ...]:
    """The headers a hit replays: hop-by-hop and per-response ones dropped, length exact.

    A 204 gets no Content-Length at all (RFC 9110 8.6 forbids it there). ``etag``
    None: none at all (an error answer replayed to waiters, never revalidated).
    """
    kept = [
        (key.lower(), value)
        for key, value in headers
        if key.lower() not in _NOT_REPLAYED and key.lower() != b"content-length"
    ]
    if status != 204:
        kept.append((b"content-length", str(body_length).encode()))
    if etag is not None:
        kept.append((b"etag", etag))
    return tuple(kept)


def response_etag(headers: RawHeaders) -> bytes | None:
    values = header_values(headers, b"etag")
    return values[0] if values else None


def make_etag(body: bytes) -> bytes:
    """Deterministic: the same body gives the same ETag on every server."""
    return b'"' + hashlib.blake2b(body, digest_size=16).hexdigest().encode() + b'"'


def _opaque(tag: bytes) -> bytes:
    tag = tag.strip()
    return tag[2:] if tag.startswith(b"W/") else tag


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """RFC 9110 weak comparison, as If-None-Match requires."""
    if if_none_match.strip() == b"*":
        return True
    wanted = _opaque(etag)
    return any(_opaque(candidate) == wanted for candidate in if_none_match.split(b","))


def cache_status_hit(ttl_left: float) -> bytes:
    # Floor, not truncation: a stale entry must show a negative ttl (RFC 9211), even 0.2 s past it.
    return b"cachemw; hit; ttl=%d" % math.floor(ttl_left)


def hit_headers(
    stored: RawHeaders, age: float, x_cache: bytes, cache_status: bytes
) -> list[tuple[bytes, bytes]]:
    headers = list(stored)
    headers.append((b"age", b"%d" % max(0, int(age))))
    headers.append((X_CACHE, x_cache))
    headers.append((CACHE_STATUS, cache_status))
    return headers


def not_modified_headers(stored: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """RFC 9110 15.4.5: a 304 carries the validators and cache headers, no content headers."""
    return [(k, v) for k, v in stored if k not in (b"content-length", b"content-type", b"content-encoding")]


# Cache-Status (RFC 9211) values for responses that did not come from an entry.
STATUS_MISS = b"cachemw; fwd=uri-miss"
STATUS_STALE_MISS = b"cachemw; fwd=stale"
STATUS_BYPASS = b"cachemw; fwd=bypass"
STATUS_BYPASS_REQUEST = b"cachemw; fwd=request"
STATUS_BYPASS_METHOD = b"cachemw; fwd=method"
# Another request's fill answered this one (RFC 9211 "collapsed").
STATUS_COLLAPSED = b"cachemw; fwd=uri-miss; collapsed"
STATUS_PASS = b"cachemw; fwd=uri-miss; detail=pass"  # the key's last response could not be stored: no lock
STATUS_ORIGIN_BUSY = b"cachemw; fwd=uri-miss; detail=origin-busy"  # past origin_concurrency: a 503 of ours


def cache_status_stale_if_error(origin_status: int | None) -> bytes:
    """The origin failed (a 5xx, an exception, a timeout) and a stale entry answered."""
    if origin_status is None:
        return b"cachemw; fwd=stale; detail=stale-if-error"
    return b"cachemw; fwd=stale; fwd-status=%d; detail=stale-if-error" % origin_status


# A handler tags its own entry with this response header (space or comma separated);
# it is stripped before the response reaches the client.
CACHE_TAG = b"cache-tag"


def parse_cache_tags(headers: RawHeaders) -> tuple[str, ...]:
    tags: list[str] = []
    for value in header_values(headers, CACHE_TAG):
        tags.extend(t for t in value.decode("latin-1").replace(",", " ").split() if t)
    return tuple(dict.fromkeys(tags))


# Request headers some frameworks and proxies honour to change the host, scheme, URL
# or method a response is made for. On a cached route they would poison the entry
# for everyone, so unless a rule keys on one (``vary``) the app never sees it.
OVERRIDE_HEADERS = frozenset({
    b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-scheme", b"x-forwarded-port", b"x-forwarded-prefix",
    b"x-forwarded-server", b"x-host", b"x-original-url", b"x-rewrite-url", b"x-original-host",
    b"x-http-method-override", b"x-http-method", b"x-method-override", b"forwarded",
})


def has_body(headers: dict[bytes, bytes]) -> bool:
    """True if the request announces a body (a GET's body would change nothing in the key)."""
    length = headers.get(b"content-length")
    if length is not None and length.strip() not in (b"0", b""):
        return True
    return b"transfer-encoding" in headers
