"""Durable write-behind: read in real time from any server, reach the database later, lose nothing.

For data that must read in real time but may reach the database later (a cart)::

    carts = WriteBehind("cart", flush=save_carts)      # save_carts(batch: list[Write]) -> awaitable
    await carts.put(f"user:{uid}", cart)               # readable everywhere, durable in Redis
    cart = await carts.get(f"user:{uid}")              # read-your-writes, from any server

``put`` runs one Lua script that stores the value (readable at once by every
server) and appends the change to a Redis Stream, so neither happens without the
other. A flusher (``run_flusher``, a supervisor service) reads the stream through
a consumer group, batches (``batch_size`` writes or ``batch_delay`` seconds),
keeps only the latest write of each key in a batch, calls ``flush(batch)`` and
acknowledges, then deletes, the entries only after it returned. Nothing else ever
trims the stream (never ``MAXLEN``, which drops unread entries too).

Delivery is at least once: a crash between ``flush`` and the acknowledgement, or
a flusher that stalls past ``claim_idle`` (its entries are claimed by a live one
with ``XAUTOCLAIM``), means a write is flushed again. And two flushers may flush
two writes of one key in either order. So **flush must be an idempotent upsert
that ignores older versions**: every write carries a ``version`` that grows with
each put of any key (at least the Redis server's clock in microseconds, so it
keeps growing even if Redis loses the counter), e.g. in SQL::

    INSERT INTO carts (key, value, version) VALUES (?, ?, ?)
    ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version
    WHERE excluded.version > carts.version

Then the database ends at each key's latest version and never goes backwards.

A failed ``flush`` is retried with exponential backoff; a failing batch is split
in halves on each failure, so a poison write ends up alone and cannot hold back
the others. A write that failed alone ``max_attempts`` times while the database
accepted other writes meanwhile is moved to the dead-letter stream with its
error (``cachemw writebehind dead|retry NAME``). Failures while nothing succeeds
look like a database outage, not poison: they are retried (and counted) for as
long as it takes, the backlog stays in Redis, and ``put`` keeps working. (So a
poison write with no other traffic is retried, not parked, until others flow.)
A write whose flushers stopped (crashed, hung) while holding it more than
``max_attempts`` times is dead-lettered too. Dead letters keep their version:
retried after a newer write of their key reached the database, they change nothing.

``redis_url`` is any URL ``RedisStore.from_url`` takes, with the same clients: one
server (``redis://``, ``rediss://``, ``unix://``), a Redis Cluster
(``redis+cluster://``) or the master a Sentinel names (``redis+sentinel://``).
Redis keys: ``{prefix}:wb:{name}:v:{key}`` (a hash: ``version``, ``value``),
``{prefix}:wb:{name}:stream``, ``{prefix}:wb:{name}:dead``,
``{prefix}:wb:{name}:version`` (the counter) and ``{prefix}:wb:{name}:stats``.
On a cluster the ``{name}`` hash tag puts all of a queue's keys in one slot, so
each command and script goes to the one node owning it (no cross-slot command,
no KEYS): queues with different names spread over the nodes, one queue does not.

What the Redis server needs for "lose nothing":

- persistence: ``appendonly yes`` with ``appendfsync always`` (a write whose
  ``put`` returned survives a crash of the Redis host) or ``everysec`` (up to
  about one second of writes lost if the host crashes; a crash of the app
  process alone never loses one). Without AOF (RDB only, or none) a Redis
  restart loses everything not yet flushed.
- ``maxmemory-policy noeviction`` (a full Redis then makes ``put`` fail, loudly)
  or a ``volatile-*`` policy: stream, counter and unflushed values have no TTL,
  so only flushed values kept for ``retain`` seconds may be evicted. Never an
  ``allkeys-*`` policy: it would evict unflushed writes.
- with replicas, a failover may lose writes not yet replicated; cachemw does not
  ``WAIT`` for replicas. ``put`` fails (``StoreError``) until a replica took over.

When Redis loses the consumer group with the data (a restart without AOF, a
failover to a replica that was behind), the flusher makes it again and flushes
what is left.

Without Redis (``redis_url`` None: the memory store), values and the queue live
in this process: ``put``/``get`` and the flusher work the same, but a write is
only as durable as the process; what is not flushed at shutdown is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from cachemw.runtime.supervisor import Supervisor
from cachemw.store.base import StoreError
from cachemw.store.redis import DRIVER_ERRORS as _DRIVER_ERRORS
from cachemw.store.redis import ConnectionGate, close_client, millis, redis_clients

__all__ = [
    "DeadLetter",
    "JsonSerializer",
    "Serializer",
    "VersionConflict",
    "Write",
    "WriteBehind",
    "WriteBehindStatus",
]

logger = logging.getLogger(__name__)

V = TypeVar("V")

_GROUP = "cachemw"  # one consumer group per stream: acknowledged entries are deleted, so there can be no other
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_MAX_KEY_LENGTH = 1024
_MAX_BLOCK = 5.0  # longest blocking read; the flusher wakes at least this often
_CHUNK = 500  # ids per script call: Lua's unpack() has a stack limit
_MAX_CONNECTIONS = 256  # per server or cluster node, for put/get/status


# -- public values ------------------------------------------------------------------------------


class Serializer(Protocol[V]):
    """How values become bytes in Redis and back; ``loads`` may raise for bytes it cannot read."""

    def dumps(self, value: V) -> bytes: ...

    def loads(self, data: bytes) -> V: ...


class JsonSerializer:
    """The default: compact UTF-8 JSON, readable with any Redis tool."""

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


@dataclass(frozen=True, slots=True)
class Write(Generic[V]):
    """One key's latest write in a batch handed to ``flush``.

    ``version`` orders the writes of a key: store it, and ignore a write whose
    version is not above the stored one. ``superseded`` counts the older writes
    of the key in the batch this one replaces.
    """

    key: str
    value: V
    version: int
    written_at: float  # Unix time of the put (the Redis server's clock)
    superseded: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A write ``flush`` kept refusing, parked with its last error until someone retries it."""

    id: str
    key: str
    version: int
    data: bytes  # the serialized value
    error: str
    attempts: int
    dead_at: float


