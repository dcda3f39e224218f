"""Redis store on redis-py's asyncio client (hiredis parser when installed).

On one server over TCP or a Unix socket the request path's commands (GET and the
lock, fill and release scripts) take the auto-pipelined connection of
``cachemw.store.pipeline`` instead, which keeps the time budget itself; what
follows describes redis-py's part (everything else, and TLS, Cluster, Sentinel).

A cache must answer within a request's budget or get out of the way, so the factory
sets its own pool and time budget instead of redis-py's defaults (a pool that raises
at 100 connections, 5 s socket timeouts, 10 retries with backoff):

- ``BlockingConnectionPool``: when all connections are busy, wait at most ``timeout``
  for one, then fail, instead of raising ``MaxConnectionsError`` at once;
- connect, read and write each time out after ``timeout``;
- no retries: a failed call fails fast and the caller falls back to the app;
- RESP2 without maintenance notifications, so the pool replaces a pooled connection
  the server closed (or one with unread data) before using it (see ``from_url``).

A call on a healthy pooled connection is thus bounded by about ``timeout``; a call
that also has to wait for the pool and (re)connect by a small multiple of it.

Never reusing a timed-out connection (its late reply would answer the next command,
CVE-2023-28858/28859): redis-py 8 closes the connection itself when a read or write
times out, fails, or is cancelled (``Connection.read_response`` /
``send_packed_command`` call ``disconnect()`` on any error, including
``CancelledError``), and the pool reconnects it on next use. The store tests check
this end to end (a frozen server, then the next reply must be the right one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
import weakref
from asyncio import _get_running_loop
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection, UnixDomainSocketConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.maint_notifications import MaintNotificationsConfig

from cachemw.core.keyspace import fill_channel, invalidation_channel, lock_key, wait_key
from cachemw.store.base import LockResult, Notifications, StoreCapabilities, StoreError
from cachemw.store.loops import LoopGuard, running_loop
from cachemw.store.pipeline import PipelinedRedis, encode_command

__all__ = ["DRIVER_ERRORS", "ConnectionGate", "RedisClients", "RedisStore", "close_client", "millis", "redis_clients"]

logger = logging.getLogger(__name__)

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_CHANNEL = fill_channel("cachemw")
DEFAULT_INVALIDATION_CHANNEL = invalidation_channel("cachemw")

# The entry, its lock and its "someone waits" flag share the key's hash tag, so each
# script stays in one slot. A lock attempt that finds the lock taken raises the flag; a
# fill or release announces itself only when the flag is up: with nobody waiting (the
# common case) no message goes out, and no subscriber anywhere has to read one.
#
# A tag's index: entry keys scored by expiry; expired members are dropped on every
# write, and the index itself lives as long as its longest-lived member.
_INDEX_SCRIPT = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
"""
# On one server a miss's lock attempt and a fill are one script each, over the entry's
# three keys plus the tag indexes and generations: one command for the client to encode
# and parse instead of up to a dozen. On a cluster those span slots, so the scripts get
# only the entry's three keys, and pipelines next to them do the rest.
# ARGV[3] = '1' (a lookup of a route that has been missing): a value is returned at
# once, and only its absence takes the lock, so a miss costs one round trip, not two.
# Every redis.call costs Redis about a microsecond on top of the command itself, and a
# miss runs both scripts: reads are one MGET, and a lock and its flag go in one DEL.
# A lock already held under the caller's own token is taken: a retried attempt whose
# first try took it (the reply lost to a timeout) must not mistake itself for another
# filler and leave the lock to expire.
_LOCK_ALL_SCRIPT = """
local found = redis.call('MGET', KEYS[1], unpack(KEYS, 4))
local value = found[1]
if value and ARGV[3] == '1' then return {2, value} end
local taken = 0
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then taken = 1
elseif redis.call('GET', KEYS[2]) == ARGV[1] then taken = 1
else redis.call('SET', KEYS[3], '1', 'PX', ARGV[2]) end
table.remove(found, 1)
return {taken, value or false, found}
"""
# A tag's index is extended only when it would otherwise expire within 30 s of its
# longest-lived member (ARGV[7] is that member's ttl + 60 s), not on every fill; a new
# index has no expired members to drop.
_FILL_ALL_SCRIPT = """
local tags = tonumber(ARGV[8])
local current = 1
if #KEYS > 3 + tags then
  local found = redis.call('MGET', unpack(KEYS, 4 + tags))
  for i = 1, #found do
    if (found[i] or '0') ~= ARGV[8 + i] then current = 0 break end
  end
end
if current == 1 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  local keep = tonumber(ARGV[7])
  for i = 1, tags do
    local index = KEYS[3 + i]
    local left = redis.call('PTTL', index)
    redis.call('ZADD', index, ARGV[6], KEYS[1])
    if left ~= -2 then redis.call('ZREMRANGEBYSCORE', index, '-inf', ARGV[5]) end
    if left < keep - 30000 then redis.call('PEXPIRE', index, keep) end
  end
end
local woken
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then woken = redis.call('DEL', KEYS[2], KEYS[3]) == 2
else woken = redis.call('DEL', KEYS[3]) == 1 end
if woken then redis.call('PUBLISH', ARGV[4], KEYS[1]) end
return current
"""
_UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if redis.call('DEL', KEYS[1], KEYS[2]) == 2 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
  return 1
