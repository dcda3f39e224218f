"""Benchmark app for ``bench/staleness.py``: an entry that carries its version, and a route that purges it.

- ``GET /item/{id}``: ``@cache(ttl="1h", sync=STALENESS_SYNC, tags=["item:{id}"])``; the body is
  ``{"id": ..., "v": VERSION}``, the version read from a file both servers map (the database).
- ``POST /purge/{id}``: bumps the version in that file, then ``invalidate(tags=["item:{id}"])``;
  answers ``{"v": new version, "t": CLOCK_MONOTONIC in ns when invalidate() returned}``.
- Every response carries ``x-served-at``: CLOCK_MONOTONIC in ns as its head was sent (one clock for
  every process of the machine), so the harness knows when B answered from the old copy.

Environment: ``CACHEMW_REDIS_URL``, ``STALENESS_VERSIONS`` (the file: 8 bytes per id),
``STALENESS_SYNC`` (seconds, default 1), ``STALENESS_TRACKING`` (``0``: Redis does not track
the entry keys for this server: the ``sync`` bound alone).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, RedisStore, Settings, cache, invalidate

__all__ = ["app"]

SYNC = float(os.environ.get("STALENESS_SYNC", "1"))
_file = open(os.environ["STALENESS_VERSIONS"], "r+b")  # noqa: SIM115 - lives as long as the process
_versions = mmap.mmap(_file.fileno(), 0)


def _version(item_id: int) -> int:
    return int(struct.unpack_from("<q", _versions, 8 * item_id)[0])


@cache(ttl="1h", sync=SYNC, tags=["item:{id}"])
async def item(request: Request) -> Response:
    item_id = request.path_params["id"]
    return JSONResponse({"id": item_id, "v": _version(item_id)})


async def purge(request: Request) -> Response:
    item_id = request.path_params["id"]
    new = _version(item_id) + 1  # one purger per id at a time: no lost update
    struct.pack_into("<q", _versions, 8 * item_id, new)
    await invalidate(tags=[f"item:{item_id}"])
    done = time.monotonic_ns()
    return Response(json.dumps({"v": new, "t": done}), media_type="application/json")


async def ready(request: Request) -> Response:
    return JSONResponse({"ok": True})


def _stamped(inner: Any) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return

        async def stamp(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                headers.append((b"x-served-at", str(time.monotonic_ns()).encode()))
                message = dict(message, headers=headers)
            await send(message)

        await inner(scope, receive, stamp)

    return app


def _create() -> Any:
    store = RedisStore.from_url(os.environ["CACHEMW_REDIS_URL"], timeout=0.05)
    if os.environ.get("STALENESS_TRACKING", "1") == "0":
        store.track(None)
    inner = Starlette(routes=[Route("/item/{id:int}", item), Route("/purge/{id:int}", purge, methods=["POST"]),
                              Route("/", ready)])
    inner.add_middleware(CacheMiddleware, store=store, settings=Settings(store_timeout=0.05))
    return _stamped(inner)


app = _create()