@dataclass(frozen=True, slots=True)
class WriteBehindStatus:
    """What an operator watches: how far behind the database is, and why.

    ``backlog`` counts writes put and not yet acknowledged (``pending`` of them
    are held by a flusher right now); ``lag`` is the age in seconds of the oldest
    of them (0 when there are none). The counters add up over every process.
    """

    name: str
    backend: str  # "redis" or "memory"
    backlog: int
    pending: int
    lag: float
    dead: int
    flushers: int
    flushed: int  # writes acknowledged after a successful flush (superseded ones included)
    failed_flushes: int  # flush calls that raised or timed out
    retried: int  # writes handed to flush again after a failure
    dead_lettered: int
    claimed: int  # writes taken over from a flusher that stopped
    requeued: int  # dead letters moved back by ``retry_dead_letters``

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class VersionConflict(Exception):
    """``put(..., if_version=n)`` found another version: someone else wrote the key meanwhile."""

    def __init__(self, key: str, expected: int, current: int) -> None:
        super().__init__(f"write-behind key {key!r} is at version {current}, not {expected}")
        self.key = key
        self.expected = expected
        self.current = current


FlushFunction = Callable[[list[Write[V]]], Awaitable[object]]


# -- the backends: Redis, and an in-process stand-in with the same behaviour ---------------------


@dataclass(slots=True, eq=False)
class _Entry:
    """A stream entry this flusher holds until it is acknowledged or dead-lettered."""

    id: str
    key: str
    version: int
    data: bytes
    deliveries: int = 1
    failures: int = 0  # failed flushes it was part of
    counted: int = 0  # failed alone while the database accepted other writes: toward max_attempts
    seen: int = 0  # the flusher's success count when it was read or last failed alone


@dataclass(slots=True)
class _Counts:
    flushed: int = 0
    failed_flushes: int = 0
    retried: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    requeued: int = 0


class _Backend(Protocol):
    kind: str

    async def put(self, key: str, data: bytes, if_version: int | None) -> tuple[bool, int]: ...
    async def get(self, key: str) -> tuple[bytes | None, int]: ...
    async def join(self) -> None: ...
    async def own_pending(self, count: int) -> list[_Entry]: ...
    async def read(self, count: int, block: float) -> list[_Entry]: ...
    async def claim(self, count: int, min_idle: float) -> list[_Entry]: ...
    async def keepalive(self, ids: Sequence[str]) -> None: ...
    async def ack(self, entries: Sequence[_Entry], winners: Sequence[_Entry], retain: float | None) -> None: ...
    async def dead_letter(self, winner: _Entry, others: Sequence[_Entry], error: str, attempts: int) -> None: ...
    async def count(self, **fields: int) -> None: ...
    async def status(self, name: str) -> WriteBehindStatus: ...
    async def dead_letters(self, limit: int) -> list[DeadLetter]: ...
    async def requeue(self, ids: Sequence[str] | None) -> int: ...
    async def leave(self) -> int: ...
    async def aclose(self) -> None: ...


def _stream_time(entry_id: str) -> float:
    try:
        return int(entry_id.split("-", 1)[0]) / 1000
    except ValueError:
        return 0.0


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _fields(flat: Sequence[Any] | None) -> dict[str, bytes] | None:
    if flat is None:
        return None
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _entry(raw: Sequence[Any]) -> _Entry | None:
    """A raw RESP2 stream entry ``[id, [field, value, ...]]``; None for one deleted meanwhile."""
    fields = _fields(raw[1])
    if fields is None or "key" not in fields:
        return None
    try:
        version = int(fields.get("version", b"0"))
    except ValueError:
        version = 0
    return _Entry(_text(raw[0]), _text(fields["key"]), version, fields.get("value", b""))


_PUT = """
if ARGV[3] ~= '' then
  local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
  if current ~= tonumber(ARGV[3]) then return {0, current} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local version = redis.call('INCR', KEYS[3])
if version < now then
  version = now
  redis.call('SET', KEYS[3], version)
end
redis.call('HSET', KEYS[1], 'version', version, 'value', ARGV[2])
redis.call('PERSIST', KEYS[1])
local id = redis.call('XADD', KEYS[2], '*', 'key', ARGV[1], 'version', version, 'value', ARGV[2])
return {1, version, id}
"""
# Acknowledge and delete together: an entry acknowledged but not deleted would stay
# in the stream for ever, and one deleted but not acknowledged would stay pending.
_ACK = """
local n = tonumber(ARGV[3])
local ids = {}
for i = 1, n do ids[i] = ARGV[3 + i] end
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
if acked > 0 then redis.call('HINCRBY', KEYS[2], 'flushed', acked) end
local retain = tonumber(ARGV[2])
if retain > 0 then
  for i = 3, #KEYS do
    if redis.call('HGET', KEYS[i], 'version') == ARGV[3 + n + i - 2] then redis.call('PEXPIRE', KEYS[i], retain) end
  end
end
return acked
"""
_DEAD = """
redis.call('XADD', KEYS[2], '*', 'key', ARGV[2], 'version', ARGV[3], 'value', ARGV[4], 'error', ARGV[5],
           'attempts', ARGV[6], 'id', ARGV[7])
local ids = {}
for i = 7, #ARGV do ids[#ids + 1] = ARGV[i] end
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
redis.call('HINCRBY', KEYS[3], 'dead_lettered', 1)
return 1
"""
_REQUEUE = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return 0 end
local fields = {}
local flat = found[1][2]
for i = 1, #flat, 2 do fields[flat[i]] = flat[i + 1] end
redis.call('XADD', KEYS[2], '*', 'key', fields['key'], 'version', fields['version'], 'value', fields['value'])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'requeued', 1)
return 1
"""
# Deleting a consumer drops its pending entries from the group (they would never be
# delivered again): only consumers with none, checked in the same script.
_PRUNE = """
local removed = 0
for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #info, 2 do c[info[i]] = info[i + 1] end
  if c['name'] ~= ARGV[2] and c['pending'] == 0 and c['idle'] >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
    removed = removed + 1
  end
end
return removed
"""

# One consistent snapshot from the stream's own node: on a cluster, a TIME sent on its
# own would go to some other node (and its clock).
_STATUS = """
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if groups['err'] then groups = {} end
return {redis.call('TIME'), redis.call('XLEN', KEYS[1]), redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1),
        redis.call('XLEN', KEYS[2]), redis.call('HGETALL', KEYS[3]), groups}