end
return 0
"""




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


def _hosts(netloc: str, url: str) -> list[tuple[str, int]]:
    """``user:pass@h1:p1,h2:p2`` -> [(h1, p1), (h2, p2)]."""
    hosts: list[tuple[str, int]] = []
    for item in netloc.rpartition("@")[2].split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{url.split('@')[-1]!r}: expected host:port[,host:port...]")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def _int(value: object) -> int:
    if value is None:  # a tag never invalidated (the usual case): no exception raised and caught
        return 0
    try:
        return int(value)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError):
        return 0  # a foreign value under a generation key counts as none


def _score(seconds: float, rounding: Callable[[float], int]) -> str:
    """A tag index score in whole milliseconds: Redis parses a float of 17 digits with strtod's slow path."""
    return f"{rounding(seconds * 1000) / 1000:.3f}"


def millis(seconds: float) -> int:
    """Redis milliseconds: rounded up, and at least 1 (PX 0 is an error; a tiny ttl should still store)."""
    return max(1, math.ceil(seconds * 1000))

# What the driver may raise for a down, slow or refusing server. asyncio.TimeoutError
# is the builtin TimeoutError (an OSError) from 3.11 on, but not on 3.10; the cluster
# client raises RedisClusterException (no RedisError) when no node answers.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


class RedisClients:
    """The clients ``RedisStore.from_url`` builds for a URL, for the parts of cachemw that talk to Redis directly.

    - ``client``: the request path's client (Redis or RedisCluster) with the time
      budget and pool settings described above;
    - ``blocking_client(socket_timeout)``: a new client on the same server, cluster or
      Sentinel master whose reads may wait ``socket_timeout`` seconds (None: for ever),
      for subscriptions and blocking reads; its caller closes it (``close_client``);
    - ``aclose()``: closes ``client`` and what else was opened for it (the
      connections that ask the sentinels);
    - ``pipelined``: on one server over TCP or a Unix socket, the auto-pipelining
      connection the request path's commands take (None for TLS, Cluster, Sentinel).
    """

    __slots__ = ("also_close", "blocking_client", "client", "cluster", "pipelined")

    def __init__(self, client: Redis | RedisCluster, blocking_client: Callable[[float | None], Redis | RedisCluster],
                 also_close: Sequence[Any] = (), pipelined: PipelinedRedis | None = None) -> None:
        self.client = client
        self.pipelined = pipelined
        self.blocking_client = blocking_client
        self.also_close = list(also_close)
        self.cluster = isinstance(client, RedisCluster)

    async def aclose(self) -> None:
        """Close ``client`` and the sentinel connections; raises the driver's errors."""
        await close_client(self.client)
        for other in self.also_close:
            await close_client(other)


