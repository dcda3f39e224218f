"""The Redis store's connections of one event loop, and the gate that bounds a cluster's commands in flight.

An asyncio connection works only on the loop it was opened on (``cachemw.store.loops``):
the store keeps one ``LoopClients`` per loop it is called on, and makes another when
the running loop is not that one's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from redis.asyncio import Redis, RedisCluster

from cachemw.store.loops import LoopGuard
from cachemw.store.pipeline import PipelinedRedis
from cachemw.store.pipeline_cluster import PipelinedCluster
from cachemw.store.redis_clients import close_client
from cachemw.store.redis_scripts import FILL_ALL_SCRIPT, LOCK_ALL_SCRIPT, UNLOCK_SCRIPT

__all__ = ["ConnectionGate", "LoopClients", "cancel_guards", "gated_script"]


class ConnectionGate:
    """At most ``limit`` commands in flight; the semaphore is made inside the event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._semaphore: anyio.Semaphore | None = None

    async def __aenter__(self) -> None:
        if self._semaphore is None:
            self._semaphore = anyio.Semaphore(self.limit)
        await self._semaphore.acquire()

    async def __aexit__(self, *exc: object) -> None:
        assert self._semaphore is not None
        self._semaphore.release()


class LoopClients:
    """The clients of one event loop: redis-py's (and their scripts and gate) and the pipelined connection."""

    __slots__ = ("_background", "_background_client", "also_close", "background_pipelined", "client", "dropped",
                 "fill_all", "gate", "guard", "listener_client", "lock_all", "loop", "pipelined", "routed",
                 "unlock_script")

    def __init__(self, client: Redis | RedisCluster, pipelined: PipelinedRedis | None,
                 listener_client: Callable[[], Redis | RedisCluster], also_close: Sequence[Any],
                 max_connections: int, background_client: Callable[[], Redis | RedisCluster],
                 background_timeout: float, routed: PipelinedCluster | None = None) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # taken by the first call inside a loop
        self.guard: LoopGuard | None = None
        self.dropped = False  # closed by its guard (its loop ended): the next call makes new clients
        self.client: Any = client
        self.pipelined = pipelined if not isinstance(client, RedisCluster) else None
        self.routed = routed if isinstance(client, RedisCluster) else None  # a Cluster's request path
        # Connects on first use, like the request path's.
        self.background_pipelined = self.pipelined.twin(background_timeout) if self.pipelined is not None else None
        self.listener_client = listener_client
        self._background_client = background_client
        self._background: Redis | RedisCluster | None = None
        self.also_close = list(also_close)
        # redis-py's cluster client raises at once when a node's pool is full; wait for a
        # connection instead (within the caller's budget), as the single-server pool does.
        self.gate: ConnectionGate | None = ConnectionGate(max_connections) if isinstance(client, RedisCluster) else None
        self.unlock_script = client.register_script(UNLOCK_SCRIPT)
        self.lock_all = client.register_script(LOCK_ALL_SCRIPT)
        self.fill_all = client.register_script(FILL_ALL_SCRIPT)

    def gated(self) -> Any:
        return self.gate if self.gate is not None else contextlib.nullcontext()

    def lane(self, timeout: float | None) -> tuple[Any, Any]:
        """The client for a call with a ``timeout`` of its own (background work), and the gate to pass.

        Background work has its own pool with the longer socket timeout, made on first
        use: it neither waits behind the request path's pool nor fails at its budget.
        Not on a cluster: a RedisCluster whose first command (its slot map) is cancelled
        leaks its node connections, and a job may be cancelled at any point; there
        background calls share the request path's client, each attempt within its budget.
        """
        if timeout is None or self.gate is not None:
            return self.client, self.gated()
        background = self._background
        if background is None:
            background = self._background = self._background_client()
        return background, contextlib.nullcontext()

    def bind(self, loop: asyncio.AbstractEventLoop) -> LoopGuard:
        self.loop = loop
        self.guard = guard = LoopGuard(loop, self._loop_ended)  # without a lifespan nobody else closes these
        return guard

    async def _loop_ended(self) -> None:
        self.dropped = True
        await self.aclose()

    async def aclose(self) -> None:
        """Close the clients (on their own loop); raises the driver's errors."""
        if self.guard is not None:
            self.guard.release()
        try:
            if self.pipelined is not None:
                await self.pipelined.aclose()
            if self.background_pipelined is not None:
                await self.background_pipelined.aclose()
            if self.routed is not None:
                await self.routed.aclose()
        finally:
            await close_client(self.client)
            background, self._background = self._background, None
            if background is not None and background is not self.client:
                await close_client(background)
            for other in self.also_close:
                await close_client(other)

    def abandon(self) -> None:
        """Another loop takes over: close these on their own loop if it still runs, else leave them be."""
        if self.pipelined is not None:  # its socket is closed by its own guard, or now on its loop
            self.pipelined.abandon()
        if self.background_pipelined is not None:
            self.background_pipelined.abandon()
        if self.routed is not None:
            self.routed.abandon()
        if self.guard is not None:
            self.guard.cancel()  # its loop, if it still runs, closes the rest


async def gated_script(bound: LoopClients, script: Any, keys: list[str], args: list[Any], timeout: float | None
                       ) -> Any:
    """A registered script on redis-py's client (TLS, Cluster, Sentinel), through the lane's gate."""
    client, gate = bound.lane(timeout)
    async with gate:
        return await script(keys=keys, args=args, client=client)


def cancel_guards(guards: list[LoopGuard]) -> None:
    """The store's finalizer: a store collected while its loop runs has its connections closed there."""
    for guard in guards:
        guard.cancel(from_finalizer=True)
