"""FastAPI without any cache: the baseline of the miss runs and of the like-for-like hit rows.

- ``/item/{id}``: sleeps 20 ms (the database), then returns the ~1 KB document, the
  same handler the cached FastAPI apps wrap;
- ``/fast/{id}``: the same document without the sleep (what a FastAPI route costs:
  the floor under any cache that sits inside the handler).

Serve: ``uvicorn peer_fastapi:app --app-dir bench/apps``.
"""

from __future__ import annotations

import peer_common
from fastapi import FastAPI

app = FastAPI()


@app.get("/item/{id}")
async def item(id: int):
    await peer_common.database("item")
    return peer_common.payload(id)


@app.get("/fast/{id}")
async def fast(id: int):
    peer_common.count("fast")
    return peer_common.payload(id)


@app.get("/_calls")
async def handler_calls():
    return peer_common.calls_document()


@app.get("/_gc_freeze")
async def gc_freeze():
    return peer_common.freeze()
