"""fastapi-cache2 on Redis, set up as its README shows (``FastAPICache.init(RedisBackend(redis))`` in
the lifespan, ``redis.asyncio.from_url``, ``@cache(expire=...)`` under the route decorator).

- ``/item/{id}``: ``@cache(expire=3600)`` over the 20 ms handler of ``peer_fastapi``;
- ``/slow/{id}``: the same with a 200 ms handler (the stampede test);
- ``/_calls``: uncached counters.

Hits carry ``X-FastAPI-Cache: HIT`` (the library's header). The Redis URL comes from
``BENCH_REDIS_URL``. Serve: ``BENCH_REDIS_URL=redis://127.0.0.1:PORT/0 uvicorn
peer_fastapi_cache2:app --app-dir bench/apps``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import peer_common
from fastapi import FastAPI
from fastapi_cache import FastAPICache
from fastapi_cache.backends.redis import RedisBackend
from fastapi_cache.decorator import cache
from redis import asyncio as aioredis

REDIS_URL = os.environ["BENCH_REDIS_URL"]


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    redis = aioredis.from_url(REDIS_URL)
    FastAPICache.init(RedisBackend(redis), prefix="fastapi-cache")
    yield
    await redis.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/item/{id}")
@cache(expire=3600)
async def item(id: int):
    await peer_common.database("item")
    return peer_common.payload(id)


@app.get("/slow/{id}")
@cache(expire=3600)
async def slow(id: int):
    await peer_common.database("slow", peer_common.SLOW_DB_SECONDS)
    return peer_common.payload(id)


@app.get("/_calls")
async def handler_calls():
    return peer_common.calls_document()
