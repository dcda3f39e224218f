"""Write-behind on a real Redis, with real processes killed and run side by side.

Most tests run twice (``shared_url``): on one redis-server and on a 3-master Redis
Cluster; one runs through a real Sentinel.

Every wait is a condition polled until a deadline (``eventually``); a process is
ready when it says so on stdout. SQLite stands in for the database, written with
the version-guarded upsert that flush functions must use.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest
import redis
import redis.cluster
from redis.crc import key_slot
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware
from cachemw.cli import main as cli
from cachemw.runtime.supervisor import Supervisor
from cachemw.store import StoreError
from cachemw.writebehind import VersionConflict, Write, WriteBehind, WriteBehindStatus
from tests.budgets import current_budgets
from tests.helpers import client as asgi_client
from tests.helpers import eventually, lifespan
from tests.redis_cluster import LocalCluster
from tests.writebehind_worker import create_schema, rows, save

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "writebehind_worker.py"
PREFIX = "wbtest"
READY_DEADLINE = 30.0


# -- helpers ---------------------------------------------------------------------------------


class Database:
    """A SQLite file written through the worker's upsert; ``fail`` makes the next flushes raise."""

    def __init__(self, path: Path) -> None:
        self.path = path
        create_schema(path)
        self.down = False
        self.calls = 0

    async def flush(self, batch: list[Write[Any]]) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("database is down")
        await anyio.to_thread.run_sync(save, self.path, batch)

    def rows(self) -> dict[str, tuple[Any, int]]:
        return rows(self.path)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "db.sqlite3")


def direct(url: str) -> Any:
    """A plain synchronous client to look at what write-behind stored: redis.Redis, or RedisCluster."""
    if url.startswith("redis+cluster://"):
        host, _, port = url.split("//", 1)[1].split(",")[0].rpartition(":")
        return redis.cluster.RedisCluster(host=host, port=int(port), socket_timeout=5)
    return redis.Redis.from_url(url, socket_timeout=5)


async def until(predicate: Any, what: str, within: float = 20.0) -> None:
    """Wait for ``predicate``; ``within`` is for an idle machine, scaled like every budget (budgets.py)."""
    async def check() -> bool:
        result = predicate()
        if hasattr(result, "__await__"):
            result = await result
        return bool(result)

    await eventually(check, within=within * current_budgets().scale, what=what)


async def drained(writes: WriteBehind[Any]) -> bool:
    status = await writes.status()
    return status.backlog == 0


async def in_thread(argv: list[str]) -> int:
    """The CLI runs its own event loop: call it from a thread, as from another process."""
    return await anyio.to_thread.run_sync(cli, argv)


