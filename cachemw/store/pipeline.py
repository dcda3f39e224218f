"""An auto-pipelining Redis connection for the request path (one server: TCP, TLS or a Unix socket).

redis-py spends ~50 µs of CPU per command on the request path (a pooled connection
checked out and back, retry and timeout wrappers, a stream writer and reader per
call), several times what the rest of a cache hit costs. Here every command of the
event loop goes over one connection: commands issued in the same loop iteration
leave in one write, replies are parsed by hiredis and matched to their callers in
order. That is all the request path needs (GET, EVALSHA); everything else stays on
redis-py. Over TLS the socket is asyncio's SSL transport, with the context redis-py
would build from the URL; a Sentinel-named master is looked up (``locate``) at each
connect, and a ``-READONLY`` reply (the master was demoted) closes the connection so
the next command finds the new one. A Cluster keeps one of these per master
(``cachemw.store.pipeline_cluster``).

Time budget: each command carries a deadline; one timer (re-armed, never one per
command) fails the overdue ones with ``StoreTimeout``. A late reply is still read and
dropped in order, so it can never answer another command. A connection whose oldest
overdue command stays unanswered for ``stuck_after`` seconds (a frozen or paused
server) is closed, failing everything in flight; the next command reconnects.

Grace: a budget can run out because this process was late, not Redis: a command
written long after it was issued (the loop was busy in between), or a deadline looked
at long after it passed. The connection notes such lateness (half a budget or more)
where it sees it for free: when it writes a batch and when its timer fires. A command
issued before the loop was last seen late gets, once, ``grace`` seconds more from the
moment its budget is found spent (its caller keeps waiting on the same future); one
issued since, with the loop on time, fails at its budget as before, and so do the older
ones still waiting with it (replies come in order: Redis has not answered those either).
A command thus costs at most its budget and one grace, beside the lateness itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import sys
import time
from asyncio import _get_running_loop
from collections.abc import Awaitable, Callable, Sequence
from ssl import SSLContext
from typing import Any

import hiredis

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # redis-py brings async-timeout on 3.10
    from async_timeout import timeout as _timeout  # type: ignore[import-not-found,unused-ignore]

from cachemw.store.base import ScriptMissing, StoreError, StoreTimeout
from cachemw.store.loops import LoopGuard, running_loop, running_or_none

__all__ = ["ErrorReply", "NoScript", "PipelinedRedis", "ReadOnly", "Redirected", "encode_command", "evalsha"]

_MAX_IN_FLIGHT = 20_000  # beyond this the server is not keeping up: fail at once, don't queue


def encode_command(args: Sequence[bytes | str | int | float]) -> bytes:
    """RESP array of bulk strings, what redis-server reads (ints and floats as their exact ``str``).

    hiredis's encoder, in C: a miss's scripts carry a dozen arguments, which cost the
    request path more encoded one by one in Python than the rest of their sending.
    """
    packed: bytes = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]  # its stub types a 1-tuple
    return packed


class _Connection(asyncio.Protocol):
    """One socket: a write buffer flushed once per loop iteration, and the callers awaiting replies in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stuck_after: float, timeout: float = 0.05,
                 grace: float = 0.0, drop_on_readonly: bool = False) -> None:
        self.loop = loop
        self.drop_on_readonly = drop_on_readonly  # a demoted master's connection: the next command finds the new one
        self.stuck_after = stuck_after
        self.timeout = timeout  # the budget of this connection's commands (a deadline minus it: when one was sent)
        self.grace = grace
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(notEnoughData=False)
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.outgoing: list[bytes] = []
        self.flush_scheduled = False
        # uvloop's ``call_at`` returns a plain ``Handle`` (no ``when()``) for a deadline
        # already past (or within its 1 ms resolution): the time it is armed for is kept here.
        self.timer: asyncio.Handle | None = None
        self.timer_at = 0.0
        self.overdue = 0  # how many of the oldest in ``waiting`` are past their deadline (and failed)
        # How many after those are past their budget but given a grace (their deadline in ``waiting``
        # is then the grace's end, in the order they were given it).
        self.graced = 0
        self.late_at = -math.inf  # loop time this process was last seen late by half a budget or more
        self.lateness = 0.0  # and by how much
        self.batch_sent_at = 0.0  # the first unwritten command's deadline (its send time plus the budget)
        self.closed = False
        self.guard: LoopGuard | None = None  # closes the socket when the loop ends first

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:  # not Redis on the other end, or a corrupted stream
                self.close(StoreError(f"redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not waiting:
                self.close(StoreError("redis sent a reply nobody asked for"))
                return
            future = waiting.popleft()[0]
            if self.overdue:
                self.overdue -= 1
            elif self.graced:
                self.graced -= 1  # a reply the grace waited for
            if not future.done():  # else it timed out or its caller went away: the reply is dropped
                if isinstance(reply, hiredis.ReplyError):
                    error = _reply_error(reply)
                    _fail(future, error)
                    if self.drop_on_readonly and isinstance(error, ReadOnly):
                        self.close(StoreError("redis master was demoted (READONLY); connection closed"))
                        return
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(StoreError(f"redis connection lost: {exc!r}" if exc else "redis closed the connection"))

    # -- commands --------------------------------------------------------------------------------

    def send(self, command: bytes, deadline: float) -> asyncio.Future[Any]:
        if self.closed:
            raise StoreError("redis connection closed")
        if len(self.waiting) >= _MAX_IN_FLIGHT:
            raise StoreError(f"{_MAX_IN_FLIGHT} redis commands in flight: the server is not keeping up")
        future = self.loop.create_future()
        self.waiting.append((future, deadline))
        self.outgoing.append(command)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.batch_sent_at = deadline
            self.loop.call_soon(self._flush)
        timer = self.timer
        if timer is None:
            self._arm(deadline)
        elif self.timer_at > deadline:  # armed for an overdue head's stuck check, later than this one
            timer.cancel()
            self._arm(deadline)
        return future

    def _arm(self, at: float) -> None:
        self.timer = self.loop.call_at(at, self._expire)
        self.timer_at = at

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.closed or self.transport is None:
            return
        outgoing, self.outgoing = self.outgoing, []
        now = self.loop.time()
        late = now - (self.batch_sent_at - self.timeout)  # how long the batch's first command waited to be written
        if late >= self.timeout / 2:
            self._late(now, late)
        self.transport.write(b"".join(outgoing))

    def _late(self, now: float, late: float) -> None:
        """This process ran ``late`` seconds late (half a budget or more): commands issued until now may be graced."""
        self.late_at = now
        self.lateness = late

    def _expire(self) -> None:
        """The timer fired: look at the deadlines once the loop has polled for I/O again.

        uvloop (libuv) runs the timers that came due after an iteration's I/O callbacks and
        before it polls again, where asyncio polls first. After a stall inside an I/O
        callback (another connection's ``data_received``: a TLS read, a burst of requests), a
        reply already waiting in this socket would lose to its own deadline, and a stall past
        ``stuck_after`` would close a connection whose replies had all arrived. Two hops
        through the ready queue put one I/O poll in between, on uvloop (whose ready callbacks
        run before it polls) as on asyncio; ``timer`` holds the pending hop, ``timer_at`` the
        time that was armed (past now, so ``send`` does not re-arm meanwhile).
        """
        self.timer = self.loop.call_soon(self._after_poll)

    def _after_poll(self) -> None:
        self.timer = self.loop.call_soon(self._check_deadlines)

    def _check_deadlines(self) -> None:
        """Fail what is overdue (or grace it, see the module's docstring); close the connection when the
        server has stopped answering."""
        self.timer = None
        now = self.loop.time()
        waiting = self.waiting
        if not waiting:
            return
        late = now - self.timer_at  # how late this check runs: the timer's own lateness and the poll in between
        if late >= self.timeout / 2:
            self._late(now, late)
        while self.graced and waiting[self.overdue][1] <= now:  # graces that ran out, oldest first
            self.graced -= 1
            self._fail_overdue(self.overdue, graced=True)
        start = self.overdue + self.graced
        due = graceable = 0
        # Issued at or before the last lateness seen: a deadline up to then plus the budget.
        excused_until = self.late_at + self.timeout if self.grace else -math.inf
        for _, deadline in itertools.islice(waiting, start, None):
            if deadline > now:
                break
            due += 1
            if deadline <= excused_until:
                graceable += 1
        if due and graceable == due:
            until = now + self.grace
            for index in range(start, start + due):
                waiting[index] = (waiting[index][0], until)
            self.graced += due
        elif due:
            # One issued while the loop was on time went unanswered: Redis is slow, for the older ones too.
            for index in range(self.overdue, start + due):
                self._fail_overdue(index, graced=index < start)
            self.graced = 0
        self._rearm(now)

    def _fail_overdue(self, index: int, *, graced: bool) -> None:
        """The command at ``index`` (the one after the overdue ones) is overdue now: its caller gets a timeout."""
        self.overdue += 1
        future, deadline = self.waiting[index]
        if future.done():
            return
        # Our own lateness during the wait that ran out (the grace, or the budget), for the caller to tell apart.
        began = deadline - (self.grace if graced else self.timeout)
        lateness = self.lateness if self.late_at > began else 0.0
        _fail(future, StoreTimeout("redis did not answer within the time budget" + (" and its grace" if graced else ""),
                                   lateness=lateness))

    def _rearm(self, now: float) -> None:
        waiting = self.waiting
        if not waiting:
            return
        pending = self.overdue + self.graced
        next_at = waiting[pending][1] if pending < len(waiting) else math.inf
        if self.graced:
            next_at = min(next_at, waiting[self.overdue][1])
        if self.overdue:
            head = waiting[0][1]
            if now - head >= self.stuck_after:
                self.close(StoreTimeout(f"redis has not answered for {now - head:.1f} s; connection closed"))
                return
            next_at = min(next_at, head + self.stuck_after)
        self._arm(next_at)

    def close(self, error: StoreError) -> None:
        if self.closed:
            return
        self.closed = True
        self.graced = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiting, self.waiting = self.waiting, collections.deque()
        for future, _ in waiting:
            if not future.done():
                _fail(future, error)
        self.outgoing = []
        if self.transport is not None:
            self.transport.abort()
        if self.guard is not None:
            self.guard.release()

    async def aclose(self) -> None:
        self.close(StoreError("redis connection closed: its event loop ended"))


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    """Fail a caller's future, marked as seen: its caller may be gone (cancelled in the same
    loop iteration, or never awaiting it), and asyncio would then log "Future exception was
    never retrieved" for a timeout nobody is waiting for. A caller still awaiting gets it."""
    future.set_exception(error)
    future.exception()


def _seen(future: asyncio.Future[Any]) -> None:
    """A reply nobody reads: its error (if any) marked as retrieved."""
    if not future.cancelled():
        future.exception()


def evalsha_command(sha: str, keys: Sequence[str], args: Sequence[bytes | str | int | float]) -> bytes:
    return encode_command(["EVALSHA", sha, len(keys), *keys, *args])


async def evalsha(execute: Callable[[bytes, float], Awaitable[Any]], sha: str, script: str, keys: Sequence[str],
                  args: Sequence[bytes | str | int | float], budget: float) -> Any:
    """A script by its digest through ``execute(command, timeout)``; sent once in full when the server does not
    know it (a restart, a failover, a new node). Both within ``budget``, which the first reply's wait uses up."""
    began = time.monotonic()
    try:
        return await execute(evalsha_command(sha, keys, args), budget)
    except NoScript:
        left = budget - (time.monotonic() - began)
        if left <= 0:
            raise StoreTimeout("the script was unknown and its time budget spent") from None
        return await execute(encode_command(["EVAL", script, len(keys), *keys, *args]), left)


def _reply_error(reply: hiredis.ReplyError) -> StoreError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScript(message)
    if message.startswith(("MOVED ", "ASK ")):
        return Redirected(message)
    if message.startswith("READONLY"):
        return ReadOnly(f"redis error: {message}")
    return ErrorReply(f"redis error: {message}")


class ErrorReply(StoreError):
    """The server answered with an error: the connection is fine, and in step."""


class NoScript(ErrorReply, ScriptMissing):
    """EVALSHA of a script the server does not have (yet, or any more after a restart)."""


class ReadOnly(ErrorReply):
    """A write sent to a replica: the master this connection reached has been demoted."""


class Redirected(ErrorReply):
    """A Cluster node's ``-MOVED slot host:port`` (the slot lives there now) or ``-ASK`` (this once, during a
    migration)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"redis error: {message}")
        kind, slot, address = message.split()[:3]
        self.ask = kind == "ASK"
        self.slot = int(slot)
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)


Locate = Callable[[], Awaitable[tuple[str, int]]]
"""Where the server is now (a Sentinel's answer): asked at each connect."""


class PipelinedRedis:
    """Commands to one Redis server over one shared, auto-pipelined connection, each within ``timeout``.

    ``host``/``port`` or a Unix socket ``path``; ``username``/``password`` for AUTH,
    ``db`` for SELECT; ``ssl`` for TLS (the server's certificate checked against
    ``host``, as redis-py does); ``locate`` instead of ``host``/``port`` for a server
    found anew at each connect (a Sentinel-named master: a ``-READONLY`` reply then
    closes the connection). Connects on first use and again after a failure; every
    error (refused, lost, timed out, an error reply) is a ``StoreError``.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 6379, path: str | None = None, db: int = 0,
                 username: str | None = None, password: str | None = None, timeout: float = 0.05,
                 stuck_after: float = 1.0, grace: float | None = None, ssl: SSLContext | None = None,
                 locate: Locate | None = None) -> None:
        self.host, self.port, self.path = host, port, path
        self.ssl = ssl
        self.locate = locate
        self._connection: _Connection | None = None
        self._timeout = timeout
        self.grace = timeout if grace is None else grace  # once, for a budget our own lateness spent (see above)
        self.stuck_after = max(stuck_after, timeout + self.grace)
        self._connected_once = False  # a timeout before the first connect is a fresh process's, not the server's
        self._hello: list[bytes] = []
        if password is not None:
            auth = ["AUTH", username, password] if username else ["AUTH", password]
            self._hello.append(encode_command(auth))
        if db:
            self._hello.append(encode_command(["SELECT", db]))
        self._attempt: asyncio.Future[None] | None = None  # a connect under way: done when it ends
        self._closed = False  # by aclose: for good, even for a connect already under way

    @property
    def timeout(self) -> float:
        """The budget of a command given none of its own."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._timeout = seconds
        if self._connection is not None:  # which tells it when its commands were sent
            self._connection.timeout = seconds

    def twin(self, timeout: float) -> PipelinedRedis:
        """Another connection to the same server with another budget (background work).

        Not this one with a longer deadline per call: replies come in order, and a
        command with a short deadline behind one with a long deadline must still fail
        on time.
        """
        twin = PipelinedRedis(host=self.host, port=self.port, path=self.path, timeout=timeout,
                              stuck_after=max(self.stuck_after, timeout), grace=0.0,  # retried within its deadline
                              ssl=self.ssl, locate=self.locate)
        twin._hello = list(self._hello)
        return twin

    def execute(self, command: bytes, timeout: float | None = None) -> Awaitable[Any]:
        """The reply to an encoded command (see ``encode_command``), within ``timeout`` (default: the budget).

        A ``timeout`` longer than the budget holds up the deadlines of the commands sent
        after it on this connection: give such calls a ``twin``. On an open connection of
        this loop, the connection's future itself: no coroutine of ours around it (a miss
        sends two commands, a hit one).
        """
        connection = self._connection
        loop = _get_running_loop()
        budget = self._timeout if timeout is None else timeout
        if connection is None or connection.closed or connection.loop is not loop or loop is None:
            return self._connect_and_send(command, budget)
        return connection.send(command, loop.time() + budget)

    async def _connect_and_send(self, command: bytes, budget: float) -> Any:
        loop = running_loop()
        if self._closed:
            raise StoreError("redis connection closed")
        connection = await self._connect(loop, budget)
        return await connection.send(command, loop.time() + budget)

    async def get(self, key: str) -> bytes | None:
        data = key.encode()
        return await self.execute(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(data), data))  # type: ignore[no-any-return]

    def evalsha(self, sha: str, script: str, keys: Sequence[str], args: Sequence[bytes | str | int | float],
                timeout: float | None = None) -> Awaitable[Any]:
        """Run a script by its digest; sent once in full when the server does not know it (see ``evalsha``)."""
        return evalsha(self.execute, sha, script, keys, args, self._timeout if timeout is None else timeout)

    def send_evalsha(self, sha: str, keys: Sequence[str], args: Sequence[bytes | str | int | float]
                     ) -> asyncio.Future[Any] | None:
        """A script by its digest, written now within the budget: the connection's future of its reply
        (NOSCRIPT fails it, nothing is sent again); None when not connected on this loop."""
        connection = self._open_here()
        if connection is None:
            return None
        return connection.send(evalsha_command(sha, keys, args), connection.loop.time() + self._timeout)

    def _open_here(self) -> _Connection | None:
        """The connection, if it is open on the running loop (``execute`` asks the same inline: a hit's path)."""
        connection = self._connection
        if connection is None or connection.closed or connection.loop is not _get_running_loop():
            return None
        return connection

    @property
    def connected(self) -> bool:
        """Open on the running loop: ``execute`` answers a future at once, without connecting first."""
        return self._open_here() is not None

    async def execute_after(self, first: bytes, command: bytes, timeout: float | None = None) -> Any:
        """``command``'s reply, sent right behind ``first`` on one connection, nothing between them
        (a Cluster's ``ASKING``, which holds for the next command only); ``first``'s reply is dropped."""
        loop = running_loop()
        budget = self._timeout if timeout is None else timeout
        connection = self._connection
        if connection is None or connection.closed or connection.loop is not loop:
            if self._closed:
                raise StoreError("redis connection closed")
            connection = await self._connect(loop, budget)
        deadline = loop.time() + budget
        connection.send(first, deadline).add_done_callback(_seen)
        return await connection.send(command, deadline)

    async def _connect(self, loop: asyncio.AbstractEventLoop, budget: float) -> _Connection:
        """Connect in the caller's own task and time budget; callers arriving meanwhile wait for that one.

        No task of its own: a caller that gives up abandons the attempt (its socket is
        closed), and one of those waiting starts another. The waiters all wake when
        the attempt ends (not one by one behind a lock, which on a cold start with
        hundreds of callers could take longer than the budget). A connection of another
        event loop (one that has ended, or runs in another thread) is dropped without
        touching that loop from this one, and a new one opened on this loop.
        """
        old = self._connection
        if old is not None and old.loop is not loop:
            self._connection = None
            _drop(old)
        try:
            async with _timeout(budget):
                while True:
                    connection = self._connection
                    if connection is not None and not connection.closed and connection.loop is loop:
                        return connection  # connected by the caller this one waited for
                    attempt = self._attempt
                    if attempt is None or attempt.get_loop() is not loop:
                        self._attempt = attempt = loop.create_future()
                        try:
                            return await self._open(loop, budget)
                        finally:
                            if self._attempt is attempt:
                                self._attempt = None
                            attempt.set_result(None)
                    await asyncio.shield(attempt)  # a waiter that gives up leaves the attempt to the others
        except asyncio.TimeoutError:
            raise StoreTimeout("connecting to redis took longer than the time budget",
                               first_connect=not self._connected_once) from None

    async def _open(self, loop: asyncio.AbstractEventLoop, budget: float) -> _Connection:
        started = time.monotonic()
        connection: _Connection | None = None
        follows = self.locate is not None

        def protocol() -> _Connection:
            return _Connection(loop, self.stuck_after, self.timeout, self.grace, drop_on_readonly=follows)

        try:
            if self.path is not None:
                _, connection = await loop.create_unix_connection(protocol, self.path)
            else:
                host, port = (self.host, self.port) if self.locate is None else await self._located()
                _, connection = await loop.create_connection(protocol, host, port, ssl=self.ssl)
            for command in self._hello:
                await connection.send(command, loop.time() + budget)
        except BaseException as exc:
            if connection is not None:
                connection.close(StoreError("connection setup failed"))
            if isinstance(exc, OSError) and not isinstance(exc, StoreError):
                raise StoreError(f"connecting to redis failed after {time.monotonic() - started:.3f} s: "
                                 f"{exc!r}") from exc
            raise
        if self._closed:  # closed while we connected: nobody would ever close this socket
            connection.close(StoreError("closed"))
            raise StoreError("redis connection closed")
        # Without a lifespan nobody calls aclose: the socket is closed when its loop ends.
        connection.guard = LoopGuard(loop, connection.aclose)
        self._connection = connection
        self._connected_once = True
        return connection

    async def _located(self) -> tuple[str, int]:
        """The server's address now, from ``locate`` (a Sentinel's answer); its failure is a ``StoreError``."""
        assert self.locate is not None
        try:
            host, port = await self.locate()
        except (StoreError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the sentinels' driver: no master known, none reachable
            raise StoreError(f"finding the redis master failed: {exc!r}") from exc
        return str(host), int(port)

    async def aclose(self) -> None:
        self.abandon()

    def abandon(self) -> None:
        """Closed for good, from any loop or thread: the socket is closed on its own loop if that still runs."""
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            _drop(connection)


def _drop(connection: _Connection) -> None:
    """Close a connection from whichever loop (or none) runs now, without using a loop that has ended."""
    loop = connection.loop
    if loop is running_or_none():
        connection.close(StoreError("closed"))
    elif not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            loop.call_soon_threadsafe(connection.close, StoreError("closed"))
    # else: the loop ended without its runner cancelling its tasks (so the guard never
    # ran); its sockets cannot be closed from here.
