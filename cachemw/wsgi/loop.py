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
import concurrent.futures
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup

__all__ = ["BackgroundLoop"]

logger = logging.getLogger("cachemw.wsgi")

T = TypeVar("T")

Startup = Callable[[TaskGroup], Awaitable[None]]
Shutdown = Callable[[], Awaitable[None]]


class BackgroundLoop:
    """One anyio loop in a daemon thread: ``startup`` runs first, ``shutdown`` when stopped, tasks in between."""

    def __init__(self, startup: Startup, shutdown: Shutdown, *, name: str = "cachemw") -> None:
        self._startup = startup
        self._shutdown = shutdown
        self._name = name
        self.pid = os.getpid()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task_group: TaskGroup | None = None
        self.thread: threading.Thread | None = None
        self.thread_id = 0
        self.failure: BaseException | None = None  # why startup failed
        self._ready = threading.Event()
        self._stop: anyio.Event | None = None
        self._tasks: set[asyncio.Future[Any]] = set()

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
        self.loop = asyncio.get_running_loop()
        self._stop = anyio.Event()
        async with anyio.create_task_group() as task_group:
            self.task_group = task_group
            await self._startup(task_group)
            self._ready.set()
            await self._stop.wait()
            with anyio.CancelScope(shield=True):
                await self._shutdown()
            task_group.cancel_scope.cancel()

    def spawn(self, function: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Start ``function(*args)`` as a task on the loop, from any thread; returns at once.

        A plain asyncio task, not one of the task group's: a loop callback is not a task,
        and anyio starts tasks only from tasks; this is also the cheapest hop there is
        (anyio's cancel scopes work inside it all the same).
        """
        loop = self.loop
        assert loop is not None
        loop.call_soon_threadsafe(self._create_task, function, args)

    def _create_task(self, function: Callable[..., Coroutine[Any, Any, Any]], args: tuple[Any, ...]) -> None:
        task = asyncio.ensure_future(function(*args))
        self._tasks.add(task)  # referenced until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    def call(self, function: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run ``function(*args)`` on the loop from another thread and wait for its result (or exception)."""
        if threading.get_ident() == self.thread_id:
            raise RuntimeError("cachemw: a blocking call into the cache's loop from the loop itself")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        async def run() -> None:
            try:
                future.set_result(await function(*args))
            except BaseException as exc:
                future.set_exception(exc)

        self.spawn(run)
        return future.result()

    def call_sync(self, function: Callable[[], T]) -> T:
        """Run the plain ``function()`` on the loop's thread (what only that thread may touch) and return its result."""
        if threading.get_ident() == self.thread_id:
            return function()

        async def run() -> T:
            return function()

        return self.call(run)

    def stop(self, timeout: float | None = None) -> None:
        """Run shutdown (drains the background work) and end the thread; idempotent, this process only."""
        thread, loop, stop = self.thread, self.loop, self._stop
        if thread is None or loop is None or stop is None or self.pid != os.getpid() or not thread.is_alive():
            return
        if threading.get_ident() == self.thread_id:
            return
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:  # the loop is already closed
            return
        thread.join(timeout)


def _backend_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401 - what uvicorn[standard] runs; plain asyncio otherwise
    except ImportError:
        return {}
    return {"use_uvloop": True}
