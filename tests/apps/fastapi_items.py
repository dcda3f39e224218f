"""A FastAPI server of the same site as ``flask_shop``: the same route and policy, its own handler."""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI

from cachemw import CacheMiddleware, Settings, cache

api = FastAPI()


@api.get("/ready")
async def ready() -> str:
    return "ok"


@api.get("/items/{item_id}")
@cache(ttl="5m", tags=["item:{item_id}"])
async def item(item_id: int) -> dict[str, Any]:
    return {"item": item_id, "made_by": "fastapi"}


app = CacheMiddleware(api, redis_url=os.environ.get("CACHEMW_REDIS_URL"), settings=Settings(store_timeout=0.5))
