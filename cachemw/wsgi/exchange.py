"""One WSGI request carried by the ASGI request handler on the cache's loop, its app run in the request's thread.

The cache's decisions (hit, stale, wait for a fill, forward and store, bypass)
are the ASGI shell's, made on the loop; the WSGI app runs where the server called
it, in the request's own thread (its thread-locals, database connections and
context intact). The two sides pass whole batches of messages:

- request thread -> loop: the request (``spawn``), then the app's response as ASGI
  messages (its start and first chunk in one batch; the last chunk marked final), or
  the exception it raised;
- loop -> request thread: ``RUN`` (call the app now, with this scope), ``SENT``
  (what to send the client so far), ``DONE`` (the rest; the handler is finished) or
  ``RAISED``.

A request carried this way (a stale entry, a lock held elsewhere, a failing store,
a bypass) is one round trip to the loop, or two with a one-chunk response of the
app; fresh hits and led misses do not come here (``cachemw.wsgi.threadpath``).
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from starlette.types import Message, Receive, Scope, Send

from cachemw.asgi.lifespan import answer_lifespan
from cachemw.wsgi.environ import environ_for, status_line, wsgi_headers
from cachemw.wsgi.loop import BackgroundLoop

__all__ = ["DONE", "RAISED", "RUN", "SENT", "ClientDisconnected", "Exchange", "ThreadedApp", "batches", "capturing",
           "emit", "final", "respond", "run_now"]

RUN, SENT, DONE, RAISED = "run", "sent", "done", "raised"

T = TypeVar("T")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
StartResponse = Callable[..., Any]

current_exchange: ContextVar[Exchange | None] = ContextVar("cachemw_wsgi_exchange", default=None)


class ClientDisconnected(OSError):
    """The WSGI server stopped reading the response (the client left): its fill lock goes at once."""


class Exchange:
    """The two sides of one request; built in the request thread, ``outgoing`` touched on the loop only."""

    __slots__ = ("app_called", "environ", "handed", "inbox", "loop", "outgoing", "replies", "scope")

    def __init__(self, environ: dict[str, Any], scope: dict[str, Any], loop: BackgroundLoop) -> None:
        self.environ = environ
        self.scope = scope
        self.loop = loop
        self.replies: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.outgoing: list[Message] = []
        self.inbox: MemoryObjectSendStream[list[Message] | BaseException] | None = None
        self.app_called = False
        self.handed = False  # the handler needs nothing more from the app (it had the last chunk, or answered)

    # -- on the loop -------------------------------------------------------------------------------

    async def collect(self, message: Message) -> None:
        """The ``send`` the handler answers through: kept until the request thread takes it."""
        self.outgoing.append(message)

    def take(self) -> list[Message]:
        taken, self.outgoing = self.outgoing, []
        return taken

    def deliver(self, batch: list[Message] | BaseException) -> None:
        inbox = self.inbox
        if inbox is not None:  # None: the handler stopped listening (a fallback was served instead)
            inbox.send_nowait(batch)

    # -- in the request thread ---------------------------------------------------------------------

    def post(self, batch: list[Message] | BaseException) -> None:
        self.loop.notify(self.deliver, batch)

    def run_app(self, app: WSGIApp, scope: Scope, start_response: StartResponse) -> Iterable[bytes]:
        """The response of the app run by the handler's word: an iterable the server closes when done.

        A server that closes it before the end (the client left), or before reading it at all,
        tells the handler, so the fill lock goes at once and the handler does not wait for more.
        """
        return _Response(self, self._run_app(app, scope, start_response))

    def _run_app(self, app: WSGIApp, scope: Scope, start_response: StartResponse) -> Iterator[bytes]:
        """Call the app, pass its response through the handler, and yield what the handler sends."""
        environ = self.environ if scope is self.scope else environ_for(scope, self.environ)
        captured: list[Any] = []
        written: list[bytes] = []
        try:
            result = app(environ, capturing(captured, written))
        except Exception as exc:
            yield from self._hand_over(exc, start_response, False)
            return
        try:
            started = yield from self._stream(result, captured, written, start_response)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if started is not None:
            yield from self._until_done(start_response, started)

    def closed(self) -> None:
        if not self.handed:
            self.handed = True
            self.post(ClientDisconnected("the client stopped reading the response"))

    def _stream(self, result: Iterable[bytes], captured: list[Any], written: list[bytes],
                start_response: StartResponse) -> Generator[bytes, None, bool | None]:
        """The app's chunks to the handler, the handler's answer to the client; None once it answered in full."""
        started = False
        try:
            for batch in batches(result, captured, written):
                self.post(batch)
                if final(batch[-1]):
                    self.handed = True
                    return started
                kind, value = self.replies.get()
                if kind == RAISED:
                    self.handed = True
                    raise value
                started = yield from emit(value, start_response, started)
                if kind == DONE:
                    self.handed = True
                    return None  # the handler answered otherwise (a fallback): the app's rest is not sent
        except Exception as exc:  # the app's iterable raised
            if self.handed:
                raise
            yield from self._hand_over(exc, start_response, started)
            return None
        return started

    def _hand_over(self, error: Exception, start_response: StartResponse, started: bool) -> Iterator[bytes]:
        """The app raised: the handler decides (a fallback within stale_if_error, or the error re-raised)."""
        self.handed = True
        self.post(error)
        yield from self._until_done(start_response, started)

    def _until_done(self, start_response: StartResponse, started: bool = False) -> Iterator[bytes]:
        while True:
            kind, value = self.replies.get()
            if kind == RAISED:
                raise value
            started = yield from emit(value, start_response, started)
            if kind == DONE:
                return


class _Response:
    """What the WSGI server iterates and closes (PEP 3333 calls ``close()`` however the response ended)."""

    __slots__ = ("_chunks", "_exchange")

    def __init__(self, exchange: Exchange, chunks: Iterator[bytes]) -> None:
        self._exchange = exchange
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._exchange.closed()


def capturing(captured: list[Any], written: list[bytes]) -> StartResponse:
    """A ``start_response`` that keeps the app's status and headers in ``captured`` (and whether they were sent)
    and what it writes through the legacy ``write()`` in ``written``."""
    def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None and captured and captured[2]:
            raise exc_info[1].with_traceback(exc_info[2])
        captured[:] = [status, headers, False]
        return written.append

    return capture


def final(message: Message) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)


def batches(result: Iterable[bytes], captured: list[Any], written: list[bytes]) -> Iterator[list[Message]]:
    """The app's response as message batches: its start with the first chunk, the last chunk marked final."""
    pending: bytes | None = None
    first = True
    for chunk in result:
        if written:  # the legacy write() callable, before this chunk
            chunk = b"".join(written) + chunk
            written.clear()
        if pending is not None:
            yield _with_start(first, captured, pending, more=True)
            first = False
        pending = chunk
    tail = b"".join(written)
    written.clear()
    yield _with_start(first, captured, (pending or b"") + tail, more=False)