"""

# Stream replies are parsed here, not by redis-py, whose parsers differ between
# versions and fail on entries deleted while pending.
_RAW_COMMANDS = ("XREADGROUP", "XAUTOCLAIM", "XRANGE", "XREVRANGE", "XPENDING", "XCLAIM")


def _raw(response: Any, **options: Any) -> Any:
    return response


def _raw_replies(client: Redis | RedisCluster) -> None:
    for command in _RAW_COMMANDS:
        client.set_response_callback(command, _raw)


async def _command(client: Redis | RedisCluster, *args: Any, **options: Any) -> Any:
    return await client.execute_command(*args, **options)


class _Script:
    """A Lua script run by its SHA1, and sent whole when the server does not know it yet.

    Not redis-py's ``Script``: on a cluster that loads a missing script with SCRIPT
    LOAD on every primary, so one primary down would fail the scripts of all the
    others; EVAL loads it on the one node that runs it.
    """

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, client: Redis | RedisCluster, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await _command(client, "EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await _command(client, "EVAL", self.text, len(keys), *keys, *args)


_PUT_SCRIPT, _ACK_SCRIPT, _DEAD_SCRIPT, _REQUEUE_SCRIPT, _PRUNE_SCRIPT, _STATUS_SCRIPT = (
    _Script(text) for text in (_PUT, _ACK, _DEAD, _REQUEUE, _PRUNE, _STATUS))


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    try:
        yield
    except _DRIVER_ERRORS as exc:
        # str(), not repr(): redis-py's repr of a server's error is just "server:ResponseError".
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
        raise StoreError(f"write-behind {what} failed: {detail}") from exc


def _group_lost(error: StoreError) -> bool:
    """Redis lost the consumer group with its data (restarted without AOF, failed over to a lagging replica)."""
    cause = error.__cause__
    return isinstance(cause, ResponseError) and str(cause).startswith("NOGROUP")


class _Keys:
    __slots__ = ("counter", "dead", "stats", "stream", "values")

    def __init__(self, prefix: str, name: str) -> None:
        base = f"{prefix}:wb:{{{name}}}"
        self.values = f"{base}:v:"
        self.stream = f"{base}:stream"
        self.dead = f"{base}:dead"
        self.counter = f"{base}:version"
        self.stats = f"{base}:stats"

    def value(self, key: str) -> str:
        return self.values + key


class _RedisBackend:
    """One server, a Sentinel's master or a Redis Cluster, with the clients ``RedisStore`` would use.

    Every key of a write-behind carries its ``{name}`` hash tag, so on a cluster each
    command and script below touches one slot, on the node that owns the stream.
    """

    kind = "redis"

    def __init__(self, url: str, keys: _Keys, consumer: str, timeout: float) -> None:
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
            client = self._clients.blocking_client(_MAX_BLOCK + 10)
            _raw_replies(client)
            self._flusher_client = client
        return await self._ready(self._flusher_client)

    async def put(self, key: str, data: bytes, if_version: int | None) -> tuple[bool, int]:
        keys = self._keys
        with _store_errors("put"):
            async with self._gate:
                reply = await _PUT_SCRIPT(await self._ready(self._client),
                                          [keys.value(key), keys.stream, keys.counter],
                                          [key, data, "" if if_version is None else if_version])
        return bool(reply[0]), int(reply[1])

    async def get(self, key: str) -> tuple[bytes | None, int]:
        with _store_errors("get"):
            async with self._gate:
                client = await self._ready(self._client)
                version, data = await client.hmget(self._keys.value(key), ["version", "value"])
        return cast("bytes | None", data), int(version or 0)

    async def join(self) -> None:
        with _store_errors("creating the consumer group"):
            try:
                # From the start of the stream: writes put before any flusher ever ran count too.
                await _command(await self._flusher(), "XGROUP", "CREATE", self._keys.stream, _GROUP, "0",
                               "MKSTREAM")
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def own_pending(self, count: int) -> list[_Entry]:
        """What Redis delivered to this consumer (before a restart, or in a reply that was lost).

        XPENDING and XRANGE, not a history read: those would count as deliveries,
        and many deliveries mark an entry as one its flushers keep dying with.
        """
        with _store_errors("reading pending writes"):
            client = await self._flusher()
            pending = await _command(client, "XPENDING", self._keys.stream, _GROUP, "-", "+", count, self._consumer)
            if not pending:
                return []
            async with client.pipeline(transaction=False) as pipe:
                for row in pending:
                    pipe.execute_command("XRANGE", self._keys.stream, row[0], row[0])
                found = await pipe.execute()
        entries = []
        for row, reply in zip(pending, found, strict=True):
            entry = _entry(reply[0]) if reply else None  # None: deleted meanwhile (XAUTOCLAIM cleans it up)
            if entry is not None:
                entry.deliveries = int(row[3])
                entries.append(entry)
        return entries

    async def read(self, count: int, block: float) -> list[_Entry]:
        args: list[Any] = ["XREADGROUP", "GROUP", _GROUP, self._consumer, "COUNT", count]
        if block > 0:
            args += ["BLOCK", millis(block)]
        args += ["STREAMS", self._keys.stream, ">"]
        with _store_errors("read"):
            client = await self._flusher()
            options: dict[str, Any] = {}
            if isinstance(client, RedisCluster):
                # Straight to the stream's node: XREADGROUP's keys are "movable", and redis-py
                # would ask another node (COMMAND GETKEYS, twice) where they are first.
                options["target_nodes"] = client.get_node_from_key(self._keys.stream)
            reply = await _command(client, *args, **options)
        if not reply:
            return []
        return [entry for entry in map(_entry, reply[0][1]) if entry is not None]

    async def claim(self, count: int, min_idle: float) -> list[_Entry]:
        claimed: list[_Entry] = []
        with _store_errors("claim"):
            client = await self._flusher()
            while len(claimed) < count:
                reply = await _command(client,
                    "XAUTOCLAIM", self._keys.stream, _GROUP, self._consumer, millis(min_idle),
                    self._cursor, "COUNT", min(count - len(claimed), 1000))
                self._cursor = _text(reply[0])
                claimed.extend(entry for entry in map(_entry, reply[1]) if entry is not None)
                if self._cursor == "0-0":
                    break
            if claimed:
                # How often each was delivered: an entry whose flushers keep dying with it is poison too.
                ids = sorted(claimed, key=lambda e: tuple(int(p) for p in e.id.split("-")))
                pending = await _command(client, "XPENDING", self._keys.stream, _GROUP, ids[0].id,
                                         ids[-1].id, len(claimed) * 2, self._consumer)
                deliveries = {_text(row[0]): int(row[3]) for row in pending}
                for entry in claimed:
                    entry.deliveries = deliveries.get(entry.id, 2)
            await _PRUNE_SCRIPT(client, [self._keys.stream], [_GROUP, self._consumer, 24 * 3600 * 1000])
        return claimed

    async def keepalive(self, ids: Sequence[str]) -> None:
        """Reset the idle time of held entries, so a live flusher's work is not claimed by another."""
        with _store_errors("keepalive"):
            client = await self._flusher()
            for start in range(0, len(ids), _CHUNK):
                await _command(client, "XCLAIM", self._keys.stream, _GROUP, self._consumer, 0,
                               *ids[start:start + _CHUNK], "JUSTID")

    async def ack(self, entries: Sequence[_Entry], winners: Sequence[_Entry], retain: float | None) -> None:
        keys = self._keys
        retain_ms = 0 if retain is None else millis(retain)
        winner_ids = {id(w) for w in winners}
        with _store_errors("acknowledge"):
            client = await self._flusher()
            for start in range(0, len(entries), _CHUNK):
                chunk = entries[start:start + _CHUNK]
                kept = [e for e in chunk if id(e) in winner_ids] if retain_ms else []
                await _ACK_SCRIPT(client, [keys.stream, keys.stats, *(keys.value(e.key) for e in kept)],
                                  [_GROUP, retain_ms, len(chunk), *(e.id for e in chunk), *(e.version for e in kept)])

    async def dead_letter(self, winner: _Entry, others: Sequence[_Entry], error: str, attempts: int) -> None:
        keys = self._keys
        with _store_errors("dead-letter"):
            await _DEAD_SCRIPT(await self._flusher(), [keys.stream, keys.dead, keys.stats],
                               [_GROUP, winner.key, winner.version, winner.data, error, attempts, winner.id,
                                *(e.id for e in others)])

    async def count(self, **fields: int) -> None:
        counts = {name: n for name, n in fields.items() if n}
        if not counts:
            return
        with _store_errors("count"):
            async with (await self._flusher()).pipeline(transaction=False) as pipe:
                for name, n in counts.items():
                    pipe.hincrby(self._keys.stats, name, n)
                await pipe.execute()

    async def status(self, name: str) -> WriteBehindStatus:
        keys = self._keys
        with _store_errors("status"):
            async with self._gate:
                reply = await _STATUS_SCRIPT(await self._ready(self._client), [keys.stream, keys.dead, keys.stats], [])
        now, backlog, first, dead, stats, groups = reply
        pending = flushers = 0
        for group in groups:  # none without a stream: nothing was ever put
            info = _fields(group) or {}
            if _text(info.get("name", b"")) == _GROUP:
                pending, flushers = int(info.get("pending", 0)), int(info.get("consumers", 0))
        server_now = int(now[0]) + int(now[1]) / 1_000_000
        lag = max(0.0, server_now - _stream_time(_text(first[0][0]))) if first else 0.0
        counts = {_text(k): int(v) for k, v in (_fields(stats) or {}).items()}
        return WriteBehindStatus(name=name, backend=self.kind, backlog=int(backlog), pending=pending, lag=lag,
                                 dead=int(dead), flushers=flushers,
                                 **{f: counts.get(f, 0) for f in _Counts.__dataclass_fields__})

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        with _store_errors("reading dead letters"):
            reply = await _command(await self._ready(self._client), "XRANGE", self._keys.dead, "-", "+", "COUNT",
                                   limit)
        letters = []
        for raw in reply:
            fields = _fields(raw[1]) or {}
            letter_id = _text(raw[0])
            letters.append(DeadLetter(id=letter_id, key=_text(fields.get("key", b"")),
                                      version=int(fields.get("version", b"0") or 0), data=fields.get("value", b""),
                                      error=_text(fields.get("error", b"")),
                                      attempts=int(fields.get("attempts", b"0") or 0),
                                      dead_at=_stream_time(letter_id)))
        return letters

    async def requeue(self, ids: Sequence[str] | None) -> int:
        keys = self._keys
        moved = 0
        with _store_errors("retrying dead letters"):
            client = await self._ready(self._client)
            if ids is None:
                while True:
                    batch = await _command(client, "XRANGE", keys.dead, "-", "+", "COUNT", 100)
                    if not batch:
                        break
                    for raw in batch:
                        moved += int(await _REQUEUE_SCRIPT(client, [keys.dead, keys.stream, keys.stats],
                                                           [_text(raw[0])]))
            else:
                for letter_id in ids:
                    moved += int(await _REQUEUE_SCRIPT(client, [keys.dead, keys.stream, keys.stats], [letter_id]))
        return moved

    async def leave(self) -> int:
        """Remove this consumer from the group if it holds nothing; returns what it still holds."""
        with _store_errors("leave"):
            client = await self._flusher()
            pending = await _command(client, "XPENDING", self._keys.stream, _GROUP, "-", "+", 1, self._consumer)
            if not pending:
                await _command(client, "XGROUP", "DELCONSUMER", self._keys.stream, _GROUP, self._consumer)
                return 0
            summary = await _command(client, "XPENDING", self._keys.stream, _GROUP)
        return sum(int(n) for name, n in (summary[3] or []) if _text(name) == self._consumer)

    async def aclose(self) -> None:
        client, self._flusher_client = self._flusher_client, None
        with contextlib.suppress(*_DRIVER_ERRORS):
            if client is not None:
                await close_client(client)
        with contextlib.suppress(*_DRIVER_ERRORS):
            await self._clients.aclose()


