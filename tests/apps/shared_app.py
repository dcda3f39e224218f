"""An app for multi-process tests: its 'database' lives in Redis, so every worker process sees one truth
and the handler runs are counted across processes."""

from __future__ import annotations

import os

import anyio
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache

URL = os.environ["CACHEMW_REDIS_URL"]
_db = redis.asyncio.Redis.from_url(URL)


@cache(ttl="5m", sync="200ms", tags=["product:{id}"])
async def product(request: Request) -> Response:
    product_id = request.path_params["id"]
    await _db.incr(f"test:calls:{product_id}")
    await anyio.sleep(0.3)  # a slow query: concurrent misses pile up behind it
    version = int(await _db.get(f"test:version:{product_id}") or 0)
    return JSONResponse({"id": product_id, "version": version, "pid": os.getpid()})


@cache("realtime", invalidates=["product:{id}"])
async def update(request: Request) -> Response:
    product_id = request.path_params["id"]
    version = await _db.incr(f"test:version:{product_id}")
    return JSONResponse({"id": product_id, "version": version})


async def ready(request: Request) -> Response:
    return PlainTextResponse(str(os.getpid()))


app = Starlette(routes=[
    Route("/products/{id:int}", product, methods=["GET"]),
    Route("/products/{id:int}", update, methods=["POST"]),
    Route("/ready", ready),
])
# A generous store budget: these tests are about coordination, and the test machine runs four
# workers and the load generator on two cores (budgets under faults are tested elsewhere).
app.add_middleware(CacheMiddleware, settings=Settings(redis_url=URL, store_timeout=1.0))
