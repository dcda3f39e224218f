"""The Redis store's subscription to fill and invalidation announcements, and Redis's own key tracking.

Kept apart from the commands: it is the one long-lived connection, it outlives any
number of losses (resubscribing with a backoff), and all it hands on goes through
``Notifications``, which treats every message as untrusted.

On one server or a Sentinel-named master (Redis 6.0+, as ``HELLO`` reports it) the
same connection also turns on client-side caching in broadcast mode, redirected to
itself, before it subscribes: ``CLIENT TRACKING on REDIRECT <own id> BCAST PREFIX
<prefix>:e:``, then ``SUBSCRIBE ... __redis__:invalidate``. Redis then names every entry
key that is written, deleted or expires, on whichever connection, and this process's
L1 evicts its copy when the message arrives, instead of keeping it up to ``sync``.
RESP2 with a redirect to the subscriber we already have, rather than RESP3 push
messages, because it needs no new connection and no RESP3 parser: redis-py's asyncio
client has no client-side caching (redis/redis-py#3916), but its asyncio
``Connection`` reads RESP2 Pub/Sub replies as they come, with TLS, Sentinel and auth as
the rest of the store has them. NOLOOP is not asked for: it spares the writes of the
tracking connection only, and this one never writes; this process hears its own
writes too, which is what a purge wants (a read in flight may have put the old copy
back after the local drop) and costs a fill one more read of its own entry.

The link is watched: a PING every third of ``Notifications.link_bound``; with nothing
heard for that bound, the link is silent and counts as lost (``listening`` goes False:
the L1 is bypassed and its copies never answer again), until anything is heard again
(the same TCP stream: whatever was sent meanwhile comes first). Silent for long, the
connection is dropped and made anew.

On a Redis Cluster the announcements arrive through redis-py's PubSub on one node
(PUBLISH reaches every node), but each key's changes are known only to its own master:
there one tracking link per master (its own connection, tracking redirected to itself,
watched by the same PING) runs beside the subscription. A link that fails or goes
silent ends the whole session, so the L1 is flushed and the session is made anew from
the current slot map, which also follows a failover to a new set of masters.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis, RedisCluster

from cachemw.core.keyspace import is_entry_key
from cachemw.store.base import Notifications
from cachemw.store.redis_clients import close_client

__all__ = ["TRACKING_CHANNEL", "Subscription", "TrackingLink", "track_here"]

logger = logging.getLogger("cachemw.store.redis")  # where these lines were logged before the split

TRACKING_CHANNEL = b"__redis__:invalidate"
_SETUP_TIMEOUT = 2.0  # each reply of the handshake (HELLO, CLIENT, SUBSCRIBE)
_SILENT_FOR_LONG = 2.0  # at least this (and 10 link bounds) of silence: the connection is made anew


class Subscription:
    """Subscribes ``notifications`` to the two channels and keeps it subscribed; ``listening`` while it is.

    ``tracking``: Redis reports changes to the keys under ``tracking_prefix`` on the live link.
    """

    __slots__ = ("_heard", "listening", "notifications", "tracking", "tracking_prefix")

    def __init__(self, notifications: Notifications, tracking_prefix: str | None = None) -> None:
        self.notifications = notifications
        self.tracking_prefix = tracking_prefix
        self.listening = False
        self.tracking = False
        self._heard = 0.0

    async def run(self, client: Redis | RedisCluster, channel: str, invalidation_channel: str, *,
                  task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``client`` (closed at the end) until cancelled, resubscribing after any loss.

        A message that does not decode to a valid announcement is dropped and counted in
        ``notifications.rejected``, and never ends the subscription.
        """
        fills = channel.encode()
        started: list[bool] = []

        def ready() -> None:
            if not started:
                started.append(True)
                task_status.started()

        backoff = 0.05
        try:
            while True:
                try:
                    if isinstance(client, RedisCluster):
                        await self._cluster_session(client, channel, invalidation_channel, fills, ready)
                    else:
                        await self._session(client, channel, invalidation_channel, fills, ready)
                except Exception as exc:  # the driver's, or anything else: resubscribe
                    logger.debug("cachemw: subscription lost (%r); resubscribing", exc)
                finally:
                    self._went_deaf()
                ready()  # don't hold up startup while Redis is down
                if self._heard and time.monotonic() - self._heard < 1.0:
                    backoff = 0.05  # the link worked a moment ago: not a server that refuses us
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await close_client(client)

    def _went_deaf(self) -> None:
        self.tracking = False
        if self.listening:
            self.listening = False
            self.notifications.lost()

    def _heard_again(self) -> None:
        self.listening = True
        self.notifications.connected()

    # -- one server, or a Sentinel-named master: our own connection, with tracking --------------

    async def _session(self, client: Redis, channel: str, invalidation_channel: str, fills: bytes,
                       ready: Callable[[], None]) -> None:
        pool: Any = client.connection_pool
        conn = await pool.get_connection()
        try:
            tracking = await self._track(conn)
            names = [channel.encode(), invalidation_channel.encode(), *([TRACKING_CHANNEL] if tracking else [])]
            await conn.send_command("SUBSCRIBE", *names)
            for _ in names:
                reply = await conn.read_response(timeout=_SETUP_TIMEOUT)
                if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                    raise ConnectionError(f"unexpected reply to SUBSCRIBE: {reply!r}")
            self.tracking = tracking
            self._heard = time.monotonic()
            self._heard_again()
            ready()
            async with anyio.create_task_group() as group:
                group.start_soon(self._watch, conn)
                await self._read(conn, fills)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await conn.disconnect()  # subscribed and tracking: no use to anyone else
                await pool.release(conn)

    async def _track(self, conn: Any) -> bool:
        return self.tracking_prefix is not None and await track_here(conn, self.tracking_prefix)

    async def _watch(self, conn: Any) -> None:
        """PING every third of the bound; nothing heard for the bound: deaf until heard again."""
        while True:
            bound = max(self.notifications.link_bound, 0.01)
            await anyio.sleep(bound / 3)
            if not conn.is_connected:
                raise ConnectionError("the subscription's connection closed")
            await conn.send_command("PING")
            silent = time.monotonic() - self._heard
            if silent > bound and self.listening:
                logger.debug("cachemw: subscription silent for %.3f s: its announcements no longer count", silent)
                self.listening = False
                self.notifications.lost()
            if silent > max(_SILENT_FOR_LONG, 10 * bound):
                raise TimeoutError(f"the subscription heard nothing for {silent:.1f} s")

    async def _read(self, conn: Any, fills: bytes) -> None:
        notifications = self.notifications
        while True:
            reply = await conn.read_response(timeout=math.inf)
            self._heard = time.monotonic()
            if not self.listening:
                self._heard_again()
            if not isinstance(reply, list) or len(reply) < 3 or reply[0] != b"message":
                continue  # a pong, or anything else the server says in subscribed mode
            if reply[1] == TRACKING_CHANNEL:
                data = reply[2]
                notifications.keys_message(_entry_keys(data) if isinstance(data, list) else data)
            elif reply[1] == fills:
                notifications.fill_message(reply[2])
            else:
                notifications.invalidation_message(reply[2])

    # -- a Redis Cluster: redis-py's PubSub on one node, a tracking link per master ------------

    async def _cluster_session(self, client: RedisCluster, channel: str, invalidation_channel: str,
                               fills: bytes, ready: Callable[[], None]) -> None:
        pubsub = client.pubsub()
        try:
            await client.initialize()  # the slot map picks the node to subscribe on
            if self._heard:  # a session before this one was lost: maybe with a master, so ask anew
                await client.nodes_manager.initialize()
            await pubsub.subscribe(channel, invalidation_channel)
            async with anyio.create_task_group() as group:
                if self.tracking_prefix is not None:
                    links = [TrackingLink(node, self.tracking_prefix, self.notifications)
                             for node in client.get_primaries()]
                    tracked = [await group.start(link.run) for link in links]
                    self.tracking = bool(tracked) and all(tracked)
                self._heard = time.monotonic()
                self._heard_again()
                ready()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    if message.get("channel") == fills:
                        self.notifications.fill_message(message.get("data"))
                    else:
                        self.notifications.invalidation_message(message.get("data"))
                raise ConnectionError("the cluster subscription ended")
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await pubsub.aclose()


