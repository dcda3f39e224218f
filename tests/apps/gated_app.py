"""An app for multi-server tests whose handlers the test holds: a read waits while ``test:gate`` is unset.

Its 'database' (versions, call counts, the gate) lives in Redis, so the test and every
server see one truth. /heard and /waiting tell the test what this server's cache has seen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import anyio
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache
from cachemw.asgi.middleware import current_cache

URL = os.environ["CACHEMW_REDIS_URL"]
_db = redis.asyncio.Redis.from_url(URL)
_heard: list[Sequence[str]] = []


async def _gate() -> None:
    while not await _db.exists("test:gate"):  # noqa: ASYNC110  (polls Redis: the test process opens the gate)
        await anyio.sleep(0.01)


@cache(ttl="5m", tags=["item:{id}"])
async def item(request: Request) -> Response:
    """The first read of an item is held by the gate: it is still in the handler when a write lands."""
    item_id = request.path_params["id"]
    version = int(await _db.get(f"test:version:{item_id}") or 0)
    if await _db.incr(f"test:reads:{item_id}") == 1:
        await _gate()
    return JSONResponse({"id": item_id, "version": version})


@cache("realtime", invalidates=["item:{id}"])
async def update(request: Request) -> Response:
    item_id = request.path_params["id"]
    return JSONResponse({"id": item_id, "version": await _db.incr(f"test:version:{item_id}")})


@cache(ttl="5m")
async def failing(request: Request) -> Response:
    """Every call waits for the gate, then fails: the herd behind it must not each call it again."""
    await _db.incr("test:calls:failing")
    await _gate()
    return PlainTextResponse("the database went away", status_code=500)


@cache(ttl="5m")
async def burst(request: Request) -> Response:
    """A read that takes a while, as a database's does, and counts itself: a herd must make one."""
    calls = await _db.incr(f"test:calls:burst:{request.path_params['id']}")
    await anyio.sleep(0.02)
    return JSONResponse({"id": request.path_params["id"], "call": calls})


async def ready(request: Request) -> Response:
    store = current_cache().store
    assert store is not None  # the store exists once the first request prepared it
    notifications = store.notifications
    if _heard.append not in notifications.on_invalidate:
        notifications.on_invalidate.append(_heard.append)
    return PlainTextResponse(str(os.getpid()))


async def heard(request: Request) -> Response:
    return JSONResponse([list(tags) for tags in _heard])


async def waiting(request: Request) -> Response:
    return JSONResponse(current_cache().metrics.waiting_on_fills)


app = Starlette(routes=[
    Route("/items/{id:int}", item, methods=["GET"]),
    Route("/items/{id:int}", update, methods=["POST"]),
    Route("/failing", failing),
    Route("/burst/{id:int}", burst),
    Route("/ready", ready),
    Route("/heard", heard),
    Route("/waiting", waiting),
])
# A lock that outlives the test: a request that waited on a fill it should not have joined would
# wait far past the test's deadline instead of being answered by a fill of its own.
app.add_middleware(CacheMiddleware, settings=Settings(
    redis_url=URL, lock_timeout=float(os.environ["TEST_LOCK_TIMEOUT"]),
    store_timeout=float(os.environ["TEST_STORE_TIMEOUT"]),
    background_timeout=float(os.environ.get("TEST_BACKGROUND_TIMEOUT", Settings().background_timeout))))
