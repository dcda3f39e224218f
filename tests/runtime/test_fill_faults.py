"""Two real uvicorn servers on one Redis: a fill that meets a Redis hiccup, and cold bursts on fresh servers.

What was seen before: a fill ran under the request path's 50 ms budget, so a restart
(scripts flushed) with writes paused for 600 ms lost it, and its lock was left to
expire; the other server's requests waited the lock out, then all called the app.
"""

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

HOST = {"host": "shop.example"}  # one public Host, as behind a load balancer


def _db(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def _env(budgets: Budgets, request_budget: float) -> dict[str, str]:
    # The lock outlives the test: a request left waiting on an orphaned lock misses the test's deadline.
    return {"TEST_LOCK_TIMEOUT": str(budgets.lock_timeout), "TEST_STORE_TIMEOUT": str(request_budget),
            "TEST_BACKGROUND_TIMEOUT": str(budgets.condition)}


@pytest.fixture(params=["asyncio", "uvloop"])
def paused_servers(request: pytest.FixtureRequest, redis_url: str, budgets: Budgets) -> Iterator[list[str]]:
    """Request path budget well below the 600 ms pause, as in production (50 ms), scaled for a busy machine."""
    with uvicorns("tests.apps.gated_app:app", redis_url, start_timeout=budgets.process_start,
                  env=_env(budgets, 0.2 * budgets.scale), loop=request.param) as bases:
        try:
            yield bases
        finally:
            with _db(redis_url) as db:
                db.set("test:gate", 1)  # no handler left waiting through the servers' shutdown


async def test_a_fill_meeting_flushed_scripts_and_paused_writes_still_answers_the_other_server(
        paused_servers: list[str], redis_url: str, budgets: Budgets) -> None:
    a, b = paused_servers
    pause_ms = int(600 * budgets.scale)
    db = _db(redis_url)
    async with httpx.AsyncClient(timeout=budgets.lock_timeout, headers=HOST) as http, \
            anyio.create_task_group() as tg:
        answers: dict[str, httpx.Response] = {}

        async def get(name: str, base: str) -> None:
            answers[name] = await http.get(base + "/items/1")

        tg.start_soon(get, "a", a)  # A takes the fill lock; its handler waits for the gate
        await eventually(lambda: _true(int(db.get("test:reads:1") or 0) == 1), what="A in the handler")

        tg.start_soon(get, "b", b)
        # B's lock attempt found A's lock and raised the key's "someone waits" flag (as the store does).
        await eventually(lambda: _true(bool(db.keys("*:wait"))), what="B waiting on A's fill")
        db.script_flush()  # as after a restart: the next EVALSHA gets NOSCRIPT
        with db.pipeline(transaction=False) as pipe:  # one packet: A's fill cannot slip in between
            pipe.set("test:gate", 1)
            pipe.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")  # type: ignore[no-untyped-call]
            pipe.execute()
        # Left waiting on an orphaned lock, B would answer only after lock_timeout, far past this.
        with anyio.fail_after(budgets.condition):
            await eventually(lambda: _true("b" in answers), what="B answered")
    assert answers["a"].status_code == answers["b"].status_code == 200
    assert answers["b"].json() == answers["a"].json() == {"id": 1, "version": 0}
    # A's fill was not lost: it is stored, and its lock is gone (not left to expire: lock_timeout is far longer).
    # A answered before its fill ran (fills are background work), and B may have too (fail open), so wait for it.
    await eventually(lambda: _true(db.keys("*:lock") == []), what="A's fill stored and its lock released")
    async with httpx.AsyncClient(timeout=budgets.condition, headers=HOST) as fresh:
        again = [await fresh.get(base + "/items/1") for base in (a, b)]
    assert [r.headers["x-cache"] for r in again] == ["HIT", "HIT"]
    assert all(r.json() == {"id": 1, "version": 0} for r in again)
    # B may have asked the app once itself while writes were paused (its lock attempt failed: fail open).
    assert int(db.get("test:reads:1") or 0) <= 2


@pytest.mark.parametrize("round_number", range(10))
async def test_a_cold_burst_on_two_fresh_servers_calls_the_origin_once(
        round_number: int, redis_url: str, budgets: Budgets) -> None:
    """200 requests of one key, half on each server, just after both started (uvloop, as in production)."""
    herd = 200
    limits = httpx.Limits(max_connections=herd)
    statuses: collections.Counter[int] = collections.Counter()
    bodies: list[object] = []
    with uvicorns("tests.apps.gated_app:app", redis_url, start_timeout=budgets.process_start,
                  env=_env(budgets, 0.05 * budgets.scale), loop="uvloop") as servers:
        async with httpx.AsyncClient(timeout=budgets.condition, limits=limits, headers=HOST) as http, \
                anyio.create_task_group() as tg:
            async def one(base: str) -> None:
                response = await http.get(base + f"/burst/{round_number}")
                statuses[response.status_code] += 1
                bodies.append(response.json())

            for i in range(herd):
                tg.start_soon(one, servers[i % 2])
    with _db(redis_url) as db:
        calls = int(db.get(f"test:calls:burst:{round_number}") or 0)
    assert statuses == {200: herd}
    assert calls == 1, f"{calls} origin calls for one cold key"
    assert all(body == bodies[0] for body in bodies)


async def _true(value: bool) -> bool:
    return value
