"""Blocking lookups for threads (the WSGI shell's request path): one socket per thread, RESP by hand, hiredis.

redis-py's blocking client costs a WSGI hit more than the rest of it: a pool
checkout and return, retry and observability wrappers around each command. A hit
needs one command on one server (a GET, or for a route that has been missing the
lookup that also tries the fill lock); a socket per thread (no lock, no pool), the
command encoded once, the reply parsed by hiredis, within the request budget.
Any failure closes the socket and raises ``StoreError``: the caller goes the long
way (the cache's loop), which counts it and falls back.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.connection import parse_url

from cachemw.store.base import LockResult, StoreError
from cachemw.store.pipeline import encode_command
from cachemw.store.redis_scripts import (
    LOCK_ALL_SCRIPT,
    lookup_lock_call,
    lookup_lock_result,
)

__all__ = ["BlockingRedis"]

_READ = 65536


@functools.cache
def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


class _Link:
    __slots__ = ("pid", "reader", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = hiredis.Reader()
        self.pid = os.getpid()


class BlockingRedis:
    """``get`` and ``get_or_lock`` on one plain Redis server (``redis://``, ``rediss://``, ``unix://``), any thread."""

    def __init__(self, url: str, timeout: float) -> None:
        self.options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self.timeout = timeout
        self._local = threading.local()
        self._links: set[_Link] = set()  # every thread's, to close them all
        self._guard = threading.Lock()

    def get(self, key: str) -> bytes | None:
        link = self._link()
        try:
            reply = self._call(link, encode_command(("GET", key)))
        except Exception as exc:
            self._drop(link)
            raise StoreError(f"redis GET failed: {exc!r}") from exc
        if reply is None or isinstance(reply, bytes):
            return reply
        self._drop(link)
        raise StoreError(f"redis GET answered {type(reply).__name__}")

    def get_or_lock(self, key: str, ttl: float, generation_keys: tuple[str, ...], token: str) -> LockResult:
        """The store's ``get_or_lock`` (the same script, so the same keys and answers), from a thread.

        A failure may come after Redis took the lock: the caller gives ``token`` back.
        """
        keys, args = lookup_lock_call(key, ttl, generation_keys, token)
        try:
            return lookup_lock_result(self._script(LOCK_ALL_SCRIPT, keys, args), token)
        except StoreError:
            raise
        except Exception as exc:  # a foreign reply shape
            raise StoreError(f"redis lookup failed: {exc!r}") from exc

    def _script(self, script: str, keys: list[str], args: Sequence[bytes | str | int]) -> Any:
        """EVALSHA, and EVAL once the server does not know the script (a restart, ``SCRIPT FLUSH``)."""
        link = self._link()
        try:
            try:
                return self._call(link, encode_command(("EVALSHA", _sha(script), len(keys), *keys, *args)))
            except hiredis.ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                return self._call(link, encode_command(("EVAL", script, len(keys), *keys, *args)))
        except Exception as exc:
            self._drop(link)
            raise StoreError(f"redis script failed: {exc!r}") from exc

    def _link(self) -> _Link:
        link: _Link | None = getattr(self._local, "link", None)
        if link is None or link.pid != os.getpid():
            link = self._connect()
        return link

    def _call(self, link: _Link, command: bytes) -> Any:
        link.sock.sendall(command)
        reader = link.reader
        while True:
            reply = reader.gets()
            if reply is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise reply
                return reply
            data = link.sock.recv(_READ)
            if not data:
                raise ConnectionError("the server closed the connection")
            reader.feed(data)

    def _connect(self) -> _Link:
        options = self.options
        sock: socket.socket | None = None
        try:
            if "path" in options:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(options["path"])
            else:
                sock = socket.create_connection((options.get("host", "localhost"), options.get("port", 6379)),
                                                timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if options.get("connection_class") is not None and "SSL" in options["connection_class"].__name__:
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=options.get("host"))
        except Exception as exc:
            if sock is not None:
                sock.close()
            raise StoreError(f"redis connect failed: {exc!r}") from exc
        link = _Link(sock)
        try:
            self._hello(link)
        except Exception as exc:
            sock.close()
            raise StoreError(f"redis connect failed: {exc!r}") from exc
        self._local.link = link
        with self._guard:
            self._links.add(link)
        return link

    def _hello(self, link: _Link) -> None:
        options = self.options
        password, username = options.get("password"), options.get("username")
        if password:
            self._call(link, encode_command(("AUTH", username, password) if username else ("AUTH", password)))
        if options.get("db"):
            self._call(link, encode_command(("SELECT", options["db"])))

    def _drop(self, link: _Link) -> None:
        self._local.link = None
        with self._guard:
            self._links.discard(link)
        link.sock.close()

    def close(self) -> None:
        with self._guard:
            links, self._links = self._links, set()
        for link in links:
            link.sock.close()