def redis_clients(url: str, *, timeout: float, max_connections: int = 256) -> RedisClients:
    """What ``RedisStore.from_url(url, timeout=..., max_connections=...)`` connects with (see there for URLs)."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
    scheme = urlsplit(url).scheme.lower()
    if scheme in CLUSTER_SCHEMES:
        return _cluster_clients(url, timeout, max_connections)
    if scheme in SENTINEL_SCHEMES:
        return _sentinel_clients(url, timeout, max_connections)
    kwargs: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": timeout,  # longest wait for a free pooled connection
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "health_check_interval": 0,  # no extra PING round trips
        # redis-py 8 speaks RESP3 by default and then turns on "maintenance
        # notifications" (a Redis Enterprise feature), which also switches off the
        # pool's check that a pooled connection is neither closed by the server nor
        # holding unread data: a connection the server dropped while idle would fail
        # the next command. RESP2 is all GET/SET/DEL need, and works on every server.
        "protocol": 2,
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }
    kwargs.update(parse_url(url))  # raises ValueError for unknown schemes
    # Values are opaque bytes, whatever the URL says.
    kwargs["decode_responses"] = False
    client = Redis(connection_pool=BlockingConnectionPool(**kwargs))
    return RedisClients(client, lambda socket_timeout: _blocking_twin(client, socket_timeout),
                        pipelined=_pipelined(kwargs, timeout))


def _pipelined(kwargs: dict[str, Any], timeout: float) -> PipelinedRedis | None:
    """The request path's connection for a plain TCP or Unix socket server; TLS stays on redis-py."""
    connection_class = kwargs.get("connection_class", Connection)
    common: dict[str, Any] = {"db": int(kwargs.get("db") or 0), "username": kwargs.get("username"),
                              "password": kwargs.get("password"), "timeout": timeout}
    if connection_class is UnixDomainSocketConnection:
        return PipelinedRedis(path=kwargs["path"], **common)
    if connection_class is Connection:
        return PipelinedRedis(host=kwargs.get("host", "localhost"), port=int(kwargs.get("port", 6379)), **common)
    return None


def _blocking_twin(client: Redis, socket_timeout: float | None) -> Redis:
    """A client on ``client``'s server with its own unbounded pool and another socket timeout."""
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs.update(socket_timeout=socket_timeout, socket_keepalive=True)
    kwargs["socket_connect_timeout"] = _connect_timeout(kwargs.get("socket_connect_timeout"), socket_timeout)
    pool = ConnectionPool(connection_class=client.connection_pool.connection_class, **kwargs)
    return Redis(connection_pool=pool)


def _connect_timeout(budget: float | None, socket_timeout: float | None) -> float | None:
    """A twin with longer reads (background work) may take as long to connect; one that blocks for ever may not."""
    if socket_timeout is None or budget is None:
        return budget
    return max(budget, socket_timeout)


def _cluster_clients(url: str, timeout: float, max_connections: int) -> RedisClients:
    parts = urlsplit(url)
    nodes = [ClusterNode(host, port) for host, port in _hosts(parts.netloc, url)]

    def client(socket_timeout: float | None) -> RedisCluster:
        return RedisCluster(
            startup_nodes=nodes,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl=parts.scheme.lower().startswith("rediss"),
            socket_timeout=socket_timeout,
            socket_connect_timeout=_connect_timeout(timeout, socket_timeout),
            max_connections=max_connections,
            # A node down must fail only its own slots: the others keep answering.
            require_full_coverage=False,
            # MOVED/ASK during resharding: refresh the slot map and retry, within our budget.
            retry=Retry(NoBackoff(), 2),
            protocol=2,
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )

    return RedisClients(client(timeout), client)


def _sentinel_clients(url: str, timeout: float, max_connections: int) -> RedisClients:
    parts = urlsplit(url)
    path = [segment for segment in parts.path.split("/") if segment]
    if not path:
        raise ValueError("a redis+sentinel:// URL names the service: redis+sentinel://host:port/SERVICE[/DB]")
    service = unquote(path[0])
    db = int(path[1]) if len(path) > 1 else 0
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        _hosts(parts.netloc, url), socket_timeout=timeout, socket_connect_timeout=timeout,
                        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout})
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None

    def client(socket_timeout: float | None) -> Redis:
        master: Redis = sentinel.master_for(
            service, db=db, socket_timeout=socket_timeout,
            socket_connect_timeout=_connect_timeout(timeout, socket_timeout),
            retry=Retry(NoBackoff(), 0), max_connections=max_connections, protocol=2,
            ssl=parts.scheme.lower().startswith("rediss"), username=username, password=password,
        )
        return master

    # also_close: the connections that ask the sentinels.
    return RedisClients(client(timeout), client, also_close=sentinel.sentinels)


