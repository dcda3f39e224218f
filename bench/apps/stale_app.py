"""Benchmark app: a fresh HIT route and a stale-while-revalidate route, cachemw on Redis.

- ``/fresh/{id}``: ``@cache(ttl="1h")``, a fast handler. After one request per id
  every request is a HIT.
- ``/stale/{id}``: ``@cache(ttl="1ms", stale_while_revalidate="1h")``, a handler
  that sleeps 500 ms (the slow database). After one request per id every request
  is STALE (the entry is fresh for 1 ms only) and starts at most one background
  refresh per key, which takes 500 ms.
- ``/_calls``: uncached; how many times each handler ran, how many stale
  handlers are running right now (background refreshes in flight), and the
  garbage collector's collections and seconds per generation so far.

Both cached routes answer the same ~1 KB JSON body. The store comes from
``CACHEMW_REDIS_URL`` (or ``create_app(redis_url=...)``); without one the app
refuses to start, since numbers measured on the in-process memory store would
say nothing about Redis.

Serve: ``CACHEMW_REDIS_URL=redis://127.0.0.1:PORT/0 uvicorn stale_app:app --app-dir bench/apps``.
"""

from __future__ import annotations

import json
import os
import time

import anyio
import peer_common
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, cache

__all__ = ["SLOW_HANDLER_SECONDS", "create_app"]  # and `app`, built on first access

SLOW_HANDLER_SECONDS = 0.5
BODY_BYTES = 1024

calls = {"fresh": 0, "stale": 0, "stale_in_flight": 0}

def _payload(item_id: int) -> bytes:
    """~1 KB of JSON for one id (same size for both routes)."""
    doc = {"id": item_id, "name": f"item {item_id}", "generated_at": time.time(), "padding": ""}
    size = len(json.dumps(doc, separators=(",", ":")).encode())
    doc["padding"] = "x" * max(0, BODY_BYTES - size)
    return json.dumps(doc, separators=(",", ":")).encode()


class _RawJSON(JSONResponse):
    def render(self, content: object) -> bytes:
        assert isinstance(content, bytes)
        return content


@cache(ttl="1h")
async def fresh(request: Request) -> Response:
    calls["fresh"] += 1
    return _RawJSON(_payload(request.path_params["id"]))


@cache(ttl="1ms", stale_while_revalidate="1h")
async def stale(request: Request) -> Response:
    calls["stale"] += 1
    calls["stale_in_flight"] += 1
    try:
        await anyio.sleep(SLOW_HANDLER_SECONDS)  # the slow database
    finally:
        calls["stale_in_flight"] -= 1
    return _RawJSON(_payload(request.path_params["id"]))


async def handler_calls(request: Request) -> Response:
    # ``gc``: time in the cyclic garbage collector per generation (peer_common's hook): background
    # work that keeps objects alive for 500 ms (refreshes) makes collections of the older
    # generations more frequent and slower, and that pause lands on whatever request allocated.
    return JSONResponse({**calls, "gc": peer_common.gc_stats})


def create_app(redis_url: str | None = None) -> Starlette:
    url = redis_url or os.environ.get("CACHEMW_REDIS_URL")
    if not url:
        raise RuntimeError("bench/apps/stale_app.py: set CACHEMW_REDIS_URL=redis://HOST:PORT/DB "
                           "(the benchmark measures cachemw on Redis, not the memory store)")
    return Starlette(
        routes=[
            Route("/fresh/{id:int}", fresh),
            Route("/stale/{id:int}", stale),
            Route("/_calls", handler_calls),
        ],
        middleware=[Middleware(CacheMiddleware, redis_url=url)],
    )


def __getattr__(name: str) -> Starlette:
    # ``app`` is built on first access (uvicorn's import), so importing the module
    # for its helpers does not need a Redis URL.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
