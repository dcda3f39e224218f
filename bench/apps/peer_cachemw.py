"""cachemw apps of ``bench/peers.py``, built on first access (``uvicorn peer_cachemw:NAME``).

- ``fastapi_redis``: FastAPI + ``CacheMiddleware(redis_url=...)``, like for like with the
  peers: ``/item/{id}`` is ``@cache(ttl="1h")`` over the 20 ms handler of
  ``peer_fastapi``, ``/slow/{id}`` the same with a 200 ms handler (the stampede test);
- ``starlette_redis``: Starlette + ``CacheMiddleware(redis_url=...)``:
  ``/item/{id}`` has **no policy** (the handler of ``peer_starlette``, which serves the
  same route without the middleware), ``/hit/{id}`` is ``@cache(ttl="1h")`` (20 ms
  handler), ``/l1/{id}`` is ``@cache(ttl="1h", sync="1s")`` (the per-process L1 in
  front of Redis);
- ``starlette_redis_unfrozen``: ``starlette_redis`` with ``Settings(gc_freeze=False)`` (cachemw's
  gc.freeze() after startup switched off: the labelled variant);
- ``starlette_memory``: Starlette + ``CacheMiddleware()`` (no URL: the in-process memory
  store): ``/hit/{id}`` is ``@cache(ttl="1h")`` (20 ms handler);
- ``starlette_memory_inner``: ``starlette_memory`` with the middleware inside Starlette
  (``Middleware(CacheMiddleware)``, what ``app.add_middleware`` does) instead of wrapping it;
- ``starlette_without``: ``starlette_redis`` without the ``CacheMiddleware`` line (same
  imports, same routes): the "without" side of the no-policy comparison.

The other Starlette apps wrap: ``CacheMiddleware(Starlette(...))``, the outermost layer,
so a hit never enters Starlette (its ServerErrorMiddleware and send wrapper) at all.

Every app also has the uncached ``/_calls`` (handler counters, GC totals) and
``/_gc_freeze`` (``gc.collect(); gc.freeze()``, for the labelled gc.freeze variant).
The Redis URL comes from ``BENCH_REDIS_URL``; the harness also clears
``CACHEMW_REDIS_URL``, which cachemw would otherwise read (and the memory-store app
would then not be one).
"""

from __future__ import annotations

import os
from typing import Any

import peer_common
import peer_starlette
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache

__all__ = ["create_fastapi_redis", "create_starlette"]  # and the apps, built on first access


def _redis_url() -> str:
    url = os.environ.get("BENCH_REDIS_URL")
    if not url:
        raise RuntimeError("bench/apps/peer_cachemw.py: set BENCH_REDIS_URL=redis://HOST:PORT/DB")
    return url


def create_fastapi_redis(redis_url: str, settings: Settings | None = None) -> FastAPI:
    """``settings``: for bench/misspath.py under valgrind, whose store budget must allow for its slowness."""
    app = FastAPI()
    app.add_middleware(CacheMiddleware, redis_url=redis_url, settings=settings)

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

    @app.get("/_gc_freeze")
    async def gc_freeze():
        return peer_common.freeze()

    return app


@cache(ttl="1h")
async def hit(request: Request) -> Response:
    await peer_common.database("hit")
    return JSONResponse(peer_common.payload(request.path_params["id"]))


@cache(ttl="1h", sync="1s")
async def l1(request: Request) -> Response:
    await peer_common.database("l1")
    return JSONResponse(peer_common.payload(request.path_params["id"]))


def create_starlette(redis_url: str | None, *, middleware: bool = True, gc_freeze: bool = True,
                     wrap: bool = True) -> Any:
    """``/item/{id}`` first, as in ``peer_starlette``, so both routers try the same route first.

    ``middleware=False``: the same app, the same imports and routes, without the
    ``CacheMiddleware`` line (the "without" side of the no-policy comparison).
    ``wrap=True``: ``CacheMiddleware(Starlette(...))``, cachemw outermost (a hit never
    enters Starlette); ``False``: ``Starlette(middleware=[Middleware(CacheMiddleware)])``,
    inside Starlette's ServerErrorMiddleware, as ``app.add_middleware`` puts it.
    """
    routes = [peer_starlette.ROUTES[0], Route("/hit/{id:int}", hit)]
    if redis_url is not None:
        routes.append(Route("/l1/{id:int}", l1))
    routes += peer_starlette.ROUTES[1:]
    if not middleware:
        return Starlette(routes=routes)
    options: dict[str, Any] = {} if redis_url is None else {"redis_url": redis_url}
    if not gc_freeze:
        options["settings"] = Settings(gc_freeze=False)
    if wrap:
        return CacheMiddleware(Starlette(routes=routes), **options)
    return Starlette(routes=routes, middleware=[Middleware(CacheMiddleware, **options)])


_FACTORIES = {
    "fastapi_redis": lambda: create_fastapi_redis(_redis_url()),
    "starlette_redis": lambda: create_starlette(_redis_url()),
    "starlette_redis_unfrozen": lambda: create_starlette(_redis_url(), gc_freeze=False),
    "starlette_memory": lambda: create_starlette(None),
    "starlette_memory_inner": lambda: create_starlette(None, wrap=False),
    "starlette_without": lambda: create_starlette("redis://unused", middleware=False),
}

__getattr__ = peer_common.lazy_apps(globals(), _FACTORIES)
