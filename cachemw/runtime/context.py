"""What a handler reaches of the cache handling its request: ``current_cache()``, ``invalidate()``, ``detach()``."""

from __future__ import annotations

from contextvars import ContextVar

from cachemw.core.keys import route_tag
from cachemw.core.rules import normalise_template
from cachemw.runtime.shell import CacheShell
from cachemw.runtime.supervisor import detach

__all__ = ["current_cache", "detach", "enter", "invalidate", "leave"]

_current: ContextVar[CacheShell] = ContextVar("cachemw_cache")


enter = _current.set
"""``enter(shell)``: make ``shell`` the cache that ``current_cache()`` and ``invalidate()`` reach from this
request. The ContextVar's own ``set``: every request calls it, and a function around it is a Python frame each."""

leave = _current.reset
"""``leave(token)``: undo ``enter`` when the request ends. An ASGI app called in the caller's own task (httpx's
ASGITransport, a test) would otherwise leave its cache as the caller's ``current_cache()`` for later calls."""


def current_cache() -> CacheShell:
    """The CacheMiddleware handling the current request."""
    cache = _current.get(None)
    if cache is None:
        raise RuntimeError("no CacheMiddleware is handling this request. HINT: call this from a handler of an app "
                           "with app.add_middleware(CacheMiddleware, ...), or use CacheMiddleware.invalidator.")
    return cache


async def invalidate(*, tags: tuple[str, ...] | list[str] = (), routes: tuple[str, ...] | list[str] = (),
                     urls: tuple[str, ...] | list[str] = (), everything: bool = False, soft: bool = False) -> int:
    """Drop entries from a handler: by tag, route template, URL, or all. Returns how many were dropped.

    Done in the shared store and this process's L1 before it returns; other
    processes drop theirs when the broadcast reaches them (at most ``sync`` later).
    ``soft``: mark them stale instead, served STALE within their ``stale_while_revalidate``
    while one refresh per key replaces them (those without a stale window are dropped).
    """
    invalidator = current_cache().invalidator
    if invalidator is None:
        return 0
    if everything:
        return await invalidator.everything(soft=soft)
    wanted = [*tags, *(route_tag(normalise_template(r)) for r in routes)]
    dropped = await invalidator.tags(*wanted, soft=soft) if wanted else 0
    return dropped + (await invalidator.urls(*urls, soft=soft) if urls else 0)
