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

# The modules, lowest first (each imports only those above it):
#   values      what users handle: Write, DeadLetter, WriteBehindStatus, VersionConflict, serializers  (pure)
#   validation  names, keys and tuning a queue accepts                                                  (pure)
#   rules       batching, coalescing, retry backoff, poison and dead-letter decisions                   (pure)
#   backend     the contract the flusher sees, and the counters                                         (pure)
#   replies     Redis stream replies decoded into those values                                          (pure)
#   scripts     the Lua scripts and how they run                                                        (Redis)
#   stream      the Redis backend: keys, stream, consumer group, clients                                (Redis)
#   memory      the in-process backend                                                                  (anyio)
#   flusher     the loop that reads, flushes, retries and acknowledges                                  (anyio)
#   writer      WriteBehind: put/get, the flusher as a supervisor service                               (anyio)
from cachemw.writebehind.values import (
    DeadLetter,
    FlushFunction,
    JsonSerializer,
    Serializer,
    VersionConflict,
    Write,
    WriteBehindStatus,
)
from cachemw.writebehind.writer import WriteBehind

__all__ = [
    "DeadLetter",
    "FlushFunction",
    "JsonSerializer",
    "Serializer",
    "VersionConflict",
    "Write",
    "WriteBehind",
    "WriteBehindStatus",
]