class TrackingLink:
    """One Cluster master's tracking link: its own connection, which Redis tells of changes to our keys.

    It never ends quietly: a lost or silent link raises, and the session around it
    (``Subscription._cluster_session``) flushes the L1 and starts again.
    """

    __slots__ = ("_heard", "node", "notifications", "prefix")

    def __init__(self, node: Any, prefix: str, notifications: Notifications) -> None:
        self.node = node
        self.prefix = prefix
        self.notifications = notifications
        self._heard = 0.0

    async def run(self, *, task_status: TaskStatus[bool] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start tracking (``started(True)``; False where this master cannot track), then read until lost."""
        conn = self.node.connection_class(**self.node.connection_kwargs)  # ours alone: not from the node's pool
        try:
            with anyio.fail_after(_SETUP_TIMEOUT):
                await conn.connect()
            if not await track_here(conn, self.prefix):
                task_status.started(False)
                await anyio.sleep_forever()  # nothing to read: the L1 keeps the sync bound for this master
            await conn.send_command("SUBSCRIBE", TRACKING_CHANNEL)
            reply = await conn.read_response(timeout=_SETUP_TIMEOUT)
            if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                raise ConnectionError(f"unexpected reply to SUBSCRIBE: {reply!r}")
            self._heard = time.monotonic()
            task_status.started(True)
            async with anyio.create_task_group() as group:
                group.start_soon(self._watch, conn)
                await self._read(conn)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await conn.disconnect()

    async def _watch(self, conn: Any) -> None:
        while True:
            bound = max(self.notifications.link_bound, 0.01)
            await anyio.sleep(bound / 3)
            if not conn.is_connected:
                raise ConnectionError(f"the tracking link to {self.node.name} closed")
            await conn.send_command("PING")
            silent = time.monotonic() - self._heard
            if silent > bound:
                raise TimeoutError(f"the tracking link to {self.node.name} was silent for {silent:.3f} s")

    async def _read(self, conn: Any) -> None:
        while True:
            reply = await conn.read_response(timeout=math.inf)
            self._heard = time.monotonic()
            if isinstance(reply, list) and len(reply) >= 3 and reply[0] == b"message" and reply[1] == TRACKING_CHANNEL:
                data = reply[2]
                self.notifications.keys_message(_entry_keys(data) if isinstance(data, list) else data)


async def track_here(conn: Any, prefix: str) -> bool:
    """Turn on broadcast tracking of the keys under ``prefix``, redirected to ``conn``, where Redis can."""
    try:
        await conn.send_command("HELLO")  # no protocol version: tells the server's, changes nothing
        hello = await conn.read_response(timeout=_SETUP_TIMEOUT)
        if _major(hello) < 6:
            return False
        await conn.send_command("CLIENT", "ID")
        own_id = int(await conn.read_response(timeout=_SETUP_TIMEOUT))
        await conn.send_command("CLIENT", "TRACKING", "on", "REDIRECT", own_id, "BCAST", "PREFIX",
                                prefix)
        answer = await conn.read_response(timeout=_SETUP_TIMEOUT)
    except (ConnectionError, TimeoutError, OSError):
        raise
    except Exception as exc:  # an error reply: Redis before 6, or an ACL without CLIENT
        logger.info("cachemw: Redis does not track keys for this connection (%r); the L1 keeps the sync bound",
                    exc)
        return False
    return answer in (b"OK", "OK")


def _entry_keys(data: Sequence[object]) -> list[object]:
    """The entry keys of a tracking message: locks and wait flags under the prefix are not kept in any L1."""
    return [key for key in data if not isinstance(key, bytes) or is_entry_key(key)]


def _major(hello: object) -> int:
    """The server's major version from a RESP2 ``HELLO`` reply (a flat list of names and values)."""
    if isinstance(hello, list):
        for name, value in zip(hello[::2], hello[1::2], strict=False):
            if name == b"version" and isinstance(value, bytes):
                head = value.split(b".", 1)[0]
                return int(head) if head.isdigit() else 0
    return 0
