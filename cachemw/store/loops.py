"""Connections bound to an event loop: which loop runs now, and closing with the loop.

An asyncio connection (a transport, a redis-py pool, a subscription) works only on
the loop it was opened on. Apps do not always keep one loop: Starlette's
``TestClient`` used outside ``with`` runs every request on a loop of its own,
pytest plugins make one per test, a script may call ``asyncio.run`` twice. So the
Redis store opens its connections per loop: a call on another loop than the
connections' drops them and opens new ones.

Nobody may close a store used without a lifespan, and a socket left open when its
loop closes is a ``ResourceWarning`` (an error under ``-W error``). Runners that
end a loop (``asyncio.run``, ``anyio.run``, ``asyncio.Runner``, so TestClient's
portal and the pytest plugins) first cancel the loop's remaining tasks and let
them finish: ``LoopGuard`` is such a task, owned by the connections it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from cachemw.store.base import StoreError

__all__ = ["NEEDS_ASYNCIO", "LoopGuard", "current_library", "running_loop", "running_or_none"]

NEEDS_ASYNCIO = "the Redis store needs an asyncio event loop (asyncio or uvloop)"
_CLOSE_TIMEOUT = 2.0  # closing at the loop's end: redis-py's pools await their sockets' close
# The loop keeps only weak references to its tasks: these keep the guards (and so what they
# close) alive until their loop ends, also when their owner is garbage-collected first.
_GUARDS: set[asyncio.Task[None]] = set()


def current_library() -> str | None:
    """The async library running the current task ("asyncio", "trio", ...), or None outside one."""
    try:
        import sniffio
    except ImportError:  # pragma: no cover - anyio brings sniffio
        return None
    try:
        return str(sniffio.current_async_library())
    except sniffio.AsyncLibraryNotFoundError:
        return None


def running_loop() -> asyncio.AbstractEventLoop:
    """The running asyncio loop; ``StoreError`` saying why when there is none (trio, or no async code)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        library = current_library()
        where = f"this code runs on {library}" if library else "no event loop is running"
        raise StoreError(f"{NEEDS_ASYNCIO}; {where}") from None


class LoopGuard:
    """Runs ``close()`` when the loop's runner cancels the loop's tasks at its end, unless released first.

    ``release()`` when the owner closed its connections itself. Not work of the app's:
    a watcher that only ever closes what its owner opened on that loop.
    """

    __slots__ = ("_released", "_task", "loop", "released")

    def __init__(self, loop: asyncio.AbstractEventLoop, close: Callable[[], Awaitable[None]]) -> None:
        self.loop = loop
        self.released = False
        self._released: asyncio.Future[None] = loop.create_future()
        self._task = loop.create_task(self._watch(close), name="cachemw: close redis connections with the loop")
        _forget_closed_loops()
        _GUARDS.add(self._task)
        self._task.add_done_callback(_GUARDS.discard)

    async def _watch(self, close: Callable[[], Awaitable[None]]) -> None:
        try:
            await self._released
        except asyncio.CancelledError:  # the loop's end, or ``cancel()``
            if not self.released:  # (the future is cancelled with the task: it cannot tell)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(close(), _CLOSE_TIMEOUT)
            raise

    def release(self) -> None:
        """The owner closed its connections: the guard ends (safe from any thread, also after the loop closed)."""
        self.released = True
        loop = self.loop
        if loop is running_or_none():
            self._set_released()
        elif not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self._set_released)

    def cancel(self, *, from_finalizer: bool = False) -> None:
        """Close the owner's connections on their loop now, if it still runs (safe from any thread,
        and from a finalizer: then always by way of the loop's queue)."""
        loop = self.loop
        if loop is running_or_none() and not from_finalizer:
            self._task.cancel()
        elif not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self._task.cancel)

    def _set_released(self) -> None:
        if not self._released.done():
            self._released.set_result(None)


def _forget_closed_loops() -> None:
    """Let go of the guards of loops that were closed without cancelling their tasks first
    (``loop.run_until_complete(...)`` then ``loop.close()`` by hand): nothing runs on those any
    more, and held here they would keep their loop, clients and sockets for ever, one set per
    such loop. Left to the garbage collector, the sockets are closed (with the ResourceWarning
    any transport left open gets); the pending guard is dropped without asyncio's "Task was
    destroyed but it is pending" (it never had anything to do but wait)."""
    for task in _GUARDS.copy():  # a copy in one step: loops in other threads add and discard meanwhile
        if not task.get_loop().is_closed():
            continue
        _GUARDS.discard(task)
        with contextlib.suppress(AttributeError):  # asyncio's own flag (set by run_until_complete too)
            task._log_destroy_pending = False  # type: ignore[attr-defined]


def running_or_none() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None (from a thread without one, or under trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
