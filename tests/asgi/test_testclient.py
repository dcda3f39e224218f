"""Apps tested with Starlette's TestClient, as most FastAPI users test theirs (its scope differs from httpx's)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from cachemw import CacheMiddleware, MemoryStore, Settings, cache
from tests.budgets import Budgets
from tests.helpers import Gate, eventually_sync, find_middleware


def make_app() -> FastAPI:
    app = FastAPI()
    calls = {"n": 0}

    @app.get("/items/{item_id}")
    @cache(ttl="5m")
    async def item(item_id: int) -> dict[str, int]:
        calls["n"] += 1
        return {"id": item_id, "n": calls["n"]}

    app.add_middleware(CacheMiddleware, store=MemoryStore())
    return app


def test_cached_routes_work_under_testclient_with_and_without_lifespan() -> None:
    app = make_app()
    # TestClient sends scope["server"] as a list, where httpx's ASGITransport sends a tuple.
    plain = TestClient(app)
    first, second = plain.get("/items/1"), plain.get("/items/1")
    assert first.status_code == second.status_code == 200
    assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"] == "HIT"
    assert second.json() == {"id": 1, "n": 1}
    with TestClient(app) as within:
        other = within.get("/items/2")
        assert other.status_code == 200 and other.json()["id"] == 2


def test_private_and_credentialed_requests_under_testclient() -> None:
    """The per-user promises through TestClient, as FastAPI users test them."""
    from fastapi import Depends
    from fastapi.security import APIKeyHeader

    app = FastAPI()
    api_key = APIKeyHeader(name="X-API-Key", auto_error=False)

    @app.get("/me")
    @cache(ttl="5m", private=True)
    async def me(key: str | None = Depends(api_key)) -> dict[str, str | None]:
        return {"user": key}

    @app.get("/offers")
    @cache(ttl="5m")
    async def offers(key: str | None = Depends(api_key)) -> dict[str, str | None]:
        return {"for": key}

    app.add_middleware(CacheMiddleware, store=MemoryStore())
    with TestClient(app) as http:
        assert http.get("/me", headers={"x-api-key": "alice"}).json() == {"user": "alice"}
        assert http.get("/me", headers={"x-api-key": "bob"}).json() == {"user": "bob"}
        again = http.get("/me", headers={"x-api-key": "alice"})
        assert again.json() == {"user": "alice"} and again.headers["x-cache"] == "HIT"
        assert http.get("/offers", headers={"x-api-key": "alice"}).headers["x-cache"] == "BYPASS"
        assert http.get("/offers").json() == {"for": None}
        assert http.get("/offers").headers["x-cache"] == "HIT"
        assert http.get("/offers", headers={"x-api-key": "bob"}).json() == {"for": "bob"}


# The request-path promises once more through TestClient: its portal runs the app on one loop in
# another thread, and the test's threads send concurrent requests into it, as a threaded test suite does.


@pytest.fixture(params=["memory", "redis"])
def backing(request: pytest.FixtureRequest) -> Callable[..., dict[str, Any]]:
    """The middleware's arguments for a store: in memory, or the private Redis (owned, closed by the lifespan)."""
    def arguments(**settings: Any) -> dict[str, Any]:
        if request.param == "memory":
            return {"store": MemoryStore(), "settings": Settings(**settings)}
        url = request.getfixturevalue("redis_url")
        return {"settings": Settings(redis_url=url, **settings)}

    return arguments


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> dict[str, Any]:
    """TestClient's own event loop: asyncio's, or uvloop's (what uvicorn[standard] runs)."""
    return {"backend_options": {"use_uvloop": request.param == "uvloop"}}


