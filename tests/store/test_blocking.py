"""The WSGI hit path's blocking GET against a real redis-server: database, password, Unix socket, faults."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import redis

from cachemw.store.base import StoreError
from cachemw.store.blocking import BlockingRedis
from tests.redis_server import RedisServer, free_port, started

_closing = contextlib.closing


@pytest.fixture
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A server of this test's own: it gets a password, or is stopped and started again."""
    with started(lambda: RedisServer(tmp_path_factory.mktemp("blocking-redis"))) as server:
        yield server


def test_it_reads_the_database_the_url_names(redis_url: str, redis_server: RedisServer) -> None:
    with redis.Redis(port=redis_server.port, db=3) as raw:
        raw.set("k", b"in db 3")
    reads = BlockingRedis(f"redis://127.0.0.1:{redis_server.port}/3", timeout=5)
    try:
        assert reads.get("k") == b"in db 3"
        with _closing(BlockingRedis(f"redis://127.0.0.1:{redis_server.port}/0", timeout=5)) as other:
            assert other.get("k") is None
    finally:
        reads.close()
        with redis.Redis(port=redis_server.port, db=3) as raw:
            raw.flushdb()


def test_it_reads_over_the_unix_socket(redis_url: str, redis_server: RedisServer) -> None:
    with redis.Redis(port=redis_server.port) as raw:
        raw.set("k", b"v")
    with _closing(BlockingRedis(redis_server.unix_url, timeout=5)) as reads:
        assert reads.get("k") == b"v"


def test_it_authenticates_with_the_urls_password(own_server: RedisServer) -> None:
    with redis.Redis(port=own_server.port) as raw:
        raw.set("k", b"secret value")
        raw.config_set("requirepass", "s3cret")
    with _closing(BlockingRedis(f"redis://:s3cret@127.0.0.1:{own_server.port}/0", timeout=5)) as reads:
        assert reads.get("k") == b"secret value"
    with _closing(BlockingRedis(f"redis://127.0.0.1:{own_server.port}/0", timeout=5)) as reads, \
            pytest.raises(StoreError):
        reads.get("k")


def test_a_foreign_value_under_the_key_is_a_store_error_not_a_crash(redis_url: str,
                                                                     redis_server: RedisServer) -> None:
    with redis.Redis(port=redis_server.port) as raw:
        raw.rpush("k", b"a list")
    with _closing(BlockingRedis(redis_url, timeout=5)) as reads, pytest.raises(StoreError):
        reads.get("k")


def test_a_server_that_is_gone_is_a_store_error_and_a_restarted_one_is_read_again(own_server: RedisServer) -> None:
    with redis.Redis(port=own_server.port) as raw:
        raw.set("k", b"v")
    reads = BlockingRedis(own_server.url, timeout=5)
    assert reads.get("k") == b"v"
    own_server.stop()
    with pytest.raises(StoreError):
        reads.get("k")
    own_server.start()
    with redis.Redis(port=own_server.port) as raw:
        raw.set("k", b"v2")
    assert reads.get("k") == b"v2"
    reads.close()
    with _closing(BlockingRedis(f"redis://127.0.0.1:{free_port()}/0", timeout=5)) as nowhere, \
            pytest.raises(StoreError):
        nowhere.get("k")
