"""The supervisor of detached work: responses first, everything else after.

One supervisor owns one anyio task group for the app's lifetime. Request code
hands it jobs with ``submit`` and returns at once; a bounded queue feeds a fixed
pool of workers. Every job runs under a timeout and an exception barrier (one
uncaught error would otherwise cancel the whole group). A full queue (in jobs, or
in the bytes the jobs hold) sheds the job and counts it; it never blocks a
response. On shutdown the queue is drained within a grace period and what is
left is cancelled, counted and logged.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio
from anyio.abc import TaskGroup, TaskStatus

__all__ = ["JobCounters", "Supervisor", "current_supervisor", "detach"]

logger = logging.getLogger(__name__)

JobFunction = Callable[..., Awaitable[Any]]
ServiceFunction = Callable[..., Awaitable[None]]

# Set by the middleware for each request it handles, so handlers can reach their app's supervisor.
_current: ContextVar[Supervisor] = ContextVar("cachemw_supervisor")


def current_supervisor() -> Supervisor:
    supervisor = _current.get(None)
    if supervisor is None:
        raise RuntimeError(
            "cachemw.detach() was called outside a request handled by CacheMiddleware. "
            "HINT: add the middleware to the app (app.add_middleware(CacheMiddleware, ...)), or call "
            "supervisor.detach() on a Supervisor you own."
        )
    return supervisor


def detach(function: JobFunction, *args: Any, kind: str = "task", retries: int = 0) -> bool:
    """Run ``function(*args)`` after the response, supervised: ``detach(send_receipt, order_id)``.

    Returns False if the job was shed (queue full: counted). Call it from a handler
    behind ``CacheMiddleware``.
    """
    return current_supervisor().detach(function, *args, kind=kind, retries=retries)


@dataclass(slots=True)
class JobCounters:
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    shed: int = 0
    abandoned: int = 0


class _Job(NamedTuple):  # a tuple: made once per fill, so its construction must cost little
    kind: str
    key: str
    function: JobFunction
    args: tuple[Any, ...]
    timeout: float
    retries: int
    size: int = 0  # what the job holds until done (JOB_BYTES included), counted against queue_max_bytes


# What a queued job holds besides what its submitter declares (``size=``): its record, its args tuple, a
# bound method, a small argument or two and its slot in the stream's deque. Measured with tracemalloc on
# CPython 3.11 for 10,000 queued lock releases (a key and a 16-character token): 281 B each.
JOB_BYTES = 288


class _Lane:
    """A bounded queue and the workers that take from it.

    Cheaper per job than an anyio memory stream (which makes an Event and a
    receiver record and passes a checkpoint for every item): a job is a deque
    append, and only a worker that found the queue empty parks on an Event.
    """

    __slots__ = ("buffer", "closed", "idle", "size", "woken")

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffer: deque[_Job] = deque()
        self.idle: list[anyio.Event] = []  # parked workers, the last one parked first to be woken
        self.woken = 0  # workers woken for a job they have not taken yet: like a memory stream, a job
        # handed to a waiting worker does not count against the queue's size
        self.closed = False

    def put(self, job: _Job) -> bool:
        buffer = self.buffer
        if len(buffer) - self.woken >= self.size:
            return False
        buffer.append(job)
        if len(buffer) > self.woken and self.idle:
            self.woken += 1
            self.idle.pop().set()
        return True

    def close(self) -> None:
        """Take no more jobs; the workers leave once the queue is empty."""
        self.closed = True
        idle, self.idle = self.idle, []
        for event in idle:
            event.set()

    async def take(self) -> _Job | None:
        """The next job, waiting for one; None once the lane is closed and empty."""
        while True:
            if self.buffer:
                return self.buffer.popleft()
            if self.closed:
                return None
            event = anyio.Event()
            self.idle.append(event)
            try:
                await event.wait()
            finally:
                if event in self.idle:  # cancelled while parked
                    self.idle.remove(event)
                elif self.woken and not self.closed:
                    self.woken -= 1


@dataclass(slots=True)
class _State:
    lanes: dict[str, _Lane]  # lane -> its queue; "" is the shared lane
    task_group: TaskGroup
    workers_left: int
    idle: anyio.Event = field(default_factory=anyio.Event)


class _StartOnce:
    """A task status a restarted service may report on again without error."""

    def __init__(self, inner: TaskStatus[None]) -> None:
        self._inner = inner
        self._done = False

    def started(self, value: None = None) -> None:
        if not self._done:
            self._done = True
            self._inner.started(value)


class Supervisor:
    """Bounded, supervised background work for one app.

    ``queue_size`` bounds waiting jobs, ``concurrency`` the jobs running at once.
    ``queue_max_bytes`` bounds what the jobs hold while they wait or run: each counts
    ``JOB_BYTES`` and the ``size`` it was submitted with (a fill: its entry).
    ``lanes`` gives kinds of work their own queue and workers (``{"refresh": 16}``),
    so slow jobs of one kind (a refresh waiting on a slow origin) never hold up
    the others (fills, lock releases, logging).

    A failing service is restarted after ``retry_backoff`` seconds, doubling up to
    30 s while it keeps failing; a run of at least ``healthy_run`` seconds ends the
    streak, and its failure is restarted after ``retry_backoff`` again.
    """

    def __init__(
        self,
        *,
        queue_size: int = 10_000,
        queue_max_bytes: int = 8 * 1024 * 1024,
        concurrency: int = 32,
        job_timeout: float = 30.0,
        grace_period: float = 10.0,
        retry_backoff: float = 0.1,
        lanes: dict[str, int] | None = None,
        healthy_run: float = 10.0,
    ) -> None:
        if queue_size < 1 or concurrency < 1 or any(n < 1 for n in (lanes or {}).values()):
            raise ValueError("queue_size and concurrency (also of each lane) must be at least 1")
        self.lanes = dict(lanes or {})
        self.queue_size = queue_size
        self.queue_max_bytes = queue_max_bytes
        self.queued_bytes = 0
        self.concurrency = concurrency
        self.job_timeout = job_timeout
        self.grace_period = grace_period
        self.retry_backoff = retry_backoff
        self.healthy_run = healthy_run
        self.counters: dict[str, JobCounters] = {}
        self.service_restarts: dict[str, int] = {}
        self._services: list[tuple[str, ServiceFunction]] = []
        self._state: _State | None = None
        self._draining = False
        # Jobs under way without a worker (a fill written to the store, its reply awaited by a callback),
        # and what a drain waiting for them to end waits on.
        self.detached = 0
        self._detached_done: anyio.Event | None = None
        # Where its loop runs in a thread of its own (the WSGI shell): how another thread's detach()
        # gets there (runs the call on the loop's thread and returns its result), and that thread.
        self.hop: Callable[[Callable[[], bool]], bool] | None = None
        self.home_thread = 0
        # Per request, not per supervisor: concurrent requests without a lifespan each collect their own jobs.
        self._inline: ContextVar[list[_Job] | None] = ContextVar("cachemw_inline", default=None)
        # What an observer puts around each job when it is submitted, in the submitter's context
        # (``wrap(kind, key, function)`` returns what runs instead: a span around it, under the request's).
        self.wrap_job: Callable[[str, str, JobFunction], JobFunction] | None = None

    def add_service(self, name: str, function: ServiceFunction) -> None:
        """A task that lives as long as the app (a subscriber, a flusher): restarted if it fails.

        ``function`` is called with ``task_status=`` and must call ``task_status.started()``.
        A service added again under the same name replaces the earlier one.
        """
        self._services = [(n, f) for n, f in self._services if n != name]
        self._services.append((name, function))

    @property
    def running(self) -> bool:
        """True while jobs are accepted: between startup and the start of shutdown."""
        return self._state is not None and not self._draining

    def counters_for(self, kind: str) -> JobCounters:
        counters = self.counters.get(kind)
        if counters is None:
            counters = self.counters[kind] = JobCounters()
        return counters

    def submit(
        self,
        kind: str,
        function: JobFunction,
        *args: Any,
        key: str = "",
        timeout: float | None = None,
        retries: int = 0,
        size: int = 0,
    ) -> bool:
        """Queue ``function(*args)`` without waiting. False if the job was not taken.

        Not taken means shed (queue full, or ``size``, the bytes its arguments hold,
        does not fit in ``queue_max_bytes``: counted) or no supervisor running (no
        lifespan, or shutting down): the caller decides whether to run it inline.
        """
        counters = self.counters_for(kind)
        wrap = self.wrap_job
        if wrap is not None:
            function = wrap(kind, key, function)
        state = self._state
        if state is None or self._draining:
            inline = self._inline.get()
            if inline is not None and not self._draining:
                # No lifespan: the middleware runs these after the response, in the request's task.
                inline.append(_Job(kind, key, function, args, self.job_timeout if timeout is None else timeout,
                                   retries))
                counters.queued += 1
                return True
            return False
        size += JOB_BYTES
        if self.queued_bytes + size > self.queue_max_bytes:
            counters.shed += 1
            return False
        lanes = state.lanes
        lane = lanes.get(kind) or lanes[""]
        if not lane.put(_Job(kind, key, function, args, self.job_timeout if timeout is None else timeout, retries,
                             size)):
            counters.shed += 1
            return False
        counters.queued += 1
        self.queued_bytes += size
        return True

    def start_detached(self, kind: str, size: int = 0) -> bool:
        """Count a job of ``kind`` that runs without a worker (its caller sent it, a callback ends it) as
        running, holding ``size`` bytes; False (nothing counted) when not running or the bytes do not fit:
        the caller then ``submit``s it, which sheds and counts."""
        size += JOB_BYTES
        if not self.running or self.queued_bytes + size > self.queue_max_bytes:
            return False
        self.counters_for(kind).running += 1
        self.queued_bytes += size
        self.detached += 1
        return True

    def end_detached(self, kind: str, size: int = 0, *, done: bool | None = True) -> None:
        """``start_detached``'s job ended: done, failed (``done=False``), or handed on to a worker (None)."""
        counters = self.counters_for(kind)
        counters.running -= 1
        if done:
            counters.done += 1
        elif done is not None:
            counters.failed += 1
        self.queued_bytes -= size + JOB_BYTES
        self.detached -= 1
        if self.detached == 0 and self._detached_done is not None:
            self._detached_done.set()

    def detach(self, function: JobFunction, *args: Any, kind: str = "task", retries: int = 0) -> bool:
        """The public face of ``submit`` for handlers' own work; also from a WSGI view's thread."""
        hop = self.hop
        if hop is not None and threading.get_ident() != self.home_thread:
            return hop(lambda: self.submit(kind, function, *args, retries=retries))
        return self.submit(kind, function, *args, retries=retries)

    def bind(self) -> Token[Supervisor]:
        """Make this the supervisor ``detach()`` reaches from the current request; ``unbind`` undoes it."""
        return _current.set(self)

    @staticmethod
    def unbind(token: Token[Supervisor]) -> None:
        _current.reset(token)

    @asynccontextmanager
    async def inline_after_response(self) -> AsyncIterator[None]:
        """Without a lifespan nothing owns a task group: collect jobs and run them at the end of the request."""
        if self._state is not None:
            yield
            return
        jobs: list[_Job] = []
        token = self._inline.set(jobs)
        try:
            yield
        finally:
            self._inline.reset(token)
            for job in jobs:
                await self._run(job)

    @asynccontextmanager
    async def run(self) -> AsyncIterator[Supervisor]:
        """Own the task group for the app's lifetime; drain it on the way out."""
        if self._state is not None:
            raise RuntimeError("this supervisor is already running")
        sizes = {"": self.concurrency, **self.lanes}
        lanes = {name: _Lane(self.queue_size) for name in sizes}
        async with anyio.create_task_group() as task_group:
            self._state = _State(lanes, task_group, sum(sizes.values()))
            self._draining = False
            for name, lane in lanes.items():
                for _ in range(sizes[name]):
                    await task_group.start(self._worker, lane)
            services = [anyio.CancelScope() for _ in self._services]
            for (name, function), scope in zip(self._services, services, strict=True):
                await task_group.start(self._service, name, function, scope)
            try:
                yield self
            finally:
                with anyio.CancelScope(shield=True):
                    await self.drain()
                for scope in services:
                    scope.cancel()
                self._state = None

    async def drain(self) -> None:
        """Stop taking jobs, let the queue empty within the grace period, cancel the rest."""
        state = self._state
        if state is None or self._draining:
            return
        self._draining = True
        for lane in state.lanes.values():
            lane.close()
        with anyio.move_on_after(self.grace_period):
            await state.idle.wait()
            while self.detached:  # a retry a detached job hands on after this is not taken: it ends here
                self._detached_done = anyio.Event()
                await self._detached_done.wait()
        self._detached_done = None
        if not state.idle.is_set() or self.detached:
            left = 0
            for counters in self.counters.values():
                left += counters.queued + counters.running
                counters.abandoned += counters.queued + counters.running
                counters.queued = 0  # the queue is dropped with the task group: these never start
            self.queued_bytes = 0
            logger.warning("cachemw: shutdown grace period of %.1fs ran out; abandoned %d background jobs",
                           self.grace_period, left)
            state.task_group.cancel_scope.cancel()

    async def _service(
        self, name: str, function: ServiceFunction, scope: anyio.CancelScope, *, task_status: TaskStatus[None]
    ) -> None:
        once = _StartOnce(task_status)
        with scope:
            backoff = self.retry_backoff
            while True:
                began = anyio.current_time()
                try:
                    await function(task_status=once)
                    return
                except Exception as exc:
                    once.started()  # a failing service must not hold up startup
                    if anyio.current_time() - began >= self.healthy_run:
                        backoff = self.retry_backoff  # it ran well: a new failure, not one more of a streak
                    logger.warning("cachemw: service %s failed (%r); restarting in %.2fs", name, exc, backoff,
                                   exc_info=True)
                    self.service_restarts[name] = self.service_restarts.get(name, 0) + 1
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)

    async def _worker(self, lane: _Lane, *, task_status: TaskStatus[None]) -> None:
        state = self._state
        assert state is not None
        task_status.started()
        try:
            while (job := await lane.take()) is not None:
                await self._run(job)
        finally:
            state.workers_left -= 1
            if state.workers_left == 0:
                state.idle.set()

    async def _run(self, job: _Job) -> None:
        """Run a taken job (counted from queued to running to done or failed).

        One coroutine for the counting and the attempts: a fill waits on the store inside
        it, and every frame held across that wait is walked by the garbage collector.
        """
        counters = self.counters_for(job.kind)
        counters.queued -= 1
        counters.running += 1
        try:
            for attempt in range(job.retries + 1):
                try:
                    if job.timeout == math.inf:  # bounded by itself (a store call with its own budget): no cancel scope
                        await job.function(*job.args)
                    else:
                        with anyio.fail_after(job.timeout):
                            await job.function(*job.args)
                except Exception as exc:  # the barrier: one job's failure never reaches the others
                    if attempt < job.retries:
                        await anyio.sleep(min(self.retry_backoff * math.pow(2, attempt), 30.0))
                        continue
                    counters.failed += 1
                    logger.warning("cachemw: background %s job failed (key %s): %r", job.kind, job.key or "-", exc,
                                   exc_info=not isinstance(exc, TimeoutError))
                    return
                counters.done += 1
                return
        finally:
            counters.running -= 1
            self.queued_bytes -= job.size  # held until the job is done, not only while it waits
