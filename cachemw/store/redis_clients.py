"""Redis clients for a URL (one server, Cluster or Sentinel) with cachemw's pool and time budget.

On one server over TCP or a Unix socket the request path's commands take the
auto-pipelined connection of ``cachemw.store.pipeline`` instead, which keeps the time
budget itself; what follows describes redis-py's part (everything else, and TLS,
Cluster, Sentinel).

A cache must answer within a request's budget or get out of the way, so the factory
sets its own pool and time budget instead of redis-py's defaults (a pool that raises
at 100 connections, 5 s socket timeouts, 10 retries with backoff):

- ``BlockingConnectionPool``: when all connections are busy, wait at most ``timeout``
  for one, then fail, instead of raising ``MaxConnectionsError`` at once;
- connect, read and write each time out after ``timeout``;
- no retries: a failed call fails fast and the caller falls back to the app;
- RESP2 without maintenance notifications, so the pool replaces a pooled connection
  the server closed (or one with unread data) before using it (see ``redis_clients``).

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
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection, UnixDomainSocketConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.maint_notifications import MaintNotificationsConfig

from cachemw.store.pipeline import PipelinedRedis

__all__ = ["CLUSTER_SCHEMES", "DRIVER_ERRORS", "SENTINEL_SCHEMES", "RedisClients", "blocking_twin", "close_client",
           "redis_clients"]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")

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


def redis_clients(url: str, *, timeout: float, max_connections: int = 256, grace: float | None = None
                  ) -> RedisClients:
    """What ``RedisStore.from_url(url, timeout=..., max_connections=..., grace=...)`` connects with (see there)."""
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
    return RedisClients(client, lambda socket_timeout: blocking_twin(client, socket_timeout),
                        pipelined=_pipelined(kwargs, timeout, grace))


def _pipelined(kwargs: dict[str, Any], timeout: float, grace: float | None) -> PipelinedRedis | None:
    """The request path's connection for a plain TCP or Unix socket server; TLS stays on redis-py."""
    connection_class = kwargs.get("connection_class", Connection)
    common: dict[str, Any] = {"db": int(kwargs.get("db") or 0), "username": kwargs.get("username"),
                              "password": kwargs.get("password"), "timeout": timeout, "grace": grace}
    if connection_class is UnixDomainSocketConnection:
        return PipelinedRedis(path=kwargs["path"], **common)
    if connection_class is Connection:
        return PipelinedRedis(host=kwargs.get("host", "localhost"), port=int(kwargs.get("port", 6379)), **common)
    return None


def blocking_twin(client: Redis, socket_timeout: float | None) -> Redis:
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
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2
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


def _hosts(netloc: str, url: str) -> list[tuple[str, int]]:
    """``user:pass@h1:p1,h2:p2`` -> [(h1, p1), (h2, p2)]."""
    hosts: list[tuple[str, int]] = []
    for item in netloc.rpartition("@")[2].split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{url.split('@')[-1]!r}: expected host:port[,host:port...]")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


async def close_client(client: Any) -> None:
    """Close a Redis or RedisCluster client and its connections."""
    if isinstance(client, RedisCluster):
        await client.aclose()
    else:
        await client.aclose(close_connection_pool=True)

