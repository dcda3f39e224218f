"""A soft purge's work on Redis: each entry marked stale in place, on one server or a Cluster alike.

Beside ``RedisStore.invalidate`` and ``purge``, which hand it the keys they found: one
``SOFTEN_SCRIPT`` call per key, pipelined (500 at a time), so on a Cluster each runs in
its entry's slot and redis-py sends each node its share.
"""

from __future__ import annotations

from collections.abc import Sequence

from cachemw.store.redis_loop import LoopClients
from cachemw.store.redis_scripts import SOFTEN_SCRIPT, soften_args

__all__ = ["soften_each"]

_BATCH = 500


async def soften_each(bound: LoopClients, keys: Sequence[str | bytes], stale_from: float,
                      timeout: float | None) -> int:
    """Mark ``keys`` stale as of ``stale_from`` (those that cannot be served stale are deleted): how many were."""
    touched = 0
    args = soften_args(stale_from)
    client, gate = bound.lane(timeout)
    for start in range(0, len(keys), _BATCH):
        async with gate, client.pipeline(transaction=False) as pipe:
            for key in keys[start : start + _BATCH]:
                # EVAL, not EVALSHA: a pipeline would ask SCRIPT EXISTS first; Redis caches it by its text.
                pipe.eval(SOFTEN_SCRIPT, 1, key, *args)
            touched += sum(1 for reply in await pipe.execute() if reply)
    return touched
