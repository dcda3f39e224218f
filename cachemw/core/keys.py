"""The cache key of a request: everything the app reads that can change its answer.

Pure over the ASGI scope. Keys stay bounded (the variable part is hashed) and
keep the route template readable, so a route can be purged and an entry found
by eye. The digest sits in a Redis Cluster hash tag so an entry and its lock
share one slot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from http.cookies import _unquote as _unquote_cookie
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode

from cachemw.core.keyspace import entry_key
from cachemw.core.policy import Policy

__all__ = ["Identity", "KeyedRequest", "RequestHeaders", "SessionIdentity", "make_key", "mounted_at", "route_path"]

Scope = Mapping[str, Any]


def cookie_parser(cookie_string: str) -> dict[str, str]:
    """A ``Cookie`` header as browsers send it, read as Starlette reads it (so keys agree with what the app sees).

    Lenient like browsers and Starlette: ``;``-separated, a chunk without ``=`` is a
    value of the empty name, quoted values are unquoted. Here, not imported, because
    the core knows nothing of a web framework and the WSGI shell must key alike.
    """
    cookies: dict[str, str] = {}
    for chunk in cookie_string.split(";"):
        name, equals, value = chunk.partition("=")
        if not equals:
            name, value = "", chunk
        name, value = name.strip(), value.strip()
        if name or value:
            cookies[name] = _unquote_cookie(value)
    return cookies
Identity = Callable[[Scope], "str | None"]


class RequestHeaders:
    """The request headers cachemw reads, gathered in one pass over the scope."""

    __slots__ = ("_cookies", "_raw", "_several_cookie_headers", "get", "values")

    def __init__(self, scope: Scope) -> None:
        values: dict[bytes, bytes] = {}
        several = False
        self._raw = raw = scope.get("headers", ())
        for name, value in raw:
            if name in values:
                several = several or name == b"cookie"
                separator = b"; " if name == b"cookie" else b", "
                values[name] = values[name] + separator + value
            else:
                values[name] = value
        self.values = values
        # ``get(name)``: the dict's own get, no Python frame (a hit reads two or three headers).
        self.get: Callable[[bytes], bytes | None] = values.get
        self._cookies: dict[str, str] | None = None
        self._several_cookie_headers = several

    def cookie(self, name: str) -> str | None:
        raw = self.values.get(b"cookie")
        if raw is None:
            return None
        if self._cookies is None:
            self._cookies = cookie_parser(raw.decode("latin-1"))
        return self._cookies.get(name)

    def cookie_values(self, name: str) -> list[str]:
        """The cookie's value in each ``Cookie`` header that has it, in order.

        Starlette reads the last one (older versions only the first header): an identity
        keyed on all of them never takes the one the app reads for another.
        """
        if not self._several_cookie_headers:
            value = self.cookie(name)
            return [] if value is None else [value]
        jars = (cookie_parser(value.decode("latin-1")) for key, value in self._raw if key == b"cookie")
        return [jar[name] for jar in jars if name in jar]


CREDENTIAL_KINDS = ("header", "cookie", "query")


def credential_parts(item: str) -> tuple[str, str]:
    """``(kind, name)`` of a credential as the ``credentials`` setting names it: "x-api-key" is a
    header, "cookie:NAME" a cookie, "query:NAME" a query parameter."""
    kind, colon, name = item.partition(":")
    return (kind, name) if colon else ("header", item)


class SessionIdentity:
    """Default identity: every credential the request carries, together.

    The session cookie, ``Authorization``, and the headers, cookies and query
    parameters named as credentials (by the ``credentials`` setting, or found in
    a route's FastAPI security dependencies). cachemw cannot know which of them
    the app authenticates with, so it keys on all of them: two users who share
    one of them (a cookie that is not their credential) never share an entry.
    Used both to key ``private`` entries and to keep requests that carry
    credentials away from shared ones.
    """

    def __init__(self, cookie_name: str = "session", credentials: Iterable[str] = ()) -> None:
        self.cookie_name = cookie_name
        headers, cookies, query = [b"authorization"], [cookie_name], []
        for item in credentials:
            kind, name = credential_parts(item)
            if kind == "cookie":
                cookies.append(name)
            elif kind == "query":
                query.append(name)
            else:
                headers.append(name.lower().encode("latin-1"))
        self.credentials = tuple(credentials)
        self._headers = tuple(dict.fromkeys(headers))
        # Only the name: the cookie parser strips spaces around "=", so "session = x" is the cookie too.
        self._cookies = tuple((name, name.encode("latin-1")) for name in dict.fromkeys(cookies))
        self._query = tuple((name, name.encode("latin-1")) for name in dict.fromkeys(query))

    @property
    def header_names(self) -> tuple[bytes, ...]:
        """The credential headers, ``cookie`` aside: what a request made for this identity must carry."""
        return self._headers

    def including(self, credentials: Iterable[str]) -> SessionIdentity:
        """This identity with more credentials (a route's own)."""
        return SessionIdentity(self.cookie_name, (*self.credentials, *credentials))

    def __call__(self, headers: RequestHeaders, query_string: bytes = b"") -> str | None:
        """Every credential the request carries, in one string; None if it carries none."""
        found: list[str] = []
        raw_cookie = headers.get(b"cookie")
        if raw_cookie is not None:
            for name, needle in self._cookies:
                if needle in raw_cookie:
                    values = headers.cookie_values(name)
                    if any(values):
                        value = "\x00".join(values)
                        found.append("c:" + value if name == self.cookie_name else f"c:{name}={value}")
        for header in self._headers:
            value_bytes = headers.get(header)
            if value_bytes:
                value = value_bytes.decode("latin-1")
                found.append("a:" + value if header == b"authorization" else f"h:{header.decode()}={value}")
        if self._query and query_string:
            # A name may be percent-encoded ("api%5Fkey") or use "+": the app reads it decoded.
            encoded = b"%" in query_string or b"+" in query_string
            wanted = [name for name, needle in self._query if encoded or needle in query_string]
            if wanted:
                pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
                found.extend(f"q:{name}={value}" for name, value in pairs if name in wanted and value)
        if not found:
            return None
        return found[0] if len(found) == 1 else "\n".join(found)


class KeyedRequest(NamedTuple):
    """A tuple of a str and bytes: the garbage collector stops tracking it, so the thousands the key
    memo holds on a run of misses add nothing to its full collections."""

    key: str
    query_string: bytes | None  # what the app must see instead, or None to leave the request as is


def route_path(scope: Scope) -> str:
    """The path the router matches (Starlette's ``get_route_path``)."""
    return strip_root_path(scope["path"], scope.get("root_path", ""))


def strip_root_path(path: str, root_path: str) -> str:
    """``path`` without ``root_path``, as Starlette's ``get_route_path`` does at each level of routes."""
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    if path[len(root_path)] == "/":
        return path[len(root_path) :]
    return path


def mounted_at(scope: Scope) -> str:
    """The part of ``scope["path"]`` before the path the app's routes match: the ``root_path`` the
    server or an outer mount gave, where ``path`` starts with it (as ASGI servers send it now)."""
    path: str = scope["path"]
    return path[: len(path) - len(route_path(scope))]


def make_key(
    scope: Scope, headers: RequestHeaders, policy: Policy, label: str, prefix: str, identity: str | None
) -> KeyedRequest:
    """Key GET and HEAD alike; ``identity`` is only given for private policies."""
    query_string: bytes = scope.get("query_string", b"")
    replacement: bytes | None = None
    pairs: list[tuple[str, str]] = []
    if query_string:
        # Parse exactly as Starlette's QueryParams does, so the key sees what the app reads.
        pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
        if policy.query is not None:
            kept = [pair for pair in pairs if pair[0] in policy.query]
            if len(kept) != len(pairs):
                replacement = urlencode(kept).encode("latin-1")
            pairs = kept
        # Sorted by name only: a stable sort keeps repeated names in their order.
        pairs.sort(key=_name)

    # Repeated headers are keyed value by value, never joined: Starlette reads the
    # first Host, the first of a header and only the first Cookie header, so
    # ("x=1", "lang=fr") must not share a key with "lang=fr" (cache poisoning).
    hosts = tuple(value.lower() for value in _all_values(scope, b"host"))
    if not hosts:
        server = scope.get("server")
        hosts = (f"{server[0]}:{server[1]}".encode(),) if server else ()
    vary = [_all_values(scope, name.encode("latin-1")) for name in policy.vary_headers]
    cookies: list[tuple[str | None, ...]] = []
    if policy.vary_cookies:
        jars = [cookie_parser(raw.decode("latin-1")) for raw in _all_values(scope, b"cookie")]
        cookies = [tuple(jar.get(name) for jar in jars) for name in policy.vary_cookies]
    material = repr((
        scope.get("scheme", "http"),
        hosts,
        scope.get("root_path", ""),
        scope["path"],
        pairs,
        vary,
        cookies,
        identity,
    ))
    digest = hashlib.blake2b(material.encode("utf-8", "backslashreplace"), digest_size=16).hexdigest()
    return KeyedRequest(entry_key(prefix, label, digest), replacement)


def _all_values(scope: Scope, name: bytes) -> tuple[bytes, ...]:
    return tuple(value for key, value in scope.get("headers", ()) if key == name)


def _name(pair: tuple[str, str]) -> str:
    return pair[0]


def route_tag(template: str) -> str:
    return "route:" + template


def path_tag(path: str) -> str:
    return "path:" + path


class KeyCache:
    """Remembers the keys of recent requests: hot URLs are keyed by one dict lookup.

    The memo is keyed by the raw facts ``make_key`` reads (so it can never answer
    for a request that differs in anything the key covers), and bounded: it is
    emptied when full.
    """

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._memo: dict[tuple[object, ...], KeyedRequest] = {}

    def key(self, scope: Scope, headers: RequestHeaders, policy: Policy, label: str, prefix: str,
            identity: str | None) -> KeyedRequest:
        raw_headers = scope.get("headers", ())
        server = scope.get("server")  # ASGI allows any two-item iterable (Starlette's TestClient sends a list)
        facts: tuple[object, ...] = (
            id(policy), label, prefix, scope.get("scheme"), scope.get("root_path", ""), scope["path"],
            scope.get("query_string", b""), identity, tuple(server) if server else None,  # hashable
            tuple([value for name, value in raw_headers if name == b"host"]),  # a list: no generator to resume
        )
        if policy.vary:
            wanted = {n.encode("latin-1") for n in policy.vary_headers}
            if policy.vary_cookies:
                wanted.add(b"cookie")
            facts += tuple((name, value) for name, value in raw_headers if name in wanted)
        keyed = self._memo.get(facts)
        if keyed is None:
            keyed = make_key(scope, headers, policy, label, prefix, identity)
            if len(self._memo) >= self.size:
                self._memo.clear()
            self._memo[facts] = keyed
        return keyed