@pytest.mark.parametrize("failure", ["raise", "500"])
def test_a_failing_leaders_herd_shares_its_failure_under_testclient(
        backing: Callable[..., dict[str, Any]], loop: dict[str, Any], budgets: Budgets, failure: str) -> None:
    gate, herd = Gate(), 20

    @cache(ttl="5m")
    async def hot(request: Request) -> Response:
        await gate.wait()
        if failure == "raise":
            raise RuntimeError("the database went away")
        return PlainTextResponse("the database went away", status_code=500)

    app = Starlette(routes=[Route("/hot", hot)])
    app.add_middleware(CacheMiddleware, **backing(lock_timeout=budgets.lock_timeout,
                                                  store_timeout=budgets.store_timeout))
    with TestClient(app, raise_server_exceptions=False, **loop) as http, ThreadPoolExecutor(herd) as pool, gate:
        answers = [pool.submit(http.get, "/hot") for _ in range(herd)]
        eventually_sync(lambda: find_middleware(app).metrics.waiting_on_fills == herd - 1,
                        within=budgets.condition, what="the herd waiting on the leader")
        gate.open()
        statuses = collections.Counter(answer.result().status_code for answer in answers)
    assert statuses == {500: herd}
    assert gate.calls == 1


def test_past_the_origin_bound_misses_get_503_with_retry_after_under_testclient(
        backing: Callable[..., dict[str, Any]], loop: dict[str, Any], budgets: Budgets) -> None:
    gate = Gate()

    @cache(ttl="5m")
    async def item(request: Request) -> Response:
        await gate.wait()
        return PlainTextResponse(f"item {request.path_params['n']}")

    app = Starlette(routes=[Route("/items/{n}", item)])
    app.add_middleware(CacheMiddleware, **backing(origin_concurrency=2, origin_wait=0.2, retry_after=7,
                                                  store_timeout=budgets.store_timeout))
    with TestClient(app, **loop) as http, ThreadPoolExecutor(10) as pool, gate:
        answers = [pool.submit(http.get, f"/items/{n}") for n in range(10)]
        eventually_sync(lambda: sum(answer.done() for answer in answers) == 8, within=budgets.condition,
                        what="eight requests turned away")
        assert gate.running == 2
        gate.open()
        seen = collections.Counter((r.status_code, r.headers.get("retry-after")) for r in
                                   (answer.result() for answer in answers))
    assert seen == {(503, "7"): 8, (200, None): 2}
    assert gate.most == 2


@pytest.mark.parametrize("write", ["POST", "OPTIONS"])
def test_a_write_detaches_the_fill_in_flight_and_a_preflight_does_not_under_testclient(
        backing: Callable[..., dict[str, Any]], loop: dict[str, Any], budgets: Budgets, write: str) -> None:
    """After a POST the next GET is not the older fill's answer; a CORS preflight or OPTIONS changes nothing."""
    gate, version = Gate(), [1]

    @cache(ttl="5m", tags=["x"])
    async def read(request: Request) -> Response:
        seen = version[0]
        if gate.calls == 0:
            await gate.wait()  # the first read is slow: still in the handler when the write lands
        return JSONResponse({"version": seen})

    @cache("realtime", invalidates=["x"])
    async def change(request: Request) -> Response:
        version[0] += 1
        return JSONResponse({"version": version[0]})

    app = Starlette(routes=[Route("/x", read, methods=["GET"]), Route("/x", change, methods=["POST", "OPTIONS"])])
    # A GET that joined the older fill would wait for it up to lock_timeout: far past the deadline below.
    app.add_middleware(CacheMiddleware, **backing(lock_timeout=budgets.lock_timeout,
                                                  store_timeout=budgets.store_timeout))
    with TestClient(app, **loop) as http, ThreadPoolExecutor(2) as pool, gate:
        slow = pool.submit(http.get, "/x")
        eventually_sync(lambda: gate.running == 1, within=budgets.condition, what="the first read in the handler")
        assert http.request(write, "/x").status_code == 200
        after = pool.submit(http.get, "/x")
        if write == "POST":
            answer = after.result(timeout=budgets.condition)  # well under lock_timeout: not the older fill
            assert answer.json() == {"version": 2} and "collapsed" not in answer.headers["cache-status"]
            gate.open()
        else:  # nothing was invalidated: the GET joins the fill in flight
            eventually_sync(lambda: find_middleware(app).metrics.waiting_on_fills == 1,
                            within=budgets.condition, what="the GET waiting on the fill")
            gate.open()
            answer = after.result(timeout=budgets.condition)
            assert answer.json() == {"version": 1} and "collapsed" in answer.headers["cache-status"]
        assert slow.result(timeout=budgets.condition).json() == {"version": 1}
        assert http.get("/x").json() == {"version": 2 if write == "POST" else 1}