def _with_start(first: bool, captured: list[Any], body: bytes, *, more: bool) -> list[Message]:
    message: Message = {"type": "http.response.body", "body": body, "more_body": more}
    if not first:
        return [message]
    if not captured:
        raise RuntimeError("the WSGI app returned its body without calling start_response")
    return [_start_message(captured), message]


def _start_message(captured: list[Any]) -> Message:
    status, headers = captured[0], captured[1]
    captured[2] = True
    return {"type": "http.response.start", "status": int(status.split(" ", 1)[0]),
            "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]}


def emit(messages: list[Message], start_response: StartResponse, started: bool) -> Generator[bytes, None, bool]:
    """Send the handler's messages to the WSGI server: ``start_response`` once, then the bodies."""
    for message in messages:
        if message["type"] == "http.response.start":
            if not started:
                start_response(status_line(message["status"]), wsgi_headers(message.get("headers", ())))
                started = True
        else:
            body = message.get("body", b"")
            if body:
                yield body
    return started


def run_now(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits (a responder sending into a list) to its end, here, without a loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()
    raise RuntimeError("cachemw: a response meant to be made without a loop waited on something")


def respond(messages: list[Message], start_response: StartResponse) -> list[bytes]:
    """A response the handler made whole without the app (a hit, a shared fill): one list, one write."""
    body: list[bytes] = []
    for message in messages:
        if message["type"] == "http.response.start":
            start_response(status_line(message["status"]), wsgi_headers(message.get("headers", ())))
        else:
            chunk = message.get("body", b"")
            if chunk:
                body.append(chunk)
    return body


class ThreadedApp:
    """The WSGI app as the ASGI handler on the loop calls it.

    For the request of an exchange, its thread runs the app (``RUN``) and posts
    the response here. For a request nobody waits on (a stale entry's refresh),
    the app runs in a worker thread with an environ rebuilt from the refresh's
    scope, a bodiless GET with only the key's headers, at most ``limit`` at once.
    """

    def __init__(self, app: WSGIApp, limit: int) -> None:
        self.app = app
        self._limiter: anyio.CapacityLimiter | None = None
        self.limit = limit  # refreshes at once (the settings' refresh_concurrency, set at startup)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        exchange = current_exchange.get()
        if exchange is None or exchange.app_called:
            await self._in_worker(scope, send)
            return
        exchange.app_called = True
        inbox, batches = anyio.create_memory_object_stream[list[Message] | BaseException](math.inf)
        exchange.inbox = inbox
        exchange.replies.put((RUN, scope))
        try:
            async with batches:
                async for batch in batches:
                    if isinstance(batch, BaseException):
                        raise batch
                    for message in batch:
                        await send(message)
                    if final(batch[-1]):
                        return
                    exchange.replies.put((SENT, exchange.take()))
        finally:
            exchange.inbox = None
            inbox.close()

    async def _in_worker(self, scope: Scope, send: Send) -> None:
        base = scope.get("cachemw.environ")
        if base is None:
            raise RuntimeError("cachemw: a request without its WSGI environ reached the WSGI app")
        environ = environ_for(scope, {name: value for name, value in base.items() if _kept(name, value)},
                              bodiless=True)
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(max(1, self.limit))
        status, headers, body = await anyio.to_thread.run_sync(_call_whole, self.app, environ,
                                                               limiter=self._limiter)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _kept(name: str, value: object) -> bool:
    """What of a finished request's environ a refresh may reuse: its strings and the WSGI flags, no sockets."""
    return isinstance(value, str) or name in ("wsgi.version", "wsgi.multithread", "wsgi.multiprocess",
                                               "wsgi.run_once", "wsgi.errors")


def _call_whole(app: WSGIApp, environ: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    captured: list[Any] = []

    def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        captured[:] = [status, headers, False]
        return chunks.append

    chunks: list[bytes] = []
    result = app(environ, capture)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    start = _start_message(captured)
    return start["status"], start["headers"], b"".join(chunks)
