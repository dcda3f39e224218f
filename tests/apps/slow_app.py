"""An app for shutdown tests: slow handlers, and detached work that records when it ran."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, cache, detach

DONE_FILE = Path(os.environ.get("SLOW_APP_DONE_FILE", "/dev/null"))


async def record(name: str) -> None:
    await anyio.sleep(0.2)
    async with await anyio.open_file(DONE_FILE, "a") as fh:
        await fh.write(name + "\n")


@cache(ttl="5m")
async def slow(request: Request) -> Response:
    await anyio.sleep(0.5)
    detach(record, request.path_params["id"])
    return PlainTextResponse(f"slow {request.path_params['id']}")


async def ready(request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/slow/{id}", slow), Route("/ready", ready)])
app.add_middleware(CacheMiddleware)
