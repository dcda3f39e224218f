"""Shared fixtures. Redis: one private redis-server per test session (see redis_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

try:  # tests/ is a package
    from tests.redis_server import RedisServer, RedisServerNotFound
except ImportError:  # tests/ as a plain directory (pytest's "prepend" import mode puts it on sys.path)
    from redis_server import RedisServer, RedisServerNotFound  # type: ignore[no-redef]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server for the whole session; fails (never skips) without a binary."""
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except RedisServerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the private server, running, thawed and empty for this test."""
    redis_server.ensure_healthy()
    redis_server.flushall()
    return redis_server.url
