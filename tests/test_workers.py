"""Two uvicorn servers with two workers each on one Redis: one fill per cold key in total, and an
invalidation seen by every worker within the rule's sync bound."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
import redis

from tests.redis_server import free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SYNC = 0.2


@pytest.fixture
def servers(redis_url: str) -> Iterator[list[str]]:
    env = {**os.environ, "CACHEMW_REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    ports = [free_port(), free_port()]
    processes = [
        subprocess.Popen([sys.executable, "-m", "uvicorn", "tests.apps.shared_app:app", "--port", str(port),
                          "--workers", "2", "--log-level", "warning"], cwd=ROOT, env=env)
        for port in ports
    ]
    try:
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        deadline = time.monotonic() + 30
        for base in bases:
            while True:
                try:
                    if httpx.get(base + "/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
        yield bases
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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