class _MemoryBackend:
    """The same contract in this process: for the memory store, tests and trying things out."""

    kind = "memory"

    def __init__(self) -> None:
        self._values: dict[str, tuple[int, bytes, float]] = {}  # key -> version, data, expiry (monotonic)
        self._unacked: dict[str, _Entry] = {}  # oldest first, like the stream
        self._queue: deque[_Entry] = deque()  # not yet delivered
        self._dead: dict[str, DeadLetter] = {}
        self._counts = _Counts()
        self._version = 0
        self._last_id = (0, 0)
        self._arrived: anyio.Event | None = None
        self._flushers = 0

    def _next_id(self) -> str:
        ms = int(time.time() * 1000)
        last_ms, seq = self._last_id
        ms, seq = (last_ms, seq + 1) if ms <= last_ms else (ms, 0)
        self._last_id = (ms, seq)
        return f"{ms}-{seq}"

    def _append(self, key: str, version: int, data: bytes) -> None:
        entry = _Entry(self._next_id(), key, version, data)
        self._unacked[entry.id] = entry
        self._queue.append(entry)
        if self._arrived is not None:
            self._arrived.set()

    async def put(self, key: str, data: bytes, if_version: int | None) -> tuple[bool, int]:
        _, current = await self.get(key)
        if if_version is not None and current != if_version:
            return False, current
        self._version = max(self._version + 1, time.time_ns() // 1000)
        self._values[key] = (self._version, data, math.inf)
        self._append(key, self._version, data)
        return True, self._version

    async def get(self, key: str) -> tuple[bytes | None, int]:
        found = self._values.get(key)
        if found is None:
            return None, 0
        if found[2] <= time.monotonic():
            del self._values[key]
            return None, 0
        return found[1], found[0]

    async def join(self) -> None:
        self._flushers = 1

    async def own_pending(self, count: int) -> list[_Entry]:
        queued = {entry.id for entry in self._queue}
        held = [entry for entry in self._unacked.values() if entry.id not in queued][:count]
        return [_Entry(e.id, e.key, e.version, e.data, deliveries=e.deliveries + 1) for e in held]

    async def read(self, count: int, block: float) -> list[_Entry]:
        if not self._queue and block > 0:
            self._arrived = anyio.Event()
            with anyio.move_on_after(block):
                await self._arrived.wait()
            self._arrived = None
        out: list[_Entry] = []
        while self._queue and len(out) < count:
            entry = self._queue.popleft()
            out.append(_Entry(entry.id, entry.key, entry.version, entry.data))
        return out

    async def claim(self, count: int, min_idle: float) -> list[_Entry]:
        return []  # one process, one flusher: nobody else's work to take over

    async def keepalive(self, ids: Sequence[str]) -> None:
        pass

    async def ack(self, entries: Sequence[_Entry], winners: Sequence[_Entry], retain: float | None) -> None:
        for entry in entries:
            if self._unacked.pop(entry.id, None) is not None:
                self._counts.flushed += 1
        if retain is not None:
            for winner in winners:
                found = self._values.get(winner.key)
                if found is not None and found[0] == winner.version:
                    self._values[winner.key] = (found[0], found[1], time.monotonic() + retain)

    async def dead_letter(self, winner: _Entry, others: Sequence[_Entry], error: str, attempts: int) -> None:
        for entry in (winner, *others):
            self._unacked.pop(entry.id, None)
        letter_id = self._next_id()
        self._dead[letter_id] = DeadLetter(id=letter_id, key=winner.key, version=winner.version, data=winner.data,
                                           error=error, attempts=attempts, dead_at=time.time())
        self._counts.dead_lettered += 1

    async def count(self, **fields: int) -> None:
        for name, n in fields.items():
            setattr(self._counts, name, getattr(self._counts, name) + n)

    async def status(self, name: str) -> WriteBehindStatus:
        first = next(iter(self._unacked), None)
        lag = max(0.0, time.time() - _stream_time(first)) if first is not None else 0.0
        return WriteBehindStatus(name=name, backend=self.kind, backlog=len(self._unacked),
                                 pending=len(self._unacked) - len(self._queue), lag=lag, dead=len(self._dead),
                                 flushers=self._flushers, **asdict(self._counts))

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        return list(self._dead.values())[:limit]

    async def requeue(self, ids: Sequence[str] | None) -> int:
        moved = 0
        for letter_id in list(self._dead) if ids is None else ids:
            letter = self._dead.pop(letter_id, None)
            if letter is not None:
                self._append(letter.key, letter.version, letter.data)
                moved += 1
        self._counts.requeued += moved
        return moved

    async def leave(self) -> int:
        self._flushers = 0
        return len(self._unacked) - len(self._queue)

    async def aclose(self) -> None:
        pass


# -- the flusher ---------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Group:
    """Entries flushed together; a failed group is retried as two halves, so poison ends up alone."""

    entries: list[_Entry]
    due: float  # anyio clock
    failures: int = 0


def _coalesce(entries: Sequence[_Entry]) -> tuple[list[_Entry], dict[str, list[_Entry]]]:
    """Each key's latest entry (by version, oldest first), and the older ones it supersedes."""
    latest: dict[str, _Entry] = {}
    for entry in entries:
        current = latest.get(entry.key)
        if current is None or entry.version > current.version:
            latest[entry.key] = entry
    older: dict[str, list[_Entry]] = {key: [] for key in latest}
    for entry in entries:
        if entry is not latest[entry.key]:
            older[entry.key].append(entry)
    return sorted(latest.values(), key=lambda e: e.version), older


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"flush did not return within {timeout:g}s"
    return f"{type(exc).__name__}: {exc}"[:1000]


class _Flusher(Generic[V]):
    """One run of a flusher: the entries it holds, and the loop that reads, flushes and acknowledges them."""

    def __init__(self, owner: WriteBehind[V], backend: _Backend, flush: FlushFunction[V]) -> None:
        self.owner = owner
        self.backend = backend
        self.flush = flush
        self.groups: list[_Group] = []
        self.held: dict[str, _Entry] = {}  # delivered to us, neither acknowledged nor dead-lettered
        self.successes = 0
        self.failing = 0  # flushes failed since the last success: an outage is logged once
        self.next_claim = 0.0
        self.next_warning = -math.inf

    def hold(self, entries: Sequence[_Entry], due: float, group: _Group | None = None) -> _Group | None:
        """Track entries the moment they are delivered: a cancelled read must not forget them."""
        new = [entry for entry in entries if entry.id not in self.held]
        for entry in new:
            entry.seen = self.successes
            self.held[entry.id] = entry
        if group is not None:
            group.entries.extend(new)
        elif new:
            group = _Group(new, due)
            self.groups.append(group)
        return group

    async def run(self) -> None:
        owner = self.owner
        # After a restart in this process: what this consumer was given before.
        self.hold(await self.backend.own_pending(owner.max_in_flight), 0.0)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._keepalive)
            backoff = owner.retry_backoff
            lost = False
            while True:
                try:
                    if lost:
                        # A read whose reply was lost delivered writes we never saw: they are ours.
                        self.hold(await self.backend.own_pending(owner.max_in_flight), 0.0)
                        lost = False
                    await self._cycle()
                    backoff = owner.retry_backoff
                except StoreError as exc:
                    # Redis is down or slow: everything held stays held, the stream keeps the rest.
                    logger.warning("cachemw: write-behind %s: %s; trying again in %.2fs", owner.name, exc, backoff)
                    lost = True
                    if _group_lost(exc):
                        # What Redis still has (and puts since) would wait for ever: read it from the start.
                        with contextlib.suppress(StoreError):
                            await self.backend.join()
                            logger.warning("cachemw: write-behind %s: Redis lost the consumer group, and with it "
                                           "any writes it did not keep; made it again", owner.name)
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, owner.max_backoff)

    async def _cycle(self) -> None:
        owner = self.owner
        now = anyio.current_time()
        if now >= self.next_claim:
            self.next_claim = now + owner.claim_idle / 2
            await self._claim()
        await self._read()
        now = anyio.current_time()
        for group in [g for g in self.groups if g.due <= now]:
            if group in self.groups:  # not emptied by a newer write of its keys meanwhile
                await self._flush_group(group)

    async def _claim(self) -> None:
        owner = self.owner
        room = owner.max_in_flight - len(self.held)
        if room <= 0:
            return
        claimed = [e for e in await self.backend.claim(room, owner.claim_idle) if e.id not in self.held]
        if not claimed:
            return
        logger.info("cachemw: write-behind %s: took over %d writes from a flusher that stopped", owner.name,
                    len(claimed))
        await self.backend.count(claimed=len(claimed))
        fresh = []
        for entry in claimed:
            if entry.deliveries > owner.max_attempts:
                await self._bury(entry, [], f"delivered {entry.deliveries} times: each flusher holding it stopped "
                                 "(crashed or hung) before acknowledging it", entry.deliveries)
            else:
                fresh.append(entry)
        self.hold(fresh, 0.0)

    async def _read(self) -> None:
        """Read new writes into a group: until ``batch_size`` or ``batch_delay`` after the first came."""
        owner = self.owner
        room = min(owner.batch_size, owner.max_in_flight - len(self.held))
        now = anyio.current_time()
        wake = min([g.due for g in self.groups] + [self.next_claim, now + _MAX_BLOCK])
        wait = max(0.0, wake - now)
        if room <= 0:
            await anyio.sleep(wait)  # holding all we may: nothing to do until a retry is due
            return
        group = self.hold(await self.backend.read(room, wait), 0.0)
        if group is None or owner.batch_delay <= 0:
            return
        deadline = anyio.current_time() + owner.batch_delay
        while len(group.entries) < room:
            left = deadline - anyio.current_time()
            if left < 0.001:
                return
            more = await self.backend.read(room - len(group.entries), left)
            if not more:
                return
            self.hold(more, 0.0, group)

    async def _keepalive(self) -> None:
        while True:
            await anyio.sleep(max(0.01, self.owner.claim_idle / 3))
            if self.held:
                try:
                    await self.backend.keepalive(list(self.held))
                except StoreError as exc:
                    logger.debug("cachemw: write-behind %s: keepalive failed: %s", self.owner.name, exc)

    async def _flush_group(self, group: _Group) -> None:
        self.groups.remove(group)
        try:
            await self._flush_entries(group)
        except StoreError:
            # Whatever was neither acknowledged nor regrouped goes back, to be flushed again.
            grouped = {e.id for g in self.groups for e in g.entries}
            left = [e for e in group.entries if e.id in self.held and e.id not in grouped]
            if left:
                self.groups.append(_Group(left, anyio.current_time() + self.owner.retry_backoff, group.failures))
            raise

    async def _flush_entries(self, group: _Group) -> None:
        owner = self.owner
        winners, older = _coalesce(group.entries)
        writes: list[Write[V]] = []
        flushed: list[_Entry] = []
        for entry in winners:
            try:
                value = owner.serializer.loads(entry.data)
            except Exception as exc:  # undecodable now means undecodable for ever: nothing to retry
                await self._bury(entry, older[entry.key], f"cannot decode the value: {exc!r}"[:1000], 0)
                continue
            flushed.append(entry)
            writes.append(Write(entry.key, value, entry.version, _stream_time(entry.id), len(older[entry.key])))
        if not writes:
            return
        entries = [e for w in flushed for e in (w, *older[w.key])]
        try:
            with anyio.fail_after(owner.flush_timeout):
                await self.flush(writes)
        except Exception as exc:  # the barrier: the database's failure is ours to retry
            await self._failed(_Group(entries, 0.0, group.failures), _describe(exc, owner.flush_timeout), exc)
            return
        self.successes += 1
        recovered, self.failing = self.failing, 0
        if recovered:
            logger.info("cachemw: write-behind %s: flushing works again (after %d failed flushes)", owner.name,
                        recovered)
        # Flushed but not acknowledged (Redis failed here) means flushed again later: at least once.
        await self.backend.ack(entries, flushed, owner.retain)
        for entry in entries:
            del self.held[entry.id]
        await self._drop_superseded({w.key: w.version for w in flushed})
        self._resume(recovered > 0)

    def _resume(self, recovered: bool) -> None:
        """The database takes writes: what waits for a retry goes now, re-batched after an outage."""
        if not self.groups:
            return
        now = anyio.current_time()
        if recovered:
            # Groups split during an outage become batches again; suspects stay alone.
            merged = [e for g in self.groups if all(e.counted == 0 for e in g.entries) for e in g.entries]
            merged_ids = {e.id for e in merged}
            self.groups = [g for g in self.groups if not any(e.id in merged_ids for e in g.entries)]
            size = self.owner.batch_size
            self.groups += [_Group(merged[i:i + size], now) for i in range(0, len(merged), size)]
        for group in self.groups:
            group.due = min(group.due, now)

    async def _drop_superseded(self, flushed: dict[str, int]) -> None:
        """Held entries older than a version just flushed are done: acknowledge them without flushing."""
        stale = [e for g in self.groups for e in g.entries if flushed.get(e.key, -1) >= e.version]
        if not stale:
            return
        await self.backend.ack(stale, [], None)
        gone = {e.id for e in stale}
        for group in self.groups:
            group.entries = [e for e in group.entries if e.id not in gone]
        self.groups = [g for g in self.groups if g.entries]
        for entry_id in gone:
            del self.held[entry_id]

    async def _failed(self, group: _Group, error: str, exc: Exception) -> None:
        owner = self.owner
        self.failing += 1
        now = anyio.current_time()
        if now >= self.next_warning:  # an outage (or a poison write) would log every retry otherwise
            self.next_warning = now + 30.0
            logger.warning("cachemw: write-behind %s: flush failed (%s); retrying with backoff", owner.name, error,
                           exc_info=not isinstance(exc, TimeoutError))
        else:
            logger.debug("cachemw: write-behind %s: flush failed again (%s)", owner.name, error)
        entries = group.entries
        for entry in entries:
            entry.failures += 1
        failures = group.failures + 1
        due = now + self._backoff(failures)
        keys = list(dict.fromkeys(e.key for e in entries))
        retried = len(entries)
        if len(keys) > 1:
            first = set(keys[: len(keys) // 2])
            self.groups.append(_Group([e for e in entries if e.key in first], due, failures))
            self.groups.append(_Group([e for e in entries if e.key not in first], due, failures))
        else:
            winners, older = _coalesce(entries)
            winner = winners[0]
            # Poison or outage? Only a failure while the database accepted other writes counts.
            if self.successes > winner.seen:
                winner.counted += 1
            winner.seen = self.successes
            if winner.counted >= owner.max_attempts:
                retried = 0
                await self._bury(winner, older[winner.key], error, winner.failures)
            else:
                self.groups.append(_Group(entries, due, failures))
        with contextlib.suppress(StoreError):  # a metric: not worth failing the loop for
            await self.backend.count(failed_flushes=1, retried=retried)

    def _backoff(self, failures: int) -> float:
        owner = self.owner
        delay = min(owner.max_backoff, owner.retry_backoff * math.pow(2, min(failures - 1, 60)))
        return delay * random.uniform(0.5, 1.0)  # spread the retries of many flushers

    async def _bury(self, winner: _Entry, older: Sequence[_Entry], error: str, attempts: int) -> None:
        await self.backend.dead_letter(winner, older, error, attempts)
        for entry in (winner, *older):
            self.held.pop(entry.id, None)
        logger.warning("cachemw: write-behind %s: the write of key %r (version %d) moved to the dead-letter stream "
                       "after %d attempts: %s", self.owner.name, winner.key, winner.version, attempts, error)

    async def finish(self) -> None:
        """At shutdown: one more try for what is held, then what is left in the stream while flushes work."""
        # A read cancelled by the shutdown may have been delivered without us seeing the reply.
        self.hold(await self.backend.own_pending(self.owner.max_in_flight), 0.0)
        tried_ok = not self.groups
        for group in list(self.groups):
            if group in self.groups:
                before = self.successes
                await self._flush_group(group)
                tried_ok = tried_ok or self.successes > before
        if not tried_ok:
            return
        while True:
            entries = await self.backend.read(self.owner.batch_size, 0)
            if not entries:
                return
            self.hold(entries, 0.0)
            before = self.successes
            await self._flush_group(self.groups[-1])
            if self.successes == before:
                return  # the database refuses: the rest stays in the stream for the next start


# -- the public face -----------------------------------------------------------------------------


class WriteBehind(Generic[V]):
    """A named write-behind queue: ``put``/``get`` in requests, ``flush`` batches later.

    ``flush`` may be None in processes that only put (a flusher runs elsewhere).
    Without ``redis_url`` it takes the one it is attached with (the middleware's);
    None there means the in-process memory backend (see the module docstring).

    Tuning: ``batch_size`` writes or ``batch_delay`` seconds make a batch;
    ``max_attempts`` failures alone (while others succeed) dead-letter a write;
    retries wait ``retry_backoff`` doubling up to ``max_backoff``; a flusher's
    writes are claimed by another after ``claim_idle`` seconds without sign of
    life; a flush taking longer than ``flush_timeout`` failed; at most
    ``max_in_flight`` writes are held in memory (the rest waits in Redis);
    ``retain`` seconds after its latest version reached the database a value
    expires from Redis (None: kept), after which ``get`` returns None and the
    database has it; ``timeout`` bounds ``put``/``get``; ``grace_period`` bounds
    the last flush at shutdown (default: the supervisor's).
    """

    def __init__(
        self,
        name: str,
        flush: FlushFunction[V] | None = None,
        *,
        redis_url: str | None = None,
        key_prefix: str | None = None,
        serializer: Serializer[V] | None = None,
        batch_size: int = 100,
        batch_delay: float = 0.05,
        max_attempts: int = 10,
        retry_backoff: float = 0.1,
        max_backoff: float = 30.0,
        claim_idle: float = 30.0,
        flush_timeout: float = 30.0,
        max_in_flight: int | None = None,
        retain: float | None = None,
        timeout: float = 1.0,
        grace_period: float | None = None,
    ) -> None:
        # No braces: the name is the Redis Cluster hash tag, and the prefix comes before it.
        if not _NAME.fullmatch(name):
            raise ValueError(f"write-behind name {name!r}: expected 1 to 64 of A-Z a-z 0-9 _ . : -")
        if key_prefix is not None and not _NAME.fullmatch(key_prefix):
            raise ValueError(f"key_prefix {key_prefix!r}: expected 1 to 64 of A-Z a-z 0-9 _ . : -")
        for label, number in (("batch_delay", batch_delay), ("retry_backoff", retry_backoff),
                              ("max_backoff", max_backoff)):
            if not 0 <= number < math.inf:
                raise ValueError(f"{label} must be a number of seconds >= 0, got {number!r}")
        for label, number in (("claim_idle", claim_idle), ("flush_timeout", flush_timeout), ("timeout", timeout)):
            if not 0 < number < math.inf:
                raise ValueError(f"{label} must be a number of seconds > 0, got {number!r}")
        if retain is not None and not 0 < retain < math.inf:
            raise ValueError(f"retain must be None or a number of seconds > 0, got {retain!r}")
        if grace_period is not None and not 0 <= grace_period < math.inf:
            raise ValueError(f"grace_period must be None or a number of seconds >= 0, got {grace_period!r}")
        if batch_size < 1 or max_attempts < 1:
            raise ValueError("batch_size and max_attempts must be at least 1")
        self.name = name
        self._flush = flush
        self.serializer: Serializer[V] = serializer if serializer is not None else JsonSerializer()
        self.batch_size = batch_size
        self.batch_delay = batch_delay
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.max_backoff = max(max_backoff, retry_backoff)
        self.claim_idle = claim_idle
        self.flush_timeout = flush_timeout
        self.max_in_flight = max(max_in_flight if max_in_flight is not None else 10 * batch_size, batch_size)
        self.retain = retain
        self.timeout = timeout
        self.grace_period = grace_period
        self._grace = 10.0 if grace_period is None else grace_period
        self._explicit_url = redis_url
        self._explicit_prefix = key_prefix
        self._settings: tuple[str | None, str] | None = None
        self._backend: _Backend | None = None
        # One consumer name per object: a flusher restarted in this process finds its own pending writes.
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._stop_scope: anyio.CancelScope | None = None
        self._stopped: anyio.Event | None = None
        self._stopping = False
        if redis_url is not None:
            self._configure(None, None)

    # -- wiring ----------------------------------------------------------------------------------

    def _configure(self, redis_url: str | None, key_prefix: str | None) -> None:
        url = self._explicit_url if self._explicit_url is not None else redis_url
        prefix = self._explicit_prefix or key_prefix or "cachemw"
        if self._settings is not None:
            if self._settings != (url, prefix):
                raise ValueError(
                    f"write-behind {self.name!r} already uses {'Redis' if self._settings[0] else 'memory'} with "
                    f"prefix {self._settings[1]!r}; it cannot switch to another store or prefix. HINT: create one "
                    "WriteBehind per app, or pass redis_url= and key_prefix= to WriteBehind itself.")
            return
        if url is not None:
            self._backend = _RedisBackend(url, _Keys(prefix, self.name), self.consumer, self.timeout)
        else:
            self._backend = _MemoryBackend()
        self._settings = (url, prefix)

    @property
    def backend(self) -> str | None:
        """``"redis"``, ``"memory"``, or None before it is attached."""
        return None if self._backend is None else self._backend.kind

    def attach(self, supervisor: Supervisor, *, redis_url: str | None = None, key_prefix: str | None = None) -> None:
        """Run the flusher as a service of ``supervisor``; take its app's Redis unless given one.

        ``CacheMiddleware(write_behind=[...])`` calls this with its settings.
        """
        self._configure(redis_url, key_prefix)
        self._stopping = False
        if self.grace_period is None:
            self._grace = supervisor.grace_period
        if self._flush is not None:
            supervisor.add_service(f"writebehind:{self.name}", self.run_flusher)

    @asynccontextmanager
    async def running(self, *, redis_url: str | None = None,
                      key_prefix: str | None = None) -> AsyncIterator[WriteBehind[V]]:
        """For apps without the middleware: ``async with carts.running(redis_url=...):`` in the lifespan.

        The flusher runs (restarted if it fails) until the block ends, then flushes
        what it can within the grace period.
        """
        supervisor = Supervisor(grace_period=self._grace)
        self.attach(supervisor, redis_url=redis_url, key_prefix=key_prefix)
        try:
            async with supervisor.run():
                yield self
                await self.stop()
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()

    def _require_backend(self) -> _Backend:
        if self._backend is None:
            raise RuntimeError(
                f"write-behind {self.name!r} has no store yet. HINT: pass it to CacheMiddleware(write_behind=[...]), "
                "call attach(supervisor, redis_url=...), use `async with writes.running(redis_url=...)`, or give "
                "WriteBehind a redis_url.")
        return self._backend

    async def run_flusher(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The flusher, until cancelled or ``stop()``; then it flushes what it can within the grace period."""
        flush = self._flush
        if flush is None:
            raise RuntimeError(f"write-behind {self.name!r} has no flush function. HINT: WriteBehind(name, "
                               "flush=save_batch) in the process that runs the flusher.")
        if self._stop_scope is not None:
            raise RuntimeError(f"the flusher of write-behind {self.name!r} is already running")
        backend = self._require_backend()
        if self._stopping:
            task_status.started()
            return
        await backend.join()
        flusher = _Flusher(self, backend, flush)
        scope = self._stop_scope = anyio.CancelScope()
        stopped = self._stopped = anyio.Event()
        task_status.started()
        try:
            with scope:
                await flusher.run()
        finally:
            self._stop_scope = None
            with anyio.CancelScope(shield=True):
                await self._finish(flusher, backend)
                stopped.set()

    async def _finish(self, flusher: _Flusher[V], backend: _Backend) -> None:
        with anyio.move_on_after(self._grace):
            try:
                await flusher.finish()
            except StoreError as exc:
                logger.warning("cachemw: write-behind %s: last flush at shutdown failed: %s", self.name, exc)
        try:
            left = await backend.leave()
        except StoreError as exc:
            logger.warning("cachemw: write-behind %s: %s", self.name, exc)
            return
        if left and backend.kind == "memory":
            logger.warning("cachemw: write-behind %s: %d writes were never flushed and are lost with this "
                           "process (memory backend)", self.name, left)
        elif left:
            logger.info("cachemw: write-behind %s: %d writes left in Redis; another flusher takes them over after "
                        "%.0fs", self.name, left, self.claim_idle)

    async def stop(self) -> None:
        """Stop the flusher after one last flush (within the grace period); returns when it is done."""
        self._stopping = True
        scope, stopped = self._stop_scope, self._stopped
        if scope is None or stopped is None:
            return
        scope.cancel()
        await stopped.wait()

    async def aclose(self) -> None:
        """Close the Redis connections (they reopen if used again)."""
        if self._backend is not None:
            await self._backend.aclose()

    # -- reading and writing ---------------------------------------------------------------------

    async def put(self, key: str, value: V, *, if_version: int | None = None) -> int:
        """Store ``value``: readable at once from every server, durable in Redis, flushed later.

        Returns the write's version. ``if_version`` writes only if the key is at
        that version (0: absent), else raises ``VersionConflict``. A ``StoreError``
        (Redis down or slow) leaves it unknown whether the write happened:
        putting the same value again is safe.
        """
        _check_key(key)
        data = self.serializer.dumps(value)
        done, version = await self._require_backend().put(key, data, if_version)
        if not done:
            raise VersionConflict(key, if_version or 0, version)
        return version

    async def get(self, key: str) -> V | None:
        """The latest value put, from any server; None if there is none (or ``retain`` let it expire)."""
        value, _ = await self.get_versioned(key)
        return value

    async def get_versioned(self, key: str) -> tuple[V | None, int]:
        """The value and its version (0 when absent), for ``put(..., if_version=...)``."""
        _check_key(key)
        data, version = await self._require_backend().get(key)
        if data is None:
            return None, 0
        return self.serializer.loads(data), version

    async def update(self, key: str, change: Callable[[V | None], Awaitable[V]], *, attempts: int = 16) -> V:
        """Read, ``change``, put if nobody wrote the key meanwhile, else again: no lost updates across servers.

        ``change`` gets None when the key is absent (load it from the database then).
        """
        for attempt in range(max(1, attempts)):
            current, version = await self.get_versioned(key)
            value = await change(current)
            try:
                await self.put(key, value, if_version=version)
            except VersionConflict:
                if attempt + 1 >= attempts:
                    raise
                continue
            return value
        raise AssertionError("unreachable")  # pragma: no cover

    # -- operating -------------------------------------------------------------------------------

    async def status(self) -> WriteBehindStatus:
        """Backlog, lag and counters, shared by every process on this Redis."""
        return await self._require_backend().status(self.name)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters."""
        return await self._require_backend().dead_letters(limit)

    async def retry_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        """Move dead letters (all, or these ids) back to the stream; returns how many moved.

        Each keeps its version, so one superseded meanwhile cannot overwrite the newer value.
        """
        return await self._require_backend().requeue(ids)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not 0 < len(key) <= _MAX_KEY_LENGTH:
        raise ValueError(f"write-behind keys are strings of 1 to {_MAX_KEY_LENGTH} characters, got {key!r:.80}")

