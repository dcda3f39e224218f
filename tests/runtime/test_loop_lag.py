"""Our own lateness is not Redis's failure (issue 15, item 4), on a real Redis, asyncio and uvloop.

A budget our busy event loop spent (the lookup issued, then the loop held by other work
before it could write it) is waited out by a grace for the reply, so a hit stays a hit
and the breaker stays closed; the metrics and the log say it was loop lag. A fresh
process's first connect, slower than a budget, does not open the breaker either.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cachemw import CacheMiddleware, Settings, cache
from cachemw.observe import snapshot
from tests.budgets import Budgets
from tests.faults.proxy import FaultProxy
from tests.helpers import client, eventually, find_middleware, lifespan
from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio

BUDGET = 0.05  # the default request budget: the stalls below are three of it
STALL = 3 * BUDGET

calls: collections.Counter[str] = collections.Counter()


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()


@cache(ttl="1h")
async def item(request: Request) -> Response:
    calls["item"] += 1
    return JSONResponse({"item": request.path_params["id"]})


class BusyLoop:
    """An ASGI wrapper: while ``stall`` is set, each request starts a task that holds the event loop
    for that long (a synchronous sleep: another request's CPU work). Its step runs in the loop
    iteration after the request's own first one: after the request's lookup is issued, before the
    auto-pipelined connection writes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.stall = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.stall:
            await self.app(scope, receive, send)
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(_hold_the_loop, self.stall)
            await self.app(scope, receive, send)


async def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # noqa: ASYNC251  (holds the event loop on purpose)


def make_app(url: str, **settings: Any) -> tuple[Starlette, BusyLoop]:
    app = Starlette(routes=[Route("/item/{id}", item)])
    app.add_middleware(CacheMiddleware, redis_url=url, settings=Settings(store_timeout=BUDGET, **settings))
    return app, BusyLoop(app)


async def _state(http: httpx.AsyncClient, path: str) -> str:
    return str((await http.get(path)).headers.get("x-cache"))


async def _is(value: bool) -> bool:
    return value


async def test_a_hit_our_busy_loop_made_late_is_served_from_the_cache_not_the_app(
        redis_url: str, budgets: Budgets, caplog: pytest.LogCaptureFixture) -> None:
    app, busy = make_app(redis_url, store_grace=budgets.store_timeout)
    with caplog.at_level(logging.WARNING, logger="cachemw"):
        async with lifespan(busy), client(busy) as http:
            for path in [f"/item/{n}" for n in range(5)]:
                await http.get(path)
                await eventually(functools.partial(_is_hit, http, path), what="the entry being stored")
            origin = calls["item"]
            cache_layer = find_middleware(app)
            before = snapshot(cache_layer)["store"]
            busy.stall = STALL
            states = [await _state(http, f"/item/{n}") for n in range(5)]
            busy.stall = 0.0
            after = snapshot(cache_layer)["store"]
            await eventually(lambda: _is("event loop lagging" in caplog.text), what="the loop-lag warning")
    assert states == ["HIT"] * 5  # each one's lookup waited out our lateness: no fall back to the app
    assert calls["item"] == origin
    assert after["breaker"] == "closed" and after["errors"] == before["errors"]
    # It was the loop, and the metrics say so.
    assert after["late_replies"] - before["late_replies"] >= 5
    assert after["loop_lag_timeouts"] == before["loop_lag_timeouts"]
    assert "store replies came well after the budget and were still used" in caplog.text


async def _is_hit(http: httpx.AsyncClient, path: str) -> bool:
    return await _state(http, path) == "HIT"


async def test_a_fresh_process_whose_first_connect_is_slow_keeps_its_breaker_closed(
        killable: RedisServer, budgets: Budgets) -> None:
    """No lifespan (nothing connects before the first requests): the first burst waits on one connect,
    here held up past every request's budget (its SELECT delayed). Each request goes to the app; none
    is held against the store, whose breaker would send the next ones there too."""
    proxy = FaultProxy(killable.port)
    try:
        app, _ = make_app(f"redis://127.0.0.1:{proxy.port}/1")
        proxy.set("delay", delay=0.3)
        statuses: list[int] = []
        async with client(app) as http:

            async def one(n: int) -> None:
                statuses.append((await http.get(f"/item/{n}")).status_code)

            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(one, n)
            cache_layer = find_middleware(app)
            assert statuses == [200] * 20 and calls["item"] == 20  # the app answered them all
            assert cache_layer.store_errors >= 20
            assert cache_layer.breaker.state == "closed"
            proxy.set("pass")
            await http.get("/item/0")
            await eventually(lambda: _is_hit(http, "/item/0"), within=budgets.condition,
                             what="the cache working once connected")
            store = cache_layer.store
            assert store is not None
            await store.aclose()  # no lifespan closes it: before the proxy goes
    finally:
        proxy.close()
