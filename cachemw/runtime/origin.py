"""A bound on concurrent origin calls of cached routes, global and per route.

Under overload a cache must take load off the database, not queue more onto it
(nginx's ``proxy_cache_lock``, Varnish's backend ``max_connections``). Past the
bound a request with a usable stale entry gets the entry; the others wait a
bounded time for a slot and are then answered 503 with ``Retry-After``.

The WSGI shell's request threads take slots from the same pools
(``take_in_thread``), so one bound covers the misses its loop carries and those its
threads lead.
"""

from __future__ import annotations

import threading

import anyio

__all__ = ["OriginSlots", "Slot"]


class _Pool:
    __slots__ = ("_semaphore", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._semaphore: anyio.Semaphore | None = None  # made in the event loop that uses it

    def semaphore(self) -> anyio.Semaphore:
        if self._semaphore is None:
            self._semaphore = anyio.Semaphore(self.limit)
        return self._semaphore

    @property
    def existing(self) -> anyio.Semaphore | None:
        return self._semaphore


def _take_all(semaphores: tuple[anyio.Semaphore, ...], guard: threading.Lock) -> Slot | None:
    """All of them or none, under ``guard``; never releases (a release may wake a waiter, which only the
    loop's thread may)."""
    with guard:
        for semaphore in semaphores:  # a loop, not any() over a generator: every miss comes here
            if semaphore.value == 0:
                return None
        for semaphore in semaphores:
            semaphore.acquire_nowait()
    return Slot(semaphores, guard)


class Slot:
    """The right to call the origin once; ``release()`` when the call is over."""

    __slots__ = ("_guard", "_held")

    def __init__(self, held: tuple[anyio.Semaphore, ...], guard: threading.Lock) -> None:
        self._held = held
        self._guard = guard  # the counts a request thread's take changes too

    def release_in_thread(self) -> bool:
        """Release from a thread that is not the loop's, unless a request there waits for a slot (whose wake-up
        only the loop's thread may do: then False, and the caller hands ``release`` to the loop)."""
        with self._guard:
            if any(semaphore.statistics().tasks_waiting for semaphore in self._held):
                return False
            held, self._held = self._held, ()
            for semaphore in held:
                semaphore.release()  # nobody waits: this only counts the slot free again
        return True

    def release(self) -> None:
        held, self._held = self._held, ()
        with self._guard:
            for semaphore in held:
                semaphore.release()


class OriginSlots:
    """``limit`` origin calls at once in this process, and ``route_limits[route]`` for a route (0: no own bound)."""

    def __init__(self, limit: int) -> None:
        self._global = _Pool(limit) if limit > 0 else None
        self._routes: dict[str, _Pool] = {}
        self._semaphores: dict[str, tuple[anyio.Semaphore, ...]] = {}  # per route, once its pools made them
        self.rejected = 0  # requests answered 503 for want of a slot
        self._taking = threading.Lock()  # takes without waiting and releases: from the loop and from request threads

    def bound_route(self, route: str, limit: int) -> None:
        if limit > 0:
            self._routes[route] = _Pool(limit)
            self._semaphores.pop(route, None)

    def take_nowait(self, route: str) -> Slot | None:
        """A slot now, without a checkpoint (the common case costs no loop turn), or None."""
        semaphores = self._semaphores.get(route)
        if semaphores is None:  # a pool keeps the semaphore it made: the tuple is made once per route
            semaphores = self._semaphores[route] = tuple(pool.semaphore() for pool in self._pools(route))
        return _take_all(semaphores, self._taking)

    def take_in_thread(self, route: str) -> Slot | None:
        """``take_nowait`` from a thread that is not the loop's; None also before the loop made the pools.

        The slot's ``release`` must run on the loop's thread (it may wake a waiter there).
        """
        semaphores = tuple(pool.existing for pool in self._pools(route))
        if None in semaphores:
            return None
        return _take_all(semaphores, self._taking)  # type: ignore[arg-type]

    async def take(self, route: str, wait: float) -> Slot | None:
        """A slot within ``wait`` seconds, or None."""
        taken: list[anyio.Semaphore] = []
        try:
            with anyio.move_on_after(wait):
                for pool in self._pools(route):
                    semaphore = pool.semaphore()
                    await semaphore.acquire()
                    taken.append(semaphore)
                slot, taken = Slot(tuple(taken), self._taking), []  # the slot holds them now
                return slot
            self.rejected += 1
            return None
        finally:
            # Timed out, or cancelled from outside (the request's task) while waiting for the
            # global pool: the route's slot it already holds must not be lost for good.
            with self._taking:
                for held in taken:
                    held.release()

    def _pools(self, route: str) -> tuple[_Pool, ...]:
        own = self._routes.get(route)
        if self._global is None:
            return () if own is None else (own,)
        return (self._global,) if own is None else (own, self._global)
