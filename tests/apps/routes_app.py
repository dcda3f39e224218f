"""A FastAPI app for tests of route matching, credentials and invalidation on real uvicorn servers.

Its "database" and its handler counts live in Redis, so every server process sees one truth.
Every answer says which process made it (``pid``): an entry made on one server and served by
another shows the first one's.
"""

# No `from __future__ import annotations`: FastAPI resolves the endpoints' annotations.

import os
from typing import Annotated

import redis.asyncio
from fastapi import Depends, FastAPI, Header
from fastapi.security import APIKeyHeader
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Host, Route, Router

from cachemw import CacheMiddleware, Settings, cache

URL = os.environ["CACHEMW_REDIS_URL"]
_db = redis.asyncio.Redis.from_url(URL)
PID = os.getpid()

api_key = APIKeyHeader(name="X-API-Key", auto_error=False)
app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


async def counted(name: str) -> int:
    return int(await _db.incr(f"routes:calls:{name}"))


@app.get("/me")
@cache(ttl="5m", private=True)
async def me(key: Annotated[str | None, Depends(api_key)]) -> dict[str, object]:
    """Per user: keyed on the API key (a FastAPI security scheme: a credential of this route)."""
    return {"user": key, "call": await counted(f"me:{key}"), "pid": PID}


@app.get("/offers")
@cache(ttl="5m")
async def offers(key: Annotated[str | None, Depends(api_key)]) -> dict[str, object]:
    """Shared: a request with an API key gets its own answer, never the shared entry."""
    return {"for": key or "everyone", "call": await counted("offers"), "pid": PID}


@app.get("/themed")
@cache(ttl="5m")
async def themed(x_theme: Annotated[str, Header()] = "light") -> dict[str, object]:
    """Shared, keyed on the header its handler reads."""
    return {"theme": x_theme, "pid": PID}


WRITES = ["POST", "PUT", "PATCH", "DELETE"]
SAFE = ["GET", "HEAD", "OPTIONS", "TRACE", "PURGE"]


@app.api_route("/things/{thing_id}", methods=[*SAFE, *WRITES])
@cache(ttl="5m", invalidates=["/things/{thing_id}"])
async def thing(thing_id: str, request: Request) -> Response:
    """One route for every method: writes bump the version, the rest only read it."""
    if request.method in WRITES:
        version = int(await _db.incr(f"routes:version:{thing_id}"))
    else:
        version = int(await _db.get(f"routes:version:{thing_id}") or 0)
    return JSONResponse({"id": thing_id, "version": version, "method": request.method, "pid": PID})


@app.get("/doc")
@cache(ttl="5m")
async def doc_get() -> Response:
    return PlainTextResponse("the document", headers={"x-handler": "get"})


@app.head("/doc")
@cache(ttl="5m")
async def doc_head() -> Response:
    return Response(headers={"x-handler": "head", "x-call": str(await counted("doc-head"))})


async def secret(request: Request) -> Response:
    """No policy: per API key, reached only with the api.test Host."""
    return PlainTextResponse(f"secret of {request.headers.get('x-api-key')}")


@cache(ttl="5m")
async def page(request: Request) -> Response:
    return JSONResponse({"page": request.path_params["page"], "pid": PID})


# A Host route first: the table cannot tell which requests it takes, so nothing under /h/ is cached.
app.mount("/h", Router([Host("api.test", Router([Route("/secret", secret)])), Route("/{page:path}", page)]))


@app.get("/ready")
async def ready() -> Response:
    return PlainTextResponse(str(PID))


# No L1 (sync 0): what one server invalidates, the other cannot serve after the response.
app.add_middleware(CacheMiddleware, settings=Settings(redis_url=URL, store_timeout=1.0))
