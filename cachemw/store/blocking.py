"""A blocking GET for threads (the WSGI shell's hits): one socket per thread, RESP by hand, hiredis to parse.

redis-py's blocking client costs a WSGI hit more than the rest of it: a pool
checkout and return, retry and observability wrappers around each command. A hit
needs one command on one server; a socket per thread (no lock, no pool), the
command encoded once, the reply parsed by hiredis, within the request budget.
Any failure closes the socket and raises ``StoreError``: the caller goes the long
way (the cache's loop), which counts it and falls back.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from typing import Any

import hiredis
from redis.connection import parse_url

from cachemw.store.base import StoreError
from cachemw.store.pipeline import encode_command

__all__ = ["BlockingGet"]

_READ = 65536


class _Link:
    __slots__ = ("pid", "reader", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = hiredis.Reader()
        self.pid = os.getpid()


class BlockingGet:
    """``get(key)`` on one plain Redis server (``redis://``, ``rediss://``, ``unix://``) from any thread."""

    def __init__(self, url: str, timeout: float) -> None:
        self.options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self.timeout = timeout
        self._local = threading.local()
        self._links: set[_Link] = set()  # every thread's, to close them all
        self._guard = threading.Lock()

    def get(self, key: str) -> bytes | None:
        link: _Link | None = getattr(self._local, "link", None)
        if link is None or link.pid != os.getpid():
            link = self._connect()
        try:
            reply = self._call(link, encode_command(("GET", key)))
        except Exception as exc:
            self._drop(link)
            raise StoreError(f"redis GET failed: {exc!r}") from exc
        if reply is None or isinstance(reply, bytes):
            return reply
        self._drop(link)
        raise StoreError(f"redis GET answered {type(reply).__name__}")

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
