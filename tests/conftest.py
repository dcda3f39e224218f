"""Shared fixtures. Redis: one private redis-server per test session (see redis_server.py)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

import cachemw.asgi.middleware
from cachemw import MemoryStore, RedisStore

_REAL_FREEZE = cachemw.asgi.middleware._freeze_startup_objects

try:  # tests/ is a package
    from tests.budgets import Budgets, current_budgets
    from tests.helpers import SpyStore
    from tests.redis_server import RedisServer, find_redis_server, free_port, started
except ImportError:  # tests/ as a plain directory (pytest's "prepend" import mode puts it on sys.path)
    from budgets import Budgets, current_budgets  # type: ignore[no-redef,import-not-found]
    from helpers import SpyStore  # type: ignore[no-redef,import-not-found]
    from redis_server import (  # type: ignore[no-redef,import-not-found]
        RedisServer,
        find_redis_server,
        free_port,
        started,
    )


@pytest.fixture(scope="session")
def budgets() -> Budgets:
    """Every time budget a test waits on (see budgets.py): scaled together on a busy machine."""
    return current_budgets()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


# The request path, the stores and the fault tests run on uvloop too (what uvicorn[standard]
# runs): its loop differs from asyncio's where it matters to us (``call_at`` for a deadline
# already past returns a plain Handle, time has a 1 ms resolution).
_ON_BOTH_LOOPS = frozenset({
    "test_pipeline", "test_store_contract", "test_redis_faults", "test_middleware", "test_freshness",
    "test_lookup_lock", "test_invalidation", "test_channel_input", "test_event_loops", "test_flights", "test_herd",
    "test_origin_limit", "test_methods", "test_credentials", "test_store_failures", "test_lifespan", "test_loop_lag",
    "test_hit_for_pass", "test_pipeline_topologies", "test_request_context", "test_tracking", "test_soft_purge",
})
UVLOOP = ("asyncio", {"use_uvloop": True})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if module in _ON_BOTH_LOOPS and "anyio_backend" in metafunc.fixturenames:
        metafunc.parametrize("anyio_backend", ["asyncio", UVLOOP], ids=["asyncio", "uvloop"], scope="module")


class FreezeCalls:
    count = 0


def real_gc_freeze() -> None:
    """The middleware's own startup freeze, which the autouse fixture below replaces."""
    _REAL_FREEZE()


@pytest.fixture(autouse=True)
def gc_freezes(monkeypatch: pytest.MonkeyPatch) -> FreezeCalls:
    """Counts the middleware's gc.freeze() at startup instead of doing it: in one test process
    hundreds of app startups would each collect and freeze everything alive (tests/runtime/test_gc_freeze.py
    checks the real thing)."""
    calls = FreezeCalls()

    def count() -> None:
        calls.count += 1

    monkeypatch.setattr(cachemw.asgi.middleware, "_freeze_startup_objects", count)
    return calls


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server for the whole session; fails (never skips) without a binary."""
    with started(lambda: RedisServer(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture
def killable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that kill it."""
    with started(lambda: RedisServer(tmp_path_factory.mktemp("killable-redis"))) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the private server, running, thawed and empty for this test."""
    redis_server.ensure_healthy()
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def sentinel_url(redis_server: RedisServer, redis_url: str, tmp_path: Path) -> Iterator[str]:
    """``redis+sentinel://.../shop``: a real redis-sentinel naming the private server (empty) as master ``shop``."""
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                      f"sentinel monitor shop 127.0.0.1 {redis_server.port} 1\n"
                      "sentinel down-after-milliseconds shop 1000\n")
    process = subprocess.Popen([find_redis_server(), str(config), "--sentinel"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    if client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "shop"):
                        break
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "redis sentinel did not start"
            time.sleep(0.05)
        yield f"redis+sentinel://127.0.0.1:{port}/shop"
    finally:
        process.terminate()
        process.wait(timeout=10)


try:  # tests/ is a package
    from tests.redis_cluster import LocalCluster
except ImportError:  # tests/ as a plain directory
    from redis_cluster import LocalCluster  # type: ignore[no-redef,import-not-found]


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A private 3-master Redis Cluster for the whole session; fails (never skips) without binaries."""
    with started(lambda: LocalCluster(tmp_path_factory.mktemp("cluster"))) as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster: LocalCluster) -> str:
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture(params=["redis", "cluster"])
def shared_url(request: pytest.FixtureRequest) -> str:
    """A Redis that several app instances share: one server, or a cluster."""
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url"))


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SpyStore]:
    """The same tests on each store: in-process memory, one Redis, a Redis Cluster."""
    if request.param == "memory":
        spy = SpyStore(MemoryStore())
    else:
        url = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
        # The store keeps the fixture's budget itself (its sockets' timeouts), not the 50 ms default:
        # a busy machine's late event loop must not turn these tests' lookups into misses.
        spy = SpyStore(RedisStore.from_url(url, timeout=current_budgets().store_timeout), keeps_budget=True)
    yield spy
    await spy.aclose()
