"""A bare Starlette app: ``GET /item/{id}`` builds and answers the ~1 KB JSON document, no cache.

The reference for what a framework route costs, and the "without" side of the
no-policy comparison (``peer_cachemw:starlette_redis`` serves the same route with
the middleware in front). Serve: ``uvicorn peer_starlette:app --app-dir bench/apps``.
"""

from __future__ import annotations

import peer_common
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def item(request: Request) -> Response:
    return JSONResponse(peer_common.payload(request.path_params["id"]))


async def handler_calls(request: Request) -> Response:
    return JSONResponse(peer_common.calls_document())


async def gc_freeze(request: Request) -> Response:
    return JSONResponse(peer_common.freeze())


ROUTES = [Route("/item/{id:int}", item), Route("/_calls", handler_calls), Route("/_gc_freeze", gc_freeze)]

app = Starlette(routes=ROUTES)
