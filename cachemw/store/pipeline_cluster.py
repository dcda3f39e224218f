"""The request path's commands on a Redis Cluster: one auto-pipelined connection per master, routed by slot.

redis-py's cluster client pays its per-command cost twice over (a node lookup, a
pooled connection, its retry loop): a hit ran at 0.29x of one Redis. Here each key's
slot (redis-py's ``key_slot``: CRC16 of the hash tag) picks the ``PipelinedRedis`` of
the master that serves it, so a hit is one command on an already open connection, as
on one server. The request path's commands each touch one entry's keys, which share
its hash tag: one slot, one node.

The slot map comes from ``CLUSTER SLOTS`` over these same connections: learnt on first
use (or at startup, ``connect``) within the caller's budget, and refreshed without a
round trip of anyone's: the ``CLUSTER SLOTS`` goes out beside other traffic and its
reply is applied when it arrives (a callback, no task).

- ``-MOVED``: the slot lives elsewhere now (a resharding, a failover); the slot is
  pointed at the new node, the command retried there once within its budget, and the
  whole map refreshed.
- ``-ASK``: this once, during a migration: ``ASKING`` and the command go to the target,
  back to back on its connection; the map is left as it is.
- a node's connection failing (refused, lost, timed out) or ``-CLUSTERDOWN``: the
  command fails (the caller falls back to the app, the node's breaker hears it) and
  the map is refreshed from another node, at most once per ``refresh_interval``, so a
  failover's new master is found as soon as the cluster names it.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Awaitable, Sequence
from ssl import SSLContext
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # redis-py brings async-timeout on 3.10
    from async_timeout import timeout as _timeout  # type: ignore[import-not-found,unused-ignore]

from cachemw.store.base import StoreError, StoreTimeout
from cachemw.store.loops import running_loop
from cachemw.store.pipeline import ErrorReply, PipelinedRedis, Redirected, encode_command, evalsha

__all__ = ["PipelinedCluster"]

_CLUSTER_SLOTS = encode_command(["CLUSTER", "SLOTS"])
_ASKING = encode_command(["ASKING"])

Slots = list["PipelinedRedis | None"]


class PipelinedCluster:
    """Commands to a Redis Cluster's masters, each over the auto-pipelined connection of its key's node.

    ``seeds``: (host, port) of any nodes to learn the slot map from. The other options
    are each node's ``PipelinedRedis``'s (AUTH, TLS, the time budget and its grace).
    """

    def __init__(self, seeds: Sequence[tuple[str, int]], *, username: str | None = None,
                 password: str | None = None, timeout: float = 0.05, grace: float | None = None,
                 stuck_after: float = 1.0, ssl: SSLContext | None = None, refresh_interval: float = 0.1) -> None:
        if not seeds:
            raise ValueError("a cluster needs at least one seed node")
        self.seeds = [(host, int(port)) for host, port in seeds]
        self._options: dict[str, Any] = {"username": username, "password": password, "timeout": timeout,
                                         "grace": grace, "stuck_after": stuck_after, "ssl": ssl}
        self._timeout = timeout
        self.refresh_interval = refresh_interval
        self._nodes: dict[tuple[str, int], PipelinedRedis] = {}
        self._slots: Slots = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._names = [""] * REDIS_CLUSTER_HASH_SLOTS  # "host:port" of each slot's master: a breaker per node
        self._loaded = False
        self._loading: asyncio.Future[None] | None = None  # a first load under way: done when it ends
        self._refreshing = False  # a CLUSTER SLOTS in flight
        self._refreshed_at = -math.inf
        self._wanted = False  # a refresh is due (one was asked for within the interval, or no node was open)
        self._closed = False
        # the key routed last and its slot, as one pair: a request routes its key twice in a row, and WSGI
        # request threads route too (their breakers), so a key is never paired with another's slot
        self._last: tuple[str, int] = ("", key_slot(b""))

    @property
    def timeout(self) -> float:
        return self._timeout

    # -- routing ----------------------------------------------------------------------------------

    def slot(self, key: str) -> int:
        """``key``'s hash slot. A request routes its key twice in a row (its node's breaker, then its
        command), and CRC16 of the hash tag in Python is the costlier half of routing: the last key's
        slot is kept (one entry: nothing to bound)."""
        last_key, last_slot = self._last
        if key == last_key:
            return last_slot
        slot = key_slot(key.encode())
        self._last = (key, slot)
        return slot

    def shard(self, key: str) -> str:
        """The name (host:port) of the master serving ``key``; "" before the slot map is known."""
        return self._names[self.slot(key)]

    def masters(self) -> list[PipelinedRedis]:
        """The connections of the nodes that serve slots now."""
        return list({id(node): node for node in self._slots if node is not None}.values())

    def node(self, host: str, port: int) -> PipelinedRedis:
        """The connection to a node, made on first use (it connects on its first command)."""
        address = (host, port)
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = PipelinedRedis(host=host, port=port, **self._options)
        return node

    def get(self, key: str) -> Awaitable[bytes | None]:
        data = key.encode()
        return self.execute(self.slot(key), b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(data), data))

    def evalsha(self, sha: str, script: str, keys: Sequence[str], args: Sequence[bytes | str | int | float],
                timeout: float | None = None) -> Awaitable[Any]:
        """A script on the node of its first key (all its keys share that key's hash tag)."""
        slot = self.slot(keys[0])

        def execute(command: bytes, budget: float) -> Awaitable[Any]:
            return self.execute(slot, command, budget)

        return evalsha(execute, sha, script, keys, args, self._timeout if timeout is None else timeout)

    async def execute(self, slot: int, command: bytes, timeout: float | None = None) -> Any:
        """The reply to an encoded command on the master of ``slot``, within ``timeout`` (default: the
        budget), a redirection followed once within it."""
        budget = self._timeout if timeout is None else timeout
        began = time.monotonic()
        node = self._slots[slot]
        if node is None or (self._wanted and not self._refresh()):
            node = await self._node_for(slot, budget)  # learns the map first: none yet, or no node open to ask
            budget -= time.monotonic() - began
        try:
            return await node.execute(command, budget)
        except Redirected as redirect:
            return await self._follow(redirect, command, budget - (time.monotonic() - began))
        except ErrorReply as exc:
            if "CLUSTERDOWN" in str(exc) or "TRYAGAIN" in str(exc):
                self._refresh(avoid=node)
            raise
        except StoreError:  # refused, lost, timed out: a failover may be under way
            self._refresh(avoid=node)
            raise

    async def _follow(self, redirect: Redirected, command: bytes, left: float) -> Any:
        if left <= 0:
            raise StoreTimeout("redis cluster redirected the command and its time budget was spent")
        target = self.node(redirect.host, redirect.port)
        try:
            if redirect.ask:
                return await target.execute_after(_ASKING, command, left)
            self._slots[redirect.slot] = target
            self._names[redirect.slot] = f"{redirect.host}:{redirect.port}"
            self._refresh(avoid=None, due=True)
            return await target.execute(command, left)
        except ErrorReply:
            raise  # another redirection, or a real error: once is enough within a request's budget
        except StoreError:
            self._refresh(avoid=target)
            raise

    async def _node_for(self, slot: int, budget: float) -> PipelinedRedis:
        if not self._loaded or self._wanted:
            await self.load(budget)
        node = self._slots[slot]
        if node is None:
            self._refresh()
            raise StoreError(f"no redis cluster node serves slot {slot}")
        return node

    # -- the slot map -----------------------------------------------------------------------------

    async def load(self, budget: float) -> None:
        """Learn the slot map within ``budget``; callers arriving meanwhile wait for the same attempt.

        No task of its own, as ``PipelinedRedis`` connects: a caller that gives up abandons
        the attempt and one of those waiting starts another.
        """
        loop = running_loop()
        try:
            async with _timeout(budget):
                while not self._loaded or self._wanted:
                    if self._closed:
                        raise StoreError("redis cluster connections closed")
                    attempt = self._loading
                    if attempt is None or attempt.get_loop() is not loop:
                        self._loading = attempt = loop.create_future()
                        try:
                            await self._ask_any()
                            return
                        finally:
                            if self._loading is attempt:
                                self._loading = None
                            attempt.set_result(None)
                    await asyncio.shield(attempt)
        except asyncio.TimeoutError:
            raise StoreTimeout("learning the redis cluster's slot map took longer than the time budget",
                               first_connect=not self._loaded) from None

    async def _ask_any(self) -> None:
        """``CLUSTER SLOTS`` from the first node that answers: known masters first, then the seeds."""
        errors: list[str] = []
        candidates = [*self.masters(), *(self.node(host, port) for host, port in self.seeds)]
        for node in {id(node): node for node in candidates}.values():
            try:
                reply = await node.execute(_CLUSTER_SLOTS)
            except StoreError as exc:
                errors.append(f"{node.host}:{node.port}: {exc}")
                continue
            self._apply(reply, node.host)
            return
        raise StoreError("no redis cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    def _refresh(self, avoid: PipelinedRedis | None = None, *, due: bool = False) -> bool:
        """Ask an open node for the slot map beside its other traffic; applied when the reply comes.

        False when no connection is open to ask over: the next command's caller learns the map itself.
        """
        now = time.monotonic()
        if self._refreshing or (not due and now - self._refreshed_at < self.refresh_interval):
            self._wanted = not self._refreshing  # asked again at the next command after the interval
            return True
        for node in self._nodes.values():
            if node is not avoid and node.connected:
                break
        else:
            self._wanted = True
            return False
        self._wanted = False
        self._refreshing = True
        self._refreshed_at = now
        reply = node.execute(_CLUSTER_SLOTS)
        assert isinstance(reply, asyncio.Future)  # an open connection answers its future itself
        host = node.host

        def done(future: asyncio.Future[Any]) -> None:
            self._refreshing = False
            if future.cancelled() or future.exception() is not None:
                self._wanted = True
                return
            self._apply(future.result(), host)

        reply.add_done_callback(done)
        return True

    def _apply(self, reply: Any, asked: str) -> None:
        """A ``CLUSTER SLOTS`` reply: ``[[start, end, [host, port, ...], replicas...], ...]``."""
        if self._closed:
            return
        slots: Slots = [None] * REDIS_CLUSTER_HASH_SLOTS
        names = [""] * REDIS_CLUSTER_HASH_SLOTS
        try:
            for start, end, master, *_ in reply:
                host = master[0].decode() if master[0] else asked  # an empty host: the node we asked
                port = int(master[1])
                node = self.node(host, port)
                count = int(end) - int(start) + 1
                slots[int(start):int(end) + 1] = [node] * count
                names[int(start):int(end) + 1] = [f"{host}:{port}"] * count
        except (TypeError, ValueError, IndexError, AttributeError):
            self._wanted = True  # not a slot map (not a cluster node?): asked again later
            return
        self._slots, self._names = slots, names
        self._loaded = True
        self._wanted = False
        serving = {id(node) for node in slots if node is not None}
        seeds = set(self.seeds)
        for address, node in list(self._nodes.items()):
            if id(node) not in serving and address not in seeds:  # a demoted or removed master
                del self._nodes[address]
                node.abandon()

    # -- lifecycle --------------------------------------------------------------------------------

    async def connect(self, timeout: float, scripts: Sequence[str]) -> None:
        """Learn the slot map, connect to every master and load ``scripts`` there, within ``timeout`` each."""
        await self.load(timeout)
        load = [encode_command(["SCRIPT", "LOAD", script]) for script in scripts] or [encode_command(["PING"])]
        for node in self.masters():
            for command in load:
                await node.execute(command, timeout)

    async def aclose(self) -> None:
        self.abandon()

    def abandon(self) -> None:
        """Closed for good, from any loop or thread (see ``PipelinedRedis.abandon``)."""
        self._closed = True
        nodes, self._nodes = list(self._nodes.values()), {}
        self._slots = [None] * REDIS_CLUSTER_HASH_SLOTS
        for node in nodes:
            node.abandon()
