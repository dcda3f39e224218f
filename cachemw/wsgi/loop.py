"""This process's event loop for the cache: one daemon thread, started on the first request after fork.

A WSGI server runs requests in threads (or one at a time); the cache's store
client, single-flight table, supervisor and timers are asyncio objects. They live
on one loop in a thread of their own, started lazily in the process that serves
(a loop thread does not survive ``fork``, so gunicorn ``--preload`` and forking
servers get a new one in each worker: the pid is checked). At interpreter exit the
loop is stopped and its work drained (the thread is a daemon, so the interpreter's
wait for threads never blocks on it; ``atexit`` stops it instead).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.from_thread import BlockingPortal

__all__ = ["BackgroundLoop"]

logger = logging.getLogger("cachemw.wsgi")

T = TypeVar("T")

LATER_INTERVAL = 0.02  # seconds: how often the loop runs what ``later`` handed it

Startup = Callable[[TaskGroup], Awaitable[None]]
Shutdown = Callable[[], Awaitable[None]]


class BackgroundLoop:
    """One anyio loop in a daemon thread: ``startup`` runs first, ``shutdown`` when stopped, tasks in between."""

    def __init__(self, startup: Startup, shutdown: Shutdown, *, name: str = "cachemw") -> None:
        self._startup = startup
        self._shutdown = shutdown
        self._name = name
        self.pid = os.getpid()
        self.portal: BlockingPortal | None = None
        self._asyncio_loop: asyncio.AbstractEventLoop | None = None
        self._later: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]] = collections.deque()
        self.thread: threading.Thread | None = None
        self.thread_id = 0
        self.failure: BaseException | None = None  # why startup failed
        self._ready = threading.Event()
        self._stop: anyio.Event | None = None

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.failure is None

    def start(self, timeout: float) -> None:
        """Start the thread and wait (at most ``timeout``) until startup has run; raises its failure."""
        self.thread = threading.Thread(target=self._run, name=f"{self._name}-loop", daemon=True)
        self.thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"cachemw: the cache's event loop did not start within {timeout:g}s")
        if self.failure is not None:
            raise self.failure
        atexit.register(self.stop)

    def _run(self) -> None:
        self.thread_id = threading.get_ident()
        try:
            anyio.run(self._main, backend="asyncio", backend_options=_backend_options())
        except BaseException as exc:
            if not self._ready.is_set():
                self.failure = exc
            else:
                logger.exception("cachemw: the cache's event loop stopped")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stop = anyio.Event()
        self._asyncio_loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as task_group, BlockingPortal() as portal:
            # Other threads hand work to the loop through anyio's portal: its tasks are supervised
            # (an exception reaches the caller's future, never the loop), and shutdown waits for them.
            self.portal = portal
            task_group.start_soon(self._run_later)
            await self._startup(task_group)
            self._ready.set()
            await self._stop.wait()
            with anyio.CancelScope(shield=True):
                await self._shutdown()
            self._drain_later()
            task_group.cancel_scope.cancel()

    def notify(self, function: Callable[..., object], *args: Any) -> None:
        """Run the plain ``function(*args)`` on the loop's thread as soon as it can; returns at once."""
        loop = self._asyncio_loop
        assert loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has stopped (the process exits): a lock it would
            loop.call_soon_threadsafe(function, *args)  # release expires by itself

    def later(self, function: Callable[..., object], *args: Any) -> None:
        """Run the plain ``function(*args)`` on the loop's thread within ``LATER_INTERVAL``, without waking it.

        For what a hit hands over (its log, its L1 copy): one wake-up of the loop per hit
        costs the hit more than the rest of its work.
        """
        self._later.append((function, args))

    async def _run_later(self) -> None:
        while True:
            await anyio.sleep(LATER_INTERVAL)
            self._drain_later()

    def _drain_later(self) -> None:
        later = self._later
        while later:
            function, args = later.popleft()
            try:
                function(*args)
            except Exception:  # the barrier: one bad item never stops the others
                logger.exception("cachemw: work handed to the cache's loop failed")

    def spawn(self, function: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Start ``function(*args)`` as a task on the loop, from any thread; returns at once."""
        assert self.portal is not None
        self.portal.start_task_soon(function, *args)

    def call(self, function: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run ``function(*args)`` on the loop from another thread and wait for its result (or exception)."""
        if threading.get_ident() == self.thread_id:
            raise RuntimeError("cachemw: a blocking call into the cache's loop from the loop itself")
        assert self.portal is not None
        result: T = self.portal.call(function, *args)
        return result

    def call_sync(self, function: Callable[[], T]) -> T:
        """Run the plain ``function()`` on the loop's thread (what only that thread may touch) and return its result."""
        if threading.get_ident() == self.thread_id:
            return function()
        assert self.portal is not None
        result: T = self.portal.call(function)
        return result

    def stop(self, timeout: float | None = None) -> None:
        """Run shutdown (drains the background work) and end the thread; idempotent, this process only."""
        thread, portal, stop = self.thread, self.portal, self._stop
        if thread is None or portal is None or stop is None or self.pid != os.getpid() or not thread.is_alive():
            return
        if threading.get_ident() == self.thread_id:
            return
        try:
            portal.call(stop.set)
        except RuntimeError:  # the loop is already gone
            return
        thread.join(timeout)


def _backend_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401 - what uvicorn[standard] runs; plain asyncio otherwise
    except ImportError:
        return {}
    return {"use_uvloop": True}
