"""The Redis store's subscription to fill and invalidation announcements.

Kept apart from the commands: it is the one long-lived connection, it outlives any
number of losses (resubscribing with a backoff), and all it hands on goes through
``Notifications``, which treats every message as untrusted.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis, RedisCluster

from cachemw.store.base import Notifications
from cachemw.store.redis_clients import close_client

__all__ = ["Subscription"]

logger = logging.getLogger("cachemw.store.redis")  # where these lines were logged before the split


class Subscription:
    """Subscribes ``notifications`` to the two channels and keeps it subscribed; ``listening`` while it is."""

    __slots__ = ("listening", "notifications")

    def __init__(self, notifications: Notifications) -> None:
        self.notifications = notifications
        self.listening = False

    async def run(self, client: Redis | RedisCluster, channel: str, invalidation_channel: str, *,
                  task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``client`` (closed at the end) until cancelled, resubscribing after any loss.

        A message that does not decode to a valid announcement is dropped and counted in
        ``notifications.rejected``, and never ends the subscription.
        """
        fills = channel.encode()
        started = False
        backoff = 0.05
        try:
            while True:
                pubsub = client.pubsub()
                try:
                    if isinstance(client, RedisCluster):
                        await client.initialize()  # the slot map picks the node to subscribe on
                    await pubsub.subscribe(channel, invalidation_channel)
                    self.listening = True
                    self.notifications.connected()
                    backoff = 0.05
                    if not started:
                        started = True
                        task_status.started()
                    await self._deliver(pubsub, fills)
                except Exception as exc:  # the driver's, or anything else: resubscribe
                    logger.debug("cachemw: subscription lost (%r); resubscribing", exc)
                finally:
                    if self.listening:
                        self.listening = False
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

    async def _deliver(self, pubsub: Any, fills: bytes) -> None:
        async for message in pubsub.listen():
            if message.get("type") != "message":
                continue
            if message.get("channel") == fills:
                self.notifications.fill_message(message.get("data"))
            else:
                self.notifications.invalidation_message(message.get("data"))


async def _quietly_close(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()
