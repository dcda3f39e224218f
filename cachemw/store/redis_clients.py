"""Redis clients for a URL (one server, Cluster or Sentinel) with cachemw's pool and time budget.

The request path's commands take the auto-pipelined connection of
``cachemw.store.pipeline`` instead (TCP, TLS, a Unix socket, a Sentinel-named master;
one per master of a Cluster, ``cachemw.store.pipeline_cluster``), which keeps the time
budget itself; what follows describes redis-py's part (everything else).

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
from redis.asyncio.connection import (
    Connection,
    RedisSSLContext,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.maint_notifications import MaintNotificationsConfig

from cachemw.store.pipeline import PipelinedRedis
from cachemw.store.pipeline_cluster import PipelinedCluster

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
    - ``pipelined``: on one server (or a Sentinel-named master), the auto-pipelining
      connection the request path's commands take; ``routed``: on a Cluster, those
      connections to its masters.
    """

    __slots__ = ("also_close", "blocking_client", "client", "cluster", "pipelined", "routed")

    def __init__(self, client: Redis | RedisCluster, blocking_client: Callable[[float | None], Redis | RedisCluster],
                 also_close: Sequence[Any] = (), pipelined: PipelinedRedis | None = None,
                 routed: PipelinedCluster | None = None) -> None:
        self.client = client
        self.pipelined = pipelined
        self.routed = routed
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
        return _cluster_clients(url, timeout, max_connections, grace)
    if scheme in SENTINEL_SCHEMES:
        return _sentinel_clients(url, timeout, max_connections, grace)
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
    """The request path's connection for a TCP, TLS or Unix socket server (None for a connection class of
    someone else's)."""
    connection_class = kwargs.get("connection_class", Connection)
    common: dict[str, Any] = {"db": int(kwargs.get("db") or 0), "username": kwargs.get("username"),
                              "password": kwargs.get("password"), "timeout": timeout, "grace": grace}
    if connection_class is UnixDomainSocketConnection:
        return PipelinedRedis(path=kwargs["path"], **common)
    if connection_class is SSLConnection:
        common["ssl"] = ssl_context(kwargs)
    elif connection_class is not Connection:
        return None
    return PipelinedRedis(host=kwargs.get("host", "localhost"), port=int(kwargs.get("port", 6379)), **common)


def ssl_context(kwargs: dict[str, Any]) -> Any:
    """The SSL context redis-py's ``SSLConnection`` builds from these ``ssl_*`` options (a URL's query):
    its defaults too (``ssl_cert_reqs=required``, ``ssl_check_hostname=True``)."""
    options = {name[4:]: value for name, value in kwargs.items() if name.startswith("ssl_")}
    options.setdefault("cert_reqs", "required")
    options.setdefault("check_hostname", True)
    return RedisSSLContext(**options).get()


def _url_ssl_options(url: str) -> dict[str, Any]:
    """A ``rediss+cluster://`` or ``rediss+sentinel://`` URL's ``ssl_*`` query options, parsed as redis-py
    parses a ``rediss://`` URL's."""
    query = urlsplit(url).query
    parsed = parse_url("rediss://localhost" + (f"/?{query}" if query else ""))
    return {name: value for name, value in parsed.items() if name.startswith("ssl_")}


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


def _cluster_clients(url: str, timeout: float, max_connections: int, grace: float | None) -> RedisClients:
    parts = urlsplit(url)
    seeds = _hosts(parts.netloc, url)
    nodes = [ClusterNode(host, port) for host, port in seeds]
    tls = parts.scheme.lower().startswith("rediss")
    ssl_options = _url_ssl_options(url) if tls else {}

    def client(socket_timeout: float | None) -> RedisCluster:
        return RedisCluster(
            startup_nodes=nodes,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl=tls,
            **ssl_options,
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

    routed = PipelinedCluster(seeds, username=unquote(parts.username) if parts.username else None,
                              password=unquote(parts.password) if parts.password else None, timeout=timeout,
                              grace=grace, ssl=ssl_context(ssl_options) if tls else None)
    return RedisClients(client(timeout), client, routed=routed)


def _sentinel_clients(url: str, timeout: float, max_connections: int, grace: float | None) -> RedisClients:
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
    tls = parts.scheme.lower().startswith("rediss")
    ssl_options = _url_ssl_options(url) if tls else {}

    def client(socket_timeout: float | None) -> Redis:
        master: Redis = sentinel.master_for(
            service, db=db, socket_timeout=socket_timeout,
            socket_connect_timeout=_connect_timeout(timeout, socket_timeout),
            retry=Retry(NoBackoff(), 0), max_connections=max_connections, protocol=2,
            ssl=tls, **ssl_options, username=username, password=password,
        )
        return master

    async def master() -> tuple[str, int]:
        host, port = await sentinel.discover_master(service)
        return str(host), int(port)

    # The master found anew at each connect: after a failover the next connect reaches the new one.
    pipelined = PipelinedRedis(locate=master, db=db, username=username, password=password, timeout=timeout,
                               grace=grace, ssl=ssl_context(ssl_options) if tls else None)
    # also_close: the connections that ask the sentinels.
    return RedisClients(client(timeout), client, also_close=sentinel.sentinels, pipelined=pipelined)


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
    """Close a Redis or RedisCluster client and its connections.

    A RedisCluster whose first command (its slot map) was cancelled has a startup node's
    connection open but no default node, and its ``aclose`` then closes nothing: that
    socket would outlive the store (and uvloop's ``close()`` waits for it forever). Its
    nodes are closed here whatever state it reached.
    """
    if isinstance(client, RedisCluster):
        await client.aclose()
        nodes = client.nodes_manager
        await asyncio.gather(*(node.disconnect() for node in
                               {id(node): node for node in [*nodes.startup_nodes.values(),
                                                            *nodes.nodes_cache.values()]}.values()))
    else:
        await client.aclose(close_connection_pool=True)