class _Bound:
    """The clients of one event loop: redis-py's (and their scripts and gate) and the pipelined connection."""

    __slots__ = ("_background", "_background_client", "also_close", "background_pipelined", "client", "dropped",
                 "fill_all", "gate", "guard", "listener_client", "lock_all", "loop", "pipelined", "unlock_script")

    def __init__(self, client: Redis | RedisCluster, pipelined: PipelinedRedis | None,
                 listener_client: Callable[[], Redis | RedisCluster], also_close: Sequence[Any],
                 max_connections: int, background_client: Callable[[], Redis | RedisCluster],
                 background_timeout: float) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # taken by the first call inside a loop
        self.guard: LoopGuard | None = None
        self.dropped = False  # closed by its guard (its loop ended): the next call makes new clients
        self.client: Any = client
        self.pipelined = pipelined if not isinstance(client, RedisCluster) else None
        # Connects on first use, like the request path's.
        self.background_pipelined = self.pipelined.twin(background_timeout) if self.pipelined is not None else None
        self.listener_client = listener_client
        self._background_client = background_client
        self._background: Redis | RedisCluster | None = None
        self.also_close = list(also_close)
        # redis-py's cluster client raises at once when a node's pool is full; wait for a
        # connection instead (within the caller's budget), as the single-server pool does.
        self.gate: ConnectionGate | None = ConnectionGate(max_connections) if isinstance(client, RedisCluster) else None
        self.unlock_script = client.register_script(_UNLOCK_SCRIPT)
        self.lock_all = client.register_script(_LOCK_ALL_SCRIPT)
        self.fill_all = client.register_script(_FILL_ALL_SCRIPT)

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
        if self.guard is not None:
            self.guard.cancel()  # its loop, if it still runs, closes the rest


