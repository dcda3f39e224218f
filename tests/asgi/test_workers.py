"""Two uvicorn servers with two workers each on one Redis: one fill per cold key in total, and an
invalidation seen by every worker within the rule's sync bound."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import httpx
import pytest
import redis

from tests.budgets import Budgets
from tests.servers import uvicorns

pytestmark = pytest.mark.anyio

SYNC = 0.2


@pytest.fixture
def servers(redis_url: str, budgets: Budgets) -> Iterator[list[str]]:
    with uvicorns("tests.apps.shared_app:app", redis_url, workers=2, start_timeout=budgets.process_start) as bases:
        yield bases


def _counter(redis_url: str, name: str) -> int:
    with redis.Redis.from_url(redis_url) as client:
        return int(client.get(name) or 0)


async def test_one_fill_per_cold_key_across_four_workers(servers: list[str], redis_url: str) -> None:
    pids: set[int] = set()
    bodies: list[int] = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)  # new connections spread workers
    # One public host, as behind a load balancer: the key covers the Host header.
    async with httpx.AsyncClient(timeout=20, limits=limits, headers={"host": "shop.example"}) as http:

        async def one(base: str) -> None:
            response = await http.get(base + "/products/7")
            assert response.status_code == 200
            bodies.append(response.json()["version"])

        async def whoami(base: str) -> None:
            pids.add(int((await http.get(base + "/ready")).text))

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, servers[i % 2])
            for i in range(40):
                tg.start_soon(whoami, servers[i % 2])
    assert _counter(redis_url, "test:calls:7") == 1
    assert bodies == [0] * 200
    assert len(pids) >= 3  # the requests really went through several worker processes


async def test_an_invalidation_reaches_every_worker_within_sync(servers: list[str], redis_url: str) -> None:
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=20, limits=limits, headers={"host": "shop.example"}) as http:
        for _ in range(3):  # fill, then let every worker read it (into its L1)
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(http.get, servers[i % 2] + "/products/8")
        assert (await http.post(servers[0] + "/products/8")).json()["version"] == 1
        changed_at = time.monotonic()
        stale_late: list[float] = []

        async def read(base: str) -> None:
            asked = time.monotonic()
            version = (await http.get(base + "/products/8")).json()["version"]
            if version == 0 and asked > changed_at + SYNC:
                stale_late.append(asked - changed_at)

        while time.monotonic() < changed_at + 3 * SYNC:
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(read, servers[i % 2])
    assert stale_late == []
    assert (await anyio.to_thread.run_sync(_counter, redis_url, "test:calls:8")) == 2  # one fill, one refill
