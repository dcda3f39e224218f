"""RedisStore: the Store protocol's commands on one Redis server, a Redis Cluster, or a Sentinel-named master.

Its parts live beside it: the clients a URL names and their time budget
(``redis_clients``), the Lua scripts (``redis_scripts``), the connections of one event
loop (``redis_loop``), the subscription to announcements (``redis_pubsub``) and the
request path's auto-pipelined connection (``pipeline``). The names other modules
import from here are re-exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
import weakref
from asyncio import _get_running_loop
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis, RedisCluster

from cachemw.core.keyspace import entry_prefix, fill_channel, invalidation_channel, lock_key, wait_key
from cachemw.store.base import LockResult, Notifications, StoreCapabilities, StoreError, StoreTimeout
from cachemw.store.loops import LoopGuard, running_loop
from cachemw.store.pipeline import PipelinedRedis, encode_command
from cachemw.store.redis_clients import (
    CLUSTER_SCHEMES,
    DRIVER_ERRORS,
    SENTINEL_SCHEMES,
    RedisClients,
    blocking_twin,
    close_client,
    redis_clients,
)
from cachemw.store.redis_cluster import fill_on_cluster, lock_on_cluster, lock_routed
from cachemw.store.redis_loop import ConnectionGate, LoopClients, cancel_guards, gated_script
from cachemw.store.redis_pubsub import Subscription
from cachemw.store.redis_purge import soften_each
from cachemw.store.redis_scripts import (
    fill_call,
    generation,
    lookup_lock_call,
    lookup_lock_result,
    millis,
)

__all__ = ["CLUSTER_SCHEMES", "DEFAULT_CHANNEL", "DEFAULT_INVALIDATION_CHANNEL", "DRIVER_ERRORS", "SENTINEL_SCHEMES",
           "ConnectionGate", "RedisClients", "RedisStore", "close_client", "millis", "redis_clients"]

T = TypeVar("T")

DEFAULT_CHANNEL = fill_channel("cachemw")
DEFAULT_INVALIDATION_CHANNEL = invalidation_channel("cachemw")


class RedisStore:
    """Store on one Redis server, a Redis Cluster, or a Sentinel-named master.

    Values are stored as plain Redis strings with a millisecond expiry, so any Redis
    tool can inspect them. ``aclose()`` closes the client and its connection pool.
    Prefer ``from_url``: a client built with redis-py's defaults has none of the time
    budget and pool settings ``cachemw.store.redis_clients`` describes, and only a store from ``from_url``
    reconnects when called on another event loop than before.

    Connections belong to one asyncio loop (see ``cachemw.store.loops``): a call on
    another loop drops them and opens new ones there; those of a loop that ends are
    closed as it ends. Any exception of the driver reaches the caller as
    ``StoreError``, and so does a call with no asyncio loop running (trio):
    ``requires_asyncio`` says so up front.
    """

    __slots__ = ("__weakref__", "_bound", "_clients", "_guards", "_max_connections", "_subscription",
                 "background_timeout", "bounded", "capabilities", "channel", "cluster", "invalidation_channel",
                 "lookup_locks", "notifications")

    requires_asyncio = True
    """The store's drivers (redis-py's asyncio client, an asyncio Protocol) need an asyncio event loop."""

    def __init__(self, client: Redis | RedisCluster, *, channel: str = DEFAULT_CHANNEL,
                 invalidation_channel: str = DEFAULT_INVALIDATION_CHANNEL,
                 listener_client: Callable[[], Redis | RedisCluster] | None = None,
                 max_connections: int = 256, pipelined: PipelinedRedis | None = None,
                 clients: Callable[[], RedisClients] | None = None, background_timeout: float = 2.0) -> None:
        self._max_connections = max_connections
        self._clients = clients  # makes the clients of another event loop
        self.background_timeout = background_timeout
        """How long a background call's socket reads may wait (its caller's ``timeout`` bounds the call)."""
        listen_with = listener_client or (lambda: blocking_twin(cast(Redis, client), None))

        def background_with() -> Redis | RedisCluster:
            return blocking_twin(cast(Redis, client), background_timeout)  # not on a cluster: see LoopClients.lane

        self._bound = LoopClients(client, pipelined, listen_with, (), max_connections, background_with,
                                  background_timeout)
        self.cluster = isinstance(client, RedisCluster)
        # The pipelined connections keep the time budget themselves: callers need no timeout of their own.
        self.bounded = self._bound.pipelined is not None or self._bound.routed is not None
        self.lookup_locks = not self.cluster  # get_or_lock is one round trip on one server
        self.capabilities = StoreCapabilities(remote=True, keeps_budget=self.bounded, lookup_locks=self.lookup_locks,
                                              sharded=self.cluster,
                                              sends_fills=not self.cluster and self._bound.pipelined is not None)
        self.channel = channel
        self.invalidation_channel = invalidation_channel
        self.notifications = Notifications()
        self._subscription = Subscription(self.notifications, entry_prefix("cachemw"))
        # A store garbage-collected while its loop runs has its connections closed there and then.
        self._guards: list[LoopGuard] = []
        weakref.finalize(self, cancel_guards, self._guards)

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.05, max_connections: int = 256,
                 background_timeout: float = 2.0, grace: float | None = None) -> RedisStore:
        """A store with its own bounded pool and time budget.

        ``timeout`` is the request path's budget; calls given a ``timeout`` of their own
        (fills, releases, refreshes and purges after the response) run on a pool whose
        reads may wait ``background_timeout``. ``grace`` (default: one more ``timeout``;
        0: none): how much longer a request-path call on one server waits for its reply
        when this process's own event loop ran late while it waited (``cachemw.store.pipeline``).

        ``redis://``, ``rediss://``, ``unix://`` (redis-py's query-string options win
        over these settings); ``redis+cluster://h1:p1,h2:p2`` for Redis Cluster (any
        reachable seed nodes); ``redis+sentinel://h1:p1,h2:p2/SERVICE[/DB]`` for the
        master a Sentinel group names. ``rediss+cluster``/``rediss+sentinel`` for TLS.
        """
        def make() -> RedisClients:
            return redis_clients(url, timeout=timeout, max_connections=max_connections, grace=grace)

        clients = make()
        store = cls(clients.client, max_connections=max_connections, pipelined=clients.pipelined, clients=make,
                    background_timeout=background_timeout)
        store._bound = store._bound_to(clients)  # with the URL's own twins for listening and background work
        if store._bound.routed is not None:  # a Cluster's request path keeps its budget too
            store.bounded = True
            store.capabilities = StoreCapabilities(remote=True, keeps_budget=True, lookup_locks=False, sharded=True)
        return store

    def _bound_to(self, clients: RedisClients) -> LoopClients:
        background_timeout = self.background_timeout
        return LoopClients(clients.client, clients.pipelined, lambda: clients.blocking_client(None),
                           clients.also_close, self._max_connections,
                           lambda: clients.blocking_client(background_timeout), background_timeout,
                           routed=clients.routed)

    def _on_loop(self) -> LoopClients:
        """The clients of the running loop: made (and the old ones dropped) when it is not theirs."""
        bound = self._bound
        loop = running_loop()
        if bound.loop is loop and not bound.dropped:
            return bound
        if bound.loop is None:
            self._guards[:] = [bound.bind(loop)]
            return bound
        if self._clients is None:
            raise StoreError("this RedisStore's connections belong to another event loop; a store made with "
                             "RedisStore.from_url reconnects on each loop")
        bound.abandon()
        self._bound = bound = self._bound_to(self._clients())
        self._guards[:] = [bound.bind(loop)]
        return bound

    def shard(self, key: str) -> str:
        """Which node serves ``key`` ("" on a single server): failures are counted per node."""
        if not self.cluster:
            return ""
        routed = self._bound.routed
        if routed is not None:
            return routed.shard(key)
        try:
            return str(self._bound.client.get_node_from_key(key).name)
        except Exception:  # no slot map yet: count it with the cluster as a whole
            return ""

    @property
    def _pipelined(self) -> PipelinedRedis | None:
        """The request path's connection of the loop the store is on now (tests record what it sends)."""
        return self._bound.pipelined

    @property
    def client(self) -> Any:
        """The underlying client (Redis or RedisCluster) of the running loop, for the parts of cachemw
        that need more than get/set."""
        if _get_running_loop() is None:
            return self._bound.client
        return self._on_loop().client

    async def get(self, key: str) -> bytes | None:
        bound = self._bound
        try:
            loop = _get_running_loop()
            if loop is None or bound.loop is not loop or bound.dropped:
                bound = self._on_loop()
            if bound.pipelined is not None:
                return await bound.pipelined.get(key)
            if bound.routed is not None:
                return await bound.routed.get(key)
            async with bound.gated():
                value = await bound.client.get(key)
        except StoreError:
            raise
        except Exception as exc:  # whatever the driver raises is a store failure to the caller
            raise StoreError(f"redis GET failed: {exc!r}") from exc
        return cast("bytes | None", value)

    async def connect(self, timeout: float) -> None:
        """Connect and load the request path's scripts now, within ``timeout``: for startup.

        A fresh process's first burst of requests then finds the connection open and
        the scripts known, instead of spending their short budgets on a connect and on
        NOSCRIPT replies (and counting those against the breaker); its first fills find
        their own connection open too. On redis-py's client (TLS, Cluster, Sentinel) the
        scripts are loaded on every primary.
        """
        try:
            bound = self._on_loop()
            scripts = (bound.lock_all, bound.fill_all, bound.unlock_script)
            if bound.pipelined is not None:
                for script in scripts:
                    await bound.pipelined.execute(encode_command(["SCRIPT", "LOAD", cast(str, script.script)]), timeout)
                if bound.background_pipelined is not None:
                    await bound.background_pipelined.execute(encode_command(["PING"]), timeout)
                return
            if bound.routed is not None:
                await bound.routed.connect(timeout, [cast(str, script.script) for script in scripts])
            async with bound.gated():
                for script in scripts:
                    await bound.client.script_load(script.script)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"redis connect failed: {exc!r}") from exc

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if not ttl > 0:  # also NaN: the value would be expired at once
            await self.delete(key)
            return
        try:
            bound = self._on_loop()
            async with bound.gated():
                if math.isinf(ttl):
                    await bound.client.set(key, value)
                else:
                    await bound.client.set(key, value, px=millis(ttl))  # PX 0 would be an error
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"redis SET failed: {exc!r}") from exc

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0  # DEL without keys is a syntax error
        try:
            return await self._delete_each(self._on_loop(), keys)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"redis DEL failed: {exc!r}") from exc

    @staticmethod
    async def _delete_each(bound: LoopClients, keys: Sequence[str | bytes], timeout: float | None = None) -> int:
        """One DEL per key, pipelined: a multi-key DEL would cross Redis Cluster slots."""
        dropped = 0
        client, gate = bound.lane(timeout)
        for start in range(0, len(keys), 500):
            async with gate, client.pipeline(transaction=False) as pipe:
                for key in keys[start : start + 500]:
                    pipe.delete(key)
                dropped += sum(int(n) for n in await pipe.execute())
        return dropped

    async def lock(self, key: str, ttl: float, generation_keys: Sequence[str], token: str | None = None, *,
                   timeout: float | None = None) -> LockResult:
        token = token or secrets.token_hex(8)
        try:
            bound = self._on_loop()
            if not self.cluster:
                taken, value, generations = await self._script(
                    bound, bound.lock_all, [key, lock_key(key), wait_key(key), *generation_keys],
                    [token, millis(ttl)], timeout)
                return ((token if taken else None), value if isinstance(value, bytes) else None,
                        tuple(generation(g) for g in generations))
            if bound.routed is not None and timeout is None:
                taken, value, generations = await lock_routed(bound.routed, bound.lock_all, key, ttl, generation_keys,
                                                              token)
            else:
                taken, value, generations = await _scoped(
                    lock_on_cluster(bound, key, ttl, generation_keys, token, timeout), timeout, bound)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"redis lock failed: {exc!r}") from exc
        return (token if taken else None), value, generations

    async def get_or_lock(self, key: str, ttl: float, generation_keys: Sequence[str], token: str) -> LockResult:
        """GET, and when the key holds nothing a lock attempt too, in one round trip.

        ``(None, value, ())`` when the key holds a value (no lock attempted);
        otherwise the lock attempt's ``(token or None, None, generations)``.
        """
        if self.cluster:  # the generation keys live in other slots than the entry
            value = await self.get(key)
            return (None, value, ()) if value is not None else await self.lock(key, ttl, generation_keys, token)
        try:
            bound = self._on_loop()
            keys, args = lookup_lock_call(key, ttl, generation_keys, token)
            return lookup_lock_result(await self._script(bound, bound.lock_all, keys, args), token)
        except StoreError:
            raise
        except Exception as exc:  # also a foreign reply shape (a script of someone else's under our name)
            raise StoreError(f"redis lookup failed: {exc!r}") from exc

    async def fill(self, key: str, value: bytes, ttl: float, token: str | None, tag_sets: Sequence[str],
                   generation_keys: Sequence[str], generations: Sequence[int], *, timeout: float | None = None
                   ) -> bool:
        # Store and index first, then read the generations: an invalidation that bumped
        # them before our read is seen here (we delete the entry again), and one that
        # bumped them after our read finds the entry in its tag set (it deletes it).
        now = time.time()
        try:
            bound = self._on_loop()
            if not self.cluster:
                keys, args = fill_call(key, value, ttl, token, self.channel, tag_sets, generation_keys, generations,
                                       now)
                return bool(await self._script(bound, bound.fill_all, keys, args, timeout))
            return await _scoped(fill_on_cluster(bound, key, value, ttl, token, self.channel, tag_sets,
                                                 generation_keys, generations, now, timeout), timeout, bound)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"redis fill failed: {exc!r}") from exc

    def fill_nowait(self, key: str, value: bytes, ttl: float, token: str | None, tag_sets: Sequence[str],
                    generation_keys: Sequence[str], generations: Sequence[int]) -> asyncio.Future[Any] | None:
        """``FILL_ALL_SCRIPT`` by its digest on the background connection, if it is open on this loop."""
        bound = self._bound
        pipelined = bound.background_pipelined
        if self.cluster or pipelined is None or bound.dropped:
            return None
        keys, args = fill_call(key, value, ttl, token, self.channel, tag_sets, generation_keys, generations,
                               time.time())
        return pipelined.send_evalsha(bound.fill_all.sha, keys, args)

    async def unlock(self, key: str, token: str, *, timeout: float | None = None) -> None:
        try:
            bound = self._on_loop()
            # Waiters are woken too: they find no entry and call the app themselves at once.
            await self._script(bound, bound.unlock_script, [lock_key(key), wait_key(key)],
                               [token, self.channel, key], timeout)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"redis unlock failed: {exc!r}") from exc

    @staticmethod
    def _script(bound: LoopClients, script: Any, keys: list[str], args: list[Any], timeout: float | None = None
                ) -> Awaitable[Any]:
        """A registered script, on the pipelined connection when there is one (no coroutine around it);
        ``timeout``: see ``Store``."""
        pipelined = bound.pipelined if timeout is None else bound.background_pipelined
        if pipelined is None:
            return _scoped(gated_script(bound, script, keys, args, timeout), timeout, bound)
        return pipelined.evalsha(script.sha, script.script, keys, args, timeout)

    async def invalidate(self, tag_sets: Sequence[str], generation_keys: Sequence[str], message: str, *,
                         timeout: float | None = None, stale_from: float | None = None) -> int:
        bound = self._on_loop()
        return await _scoped(self._invalidate(bound, tag_sets, generation_keys, message, timeout, stale_from),
                             timeout, bound)

    async def _invalidate(self, bound: LoopClients, tag_sets: Sequence[str], generation_keys: Sequence[str],
                          message: str, timeout: float | None, stale_from: float | None) -> int:
        try:
            client, gate = bound.lane(timeout)
            async with gate, client.pipeline(transaction=False) as pipe:
                for generation_key in generation_keys:
                    pipe.incr(generation_key)
                for tag_set in tag_sets:
                    pipe.zrange(tag_set, 0, -1)
                replies = await pipe.execute()
            indexed = replies[len(generation_keys):]
            keys = {member for members in indexed for member in members}
            if stale_from is not None:  # soft: the entries stay indexed, for a hard purge to find later
                dropped = await soften_each(bound, list(keys), stale_from, timeout)
            else:
                # Only the members read leave the index, and before their entries go: a fill indexed
                # meanwhile (current: the generations had moved) stays findable by the next purge, or is
                # deleted with them. Deleting the whole set after the entries lost such a fill from the
                # index for its whole ttl.
                async with gate, client.pipeline(transaction=False) as pipe:
                    for tag_set, members in zip(tag_sets, indexed, strict=True):
                        if members:
                            pipe.zrem(tag_set, *members)
                    await pipe.execute()
                dropped = await self._delete_each(bound, list(keys), timeout)
            await client.publish(self.invalidation_channel, message)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"redis invalidate failed: {exc!r}") from exc
        return dropped

    async def purge(self, pattern: str, generation_key: str, message: str, *, timeout: float | None = None,
                    stale_from: float | None = None) -> int:
        bound = self._on_loop()
        return await _scoped(self._purge(bound, pattern, generation_key, message, timeout, stale_from), timeout,
                             bound)

    async def _purge(self, bound: LoopClients, pattern: str, generation_key: str, message: str,
                     timeout: float | None, stale_from: float | None) -> int:
        try:
            client, _ = bound.lane(timeout)
            await client.incr(generation_key)

            def drop(keys: list[bytes]) -> Awaitable[int]:
                if stale_from is not None:
                    return soften_each(bound, keys, stale_from, timeout)
                return self._delete_each(bound, keys, timeout)

            dropped = 0
            batch: list[bytes] = []
            async for found in client.scan_iter(match=pattern, count=1000):
                batch.append(found)
                if len(batch) >= 500:
                    dropped += await drop(batch)
                    batch = []
            dropped += await drop(batch)
            await client.publish(self.invalidation_channel, message)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"redis purge failed: {exc!r}") from exc
        return dropped

    async def publish_invalidation(self, message: str) -> None:
        try:
            await self._on_loop().client.publish(self.invalidation_channel, message)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"redis publish failed: {exc!r}") from exc

    @property
    def listening(self) -> bool:
        """True while subscribed: only then do other processes' announcements arrive."""
        return self._subscription.listening

    @property
    def tracking(self) -> bool:
        """True while Redis itself reports changes to the entry keys on the live link (``redis_pubsub``)."""
        return self._subscription.tracking

    def track(self, prefix: str | None) -> None:
        """Ask Redis to report changes to keys under ``prefix`` (the entry keys) from the next subscription on;
        None: don't (the L1 then keeps the ``sync`` bound alone)."""
        self._subscription.tracking_prefix = prefix

    async def listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe to fill and invalidation announcements; resubscribe after any loss, until cancelled.

        What arrives on the channels is untrusted (anyone who can reach the Redis can
        publish): a message that does not decode to a valid announcement is dropped and
        counted in ``notifications.rejected``, and never ends the subscription.
        """
        bound = self._on_loop()
        if self.cluster:
            # Learn the slot map once, before traffic: concurrent first commands would each
            # start discovering it (redis-py then leaks the connections of the losers).
            with contextlib.suppress(Exception):
                await bound.client.initialize()
        await self._subscription.run(bound.listener_client(), self.channel, self.invalidation_channel,
                                     task_status=task_status)

    async def aclose(self) -> None:
        bound = self._bound
        try:
            if bound.loop is None or bound.loop is _get_running_loop():
                await bound.aclose()
            else:  # opened on a loop that is not this one: closed there, if it still runs
                bound.abandon()
        except Exception as exc:
            raise StoreError(f"closing the redis client failed: {exc!r}") from exc


async def _scoped(call: Awaitable[T], timeout: float | None, bound: LoopClients) -> T:
    """A Cluster's background call on redis-py within its own ``timeout``: its store keeps the budget
    (``keeps_budget``), so no caller's cancel scope bounds it any more."""
    if timeout is None or bound.routed is None:
        return await call
    try:
        with anyio.fail_after(timeout):
            return await call
    except TimeoutError as exc:
        raise StoreTimeout(f"redis cluster call took longer than {timeout:.3f} s") from exc
