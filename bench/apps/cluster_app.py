"""Benchmark app for ``bench/cluster.py``: one cached route on whatever Redis ``CACHEMW_REDIS_URL`` names.

- ``GET /item/{id}``: ``@cache(ttl="1h")``; the handler sleeps 20 ms (the database)
  and answers a ~1 KB JSON document. After one request per id every request is a HIT.
- ``GET /_calls``: uncached; how many times the item handler ran, summed over all
  uvicorn workers, plus the answering worker's pid and its GC totals.

The store comes from the environment: ``CacheMiddleware()`` is given no URL, so it
reads ``CACHEMW_REDIS_URL`` (``redis://...`` for one server, ``redis+cluster://h:p,h:p``
for a Redis Cluster). Without it the app refuses to start: numbers measured on the
in-process memory store would say nothing about Redis.

Handler counts across workers: with ``--workers N`` each worker is its own process,
so a worker writes its own count to ``$CACHEMW_BENCH_CALLS_DIR/<pid>`` whenever the
handler runs (misses only: a hit never writes), and ``/_calls`` sums the files.
Without ``CACHEMW_BENCH_CALLS_DIR`` only the answering worker's count is known.

Serve: ``CACHEMW_REDIS_URL=redis://127.0.0.1:PORT/0 uvicorn cluster_app:app --app-dir bench/apps``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import peer_common
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, cache

__all__ = ["DB_SECONDS", "create_app"]  # and `app`, built on first access

DB_SECONDS = peer_common.DB_SECONDS

_calls = [0]
_calls_dir = os.environ.get("CACHEMW_BENCH_CALLS_DIR") or None


class _RawJSON(JSONResponse):
    def render(self, content: object) -> bytes:
        assert isinstance(content, bytes)
        return content


def _record_call() -> None:
    _calls[0] += 1
    if _calls_dir is not None:
        path = Path(_calls_dir) / str(os.getpid())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(_calls[0]))
        tmp.replace(path)  # readers never see a half-written count


@cache(ttl="1h")
async def item(request: Request) -> Response:
    _record_call()
    await asyncio.sleep(DB_SECONDS)  # the database
    return _RawJSON(peer_common.payload_bytes(request.path_params["id"]))


def _total_calls() -> tuple[int, dict[str, int]]:
    if _calls_dir is None:
        return _calls[0], {str(os.getpid()): _calls[0]}
    per_worker: dict[str, int] = {}
    for path in Path(_calls_dir).iterdir():
        if path.name.isdigit():
            per_worker[path.name] = int(path.read_text() or 0)
    per_worker.setdefault(str(os.getpid()), _calls[0])
    return sum(per_worker.values()), per_worker


async def handler_calls(request: Request) -> Response:
    total, per_worker = _total_calls()
    return JSONResponse({"item": total, "per_worker": per_worker, "pid": os.getpid(), "gc": peer_common.gc_stats})


def create_app() -> Starlette:
    if not os.environ.get("CACHEMW_REDIS_URL"):
        raise RuntimeError("bench/apps/cluster_app.py: set CACHEMW_REDIS_URL=redis://HOST:PORT/DB or "
                           "redis+cluster://HOST:PORT,HOST:PORT (the benchmark measures cachemw on Redis)")
    return Starlette(
        routes=[Route("/item/{id:int}", item), Route("/_calls", handler_calls)],
        middleware=[Middleware(CacheMiddleware)],  # reads CACHEMW_REDIS_URL
    )


def __getattr__(name: str) -> Starlette:
    # ``app`` is built on first access (uvicorn's import), so importing the module
    # for its helpers does not need a Redis URL.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