@contextmanager
def worker(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``tests/writebehind_worker.py ARGS``, once it printed ``ready``; killed on the way out."""
    log = tmp_path / f"worker-{time.monotonic_ns()}.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=stderr,
                                text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + READY_DEADLINE
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                line = proc.stdout.readline()
                break
        assert line.strip() == "ready", f"worker did not get ready: {line!r}\n{log.read_text()}"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def expected_latest(count: int, keys: int) -> dict[str, dict[str, int]]:
    """The worker's writes: write i stores {"n": i} under k{i % keys}."""
    return {f"k{k}": {"n": max(i for i in range(count) if i % keys == k)} for k in range(keys)}


# -- put and get -----------------------------------------------------------------------------


async def test_put_is_readable_at_once_from_another_server(shared_url: str) -> None:
    one: WriteBehind[Any] = WriteBehind("cart", redis_url=shared_url, key_prefix=PREFIX)
    other: WriteBehind[Any] = WriteBehind("cart", redis_url=shared_url, key_prefix=PREFIX)
    try:
        first = await one.put("user:1", {"items": [1, 2]})
        assert await other.get("user:1") == {"items": [1, 2]}
        second = await other.put("user:1", {"items": [1, 2, 3]})
        assert second > first
        assert await one.get_versioned("user:1") == ({"items": [1, 2, 3]}, second)
        assert await one.get("user:2") is None
        assert await one.get_versioned("user:2") == (None, 0)
    finally:
        await one.aclose()
        await other.aclose()


async def test_put_stores_value_and_stream_entry_together_under_one_hash_tag(shared_url: str) -> None:
    writes: WriteBehind[Any] = WriteBehind("cart", redis_url=shared_url, key_prefix=PREFIX)
    try:
        version = await writes.put("user:7", {"qty": 3})
    finally:
        await writes.aclose()
    with direct(shared_url) as r:
        value_key = f"{PREFIX}:wb:{{cart}}:v:user:7"
        stream = f"{PREFIX}:wb:{{cart}}:stream"
        assert r.hgetall(value_key) == {b"version": str(version).encode(), b"value": b'{"qty":3}'}
        assert r.ttl(value_key) == -1  # unflushed: never expires
        [(_, fields)] = r.xrange(stream)
        assert fields == {b"key": b"user:7", b"version": str(version).encode(), b"value": b'{"qty":3}'}
        # One hash tag: every key of one name is in one Redis Cluster slot, as the scripts need.
        keys = [value_key, stream, *(f"{PREFIX}:wb:{{cart}}:{k}" for k in ("dead", "version", "stats"))]
        assert {key[key.index("{"):key.index("}") + 1] for key in keys} == {"{cart}"}
        assert len({key_slot(key.encode()) for key in keys}) == 1
    # Versions grow with the server's clock (microseconds), so they survive a lost counter.
    assert abs(version / 1_000_000 - time.time()) < 60


async def test_versions_keep_growing_after_redis_loses_the_counter(shared_url: str) -> None:
    writes: WriteBehind[Any] = WriteBehind("cart", redis_url=shared_url, key_prefix=PREFIX)
    try:
        first = await writes.put("a", 1)
        with direct(shared_url) as r:
            r.flushall()
        assert await writes.put("a", 2) > first
    finally:
        await writes.aclose()


async def test_the_flusher_makes_the_consumer_group_again_when_redis_loses_it(
        shared_url: str, db: Database) -> None:
    """A restart without AOF, or a failover to a replica that was behind: the group is gone with the data."""
    writes = WriteBehind("cart", flush=db.flush, redis_url=shared_url, key_prefix=PREFIX, retry_backoff=0.01,
                         max_backoff=0.05)
    async with writes.running():
        await writes.put("a", 1)
        await until(lambda: "a" in db.rows(), "flushed")
        with direct(shared_url) as r:
            r.flushall()
        await writes.put("b", 2)
        await until(lambda: "b" in db.rows(), "a write put after the loss flushed")
        await until(lambda: drained(writes), "drained")
        assert (await writes.status()).flushers == 1


async def test_if_version_refuses_a_stale_write_and_update_loses_no_update(shared_url: str) -> None:
    one: WriteBehind[Any] = WriteBehind("counter", redis_url=shared_url, key_prefix=PREFIX)
    other: WriteBehind[Any] = WriteBehind("counter", redis_url=shared_url, key_prefix=PREFIX)
    try:
        version = await one.put("c", 0, if_version=0)
        with pytest.raises(VersionConflict) as caught:
            await one.put("c", 5, if_version=0)
        assert caught.value.current == version

        async def increment(current: Any) -> Any:
            await anyio.lowlevel.checkpoint()  # let the other updates interleave
            return (current or 0) + 1

        async def bump(writes: WriteBehind[Any]) -> None:
            await writes.update("c", increment, attempts=100)

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(bump, one if i % 2 else other)
        assert await one.get("c") == 40
    finally:
        await one.aclose()
        await other.aclose()


async def test_put_fails_loudly_when_redis_is_down(redis_url: str, redis_server: Any) -> None:
    writes: WriteBehind[Any] = WriteBehind("cart", redis_url=redis_url, key_prefix=PREFIX, timeout=0.2)
    try:
        redis_server.stop()
        with pytest.raises(StoreError):
            await writes.put("a", 1)
        with pytest.raises(StoreError):
            await writes.get("a")
    finally:
        await writes.aclose()
        redis_server.ensure_healthy()


# -- flushing --------------------------------------------------------------------------------


async def test_flush_gets_each_keys_latest_write_and_acknowledged_entries_leave_the_stream(
        shared_url: str) -> None:
    batches: list[list[Write[Any]]] = []

    async def flush(batch: list[Write[Any]]) -> None:
        batches.append(batch)

    writes = WriteBehind("cart", flush=flush, redis_url=shared_url, key_prefix=PREFIX, batch_size=100)
    for i in range(30):  # before any flusher runs: the group must still see them
        await writes.put(f"k{i % 3}", {"n": i})
    async with writes.running():
        await until(lambda: drained(writes), "backlog drained")
        status = await writes.status()
    flushed = {w.key: w for batch in batches for w in batch}
    assert {k: w.value for k, w in flushed.items()} == {"k0": {"n": 27}, "k1": {"n": 28}, "k2": {"n": 29}}
    assert sum(len(b) for b in batches) == 3, "repeated writes to a key are coalesced within a batch"
    assert all(w.superseded == 9 for w in flushed.values())
    assert all(abs(w.written_at - time.time()) < 60 for w in flushed.values())
    assert [w.version for w in batches[0]] == sorted(w.version for w in batches[0])
    assert (status.backlog, status.pending, status.flushed, status.dead, status.lag) == (0, 0, 30, 0, 0.0)
    with direct(shared_url) as r:
        stream = f"{PREFIX}:wb:{{cart}}:stream"
        assert r.exists(stream) and r.xlen(stream) == 0 and r.xrange(stream) == []
        assert r.xinfo_consumers(stream, "cachemw") == [], "a flusher that holds nothing leaves the group"


async def test_kill_9_with_1000_writes_put_but_not_flushed_loses_nothing(
        shared_url: str, db: Database, tmp_path: Path) -> None:
    count, keys = 1000, 100
    with worker(tmp_path, "put", "--redis-url", shared_url, "--prefix", PREFIX, "--name", "orders",
                "--count", str(count), "--keys", str(keys), "--batch-size", "50") as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert db.rows() == {}

    writes = WriteBehind("orders", flush=db.flush, redis_url=shared_url, key_prefix=PREFIX, claim_idle=0.5)
    before = await writes.status()
    assert (before.backlog, before.pending) == (count, 50), "50 held by the dead process, the rest unread"
    async with writes.running():
        expected = expected_latest(count, keys)
        await until(lambda: {k: v for k, (v, _) in db.rows().items()} == expected,
                    "every key's latest value in the database", within=30)
        await until(lambda: drained(writes), "backlog drained")
        status = await writes.status()
    assert status.claimed == 50, "the dead consumer's writes were claimed"
    assert status.flushed == count
    assert (status.dead, status.dead_lettered) == (0, 0)
    # The database holds the version Redis has: nothing older won.
    latest = {k: v for k, (_, v) in db.rows().items()}
    reader: WriteBehind[Any] = WriteBehind("orders", redis_url=shared_url, key_prefix=PREFIX)
    try:
        for key, version in latest.items():
            assert (await reader.get_versioned(key))[1] == version
    finally:
        await reader.aclose()


async def test_database_down_then_up_loses_nothing(shared_url: str, db: Database) -> None:
    writes = WriteBehind("cart", flush=db.flush, redis_url=shared_url, key_prefix=PREFIX, batch_size=20,
                         retry_backoff=0.01, max_backoff=0.05, max_attempts=2)
    db.down = True
    async with writes.running():
        for i in range(200):
            await writes.put(f"k{i % 40}", {"n": i})

        async def many_failures() -> bool:
            return (await writes.status()).failed_flushes >= 30

        await until(many_failures, "retries while the database is down")
        for i in range(200, 300):  # put keeps working during the outage
            await writes.put(f"k{i % 40}", {"n": i})
        down = await writes.status()
        assert down.backlog == 300, "nothing trimmed while unflushed (no MAXLEN)"
        assert down.lag > 0
        assert (down.dead, down.dead_lettered) == (0, 0), "an outage is not poison"
        assert db.rows() == {}

        db.down = False
        await until(lambda: drained(writes), "backlog drained after the database came back")
        status = await writes.status()
    assert {k: v for k, (v, _) in db.rows().items()} == expected_latest(300, 40)
    assert status.retried > 0 and status.failed_flushes >= 30
    assert (status.dead, status.dead_lettered, status.flushed) == (0, 0, 300)


async def test_poison_write_goes_to_dead_letters_without_blocking_the_others(
        shared_url: str, db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    events: list[tuple[str, int]] = []  # ("ok", newest version flushed) / ("fail", poison version)
    accept_poison = False

    async def flush(batch: list[Write[Any]]) -> None:
        poison = [w for w in batch if isinstance(w.value, dict) and w.value.get("poison")]
        if poison and not accept_poison:
            events.append(("fail", poison[0].version))
            raise ValueError("value out of range for column qty")
        await db.flush(batch)
        events.append(("ok", max(w.version for w in batch)))

    writes = WriteBehind("cart", flush=flush, redis_url=shared_url, key_prefix=PREFIX, batch_size=10,
                         batch_delay=0.001, retry_backoff=0.01, max_backoff=0.05, max_attempts=3)
    async with writes.running():
        for i in range(20):
            await writes.put(f"k{i}", {"n": i})
        poison_version = await writes.put("bad", {"poison": True})
        put_after = 0

        async def dead_lettered() -> bool:
            nonlocal put_after
            # Live traffic: the others keep flowing while the poison fails.
            await writes.put(f"k{put_after % 20}", {"n": 20 + put_after})
            put_after += 1
            return (await writes.status()).dead == 1

        await until(dead_lettered, "the poison write dead-lettered")
        await until(lambda: drained(writes), "the others flushed")
        status = await writes.status()
        [letter] = await writes.dead_letters()

        # Writes put after the poison reached the database while the poison was still failing.
        last_failure = max(i for i, (kind, _) in enumerate(events) if kind == "fail")
        assert any(kind == "ok" and version > poison_version for kind, version in events[:last_failure])
        assert letter.key == "bad" and letter.version == poison_version
        assert json.loads(letter.data) == {"poison": True}
        assert "value out of range" in letter.error and letter.attempts >= 3
        assert status.dead_lettered == 1 and status.backlog == 0
        assert "bad" not in db.rows()
        assert {k: v for k, (v, _) in db.rows().items()} == {
            f"k{k}": {"n": max([k] + [20 + i for i in range(put_after) if i % 20 == k])} for k in range(20)}

        # The operator's view, then a retry once the bug is fixed.
        args = ["--redis-url", shared_url, "--prefix", PREFIX]
        assert await in_thread(["writebehind", "dead", "cart", *args, "--json"]) == 0
        [shown] = json.loads(capsys.readouterr().out)
        assert (shown["key"], shown["version"], shown["value"]) == ("bad", poison_version, '{"poison":true}')
        assert "value out of range" in shown["error"]
        assert await in_thread(["writebehind", "dead", "cart", *args]) == 0
        assert "key=bad" in capsys.readouterr().out
        accept_poison = True
        assert await in_thread(["writebehind", "retry", "cart", *args]) == 0
        assert "moved 1 dead letter back" in capsys.readouterr().out
        await until(lambda: "bad" in db.rows(), "the retried write flushed")
        assert db.rows()["bad"] == ({"poison": True}, poison_version), "a retry keeps the version"
        await until(lambda: drained(writes), "acknowledged")
        after = await writes.status()
    assert (after.dead, after.requeued, after.backlog) == (0, 1, 0)


async def test_two_processes_flush_each_write_once_at_least_and_never_go_backwards(
        shared_url: str, db: Database, tmp_path: Path) -> None:
    common = ["--redis-url", shared_url, "--prefix", PREFIX, "--name", "cart", "--db", str(db.path),
              "--batch-size", "10", "--flush-delay", "0.002"]
    writes: WriteBehind[Any] = WriteBehind("cart", redis_url=shared_url, key_prefix=PREFIX)  # puts only
    seen: dict[str, int] = {}
    backwards: list[tuple[str, int, int]] = []

    def watch() -> None:
        for key, (_, version) in db.rows().items():
            if version < seen.get(key, 0):
                backwards.append((key, seen[key], version))
            seen[key] = max(seen.get(key, 0), version)

    count, keys = 2000, 50
    latest: dict[str, tuple[int, int]] = {}
    with worker(tmp_path, "flush", *common, "--worker", "a") as a, \
            worker(tmp_path, "flush", *common, "--worker", "b") as b:
        try:
            for i in range(count):
                latest[f"k{i % keys}"] = (i, await writes.put(f"k{i % keys}", {"n": i}))
                if i % 100 == 99:
                    watch()
                    await anyio.sleep(0.005)  # bursts, as traffic comes

            async def done() -> bool:
                watch()
                return await drained(writes)

            await until(done, "both processes drained the stream", within=30)
            status = await writes.status()
        finally:
            for proc in (a, b):
                proc.send_signal(signal.SIGTERM)
            for proc in (a, b):
                assert proc.wait(timeout=20) == 0, "a graceful stop"
        await writes.aclose()

    assert backwards == [], "the database never went back to an older version"
    final = db.rows()
    assert {k: (v["n"], version) for k, (v, version) in final.items()} == latest
    assert status.flushed >= count and status.dead == 0
    with closing(sqlite3.connect(db.path)) as conn:
        log = conn.execute("SELECT worker, key, version, superseded FROM flushed ORDER BY rowid").fetchall()
    assert {row[0] for row in log} == {"a", "b"}, "both processes flushed"
    # Each write was flushed itself or superseded in a batch by a newer write of its key.
    assert sum(1 + row[3] for row in log) >= count
    for name in ("a", "b"):
        versions: dict[str, int] = {}
        for _, key, version, _ in (row for row in log if row[0] == name):
            assert version > versions.get(key, 0), f"worker {name} flushed {key} out of order"
            versions[key] = version


# -- shutdown and registration ---------------------------------------------------------------


async def test_shutdown_flushes_what_it_can_and_leaves_the_rest_for_the_next_start(
        shared_url: str, db: Database) -> None:
    release = anyio.Event()

    async def stuck(batch: list[Write[Any]]) -> None:
        await release.wait()

    writes = WriteBehind("cart", flush=stuck, redis_url=shared_url, key_prefix=PREFIX, grace_period=0.3,
                         claim_idle=0.5)
    started = anyio.current_time()
    async with writes.running():
        for i in range(10):
            await writes.put(f"k{i}", i)
        await until(lambda: writes.status(), "status")  # the flusher is running
        await until(lambda: _pending(writes), "the flusher holds the writes")
    assert anyio.current_time() - started < 5, "the grace period bounds the last flush"
    assert (await writes.status()).backlog == 10, "what could not be flushed stays in Redis"
    await writes.aclose()

    # The next start (another process: another consumer) flushes them.
    again = WriteBehind("cart", flush=db.flush, redis_url=shared_url, key_prefix=PREFIX, claim_idle=0.5)
    async with again.running():
        await until(lambda: drained(again), "the next start drained the stream")
    assert {k: v for k, (v, _) in db.rows().items()} == {f"k{i}": i for i in range(10)}


async def _pending(writes: WriteBehind[Any]) -> bool:
    return (await writes.status()).pending > 0


async def test_shutdown_flushes_what_was_put_last(shared_url: str, db: Database) -> None:
    writes = WriteBehind("cart", flush=db.flush, redis_url=shared_url, key_prefix=PREFIX, batch_delay=5.0)
    async with writes.running():
        for i in range(5):
            await writes.put(f"k{i}", i)
    assert {k: v for k, (v, _) in db.rows().items()} == {f"k{i}": i for i in range(5)}
    assert (await writes.status()).backlog == 0
    await writes.aclose()


async def test_attach_runs_the_flusher_as_a_supervisor_service(shared_url: str, db: Database) -> None:
    writes = WriteBehind("cart", flush=db.flush)
    supervisor = Supervisor(grace_period=2.0)
    writes.attach(supervisor, redis_url=shared_url, key_prefix=PREFIX)
    assert writes.backend == "redis"
    async with supervisor.run():
        await writes.put("user:1", {"items": [3]})
        await until(lambda: "user:1" in db.rows(), "flushed by the supervised flusher")
        assert (await writes.status()).flushers == 1
    await writes.aclose()
    with direct(shared_url) as r:
        assert r.exists(f"{PREFIX}:wb:{{cart}}:v:user:1")
    # Attached again with the same settings (a second lifespan): fine; with others: refused.
    writes.attach(Supervisor(), redis_url=shared_url, key_prefix=PREFIX)
    with pytest.raises(ValueError, match="HINT"):
        writes.attach(Supervisor(), redis_url=None, key_prefix=PREFIX)


async def test_a_restarted_flusher_finds_its_own_pending_writes(shared_url: str, db: Database) -> None:
    writes = WriteBehind("cart", flush=db.flush, redis_url=shared_url, key_prefix=PREFIX, claim_idle=60)
    await writes.put("a", 1)
    async with anyio.create_task_group() as tg:
        await tg.start(writes.run_flusher)
        await until(lambda: "a" in db.rows(), "first flush")
        tg.cancel_scope.cancel()  # as the supervisor does before restarting a failed service
    await writes.put("b", 2)
    with direct(shared_url) as r:  # b delivered to this consumer, as if it failed before flushing it
        r.xreadgroup("cachemw", writes.consumer, {f"{PREFIX}:wb:{{cart}}:stream": ">"})
    async with anyio.create_task_group() as tg:
        await tg.start(writes.run_flusher)
        # Not claimed (claim_idle is a minute): found again as this consumer's own pending write.
        await until(lambda: "b" in db.rows(), "own pending write flushed after the restart", within=5)
        await writes.stop()
    await writes.aclose()


async def test_memory_backend_works_in_process_and_flushes_at_shutdown(db: Database) -> None:
    writes = WriteBehind("cart", flush=db.flush, batch_delay=5.0)
    with pytest.raises(RuntimeError, match="HINT"):
        await writes.put("a", 1)
    async with writes.running():
        assert writes.backend == "memory"
        for i in range(10):
            await writes.put(f"k{i % 2}", i)
        assert await writes.get("k0") == 8
        status = await writes.status()
        assert (status.backend, status.backlog) == ("memory", 10)
        with pytest.raises(VersionConflict):
            await writes.put("k0", 0, if_version=1)
    assert {k: v for k, (v, _) in db.rows().items()} == {"k0": 8, "k1": 9}
    assert (await writes.status()).backlog == 0


async def test_memory_backend_retries_and_dead_letters_like_redis(db: Database) -> None:
    async def flush(batch: list[Write[Any]]) -> None:
        if any(w.key == "bad" for w in batch):
            raise ValueError("refused")
        await db.flush(batch)

    writes = WriteBehind("cart", flush=flush, retry_backoff=0.01, max_backoff=0.02, max_attempts=2,
                         batch_delay=0.001)
    async with writes.running():
        await writes.put("bad", 0)
        n = 0

        async def dead() -> bool:
            nonlocal n
            n += 1
            await writes.put(f"k{n % 5}", n)
            return (await writes.status()).dead == 1

        await until(dead, "dead-lettered")
        assert [letter.key for letter in await writes.dead_letters()] == ["bad"]
        assert await writes.retry_dead_letters() == 1
        assert (await writes.status()).requeued == 1


async def test_retain_expires_values_only_after_they_reached_the_database(shared_url: str, db: Database) -> None:
    writes = WriteBehind("cart", flush=db.flush, redis_url=shared_url, key_prefix=PREFIX, retain=0.3,
                         retry_backoff=0.01, max_backoff=0.05)
    db.down = True
    async with writes.running():
        await writes.put("a", 1)
        await until(lambda: db.calls >= 3, "failed flushes")
        with direct(shared_url) as r:
            assert r.ttl(f"{PREFIX}:wb:{{cart}}:v:a") == -1, "unflushed values never expire"
        db.down = False
        await until(lambda: "a" in db.rows(), "flushed")
        assert await writes.get("a") == 1
        await until(lambda: _absent(writes, "a"), "expired after retain")
        # A put after expiry gets a newer version than the database has.
        assert await writes.put("a", 2) > db.rows()["a"][1]
    await writes.aclose()


async def _absent(writes: WriteBehind[Any], key: str) -> bool:
    return await writes.get(key) is None


class Upper:
    """A serializer of strings, stored upper-cased: proves the hook is used both ways."""

    def dumps(self, value: str) -> bytes:
        return value.upper().encode()

    def loads(self, data: bytes) -> str:
        if data.startswith(b"{"):
            raise ValueError("not one of ours")
        return data.decode().lower()


async def test_pluggable_serializer_and_undecodable_values_are_dead_lettered(shared_url: str) -> None:
    got: list[Write[str]] = []

    async def flush(batch: list[Write[str]]) -> None:
        got.extend(batch)

    writes = WriteBehind("notes", flush=flush, serializer=Upper(), redis_url=shared_url, key_prefix=PREFIX)
    async with writes.running():
        await writes.put("n1", "hello")
        with direct(shared_url) as r:
            assert r.hget(f"{PREFIX}:wb:{{notes}}:v:n1", "value") == b"HELLO"
            r.xadd(f"{PREFIX}:wb:{{notes}}:stream", {"key": "n2", "version": 1, "value": b'{"json": 1}'})
        assert await writes.get("n1") == "hello"

        async def dead() -> bool:
            return (await writes.status()).dead == 1

        await until(dead, "undecodable value dead-lettered")
        await until(lambda: drained(writes), "drained")
        [letter] = await writes.dead_letters()
    assert [(w.key, w.value) for w in got] == [("n1", "hello")]
    assert letter.key == "n2" and "cannot decode" in letter.error


async def test_a_write_whose_flushers_keep_dying_is_dead_lettered(shared_url: str, db: Database) -> None:
    writes = WriteBehind("cart", flush=db.flush, redis_url=shared_url, key_prefix=PREFIX, claim_idle=0.2,
                         max_attempts=3)
    await writes.put("crashy", 1)
    stream = f"{PREFIX}:wb:{{cart}}:stream"
    with direct(shared_url) as r:
        r.xgroup_create(stream, "cachemw", "0")
        [[_, [(entry_id, _)]]] = r.xreadgroup("cachemw", "ghost-1", {stream: ">"})
        for n in range(2, 5):  # claimed by one flusher after another, each dying with it
            r.xclaim(stream, "cachemw", f"ghost-{n}", 0, [entry_id])
    async with writes.running():
        async def dead() -> bool:
            return (await writes.status()).dead == 1

        await until(dead, "dead-lettered after repeated deaths")
        [letter] = await writes.dead_letters()
    assert letter.key == "crashy" and "delivered 5 times" in letter.error
    assert db.rows() == {}


async def test_a_dead_letter_that_fails_once_is_tried_again_not_stranded(
        shared_url: str, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis blip while a write that kept killing its flushers is moved to the dead letters."""
    from cachemw.store.base import StoreError
    from cachemw.writebehind.stream import RedisBackend

    real = RedisBackend.dead_letter
    blips = [1]

    async def once_failing(self: Any, *args: Any) -> None:
        if blips[0]:
            blips[0] -= 1
            raise StoreError("redis dead letter failed: connection reset")
        await real(self, *args)

    monkeypatch.setattr(RedisBackend, "dead_letter", once_failing)
    writes = WriteBehind("cart", flush=db.flush, redis_url=shared_url, key_prefix=PREFIX, claim_idle=0.2,
                         max_attempts=3)
    await writes.put("crashy", 1)
    stream = f"{PREFIX}:wb:{{cart}}:stream"
    with direct(shared_url) as r:
        r.xgroup_create(stream, "cachemw", "0")
        [[_, [(entry_id, _)]]] = r.xreadgroup("cachemw", "ghost-1", {stream: ">"})
        for n in range(2, 5):
            r.xclaim(stream, "cachemw", f"ghost-{n}", 0, [entry_id])
    async with writes.running():
        async def settled() -> bool:  # dead-lettered after all, or flushed by the flusher that now owns it
            return (await writes.status()).dead == 1 or bool(db.rows())

        await until(settled, "the write leaving the flusher once the blip passed")
    assert blips == [0]


# -- operating -------------------------------------------------------------------------------


async def test_status_reports_backlog_and_lag_and_the_cli_shows_it(
        shared_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    writes: WriteBehind[Any] = WriteBehind("cart", redis_url=shared_url, key_prefix=PREFIX)
    empty = await writes.status()
    assert empty == WriteBehindStatus(name="cart", backend="redis", backlog=0, pending=0, lag=0.0, dead=0,
                                      flushers=0, flushed=0, failed_flushes=0, retried=0, dead_lettered=0,
                                      claimed=0, requeued=0)
    await writes.put("a", 1)
    await until(lambda: _lag_at_least(writes, 0.05), "lag grows while nothing flushes")
    await writes.aclose()

    assert await in_thread(["writebehind", "status", "cart", "--redis-url", shared_url, "--prefix", PREFIX,
                            "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["backlog"] == 1 and shown["lag"] >= 0.05 and shown["name"] == "cart"
    assert await in_thread(["writebehind", "status", "cart", "--redis-url", shared_url, "--prefix", PREFIX]) == 0
    text = capsys.readouterr().out
    assert "write-behind cart (redis)" in text and "backlog" in text and "1 writes" in text


async def _lag_at_least(writes: WriteBehind[Any], seconds: float) -> bool:
    return (await writes.status()).lag >= seconds


def test_cli_errors_are_clean(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CACHEMW_REDIS_URL", raising=False)
    assert cli(["writebehind", "status", "cart"]) == 2
    assert "no Redis URL" in capsys.readouterr().err
    assert cli(["writebehind", "status", "bad{name}", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    assert "write-behind name" in capsys.readouterr().err
    # Nothing listens on port 1: a store error, not a traceback.
    assert cli(["writebehind", "dead", "cart", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    assert capsys.readouterr().err.startswith("cachemw: write-behind")
    with pytest.raises(SystemExit):
        cli(["writebehind", "purge", "cart"])


def test_bad_arguments_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="write-behind name"):
        WriteBehind("a{b}")
    with pytest.raises(ValueError, match="claim_idle"):
        WriteBehind("a", claim_idle=0)
    with pytest.raises(ValueError, match="batch_size"):
        WriteBehind("a", batch_size=0)


async def test_keys_are_bounded() -> None:
    writes: WriteBehind[Any] = WriteBehind("a")
    writes.attach(Supervisor())
    with pytest.raises(ValueError, match="keys are strings"):
        await writes.put("", 1)
    with pytest.raises(ValueError, match="keys are strings"):
        await writes.put("x" * 2000, 1)



# -- the sample app: two servers on one Redis --------------------------------------------------


@contextmanager
def sample_server(workdir: Path, redis_url: str, db_path: Path) -> Iterator[str]:
    """``python -m sample_app`` on a free port; stopped gracefully (SIGTERM) and checked on the way out."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEMW_")}
    env.update(CACHEMW_REDIS_URL=redis_url, SAMPLE_DB_PATH=str(db_path), SAMPLE_DB_DELAY="0.02")
    log_path = workdir / f"server-{port}.log"
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sample_app", "--port", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + READY_DEADLINE
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            try:
                if httpx.get(base + "/debug/queries", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # poll interval; bounded by the deadline
        yield base
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code in (0, -signal.SIGTERM), log_path.read_text()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


def _items(response: httpx.Response) -> list[tuple[int, int]]:
    assert response.status_code == 200, response.text
    return [(item["product_id"], item["qty"]) for item in response.json()["items"]]


def test_sample_app_cart_is_read_at_once_through_any_server_and_written_behind_to_sqlite(
        redis_url: str, tmp_path: Path) -> None:
    db_path = tmp_path / "sample.sqlite3"
    with sample_server(tmp_path, redis_url, db_path) as one, sample_server(tmp_path, redis_url, db_path) as two, \
            httpx.Client(timeout=10) as browser:
        assert _items(browser.get(one + "/cart")) == []
        cookie = browser.cookies["session"]
        assert _items(browser.post(one + "/cart/items", json={"product_id": 2, "qty": 1})) == [(2, 1)]
        # The very next request, through the other server: already there.
        assert _items(browser.get(two + "/cart")) == [(2, 1)]
        assert _items(browser.post(two + "/cart/items", json={"product_id": 2, "qty": 2})) == [(2, 3)]
        assert _items(browser.post(one + "/cart/items", json={"product_id": 5, "qty": 1})) == [(2, 3), (5, 1)]
        assert _items(browser.get(two + "/cart")) == [(2, 3), (5, 1)]
        assert browser.post(one + "/cart/items", json={"product_id": 999, "qty": 1}).status_code == 404

        deadline = time.monotonic() + 20
        while True:  # SQLite catches up, written behind by whichever server's flusher got the writes
            with closing(sqlite3.connect(db_path, timeout=10)) as conn:
                lines = conn.execute("SELECT product_id, qty FROM cart_items WHERE session = ?"
                                     " ORDER BY product_id", (cookie,)).fetchall()
            lag = browser.get(two + "/cart/lag")
            assert lag.status_code == 200 and lag.headers["x-cache"] == "BYPASS"
            if lines == [(2, 3), (5, 1)] and lag.json()["backlog"] == 0:
                break
            assert time.monotonic() < deadline, (lines, lag.json())
            time.sleep(0.05)  # poll interval; bounded by the deadline
        status = lag.json()
        assert status["name"] == "cart" and status["backend"] == "redis"
        assert status["flushed"] == 3 and status["dead"] == 0 and status["flushers"] == 2


# -- Redis Cluster and Sentinel specifics ----------------------------------------------------------

# What write-behind sends for a name: none of it may reach a node other than the one owning the name's slot.
DATA_COMMANDS = ("eval", "evalsha", "script|load", "command|getkeys", "time", "xadd", "xreadgroup", "xautoclaim",
                 "xpending", "xclaim", "xrange", "xack", "xdel", "xlen", "xgroup|create", "xgroup|delconsumer",
                 "xinfo|groups", "xinfo|consumers", "hmget", "hset", "hget", "hincrby", "incr", "set", "persist",
                 "pexpire")


def _commandstats(port: int) -> dict[str, int]:
    with redis.Redis(port=port, socket_timeout=5) as r:
        return {name.removeprefix("cmdstat_"): int(stats["calls"])
                for name, stats in r.info("commandstats").items()}


async def test_on_a_cluster_every_command_goes_to_the_node_owning_the_names_slot(
        cluster_url: str, redis_cluster: Any, db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    refuse = True

    async def flush(batch: list[Write[Any]]) -> None:
        if refuse and any(w.key == "bad" for w in batch):
            raise ValueError("refused")
        await db.flush(batch)

    writes = WriteBehind("cart", flush=flush, redis_url=cluster_url, key_prefix=PREFIX, retry_backoff=0.01,
                         max_backoff=0.02, max_attempts=2, batch_delay=0.001, claim_idle=0.2, retain=60)
    await writes.put("ghost", 0)
    with direct(cluster_url) as r:  # a flusher that died holding a write: claimed below
        stream = f"{PREFIX}:wb:{{cart}}:stream"
        r.xgroup_create(stream, "cachemw", "0")
        r.xreadgroup("cachemw", "ghost", {stream: ">"})
        owner = r.get_node_from_key(stream).port
        # redis-py sends keyless commands (TIME, COMMAND GETKEYS) to the node owning slot 0: not this one.
        assert r.nodes_manager.get_node_from_slot(0).port != owner
    primaries = redis_cluster.primaries()
    for node in primaries:  # counting from here: only what the WriteBehind sends
        with redis.Redis(port=node.port, socket_timeout=5) as r:
            r.config_resetstat()
    async with writes.running():
        await writes.put("bad", 0)
        n = 0

        async def dead() -> bool:
            nonlocal n
            n += 1
            await writes.put(f"k{n % 5}", n, if_version=None)
            await writes.update("counter", lambda v: _plus_one(v))
            return (await writes.status()).dead == 1

        await until(dead, "the poison write dead-lettered while the others flow")
        assert [letter.key for letter in await writes.dead_letters()] == ["bad"]
        refuse = False
        assert await writes.retry_dead_letters() == 1
        await until(lambda: "ghost" in db.rows() and "bad" in db.rows(), "claimed and retried writes flushed")
        await until(lambda: drained(writes), "drained")
        status = await writes.status()
        assert (status.claimed, status.requeued, status.dead, status.flushers) == (1, 1, 0, 2)  # 2: with the ghost
    assert await writes.get("k1") is not None
    await writes.aclose()

    assert len(primaries) == 3
    for node in primaries:
        sent = {name: calls for name, calls in _commandstats(node.port).items() if name in DATA_COMMANDS}
        if node.port == owner:
            assert {"evalsha", "xreadgroup", "xautoclaim", "xpending", "hmget"} <= set(sent), sent
        else:
            assert sent == {}, f"node {node.port} does not own the slot of {{cart}} but got {sent}"


async def _plus_one(value: Any) -> int:
    return (value or 0) + 1


async def test_write_behinds_on_every_node_of_a_cluster_flush_side_by_side(cluster_url: str, db: Database) -> None:
    """Names hashing to each of the three masters, one flusher each, run together."""
    with direct(cluster_url) as r:
        by_node: dict[str, str] = {}
        for i in range(200):
            name = f"q{i}"
            by_node.setdefault(r.get_node_from_key(f"{PREFIX}:wb:{{{name}}}:stream").name, name)
    names = sorted(by_node.values())
    assert len(names) == 3
    queues = [WriteBehind(name, flush=db.flush, redis_url=cluster_url, key_prefix=PREFIX, batch_size=10)
              for name in names]
    async with anyio.create_task_group() as tg:
        for queue in queues:
            await tg.start(queue.run_flusher)
        for i in range(60):
            await queues[i % 3].put(f"{names[i % 3]}:k{i % 6}", i)
        await until(lambda: len(db.rows()) == 6, "each queue's keys in the database")
        for queue in queues:
            await until(lambda q=queue: drained(q), f"{queue.name} drained")
            await queue.stop()
    for queue in queues:
        await queue.aclose()
    assert {k: v for k, (v, _) in db.rows().items()} == {
        f"{names[i % 3]}:k{i % 6}": max(j for j in range(60) if j % 6 == i % 6) for i in range(6)}


def _replicas_in_sync(cluster: LocalCluster) -> bool:
    synced = 0
    for node in cluster.nodes:
        with redis.Redis(port=node.port, socket_timeout=5) as r:
            info = r.info("replication")
        if info["role"] == "slave" and info.get("master_link_status") == "up" \
                and not info.get("master_sync_in_progress"):
            synced += 1
    return synced == cluster.masters * cluster.replicas


async def test_the_flusher_follows_a_failover_of_its_streams_master(
        tmp_path_factory: pytest.TempPathFactory, db: Database) -> None:
    cluster = LocalCluster(tmp_path_factory.mktemp("wb-failover"), masters=3, replicas=1, node_timeout_ms=1000)
    cluster.start()
    try:
        await until(lambda: _replicas_in_sync(cluster), "replicas in sync")
        writes = WriteBehind("cart", flush=db.flush, redis_url=cluster.url, key_prefix=PREFIX, timeout=0.3,
                             retry_backoff=0.05, max_backoff=0.5)
        with direct(cluster.url) as r:
            owner = r.get_node_from_key(f"{PREFIX}:wb:{{cart}}:stream").port
        async with writes.running():
            for i in range(100):
                await writes.put(f"k{i % 10}", i)
            await until(lambda: drained(writes), "drained before the failover")
            next(node for node in cluster.nodes if node.port == owner).stop()
            latest: dict[str, int] = {}

            async def all_put_again() -> bool:  # puts fail (loudly) until the replica took over
                for k in range(10):
                    if f"k{k}" not in latest:
                        with contextlib.suppress(StoreError):
                            await writes.put(f"k{k}", 1000 + k)
                            latest[f"k{k}"] = 1000 + k
                return len(latest) == 10

            await until(all_put_again, "puts work again on the new master", within=30)
            await until(lambda: {k: v for k, (v, _) in db.rows().items()} == latest,
                        "the flusher, on the new master, flushed the writes put after the failover", within=30)
            await until(lambda: drained(writes), "drained after the failover")
        await writes.aclose()
    finally:
        cluster.stop()


async def test_an_unreachable_cluster_is_a_store_error() -> None:
    writes: WriteBehind[Any] = WriteBehind("cart", redis_url="redis+cluster://127.0.0.1:1", timeout=0.2)
    try:
        with pytest.raises(StoreError):
            await writes.put("a", 1)
        with pytest.raises(StoreError):
            await writes.status()
    finally:
        await writes.aclose()


async def test_put_get_and_flush_through_sentinel(sentinel_url: str, redis_url: str, db: Database,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    writes = WriteBehind("cart", flush=db.flush, redis_url=sentinel_url, key_prefix=PREFIX, batch_delay=0.001)
    reader: WriteBehind[Any] = WriteBehind("cart", redis_url=sentinel_url, key_prefix=PREFIX)
    try:
        async with writes.running():
            version = await writes.put("user:1", {"items": [1]})
            assert await reader.get_versioned("user:1") == ({"items": [1]}, version)
            for i in range(20):
                await reader.put(f"k{i % 4}", i)
            await until(lambda: drained(writes), "flushed through the sentinel's master")
            status = await writes.status()
        assert (status.flushed, status.flushers, status.backlog) == (21, 1, 0)
        assert {k: v for k, (v, _) in db.rows().items()} == {"user:1": {"items": [1]}, "k0": 16, "k1": 17,
                                                             "k2": 18, "k3": 19}
    finally:
        await writes.aclose()
        await reader.aclose()
    with direct(redis_url) as r:  # the master the sentinel names
        assert r.hget(f"{PREFIX}:wb:{{cart}}:v:user:1", "version") == str(version).encode()
    assert await in_thread(["writebehind", "status", "cart", "--redis-url", sentinel_url, "--prefix", PREFIX,
                            "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flushed"] == 21


async def test_under_the_middlewares_supervisor_puts_are_flushed_and_the_rest_at_shutdown(
        shared_url: str, db: Database) -> None:
    """What ``CacheMiddleware(write_behind=[...])`` does: attach to its supervisor with its settings."""
    writes: WriteBehind[Any] = WriteBehind("cart", flush=db.flush, batch_delay=30.0)  # batches wait: shutdown flushes

    async def add(request: Request) -> Response:
        await writes.put(request.path_params["user"], {"items": [1]})
        return JSONResponse(await writes.get(request.path_params["user"]))

    supervisor = Supervisor(grace_period=5.0)
    app = Starlette(routes=[Route("/cart/{user}", add, methods=["POST"])])
    app.add_middleware(CacheMiddleware, redis_url=shared_url, key_prefix=PREFIX, supervisor=supervisor)
    writes.attach(supervisor, redis_url=shared_url, key_prefix=PREFIX)  # prepare() will make this call
    async with lifespan(app), asgi_client(app) as http:
        response = await http.post("/cart/alice")
        assert response.json() == {"items": [1]}
        await until(lambda: _pending(writes), "the flusher holds the write, waiting to fill a batch")
        assert db.rows() == {}
    assert db.rows() == {"alice": ({"items": [1]}, db.rows()["alice"][1])}, "flushed at shutdown"
    assert (await writes.status()).backlog == 0
    await writes.aclose()


@pytest.mark.anyio
async def test_the_installed_cachemw_command_shows_the_backlog(redis_url: str) -> None:
    writes: WriteBehind[Any] = WriteBehind("cli-cart", flush=None)
    async with writes.running(redis_url=redis_url):
        await writes.put("user:1", {"items": [1]})
        await writes.put("user:2", {"items": [2]})
    script = Path(sys.executable).with_name("cachemw")
    done = await anyio.to_thread.run_sync(lambda: subprocess.run(
        [str(script), "writebehind", "status", "cli-cart", "--redis-url", redis_url, "--json"],
        capture_output=True, text=True, timeout=30))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["backlog"] == 2
