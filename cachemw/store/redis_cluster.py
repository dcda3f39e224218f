"""What the single-server lock and fill scripts do, on a Redis Cluster.

There a miss's keys span slots (the entry's three share its hash tag; its tag indexes
and generations do not), so a script gets only the entry's keys, and a pipeline next
to it reads the generations and writes the indexes: one round trip per node instead
of one script.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from cachemw.core.keyspace import lock_key, wait_key
from cachemw.store.pipeline_cluster import PipelinedCluster
from cachemw.store.redis_loop import LoopClients
from cachemw.store.redis_scripts import FILL_ALL_SCRIPT, INDEX_SCRIPT, LOCK_ALL_SCRIPT, generation, millis

__all__ = ["fill_on_cluster", "lock_on_cluster", "lock_routed"]


async def lock_on_cluster(bound: LoopClients, key: str, ttl: float, generation_keys: Sequence[str], token: str,
                          timeout: float | None) -> tuple[bool, bytes | None, tuple[int, ...]]:
    """The lock script's ``(taken, value, generations)``, the generations read beside it."""
    client, gate = bound.lane(timeout)
    async with gate, client.pipeline(transaction=False) as pipe:
        # EVAL, not EVALSHA: a pipeline would ask SCRIPT EXISTS first (one more round trip);
        # Redis caches the compiled script by its text anyway.
        pipe.eval(LOCK_ALL_SCRIPT, 3, key, lock_key(key), wait_key(key), token, millis(ttl))
        for generation_key in generation_keys:
            pipe.get(generation_key)
        (taken, value, _), *generations = await pipe.execute()
    return bool(taken), value if isinstance(value, bytes) else None, tuple(generation(g) for g in generations)


async def lock_routed(routed: PipelinedCluster, script: Any, key: str, ttl: float, generation_keys: Sequence[str],
                      token: str) -> tuple[bool, bytes | None, tuple[int, ...]]:
    """``lock_on_cluster`` on the request path's connections: the script on the entry's node and each
    generation read on its own, all sent at once (one round trip), each within the budget."""
    locked, *generations = await asyncio.gather(
        routed.evalsha(script.sha, script.script, [key, lock_key(key), wait_key(key)], [token, millis(ttl)]),
        *(routed.get(generation_key) for generation_key in generation_keys))
    taken, value, _ = locked
    return bool(taken), value if isinstance(value, bytes) else None, tuple(generation(g) for g in generations)


async def fill_on_cluster(bound: LoopClients, key: str, value: bytes, ttl: float, token: str | None, channel: str,
                          tag_sets: Sequence[str], generation_keys: Sequence[str], generations: Sequence[int],
                          now: float, timeout: float | None) -> bool:
    """Store, index, then compare the generations read after: a fill an invalidation overtook is deleted again."""
    expires = now + ttl
    client, gate = bound.lane(timeout)
    async with gate:
        async with client.pipeline(transaction=False) as pipe:
            pipe.eval(FILL_ALL_SCRIPT, 3, key, lock_key(key), wait_key(key), value, millis(ttl),
                      token or "", channel, now, expires, millis(ttl + 60), 0)
            for tag_set in tag_sets:
                pipe.eval(INDEX_SCRIPT, 1, tag_set, key, expires, now, millis(ttl + 60))
            for generation_key in generation_keys:
                pipe.get(generation_key)
            replies: list[Any] = await pipe.execute()
        current = tuple(generation(g) for g in replies[len(replies) - len(generation_keys):])
        if current != tuple(generations):
            await client.delete(key)
            return False
    return True
