"""Fills in flight and invalidations: a request that starts after a write never gets an answer computed before it."""

from __future__ import annotations

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache, invalidate
from cachemw.store.base import Notifications
from tests.budgets import Budgets
from tests.helpers import Gate, SpyStore, client, eventually, lifespan

pytestmark = pytest.mark.anyio


class Database:
    def __init__(self) -> None:
        self.version = 1
        self.reads = 0
        self.gate = Gate()


class Deaf(SpyStore):
    """A store whose announcements never reach this process (pub/sub is at-most-once; a lost
    subscription): only the invalidation's own hook can detach the fills it covers."""

    def __init__(self, inner: SpyStore) -> None:
        super().__init__(inner.inner)
        self.notifications = Notifications()


def make_app(db: Database, store: SpyStore, lock_timeout: float) -> Starlette:
    @cache(ttl="5m", tags=["x"])
    async def read(request: Request) -> Response:
        version = db.version
        db.reads += 1
        if db.reads == 1:
            await db.gate.wait()  # the first read is slow: still in the handler when the write lands
        return JSONResponse({"version": version})

    @cache("realtime", invalidates=["x"])
    async def write(request: Request) -> Response:
        db.version += 1
        return JSONResponse({"version": db.version})

    async def purge_all(request: Request) -> Response:
        db.version += 1
        return JSONResponse({"dropped": await invalidate(everything=True)})

    app = Starlette(routes=[Route("/x", read, methods=["GET"]), Route("/x", write, methods=["POST"]),
                            Route("/purge", purge_all, methods=["POST"])])
    app.add_middleware(CacheMiddleware, store=store, settings=Settings(lock_timeout=lock_timeout, store_timeout=2.0))
    return app


@pytest.mark.parametrize("hears", ["hears-itself", "deaf"])
@pytest.mark.parametrize("write", ["POST /x", "POST /purge"])
async def test_a_get_after_a_write_does_not_join_the_fill_before_it(store: SpyStore, budgets: Budgets, write: str,
                                                                    hears: str) -> None:
    db = Database()
    # A GET that joined the older fill would wait for it up to lock_timeout: far past the deadline below.
    app = make_app(db, store if hears == "hears-itself" else Deaf(store), budgets.lock_timeout)
    answers: list[dict[str, int]] = []
    async with lifespan(app), client(app) as http, anyio.create_task_group() as tg:
        async def slow_read() -> None:
            answers.append((await http.get("/x")).json())

        tg.start_soon(slow_read)
        await eventually(lambda: _true(db.reads == 1), within=budgets.condition, what="the first read in the handler")
        method, path = write.split()
        assert (await http.request(method, path)).status_code == 200
        with db.gate, anyio.fail_after(budgets.condition):  # well under the lock timeout: not the old fill
            after = await http.get("/x")
        assert after.json() == {"version": 2}
        assert "collapsed" not in after.headers["cache-status"]
    assert answers == [{"version": 1}]
    async with client(app) as http:
        again = await http.get("/x")
    assert again.json() == {"version": 2}


async def _true(value: bool) -> bool:
    return value
