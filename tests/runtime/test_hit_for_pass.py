"""A key whose response cannot be stored is remembered for ``pass_ttl``: its requests go to the app at once.

Without it, every request of such a key (a view that sets a cookie, answers
``private``, or a status outside ``statuses``) takes the fill lock in turn across
servers, each waiting for the one before to find out, again, that nothing can be
stored (Varnish's hit-for-pass).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache
from tests.budgets import Budgets
from tests.helpers import eventually, find_middleware, lifespan

pytestmark = pytest.mark.anyio

CLIENTS = 10


class Origin:
    def __init__(self) -> None:
        self.calls = 0
        self.inside = 0  # requests in the view right now
        self.gate = anyio.Event()
        self.gate.set()
        self.storable = False


def make_app(origin: Origin, url: str, budgets: Budgets, **settings: Any) -> Starlette:
    @cache(ttl="5m")
    async def login(request: Request) -> Response:
        origin.calls += 1
        origin.inside += 1
        try:
            await origin.gate.wait()
        finally:
            origin.inside -= 1
        response = JSONResponse({"run": origin.calls})
        if not origin.storable:
            response.set_cookie("tracking", "t-1")  # not the session cookie: the clients send it back
        return response

    app = Starlette(routes=[Route("/login", login)])
    app.add_middleware(CacheMiddleware, redis_url=url, settings=Settings(**{
        "lock_timeout": budgets.lock_timeout, "store_timeout": budgets.store_timeout, **settings}))
    return app


@asynccontextmanager
async def servers(origin: Origin, url: str, budgets: Budgets, **settings: Any
                  ) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Two app instances on one Redis, as two servers of one site."""
    async with AsyncExitStack() as stack:
        clients = []
        for _ in range(2):
            app = make_app(origin, url, budgets, **settings)
            await stack.enter_async_context(lifespan(app))
            clients.append(await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")))
        yield clients


async def _passed(client: httpx.AsyncClient) -> bool:
    response = await client.get("/login")
    return response.status_code == 200 and "detail=pass" in response.headers.get("cache-status", "")


async def _hit(client: httpx.AsyncClient) -> bool:
    response = await client.get("/login")
    return bool(response.headers.get("x-cache") == "HIT")


async def test_requests_of_a_key_that_cannot_be_stored_reach_the_app_at_once_on_every_server(
        shared_url: str, budgets: Budgets) -> None:
    origin = Origin()
    async with servers(origin, shared_url, budgets) as (a, b):
        first = await a.get("/login")
        assert first.status_code == 200 and first.headers["x-cache"] == "MISS" and "set-cookie" in first.headers
        await eventually(lambda: _passed(b), what="the other server passing the key to the app")
        origin.gate = anyio.Event()
        statuses: list[int] = []
        async with anyio.create_task_group() as requests:
            async def one(client: httpx.AsyncClient) -> None:
                statuses.append((await client.get("/login")).status_code)

            for n in range(CLIENTS):
                requests.start_soon(one, (a, b)[n % 2])

            async def all_inside() -> bool:
                return origin.inside == CLIENTS

            # None of them waits on a fill lock: all ten are in the view at once.
            await eventually(all_inside, what="every request inside the view at the same time")
            origin.gate.set()
    assert statuses == [200] * CLIENTS


async def test_a_purge_forgets_that_a_key_cannot_be_stored(redis_url: str, budgets: Budgets) -> None:
    origin = Origin()
    async with servers(origin, redis_url, budgets) as (a, b):
        await a.get("/login")
        await eventually(lambda: _passed(a), what="the key passed to the app")
        origin.storable = True
        runtime = find_middleware(a._transport.app).runtime  # type: ignore[attr-defined]
        assert runtime is not None
        await runtime.invalidator.tags("path:/login")
        stored = await b.get("/login")  # the lock is taken again, and this answer is stored
        assert stored.headers["x-cache"] == "MISS" and "detail=pass" not in stored.headers["cache-status"]
        await eventually(lambda: _hit(a), what="the stored answer served")


async def test_the_key_is_tried_again_after_pass_ttl(redis_url: str, budgets: Budgets) -> None:
    origin = Origin()
    async with servers(origin, redis_url, budgets, pass_ttl=0.2) as (a, _b):
        await a.get("/login")
        origin.storable = True
        await eventually(lambda: _hit(a), what="a stored answer once the pass marker expired")


async def test_pass_ttl_zero_remembers_nothing(redis_url: str, budgets: Budgets) -> None:
    origin = Origin()
    async with servers(origin, redis_url, budgets, pass_ttl=0) as (a, b):
        for client in (a, b, a):
            response = await client.get("/login")
            assert response.headers["x-cache"] == "MISS" and "detail=pass" not in response.headers["cache-status"]


async def test_requests_waiting_on_the_lock_go_to_the_app_once_the_fill_turns_out_not_storable(
        shared_url: str, budgets: Budgets) -> None:
    origin = Origin()
    origin.gate = anyio.Event()
    async with servers(origin, shared_url, budgets) as (a, b):
        answers: list[httpx.Response] = []
        async with anyio.create_task_group() as requests:
            async def one(client: httpx.AsyncClient) -> None:
                answers.append(await client.get("/login"))

            requests.start_soon(one, a)  # the leader: it takes the key's lock and waits in the view

            async def leader_inside() -> bool:
                return origin.inside == 1

            await eventually(leader_inside, what="the leader inside the view")
            for _ in range(5):
                requests.start_soon(one, b)
            b_metrics = find_middleware(b._transport.app).metrics  # type: ignore[attr-defined]

            async def b_waiting() -> bool:
                return b_metrics.waiting_on_fills == 4  # one of them waits on the lock, four on it

            await eventually(b_waiting, what="the other server's requests waiting on the leader's lock")
            origin.gate.set()
    assert [answer.status_code for answer in answers] == [200] * 6
    passed = [answer for answer in answers if "detail=pass" in answer.headers["cache-status"]]
    assert passed, "the request waiting on the lock took it in turn instead of going to the app"
    assert origin.calls == 6
