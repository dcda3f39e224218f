"""``Purger``: what the ORM hooks purge through after a commit, from any thread, loop or process.

Bound to a running middleware (``Purger(cache=middleware)``), it purges through
that cache's invalidator: this process's L1 and fills in flight at once, the
shared store, and every other server by the store's broadcast. Without one (a
worker, a script: a process that serves no HTTP) it starts a cache of its own,
without routes, from the same settings the app reads (``config``, ``redis_url``,
``key_prefix``, ``CACHEMW_REDIS_URL``): its purges reach every server the same way.

A commit never fails because of the cache and never waits on a dead store for
long: the purge is tried once, within ``background_timeout``; if the store does
not answer it is retried in the background (``retries`` times, with backoff,
logged, counted under the supervisor's ``purge`` kind). Meanwhile the L1 bound
holds: a server that cannot hear the store drops and bypasses its L1.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import anyio
import anyio.from_thread

from cachemw.core.rules import RuleTable
from cachemw.core.settings import Settings, load_settings
from cachemw.core.tags import unique
from cachemw.runtime.runtime import CacheRuntime
from cachemw.runtime.shell import CacheShell

__all__ = ["Purger"]

logger = logging.getLogger("cachemw.orm")

_RETRIES = 8  # about 25 s of backoff (0.1 s doubling) before a purge is given up


class Purger:
    """Purges tags after commits: through ``cache`` (a ``CacheMiddleware``, ASGI or WSGI), or a cache of its own.

    ``purge(tags)`` from sync code and ``await apurge(tags)`` from async code return
    once the purge is done, or handed to the background after a store failure; they
    never raise. ``purged``, ``retried`` and ``lost`` count what happened.
    """

    def __init__(self, cache: CacheShell | None = None, *, config: str | os.PathLike[str] | None = None,
                 redis_url: str | None = None, key_prefix: str | None = None, settings: Settings | None = None,
                 retries: int = _RETRIES) -> None:
        if cache is not None and (config is not None or redis_url is not None or key_prefix is not None
                                  or settings is not None):
            raise TypeError("Purger: pass either cache= (a running middleware) or the settings of a cache of "
                            "its own (config=, redis_url=, key_prefix=, settings=), not both")
        self.cache = cache
        self.retries = retries
        self._options: dict[str, Any] = {"config": config, "redis_url": redis_url, "key_prefix": key_prefix,
                                         "settings": settings}
        self._own: CacheShell | None = None
        self._starting = threading.Lock()
        self.purged = 0
        self.retried = 0
        self.lost = 0

    # -- from sync code --------------------------------------------------------------------------

    def purge(self, tags: Iterable[str]) -> None:
        """Purge ``tags`` from a thread (a sync ORM commit): waits for the purge, or hands it to the background."""
        wanted = unique(tags)
        if not wanted:
            return
        try:
            runtime = self._runtime()
            if runtime is None:
                return
            token = runtime.loop_token
            if token is not None and threading.get_ident() != runtime.loop_thread:
                anyio.from_thread.run(self._purge_now, runtime, wanted, token=token)
                return
            try:  # a worker thread of the loop the cache runs on, without a lifespan (no token)
                anyio.from_thread.run(self._purge_now, runtime, wanted)
                return
            except RuntimeError:
                pass
            # On the cache's own loop (a sync session inside an async handler): it cannot be waited for here.
            self._hand_over(runtime, wanted, self._purge_now, runtime, wanted)
        except Exception:  # the barrier: a commit never fails because of the cache
            self.lost += 1
            logger.exception("cachemw: purging %s after a commit failed; those entries live out their ttl",
                             ", ".join(wanted))

    # -- from async code -------------------------------------------------------------------------

    async def apurge(self, tags: Iterable[str]) -> None:
        """Purge ``tags`` from async code (an asyncio ORM commit), on the cache's loop or from another."""
        wanted = unique(tags)
        if not wanted:
            return
        runtime = self._current_runtime()
        if runtime is not None and (runtime.loop_token is None or threading.get_ident() == runtime.loop_thread):
            try:
                await self._purge_now(runtime, wanted)
            except Exception:
                self.lost += 1
                logger.exception("cachemw: purging %s after a commit failed", ", ".join(wanted))
            return
        await anyio.to_thread.run_sync(self.purge, wanted)  # the cache's loop is another thread's (or to start)

    # -- the work ----------------------------------------------------------------------------------

    async def _purge_now(self, runtime: CacheRuntime, tags: list[str]) -> None:
        invalidator = runtime.invalidator
        if runtime.breaker.state == "open":  # the store is known down: do not make the commit wait for it
            self._retry_later(runtime, tags, "the store's circuit is open")
            return
        try:
            await invalidator.tags(*tags)
        except Exception as exc:
            self._retry_later(runtime, tags, repr(exc))
        else:
            self.purged += 1

    def _retry_later(self, runtime: CacheRuntime, tags: list[str], why: str) -> None:
        self.retried += 1
        logger.warning("cachemw: purging %s after a commit failed (%s); retrying in the background",
                       ", ".join(tags), why)
        self._hand_over(runtime, tags, runtime.invalidator.tags, *tags, retries=self.retries)

    def _hand_over(self, runtime: CacheRuntime, tags: list[str], function: Callable[..., Any], *args: Any,
                   retries: int = 0) -> None:
        supervisor = runtime.supervisor
        hop = supervisor.hop  # the WSGI shell's loop thread, where its supervisor takes jobs

        def submit() -> bool:
            return supervisor.submit("purge", function, *args, key=",".join(tags)[:200], retries=retries)

        taken = hop(submit) if hop is not None and threading.get_ident() != supervisor.home_thread else submit()
        if not taken:
            self.lost += 1
            logger.error("cachemw: could not queue the purge of %s (background queue full or stopped); those "
                         "entries live out their ttl", ", ".join(tags))

    # -- which cache -------------------------------------------------------------------------------

    def _current_runtime(self) -> CacheRuntime | None:
        shell = self.cache if self.cache is not None else self._own
        return None if shell is None else shell.runtime

    def _runtime(self) -> CacheRuntime | None:
        """The runtime to purge through; a cache of our own is started on first use (in this process)."""
        shell = self.cache
        if shell is None:
            shell = self._own_cache()
        shell.start()
        runtime = shell.runtime
        if runtime is None:
            self.lost += 1
            logger.warning("cachemw: a commit's purge came before the cache started (its app's lifespan): "
                           "dropped. HINT: give a process that serves no HTTP a Purger() of its own")
        return runtime

    def _own_cache(self) -> CacheShell:
        with self._starting:
            if self._own is None:
                from cachemw.wsgi import CacheMiddleware  # its own loop in a thread: usable from any thread

                options = self._options
                settings = options["settings"] or load_settings(options["config"])
                for name in ("redis_url", "key_prefix"):
                    if options[name] is not None:
                        settings = replace(settings, **{name: options[name]})
                if settings.redis_url is None:
                    logger.warning("cachemw: this process's Purger has no redis_url (nor CACHEMW_REDIS_URL): "
                                   "its purges reach no other process")
                # A process that serves no HTTP reports no request metrics to the fleet.
                settings = replace(settings, metrics_interval=0.0)
                self._own = CacheMiddleware(_no_app, settings=settings, route_table=_no_routes)
            return self._own

    def close(self) -> None:
        """Stop a cache of our own after its pending purges (also done at interpreter exit)."""
        own = self._own
        close = getattr(own, "close", None)
        if close is not None:
            close()


def _no_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("404 Not Found", [("content-type", "text/plain")])
    return [b"this cache serves no routes\n"]


def _no_routes(settings: Settings) -> RuleTable:
    return RuleTable([], ())
