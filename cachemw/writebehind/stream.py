"""The Redis side of a write-behind: its keys, the stream and its consumer group, the clients.

``put`` and ``get`` run on the request path's client (bounded by ``timeout``); the
flusher reads, claims and acknowledges on a client of its own, since a blocking
XREADGROUP outlasts that timeout. What the replies mean is decoded in ``replies``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError

from cachemw.core.keyspace import writebehind_base
from cachemw.store.base import StoreError
from cachemw.store.redis import DRIVER_ERRORS, ConnectionGate, close_client, millis, redis_clients
from cachemw.writebehind import scripts
from cachemw.writebehind.replies import parse_dead_letter, parse_entry, parse_status, text
from cachemw.writebehind.rules import StreamEntry
from cachemw.writebehind.scripts import command
from cachemw.writebehind.values import DeadLetter, WriteBehindStatus

__all__ = ["GROUP", "MAX_BLOCK", "RedisBackend", "StreamKeys", "group_lost", "store_errors"]

GROUP = "cachemw"  # one consumer group per stream: acknowledged entries are deleted, so there can be no other
MAX_BLOCK = 5.0  # longest blocking read; the flusher wakes at least this often
_CHUNK = 500  # ids per script call: Lua's unpack() has a stack limit
_MAX_CONNECTIONS = 256  # per server or cluster node, for put/get/status


# Stream replies are parsed here, not by redis-py, whose parsers differ between
# versions and fail on entries deleted while pending.
_RAW_COMMANDS = ("XREADGROUP", "XAUTOCLAIM", "XRANGE", "XREVRANGE", "XPENDING", "XCLAIM")


def _raw(response: Any, **options: Any) -> Any:
    return response


def _raw_replies(client: Redis | RedisCluster) -> None:
    for name in _RAW_COMMANDS:
        client.set_response_callback(name, _raw)


@contextlib.contextmanager
def store_errors(what: str) -> Iterator[None]:
    try:
        yield
    except DRIVER_ERRORS as exc:
        # str(), not repr(): redis-py's repr of a server's error is just "server:ResponseError".
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
        raise StoreError(f"write-behind {what} failed: {detail}") from exc


def group_lost(error: StoreError) -> bool:
    """Redis lost the consumer group with its data (restarted without AOF, failed over to a lagging replica)."""
    cause = error.__cause__
    return isinstance(cause, ResponseError) and str(cause).startswith("NOGROUP")


class StreamKeys:
    __slots__ = ("counter", "dead", "stats", "stream", "values")

    def __init__(self, prefix: str, name: str) -> None:
        base = writebehind_base(prefix, name)
        self.values = f"{base}:v:"
        self.stream = f"{base}:stream"
        self.dead = f"{base}:dead"
        self.counter = f"{base}:version"
        self.stats = f"{base}:stats"

    def value(self, key: str) -> str:
        return self.values + key


class RedisBackend:
    """One server, a Sentinel's master or a Redis Cluster, with the clients ``RedisStore`` would use.

    Every key of a write-behind carries its ``{name}`` hash tag, so on a cluster each
    command and script below touches one slot, on the node that owns the stream.
    """

    kind = "redis"

    def __init__(self, url: str, keys: StreamKeys, consumer: str, timeout: float) -> None:
        self._clients = redis_clients(url, timeout=timeout, max_connections=_MAX_CONNECTIONS)
        self._client: Redis | RedisCluster = self._clients.client  # put, get, status: bounded by ``timeout``
        _raw_replies(self._client)
        # redis-py's cluster client raises at once when a node's pool is full: wait for a
        # connection instead (within the caller's budget), as the single-server pool does.
        self._gate: Any = ConnectionGate(_MAX_CONNECTIONS) if self._clients.cluster else contextlib.nullcontext()
        self._keys = keys
        self._consumer = consumer
        self._flusher_client: Redis | RedisCluster | None = None
        self._cursor = "0-0"

    async def _ready(self, client: Redis | RedisCluster) -> Redis | RedisCluster:
        """``client``, knowing the cluster's slot map: a first command must not wander to another node."""
        if isinstance(client, RedisCluster):
            await client.initialize()  # at once when known; again after a node failed
        return client

    async def _flusher(self) -> Redis | RedisCluster:
        """The flusher's own client: a blocking read outlasts the request path's socket timeout."""
        if self._flusher_client is None:
            client = self._clients.blocking_client(MAX_BLOCK + 10)
            _raw_replies(client)
            self._flusher_client = client
        return await self._ready(self._flusher_client)

    async def put(self, key: str, data: bytes, if_version: int | None) -> tuple[bool, int]:
        keys = self._keys
        with store_errors("put"):
            async with self._gate:
                reply = await scripts.PUT(await self._ready(self._client),
                                          [keys.value(key), keys.stream, keys.counter],
                                          [key, data, "" if if_version is None else if_version])
        return bool(reply[0]), int(reply[1])

    async def get(self, key: str) -> tuple[bytes | None, int]:
        with store_errors("get"):
            async with self._gate:
                client = await self._ready(self._client)
                version, data = await client.hmget(self._keys.value(key), ["version", "value"])
        return cast("bytes | None", data), int(version or 0)

    async def join(self) -> None:
        with store_errors("creating the consumer group"):
            try:
                # From the start of the stream: writes put before any flusher ever ran count too.
                await command(await self._flusher(), "XGROUP", "CREATE", self._keys.stream, GROUP, "0",
                               "MKSTREAM")
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def own_pending(self, count: int) -> list[StreamEntry]:
        """What Redis delivered to this consumer (before a restart, or in a reply that was lost).

        XPENDING and XRANGE, not a history read: those would count as deliveries,
        and many deliveries mark an entry as one its flushers keep dying with.
        """
        with store_errors("reading pending writes"):
            client = await self._flusher()
            pending = await command(client, "XPENDING", self._keys.stream, GROUP, "-", "+", count, self._consumer)
            if not pending:
                return []
            async with client.pipeline(transaction=False) as pipe:
                for row in pending:
                    pipe.execute_command("XRANGE", self._keys.stream, row[0], row[0])
                found = await pipe.execute()
        entries = []
        for row, reply in zip(pending, found, strict=True):
            entry = parse_entry(reply[0]) if reply else None  # None: deleted meanwhile (XAUTOCLAIM cleans it up)
            if entry is not None:
                entry.deliveries = int(row[3])
                entries.append(entry)
        return entries

    async def read(self, count: int, block: float) -> list[StreamEntry]:
        args: list[Any] = ["XREADGROUP", "GROUP", GROUP, self._consumer, "COUNT", count]
        if block > 0:
            args += ["BLOCK", millis(block)]
        args += ["STREAMS", self._keys.stream, ">"]
        with store_errors("read"):
            client = await self._flusher()
            options: dict[str, Any] = {}
            if isinstance(client, RedisCluster):
                # Straight to the stream's node: XREADGROUP's keys are "movable", and redis-py
                # would ask another node (COMMAND GETKEYS, twice) where they are first.
                options["target_nodes"] = client.get_node_from_key(self._keys.stream)
            reply = await command(client, *args, **options)
        if not reply:
            return []
        return [entry for entry in map(parse_entry, reply[0][1]) if entry is not None]

    async def claim(self, count: int, min_idle: float) -> list[StreamEntry]:
        claimed: list[StreamEntry] = []
        with store_errors("claim"):
            client = await self._flusher()
            while len(claimed) < count:
                reply = await command(client,
                    "XAUTOCLAIM", self._keys.stream, GROUP, self._consumer, millis(min_idle),
                    self._cursor, "COUNT", min(count - len(claimed), 1000))
                self._cursor = text(reply[0])
                claimed.extend(entry for entry in map(parse_entry, reply[1]) if entry is not None)
                if self._cursor == "0-0":
                    break
            if claimed:
                # How often each was delivered: an entry whose flushers keep dying with it is poison too.
                ids = sorted(claimed, key=lambda e: tuple(int(p) for p in e.id.split("-")))
                pending = await command(client, "XPENDING", self._keys.stream, GROUP, ids[0].id,
                                        ids[-1].id, len(claimed) * 2, self._consumer)
                deliveries = {text(row[0]): int(row[3]) for row in pending}
                for entry in claimed:
                    entry.deliveries = deliveries.get(entry.id, 2)
            await scripts.PRUNE(client, [self._keys.stream], [GROUP, self._consumer, 24 * 3600 * 1000])
        return claimed

    async def keepalive(self, ids: Sequence[str]) -> None:
        """Reset the idle time of held entries, so a live flusher's work is not claimed by another."""
        with store_errors("keepalive"):
            client = await self._flusher()
            for start in range(0, len(ids), _CHUNK):
                await command(client, "XCLAIM", self._keys.stream, GROUP, self._consumer, 0,
                              *ids[start:start + _CHUNK], "JUSTID")

    async def ack(self, entries: Sequence[StreamEntry], winners: Sequence[StreamEntry], retain: float | None) -> None:
        keys = self._keys
        retain_ms = 0 if retain is None else millis(retain)
        winner_ids = {id(w) for w in winners}
        with store_errors("acknowledge"):
            client = await self._flusher()
            for start in range(0, len(entries), _CHUNK):
                chunk = entries[start:start + _CHUNK]
                kept = [e for e in chunk if id(e) in winner_ids] if retain_ms else []
                await scripts.ACK(client, [keys.stream, keys.stats, *(keys.value(e.key) for e in kept)],
                                  [GROUP, retain_ms, len(chunk), *(e.id for e in chunk), *(e.version for e in kept)])

    async def dead_letter(self, winner: StreamEntry, others: Sequence[StreamEntry], error: str, attempts: int) -> None:
        keys = self._keys
        with store_errors("dead-letter"):
            await scripts.DEAD_LETTER(await self._flusher(), [keys.stream, keys.dead, keys.stats],
                                      [GROUP, winner.key, winner.version, winner.data, error, attempts, winner.id,
                                       *(e.id for e in others)])

    async def count(self, **fields: int) -> None:
        counts = {name: n for name, n in fields.items() if n}
        if not counts:
            return
        with store_errors("count"):
            async with (await self._flusher()).pipeline(transaction=False) as pipe:
                for name, n in counts.items():
                    pipe.hincrby(self._keys.stats, name, n)
                await pipe.execute()

    async def status(self, name: str) -> WriteBehindStatus:
        keys = self._keys
        with store_errors("status"):
            async with self._gate:
                reply = await scripts.STATUS(await self._ready(self._client), [keys.stream, keys.dead, keys.stats], [])
        return parse_status(reply, name=name, backend=self.kind, group=GROUP)

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        with store_errors("reading dead letters"):
            reply = await command(await self._ready(self._client), "XRANGE", self._keys.dead, "-", "+", "COUNT",
                                  limit)
        return [parse_dead_letter(raw) for raw in reply]

    async def requeue(self, ids: Sequence[str] | None) -> int:
        keys = self._keys
        moved = 0
        with store_errors("retrying dead letters"):
            client = await self._ready(self._client)
            if ids is None:
                while True:
                    batch = await command(client, "XRANGE", keys.dead, "-", "+", "COUNT", 100)
                    if not batch:
                        break
                    for raw in batch:
                        moved += int(await scripts.REQUEUE(client, [keys.dead, keys.stream, keys.stats],
                                                           [text(raw[0])]))
            else:
                for letter_id in ids:
                    moved += int(await scripts.REQUEUE(client, [keys.dead, keys.stream, keys.stats], [letter_id]))
        return moved

    async def leave(self) -> int:
        """Remove this consumer from the group if it holds nothing; returns what it still holds."""
        with store_errors("leave"):
            client = await self._flusher()
            pending = await command(client, "XPENDING", self._keys.stream, GROUP, "-", "+", 1, self._consumer)
            if not pending:
                await command(client, "XGROUP", "DELCONSUMER", self._keys.stream, GROUP, self._consumer)
                return 0
            summary = await command(client, "XPENDING", self._keys.stream, GROUP)
        return sum(int(n) for name, n in (summary[3] or []) if text(name) == self._consumer)

    async def aclose(self) -> None:
        client, self._flusher_client = self._flusher_client, None
        with contextlib.suppress(*DRIVER_ERRORS):
            if client is not None:
                await close_client(client)
        with contextlib.suppress(*DRIVER_ERRORS):
            await self._clients.aclose()
