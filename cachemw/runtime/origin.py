"""A bound on concurrent origin calls of cached routes, global and per route.

Under overload a cache must take load off the database, not queue more onto it
(nginx's ``proxy_cache_lock``, Varnish's backend ``max_connections``). Past the
bound a request with a usable stale entry gets the entry; the others wait a
bounded time for a slot and are then answered 503 with ``Retry-After``.
"""

from __future__ import annotations

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


class Slot:
    """The right to call the origin once; ``release()`` when the call is over."""

    __slots__ = ("_held",)

    def __init__(self, held: tuple[anyio.Semaphore, ...]) -> None:
        self._held = held

    def release(self) -> None:
        held, self._held = self._held, ()
        for semaphore in held:
            semaphore.release()


class OriginSlots:
    """``limit`` origin calls at once in this process, and ``route_limits[route]`` for a route (0: no own bound)."""

    def __init__(self, limit: int) -> None:
        self._global = _Pool(limit) if limit > 0 else None
        self._routes: dict[str, _Pool] = {}
        self.rejected = 0  # requests answered 503 for want of a slot

    def bound_route(self, route: str, limit: int) -> None:
        if limit > 0:
            self._routes[route] = _Pool(limit)

    def take_nowait(self, route: str) -> Slot | None:
        """A slot now, without a checkpoint (the common case costs no loop turn), or None."""
        pools = self._pools(route)
        taken: list[anyio.Semaphore] = []
        for pool in pools:
            semaphore = pool.semaphore()
            try:
                semaphore.acquire_nowait()
            except anyio.WouldBlock:
                for held in taken:
                    held.release()
                return None
            taken.append(semaphore)
        return Slot(tuple(taken))

    async def take(self, route: str, wait: float) -> Slot | None:
        """A slot within ``wait`` seconds, or None."""
        taken: list[anyio.Semaphore] = []
        try:
            with anyio.move_on_after(wait):
                for pool in self._pools(route):
                    semaphore = pool.semaphore()
                    await semaphore.acquire()
                    taken.append(semaphore)
                slot, taken = Slot(tuple(taken)), []  # the slot holds them now
                return slot
            self.rejected += 1
            return None
        finally:
            # Timed out, or cancelled from outside (the request's task) while waiting for the
            # global pool: the route's slot it already holds must not be lost for good.
            for held in taken:
                held.release()

    def _pools(self, route: str) -> tuple[_Pool, ...]:
        own = self._routes.get(route)
        if self._global is None:
            return () if own is None else (own,)
        return (self._global,) if own is None else (own, self._global)