class RedisStore:
    """Store on one Redis server, a Redis Cluster, or a Sentinel-named master.

    Values are stored as plain Redis strings with a millisecond expiry, so any Redis
    tool can inspect them. ``aclose()`` closes the client and its connection pool.
    Prefer ``from_url``: a client built with redis-py's defaults has none of the time
    budget and pool settings described above, and only a store from ``from_url``
    reconnects when called on another event loop than before.

    Connections belong to one asyncio loop (see ``cachemw.store.loops``): a call on
    another loop drops them and opens new ones there; those of a loop that ends are
    closed as it ends. Any exception of the driver reaches the caller as
    ``StoreError``, and so does a call with no asyncio loop running (trio):
    ``requires_asyncio`` says so up front.
    """

    __slots__ = ("__weakref__", "_bound", "_clients", "_guards", "_listening", "_max_connections",
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
        listen_with = listener_client or (lambda: _blocking_twin(cast(Redis, client), None))

        def background_with() -> Redis | RedisCluster:
            return _blocking_twin(cast(Redis, client), background_timeout)  # not on a cluster: see _Bound.lane

        self._bound = _Bound(client, pipelined, listen_with, (), max_connections, background_with, background_timeout)
        self.cluster = isinstance(client, RedisCluster)
        # The pipelined connection keeps the time budget itself: callers need no timeout of their own.
        self.bounded = self._bound.pipelined is not None
        self.lookup_locks = not self.cluster  # get_or_lock is one round trip on one server
        self.capabilities = StoreCapabilities(remote=True, keeps_budget=self.bounded, lookup_locks=self.lookup_locks,
                                              sharded=self.cluster)
        self.channel = channel
        self.invalidation_channel = invalidation_channel
        self.notifications = Notifications()
        self._listening = False
        # A store garbage-collected while its loop runs has its connections closed there and then.
        self._guards: list[LoopGuard] = []
        weakref.finalize(self, _cancel_guards, self._guards)

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.05, max_connections: int = 256,
                 background_timeout: float = 2.0) -> RedisStore:
        """A store with its own bounded pool and time budget.

        ``timeout`` is the request path's budget; calls given a ``timeout`` of their own
        (fills, releases, refreshes and purges after the response) run on a pool whose
        reads may wait ``background_timeout``.

        ``redis://``, ``rediss://``, ``unix://`` (redis-py's query-string options win
        over these settings); ``redis+cluster://h1:p1,h2:p2`` for Redis Cluster (any
        reachable seed nodes); ``redis+sentinel://h1:p1,h2:p2/SERVICE[/DB]`` for the
        master a Sentinel group names. ``rediss+cluster``/``rediss+sentinel`` for TLS.
        """
        def make() -> RedisClients:
            return redis_clients(url, timeout=timeout, max_connections=max_connections)

        clients = make()
        store = cls(clients.client, max_connections=max_connections, pipelined=clients.pipelined, clients=make,
                    background_timeout=background_timeout)
        store._bound = store._bound_to(clients)  # with the URL's own twins for listening and background work
        return store

    def _bound_to(self, clients: RedisClients) -> _Bound:
        background_timeout = self.background_timeout
        return _Bound(clients.client, clients.pipelined, lambda: clients.blocking_client(None), clients.also_close,
                      self._max_connections, lambda: clients.blocking_client(background_timeout), background_timeout)

    def _on_loop(self) -> _Bound:
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
        NOSCRIPT replies (and counting those against the breaker).
        """
        try:
            bound = self._on_loop()
            scripts = (bound.lock_all, bound.fill_all, bound.unlock_script)
            if bound.pipelined is not None:
                for script in scripts:
                    await bound.pipelined.execute(encode_command(["SCRIPT", "LOAD", cast(str, script.script)]), timeout)
                return
            async with bound.gated():
                await bound.client.ping()
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
    async def _delete_each(bound: _Bound, keys: Sequence[str | bytes], timeout: float | None = None) -> int:
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
                        tuple(_int(g) for g in generations))
            client, gate = bound.lane(timeout)
            async with gate, client.pipeline(transaction=False) as pipe:
                # EVAL, not EVALSHA: a pipeline would ask SCRIPT EXISTS first (one more round trip);
                # Redis caches the compiled script by its text anyway.
                pipe.eval(_LOCK_ALL_SCRIPT, 3, key, lock_key(key), wait_key(key), token, millis(ttl))
                for generation_key in generation_keys:
                    pipe.get(generation_key)
                (taken, value, _), *generations = await pipe.execute()
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"redis lock failed: {exc!r}") from exc
        return (token if taken else None), value if isinstance(value, bytes) else None, tuple(
            _int(g) for g in generations)

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
            reply = await self._script(
                bound, bound.lock_all, [key, lock_key(key), wait_key(key), *generation_keys],
                [token, millis(ttl), "1"])
            if reply[0] == 2:
                return None, reply[1], ()
            taken, _, generations = reply
            return (token if taken else None), None, tuple(_int(g) for g in generations)
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
        expires = now + ttl
        try:
            bound = self._on_loop()
            if not self.cluster:
                stored = await self._script(
                    bound, bound.fill_all, [key, lock_key(key), wait_key(key), *tag_sets, *generation_keys],
                    [value, millis(ttl), token or "", self.channel, _score(now, math.floor),
                     _score(expires, math.ceil), millis(ttl + 60), len(tag_sets), *(str(g) for g in generations)],
                    timeout)
                return bool(stored)
            client, gate = bound.lane(timeout)
            async with gate:
                async with client.pipeline(transaction=False) as pipe:
                    pipe.eval(_FILL_ALL_SCRIPT, 3, key, lock_key(key), wait_key(key), value, millis(ttl),
                              token or "", self.channel, now, expires, millis(ttl + 60), 0)
                    for tag_set in tag_sets:
                        pipe.eval(_INDEX_SCRIPT, 1, tag_set, key, expires, now, millis(ttl + 60))
                    for generation_key in generation_keys:
                        pipe.get(generation_key)
                    replies = await pipe.execute()
                current = tuple(_int(g) for g in replies[len(replies) - len(generation_keys):])
                if current != tuple(generations):
                    await client.delete(key)
                    return False
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"redis fill failed: {exc!r}") from exc
        return True

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
    def _script(bound: _Bound, script: Any, keys: list[str], args: list[Any], timeout: float | None = None
                ) -> Awaitable[Any]:
        """A registered script, on the pipelined connection when there is one (no coroutine around it);
        ``timeout``: see ``Store``."""
        pipelined = bound.pipelined if timeout is None else bound.background_pipelined
        if pipelined is None:
            return _gated_script(bound, script, keys, args, timeout)
        return pipelined.evalsha(script.sha, script.script, keys, args, timeout)

    async def invalidate(self, tag_sets: Sequence[str], generation_keys: Sequence[str], message: str, *,
                         timeout: float | None = None) -> int:
        try:
            bound = self._on_loop()
            client, gate = bound.lane(timeout)
            async with gate, client.pipeline(transaction=False) as pipe:
                for generation_key in generation_keys:
                    pipe.incr(generation_key)
                for tag_set in tag_sets:
                    pipe.zrange(tag_set, 0, -1)
                replies = await pipe.execute()
            keys = {member for members in replies[len(generation_keys):] for member in members}
            dropped = await self._delete_each(bound, list(keys), timeout)
            await self._delete_each(bound, list(tag_sets), timeout)
            await client.publish(self.invalidation_channel, message)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"redis invalidate failed: {exc!r}") from exc
        return dropped

    async def purge(self, pattern: str, generation_key: str, message: str, *, timeout: float | None = None) -> int:
        try:
            bound = self._on_loop()
            client, _ = bound.lane(timeout)
            await client.incr(generation_key)
            dropped = 0
            batch: list[bytes] = []
            async for found in client.scan_iter(match=pattern, count=1000):
                batch.append(found)
                if len(batch) >= 500:
                    dropped += await self._delete_each(bound, batch, timeout)
                    batch = []
            dropped += await self._delete_each(bound, batch, timeout)
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
        return self._listening

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
        client = bound.listener_client()
        fills = self.channel.encode()
        started = False
        backoff = 0.05
        try:
            while True:
                pubsub = client.pubsub()
                try:
                    if isinstance(client, RedisCluster):
                        await client.initialize()  # the slot map picks the node to subscribe on
                    await pubsub.subscribe(self.channel, self.invalidation_channel)
                    self._listening = True
                    self.notifications.connected()
                    backoff = 0.05
                    if not started:
                        started = True
                        task_status.started()
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        if message.get("channel") == fills:
                            self.notifications.fill_message(message.get("data"))
                        else:
                            self.notifications.invalidation_message(message.get("data"))
                except Exception as exc:  # the driver's, or anything else: resubscribe
                    logger.debug("cachemw: subscription lost (%r); resubscribing", exc)
                finally:
                    if self._listening:
                        self._listening = False
                        self.notifications.lost()
                    with anyio.CancelScope(shield=True):
                        await _quietly_close(pubsub)
                if not started:
                    started = True
                    task_status.started()  # don't hold up startup while Redis is down
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await close_client(client)

    async def aclose(self) -> None:
        bound = self._bound
        try:
            if bound.loop is None or bound.loop is _get_running_loop():
                await bound.aclose()
            else:  # opened on a loop that is not this one: closed there, if it still runs
                bound.abandon()
        except Exception as exc:
            raise StoreError(f"closing the redis client failed: {exc!r}") from exc


async def _gated_script(bound: _Bound, script: Any, keys: list[str], args: list[Any], timeout: float | None
                        ) -> Any:
    client, gate = bound.lane(timeout)
    async with gate:
        return await script(keys=keys, args=args, client=client)


def _cancel_guards(guards: list[LoopGuard]) -> None:
    for guard in guards:
        guard.cancel(from_finalizer=True)


async def close_client(client: Any) -> None:
    """Close a Redis or RedisCluster client and its connections."""
    if isinstance(client, RedisCluster):
        await client.aclose()
    else:
        await client.aclose(close_connection_pool=True)


async def _quietly_close(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()
