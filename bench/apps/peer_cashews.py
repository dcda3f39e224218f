"""cashews on Redis, set up as its README shows (``cache.setup("redis://...")`` at import,
``@cache(ttl=...)`` under the route decorator; all defaults: its own pool, ``protected=True``).

- ``/item/{id}``: ``@cache(ttl="1h")`` over the 20 ms handler of ``peer_fastapi``;
- ``/slow/{id}``: the same with a 200 ms handler (the stampede test);
- ``/_calls``: uncached counters.

cashews adds no response header: the harness tells hits by the handler counter.
The Redis URL comes from ``BENCH_REDIS_URL``. Serve: ``BENCH_REDIS_URL=redis://127.0.0.1:PORT/0
uvicorn peer_cashews:app --app-dir bench/apps``.
"""

from __future__ import annotations

import os

import peer_common
from cashews import cache
from fastapi import FastAPI

cache.setup(os.environ["BENCH_REDIS_URL"])

app = FastAPI()


@app.get("/item/{id}")
@cache(ttl="1h")
async def item(id: int):
    await peer_common.database("item")
    return peer_common.payload(id)


@app.get("/slow/{id}")
@cache(ttl="1h")
async def slow(id: int):
    await peer_common.database("slow", peer_common.SLOW_DB_SECONDS)
    return peer_common.payload(id)


@app.get("/_calls")
async def handler_calls():
    return peer_common.calls_document()
