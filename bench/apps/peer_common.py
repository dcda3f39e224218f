"""What every app of ``bench/peers.py`` shares: the body, the "database", the counters, GC accounting.

Every app serves ``GET /item/{id}`` (or a variant path) with the same ~1 KB JSON
document; a cached route's handler sleeps ``DB_SECONDS`` (the database) before
answering, so it costs 20 ms whenever it runs, i.e. on a miss. ``/slow/{id}``
handlers sleep ``SLOW_DB_SECONDS`` (the stampede test: 200 requests arrive on one
cold key while the first one is still in the database).

``/_calls`` (uncached, on every app) answers how often each handler ran and the
time the cyclic garbage collector took so far; the harness reads it before and
after each run (a hit run must not move the handler counters).

Only the standard library here: each app module imports just its own framework
and cache library, so no process carries another library's objects (they would
show up in its GC pauses).
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

DB_SECONDS = 0.020
SLOW_DB_SECONDS = 0.200
BODY_BYTES = 1024

calls: dict[str, int] = {}

gc_stats: dict[str, list[float]] = {"collections": [0, 0, 0], "seconds": [0.0, 0.0, 0.0]}
_gc_started = [0.0]


def _gc_callback(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        generation = info["generation"]
        gc_stats["collections"][generation] += 1
        gc_stats["seconds"][generation] += time.perf_counter() - _gc_started[0]


gc.callbacks.append(_gc_callback)


def payload(item_id: int) -> dict[str, Any]:
    """The document for one id: ~1 KB once serialized compactly (the same size for every app)."""
    doc: dict[str, Any] = {"id": item_id, "name": f"item {item_id}", "price": 12.5, "tags": ["a", "b"],
                           "padding": ""}
    size = len(json.dumps(doc, separators=(",", ":")).encode())
    doc["padding"] = "x" * max(0, BODY_BYTES - size)
    return doc


def payload_bytes(item_id: int) -> bytes:
    return json.dumps(payload(item_id), separators=(",", ":")).encode()


def count(name: str) -> None:
    calls[name] = calls.get(name, 0) + 1


async def database(name: str, seconds: float = DB_SECONDS) -> None:
    """The handler's trip to the database: counted, then ``seconds`` of waiting."""
    count(name)
    await asyncio.sleep(seconds)


def calls_document() -> dict[str, Any]:
    return {"calls": dict(calls), "gc": gc_stats, "frozen": gc.get_freeze_count()}


def freeze() -> dict[str, Any]:
    """``gc.collect(); gc.freeze()``: everything alive now leaves the collector's view (the labelled variant)."""
    gc.collect()
    gc.freeze()
    return calls_document()


def calls_json() -> bytes:
    return json.dumps(calls_document()).encode()


def lazy_apps(namespace: dict[str, Any], factories: Mapping[str, Callable[[], Any]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` building each app on first access (uvicorn's import), so importing the
    module for its helpers builds nothing and needs no Redis URL."""

    def build(name: str) -> Any:
        factory = factories.get(name)
        if factory is None:
            raise AttributeError(name)
        application = factory()
        namespace[name] = application
        return application

    return build
