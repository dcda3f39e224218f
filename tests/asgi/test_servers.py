"""Two real uvicorn servers on one Redis behind one Host: the in-process promises of fills hold across them."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import anyio
import httpx
import pytest
import redis

from tests.budgets import Budgets
from tests.helpers import eventually
from tests.servers import uvicorns

pytestmark = pytest.mark.anyio

HOST = {"host": "shop.example"}  # one public Host, as behind a load balancer: the key covers it


@pytest.fixture(params=["asyncio", "uvloop"])
def servers(request: pytest.FixtureRequest, redis_url: str, budgets: Budgets) -> Iterator[list[str]]:
    env = {"TEST_LOCK_TIMEOUT": str(budgets.lock_timeout), "TEST_STORE_TIMEOUT": str(budgets.store_timeout)}
    with uvicorns("tests.apps.gated_app:app", redis_url, start_timeout=budgets.process_start, env=env,
                  loop=request.param) as bases:
        try:
            yield bases
        finally:
            with _db(redis_url) as db:
                db.set("test:gate", 1)  # a failing test leaves no handler waiting through the servers' shutdown


def _db(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


async def test_a_write_on_b_detaches_as_fill_in_flight(servers: list[str], redis_url: str, budgets: Budgets
                                                        ) -> None:
    """A GET on A that starts after B's write (and its broadcast) is not answered by A's older fill."""
    a, b = servers
    db = _db(redis_url)
    async with httpx.AsyncClient(timeout=budgets.lock_timeout, headers=HOST) as http, \
            anyio.create_task_group() as tg:
        old: list[httpx.Response] = []

        async def slow_read() -> None:
            old.append(await http.get(a + "/items/1"))

        tg.start_soon(slow_read)
        await eventually(lambda: _true(int(db.get("test:reads:1") or 0) == 1), within=budgets.condition,
                         what="A's first read in the handler")
        assert (await http.post(b + "/items/1")).json()["version"] == 1

        async def a_heard_it() -> bool:
            return ["item:1"] in [tags[:1] for tags in (await http.get(a + "/heard")).json()]

        await eventually(a_heard_it, within=budgets.condition, what="B's broadcast reaching A")
        # A GET that joined the older fill would wait for it up to lock_timeout: far past this deadline.
        with anyio.fail_after(budgets.condition):
            after = await http.get(a + "/items/1")
        db.set("test:gate", 1)
    assert after.json()["version"] == 1 and "collapsed" not in after.headers["cache-status"]
    assert old[0].json()["version"] == 0
    async with httpx.AsyncClient(timeout=budgets.condition, headers=HOST) as fresh:
        again = await fresh.get(b + "/items/1")
    assert again.json()["version"] == 1  # the older fill was not stored after the write


async def test_a_failing_leaders_herd_on_two_servers_calls_the_origin_once_per_server(
        servers: list[str], redis_url: str, budgets: Budgets) -> None:
    herd = 40
    db = _db(redis_url)
    limits = httpx.Limits(max_connections=herd)
    statuses: collections.Counter[int] = collections.Counter()
    async with httpx.AsyncClient(timeout=budgets.lock_timeout, limits=limits, headers=HOST) as http, \
            httpx.AsyncClient(timeout=budgets.condition) as control, anyio.create_task_group() as tg:
        async def one(base: str) -> None:
            statuses[(await http.get(base + "/failing")).status_code] += 1

        for i in range(herd):
            tg.start_soon(one, servers[i % 2])

        async def gathered() -> bool:
            # One leader holds the Redis lock, the other server's first waits on it; the rest wait in-process.
            waiting: list[int] = [(await control.get(base + "/waiting")).json() for base in servers]
            return sum(waiting) == herd - 2

        await eventually(gathered, within=budgets.condition, what="the herd waiting on the two leaders")
        assert int(db.get("test:calls:failing") or 0) == 1
        db.set("test:gate", 1)
    assert statuses == {500: herd}
    assert int(db.get("test:calls:failing") or 0) <= 2  # one per server at most, never one per request


async def _true(value: bool) -> bool:
    return value
