"""The bound on concurrent origin calls: past it, a stale entry answers, or a 503 with Retry-After.

And a miss cancelled midway (the client left) leaves no fill lock behind for other servers to wait out.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache
from tests.budgets import Budgets
from tests.helpers import Gate, SpyStore, assert_counted, client, eventually, lifespan
from tests.runtime.test_freshness import age_entry

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
        await eventually(lambda: _true(answers[(503, "7")] == 8), within=budgets.condition,
                         what="eight requests turned away")
        assert origin.running == 2
        origin.open()
    assert answers == {(503, "7"): 8, (200, None): 2}
    assert origin.most == 2
    assert_counted_busy(app, "/items/{n}", 8)


async def test_a_request_with_a_stale_if_error_entry_gets_it_instead_of_waiting(store: SpyStore, budgets: Budgets
                                                                                 ) -> None:
    origin = Gate()
    origin.open()
    # A request that waited for the slot would wait origin_wait: far past the deadline below.
    app = make_app(origin, store, origin_wait=budgets.lock_timeout)
    async with lifespan(app), client(app) as http:
        assert (await http.get("/reports/1")).text == "report 1"
        await eventually(lambda: _true(bool(store.keys_set)), within=budgets.condition, what="the report stored")
        await age_entry(store, 120)  # past ttl: only usable if the origin fails (or is saturated)
        origin.close()
        async with anyio.create_task_group() as tg:
            tg.start_soon(http.get, "/reports/2")  # takes the route's one slot and holds it
            await eventually(lambda: _true(origin.running == 1), within=budgets.condition, what="the slot taken")
            with anyio.fail_after(budgets.condition):
                stale = await http.get("/reports/1")
            origin.open()
    assert stale.status_code == 200 and stale.text == "report 1"
    assert stale.headers["x-cache"] == "STALE"
    assert origin.most == 1
    assert_counted_busy(app, "/reports/{n}", 1)


async def test_a_wait_cancelled_from_outside_gives_back_the_route_slot_it_held() -> None:
    from cachemw.runtime.origin import OriginSlots

    slots = OriginSlots(1)
    slots.bound_route("/r", 1)
    other = slots.take_nowait("/other")  # the one global slot
    assert other is not None
    async with anyio.create_task_group() as tg:
        tg.start_soon(slots.take, "/r", 30.0)  # takes the route's one slot, then waits for the global one
        await anyio.wait_all_tasks_blocked()
        assert slots.take_nowait("/r") is None
        tg.cancel_scope.cancel()  # e.g. the server cancels the request
    other.release()
    again = slots.take_nowait("/r")
    assert again is not None, "the cancelled wait kept the route's slot"
    again.release()
    assert slots.rejected == 0  # cancelled, not turned away


class LockSpy(SpyStore):
    """Counts the fill locks taken, so a test knows a request holds one."""

    def __init__(self, inner: SpyStore) -> None:
        super().__init__(inner.inner)
        self.locks_taken = 0

    async def lock(self, *args: Any, **kwargs: Any) -> Any:
        return self._count(await self.inner.lock(*args, **kwargs))

    async def get_or_lock(self, *args: Any, **kwargs: Any) -> Any:
        return self._count(await self.inner.get_or_lock(*args, **kwargs))

    def _count(self, result: Any) -> Any:
        self.locks_taken += result[0] is not None
        return result


async def test_a_miss_cancelled_while_waiting_for_a_slot_releases_its_fill_lock(store: SpyStore,
                                                                              budgets: Budgets) -> None:
    """Server A's request for a cold key takes its lock, then waits for an origin slot and is cancelled
    (the client left): server B's request for that key must not wait the lock out."""
    spy = LockSpy(store)
    busy = Gate()
    server_a = make_app(busy, spy, origin_concurrency=1, lock_timeout=budgets.lock_timeout,
                        origin_wait=budgets.lock_timeout)
    async with lifespan(server_a), client(server_a) as a, anyio.create_task_group() as tg:
        tg.start_soon(a.get, "/items/1")  # holds A's one origin slot
        await eventually(lambda: _true(busy.running == 1), what="A calling its origin")
        await _cancelled_once_locked(tg, a, "/items/2", spy, locks=2)
        await _answered_by_another_server_at_once(spy, "/items/2", budgets)
        busy.open()


class HangingLock(LockSpy):
    """A store whose lock replies are late: the lock is taken in the store, the caller is still waiting."""

    async def lock(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().lock(*args, **kwargs)
        await anyio.sleep_forever()
        return result  # pragma: no cover

    async def get_or_lock(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().get_or_lock(*args, **kwargs)
        await anyio.sleep_forever()
        return result  # pragma: no cover


async def test_a_miss_cancelled_while_its_lock_reply_is_on_the_way_releases_the_lock(store: SpyStore,
                                                                                   budgets: Budgets) -> None:
    hanging = HangingLock(store)
    server_a = make_app(Gate(), hanging, lock_timeout=budgets.lock_timeout)
    async with lifespan(server_a), client(server_a) as a, anyio.create_task_group() as tg:
        await _cancelled_once_locked(tg, a, "/items/1", hanging, locks=1)
        await _answered_by_another_server_at_once(store, "/items/1", budgets)


async def _cancelled_once_locked(tg: TaskGroup, http: httpx.AsyncClient, path: str, spy: LockSpy, *,
                                 locks: int) -> None:
    """GET ``path``, and cancel it (as when the client leaves) once the store holds ``locks`` locks."""
    waiting = anyio.CancelScope()
    tg.start_soon(_within, waiting, http.get, path)
    await eventually(lambda: _true(spy.locks_taken == locks), what=f"the lock of {path} taken")
    waiting.cancel()


async def _answered_by_another_server_at_once(store: SpyStore, path: str, budgets: Budgets) -> None:
    """Server B, on the same store, answers ``path`` from its own origin without waiting out a lock."""
    idle = Gate()
    idle.open()
    server_b = make_app(idle, store, lock_timeout=budgets.lock_timeout)
    async with lifespan(server_b), client(server_b) as b:
        with anyio.fail_after(budgets.condition):  # far less than the lock's lifetime
            response = await b.get(path)
    assert (response.status_code, response.text) == (200, f"item {path.rsplit('/', 1)[1]}")


async def _within(scope: anyio.CancelScope, call: Callable[[str], Awaitable[object]], path: str) -> None:
    with scope:
        await call(path)


def assert_counted_busy(app: Starlette, route: str, busy: int) -> None:
    assert_counted(app, route, "origin_busy", busy,
                   lambda n: f"origin busy   {n} answered stale or 503 past origin_concurrency ({route} {n})")


async def _true(value: bool) -> bool:
    return value
