"""A herd of misses on one key calls the origin once, also when that one call fails."""

from __future__ import annotations

import collections

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache
from tests.asgi import SpyStore, eventually, find_middleware, lifespan

pytestmark = pytest.mark.anyio

HERD = 60


class Origin:
    def __init__(self, failure: str) -> None:
        self.failure = failure
        self.calls = 0
        self.gate = anyio.Event()


def make_app(origin: Origin, store: SpyStore) -> Starlette:
    @cache(ttl="5m")
    async def hot(request: Request) -> Response:
        origin.calls += 1
        await origin.gate.wait()  # the herd gathers behind this first call
        if origin.failure == "raise":
            raise RuntimeError("the database went away")
        return PlainTextResponse("the database went away", status_code=500)

    app = Starlette(routes=[Route("/hot", hot)])
    app.add_middleware(CacheMiddleware, store=store, settings=Settings(lock_timeout=10.0, store_timeout=2.0))
    return app


@pytest.mark.parametrize("failure", ["raise", "500"])
async def test_a_failing_leader_does_not_release_its_herd_onto_the_origin(store: SpyStore, failure: str) -> None:
    origin = Origin(failure)
    app = make_app(origin, store)
    statuses: collections.Counter[int] = collections.Counter()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://testserver") as http, \
            anyio.create_task_group() as tg:
        async def one() -> None:
            statuses[(await http.get("/hot")).status_code] += 1

        for _ in range(HERD):
            tg.start_soon(one)
        await eventually(lambda: _true(find_middleware(app).metrics.waiting_on_fills == HERD - 1),
                         what="the herd waiting on the leader")
        origin.gate.set()
    assert statuses == {500: HERD}
    assert origin.calls == 1


async def _true(value: bool) -> bool:
    return value
