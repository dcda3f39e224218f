"""Apps of ``bench/overload.py``: one FastAPI app per cache library, the same routes, on ``BENCH_REDIS_URL``.

``uvicorn overload_app:cachemw`` (or ``:fastapi_cache2``, ``:cashews``), built on
first access, so each process imports only its own library. Every app serves the
same ~1 KB document from a "database" that sleeps ``DB_SECONDS`` (20 ms) per call:

- ``/hot/{id}``: cached for an hour (the harness warms them first: hits);
- ``/cold/{id}``: cached for an hour, each id new when the load asks for it; the
  counts per id are what "one origin call per cold key per fleet" is measured on;
- ``/stale/{id}``: a short ttl (``STALE_TTL``, 2 s) so they go stale during a run;
  cachemw: ``stale_while_revalidate="1h"``; cashews: ``cache.early`` (answers the old
  value and recomputes in the background, its closest feature); fastapi-cache2 has
  none, so there they simply expire and are filled again;
- ``/_stats``: uncached; origin calls per kind and per cold id in this process, and
  for cachemw its own counters (breaker, store errors, loop-lag timeouts, origin_busy,
  shed jobs). The harness sums both servers.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import peer_common
from fastapi import FastAPI

__all__ = ["DB_SECONDS", "STALE_TTL"]  # and the apps, built on first access

DB_SECONDS = peer_common.DB_SECONDS
STALE_TTL = 2

calls: dict[str, int] = {"hot": 0, "cold": 0, "stale": 0}
cold_calls: dict[int, int] = {}


async def database(kind: str, item_id: int) -> dict[str, Any]:
    """The origin: counted per kind (and per id for cold keys), then 20 ms of waiting."""
    calls[kind] += 1
    if kind == "cold":
        cold_calls[item_id] = cold_calls.get(item_id, 0) + 1
    await asyncio.sleep(DB_SECONDS)
    return peer_common.payload(item_id)


def stats(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"pid": os.getpid(), "calls": dict(calls), "cold": {str(k): v for k, v in cold_calls.items()},
            "library": extra or {}, "gc": peer_common.gc_stats}


def _redis_url() -> str:
    url = os.environ.get("BENCH_REDIS_URL")
    if not url:
        raise RuntimeError("bench/apps/overload_app.py: set BENCH_REDIS_URL=redis://HOST:PORT/DB")
    return url


def _routes(app: FastAPI, cached: Callable[[str], Callable[[Any], Any]],
            library_stats: Callable[[], dict[str, Any]] = dict) -> FastAPI:
    """The three cached routes, ``cached(kind)`` being the library's decorator for that kind."""

    @app.get("/hot/{id}")
    @cached("hot")
    async def hot(id: int):
        return await database("hot", id)

    @app.get("/cold/{id}")
    @cached("cold")
    async def cold(id: int):
        return await database("cold", id)

    @app.get("/stale/{id}")
    @cached("stale")
    async def stale(id: int):
        return await database("stale", id)

    @app.get("/_stats")
    async def handler_stats():
        return stats(library_stats())

    return app


def create_cachemw() -> FastAPI:
    from cachemw import CacheMiddleware, cache
    from cachemw.observe import find_cache, snapshot

    app = FastAPI()
    app.add_middleware(CacheMiddleware, redis_url=_redis_url())

    def cached(kind: str) -> Callable[[Any], Any]:
        if kind == "stale":
            return cache(ttl=f"{STALE_TTL}s", stale_while_revalidate="1h")
        return cache(ttl="1h")

    def library_stats() -> dict[str, Any]:
        middleware = find_cache(app)
        data = snapshot(middleware)
        store = data["store"]
        return {"breaker": store["breaker"], "breaker_transitions": store["breaker_transitions"],
                "store_errors": store["errors"], "loop_lag_timeouts": getattr(middleware, "loop_lag_timeouts", None),
                "late_replies": store.get("late_replies"),
                "origin_busy": data["totals"]["origin_busy"], "collapsed": data["totals"]["collapsed"],
                "shed": data["supervisor"]["totals"]["shed"], "waiting_on_fills": store["waiting_on_fills"]}

    return _routes(app, cached, library_stats)


def create_fastapi_cache2() -> FastAPI:
    from fastapi_cache import FastAPICache
    from fastapi_cache.backends.redis import RedisBackend
    from fastapi_cache.decorator import cache
    from redis import asyncio as aioredis

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        redis = aioredis.from_url(_redis_url())
        FastAPICache.init(RedisBackend(redis), prefix="fastapi-cache")
        yield
        await redis.aclose()

    def cached(kind: str) -> Callable[[Any], Any]:
        return cache(expire=STALE_TTL if kind == "stale" else 3600)

    return _routes(FastAPI(lifespan=lifespan), cached)


def create_cashews() -> FastAPI:
    from cashews import cache

    cache.setup(_redis_url())

    def cached(kind: str) -> Callable[[Any], Any]:
        if kind == "stale":
            return cache.early(ttl="1h", early_ttl=f"{STALE_TTL}s")
        return cache(ttl="1h")

    return _routes(FastAPI(), cached)


_FACTORIES = {"cachemw": create_cachemw, "fastapi_cache2": create_fastapi_cache2, "cashews": create_cashews}

__getattr__ = peer_common.lazy_apps(globals(), _FACTORIES)
