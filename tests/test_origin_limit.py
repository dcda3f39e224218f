"""The bound on concurrent origin calls: past it, a stale entry answers, or a 503 with Retry-After."""

from __future__ import annotations

import collections

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache
from tests.asgi import Gate, SpyStore, client, eventually, lifespan
from tests.budgets import Budgets
from tests.test_freshness import age_entry

pytestmark = pytest.mark.anyio


def make_app(origin: Gate, store: SpyStore, **settings: object) -> Starlette:
    @cache(ttl="5m")
    async def item(request: Request) -> Response:
        await origin.wait()
        return PlainTextResponse(f"item {request.path_params['n']}")

    @cache(ttl="1m", stale_if_error="1h", origin_concurrency=1)
    async def report(request: Request) -> Response:
        await origin.wait()
        return PlainTextResponse(f"report {request.path_params['n']}")

    app = Starlette(routes=[Route("/items/{n}", item), Route("/reports/{n}", report)])
    app.add_middleware(CacheMiddleware, store=store, settings=Settings(store_timeout=2.0, **settings))  # type: ignore[arg-type]
    return app


async def test_past_the_bound_misses_wait_then_get_503_with_retry_after(store: SpyStore, budgets: Budgets) -> None:
    origin = Gate()
    app = make_app(origin, store, origin_concurrency=2, origin_wait=0.2, retry_after=7)
    answers: collections.Counter[tuple[int, str | None]] = collections.Counter()
    async with lifespan(app), client(app) as http, anyio.create_task_group() as tg:
        async def one(n: int) -> None:
            response = await http.get(f"/items/{n}")
            answers[(response.status_code, response.headers.get("retry-after"))] += 1

        for n in range(10):
            tg.start_soon(one, n)
        await eventually(lambda: _true(answers[(503, "7")] == 8), timeout=budgets.condition,
                         what="eight requests turned away")
        assert origin.running == 2
        origin.open()
    assert answers == {(503, "7"): 8, (200, None): 2}
    assert origin.most == 2


async def test_a_request_with_a_stale_if_error_entry_gets_it_instead_of_waiting(store: SpyStore, budgets: Budgets
                                                                                 ) -> None:
    origin = Gate()
    origin.open()
    # A request that waited for the slot would wait origin_wait: far past the deadline below.
    app = make_app(origin, store, origin_wait=budgets.lock_timeout)
    async with lifespan(app), client(app) as http:
        assert (await http.get("/reports/1")).text == "report 1"
        await eventually(lambda: _true(bool(store.keys_set)), timeout=budgets.condition, what="the report stored")
        await age_entry(store, 120)  # past ttl: only usable if the origin fails (or is saturated)
        origin.close()
        async with anyio.create_task_group() as tg:
            tg.start_soon(http.get, "/reports/2")  # takes the route's one slot and holds it
            await eventually(lambda: _true(origin.running == 1), timeout=budgets.condition, what="the slot taken")
            with anyio.fail_after(budgets.condition):
                stale = await http.get("/reports/1")
            origin.open()
    assert stale.status_code == 200 and stale.text == "report 1"
    assert stale.headers["x-cache"] == "STALE"
    assert origin.most == 1


async def _true(value: bool) -> bool:
    return value
