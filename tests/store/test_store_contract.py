"""The Store contract, run against every store; then what is specific to each.

The contract runs on the memory store, a private redis-server and a private 3-master
Redis Cluster (see conftest.py). RedisStore's own tests include the faults the
middleware must survive: a dead server, a frozen one, a restarted one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import anyio
import pytest
import redis.exceptions

from cachemw.core.entry import (
    HEAD_SIZE,
    PASS_MARKER,
    WINDOWS_OFFSET,
    Entry,
    decode_entry,
    encode_entry,
    soften,
)
from cachemw.store import MemoryStore, RedisStore, Store, StoreError, store_from_url

try:
    from tests.budgets import Budgets
    from tests.redis_cluster import LocalCluster
    from tests.redis_server import RedisServer
except ImportError:  # tests/ as a plain directory
    from budgets import Budgets  # type: ignore[no-redef,import-not-found]
    from redis_cluster import LocalCluster  # type: ignore[no-redef,import-not-found]
    from redis_server import RedisServer  # type: ignore[no-redef,import-not-found]

pytestmark = pytest.mark.anyio

# Generous for a loaded test machine; fault tests set their own, tighter budget.
REDIS_TIMEOUT = 0.5


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def wait_until(condition: Callable[[], Awaitable[bool]], within: float) -> bool:
    """Poll ``condition`` until it holds or ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        if await condition():
            return True
        if time.monotonic() >= deadline:
            return False
        await anyio.sleep(0.01)


@dataclass
class Harness:
    store: Store
    short_ttl: float
    let_expire: Callable[[str], Awaitable[bool]]  # True once the key reads as gone
    nodes: frozenset[str] = frozenset()  # a sharded store's node names (what ``shard`` answers); none: unsharded


@pytest.fixture(params=["memory", "redis", "cluster"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()
        memory = MemoryStore(clock=clock)

        async def advance_past(key: str) -> bool:
            clock.advance(10.001)
            return await memory.get(key) is None

        yield Harness(memory, 10.0, advance_past)
        await memory.aclose()
    else:
        url: str = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
        # A Cluster's three nodes share the machine with the rest of the suite: the budgets fixture's store
        # timeout, not the single server's fixed one (a loaded run timed out a SET at 0.5 s).
        budgets: Budgets = request.getfixturevalue("budgets")
        timeout = REDIS_TIMEOUT if request.param == "redis" else max(REDIS_TIMEOUT, budgets.store_timeout)
        store = RedisStore.from_url(url, timeout=timeout)

        async def wait_gone(key: str) -> bool:
            async def gone() -> bool:
                return await store.get(key) is None

            return await wait_until(gone, within=2.0)

        nodes: frozenset[str] = frozenset()
        if request.param == "cluster":
            cluster: LocalCluster = request.getfixturevalue("redis_cluster")
            nodes = frozenset(f"127.0.0.1:{node.port}" for node in cluster.primaries())
        yield Harness(store, 0.05, wait_gone, nodes)
        await store.aclose()


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    """A store with a tight time budget, as in production, for the fault tests."""
    store = RedisStore.from_url(redis_url, timeout=0.1)
    yield store
    await store.aclose()


# --- the contract ---------------------------------------------------------------


async def test_is_a_store(harness: Harness) -> None:
    assert isinstance(harness.store, Store)


async def test_get_or_lock_answers_the_value_or_takes_the_lock(harness: Harness) -> None:
    # A key as the runtime makes them (keyspace.entry_key): its hash tag keeps its lock and wait flag in its
    # Cluster slot. A bare "k" would not (k:lock lives elsewhere), and a Cluster refuses a script over two slots.
    store, k = harness.store, "{k}"
    token, value, generations = await store.get_or_lock(k, 5, ["g"], "mine")
    assert (token, value, generations) == ("mine", None, (0,))  # nothing there: the lock is ours
    assert (await store.get_or_lock(k, 5, ["g"], "theirs"))[:2] == (None, None)  # held: not taken twice
    await store.fill(k, b"v", 60, "mine", [], ["g"], generations)
    assert (await store.get_or_lock(k, 5, ["g"], "later"))[:2] == (None, b"v")  # a value: no lock attempted
    # On a Cluster the generation keys live in other slots than the entry: get_or_lock is a GET, then
    # (nothing there) the lock and the generations, two round trips; the answers are the same.
    assert store.capabilities.lookup_locks is (isinstance(store, RedisStore) and not harness.nodes)


async def test_capabilities_say_what_the_runtime_may_rely_on(harness: Harness) -> None:
    store = harness.store
    capabilities = store.capabilities
    assert capabilities.remote is isinstance(store, RedisStore)
    if not harness.nodes:
        assert capabilities.sharded is False and store.shard("k") == ""  # one server: one breaker
    await store.connect(1.0)  # the startup probe: nothing to open for memory, a connection for Redis
    assert await store.get("k") is None
    if harness.nodes:  # a Cluster: a breaker per node, named by the node that serves the key
        assert capabilities.sharded is True
        assert store.shard("k") in harness.nodes
        assert len({store.shard(key) for key in ("a", "b", "c", "d", "e", "f")}) > 1


async def test_get_missing_is_none(harness: Harness) -> None:
    assert await harness.store.get("missing") is None


@pytest.mark.parametrize(
    "value",
    [b"", b"\x00", b"plain", bytes(range(256)), b"\r\n$-1\r\n", os.urandom(1 << 20)],
    ids=["empty", "nul", "plain", "all-bytes", "resp-lookalike", "1MB"],
)
async def test_roundtrip_binary(harness: Harness, value: bytes) -> None:
    await harness.store.set("k", value, 60)
    assert await harness.store.get("k") == value


async def test_keys_are_distinct_and_unicode(harness: Harness) -> None:
    await harness.store.set("ключ:ü", b"1", 60)
    await harness.store.set("ключ:u", b"2", 60)
    assert await harness.store.get("ключ:ü") == b"1"
    assert await harness.store.get("ключ:u") == b"2"


async def test_overwrite(harness: Harness) -> None:
    await harness.store.set("k", b"first", 60)
    await harness.store.set("k", b"second, longer", 60)
    assert await harness.store.get("k") == b"second, longer"


async def test_expiry(harness: Harness) -> None:
    await harness.store.set("k", b"v", harness.short_ttl)
    await harness.store.set("other", b"stays", 60)
    assert await harness.store.get("k") == b"v"
    assert await harness.let_expire("k"), "the entry did not expire"
    assert await harness.store.get("other") == b"stays"


@pytest.mark.parametrize("ttl", [0, -1, float("nan")])
async def test_set_with_no_lifetime_removes(harness: Harness, ttl: float) -> None:
    await harness.store.set("k", b"old", 60)
    await harness.store.set("k", b"new", ttl)
    assert await harness.store.get("k") is None


async def test_tiny_ttl_is_still_stored(harness: Harness) -> None:
    # Redis needs PX >= 1 ms: a sub-millisecond ttl must not be an error.
    await harness.store.set("k", b"v", 0.0001)


async def test_delete_returns_count(harness: Harness) -> None:
    store = harness.store
    await store.set("a", b"1", 60)
    await store.set("b", b"2", 60)
    await store.set("c", b"3", 60)
    assert await store.delete("a", "b", "missing") == 2
    assert await store.get("a") is None
    assert await store.get("b") is None
    assert await store.get("c") == b"3"
    assert await store.delete("a") == 0
    assert await store.delete() == 0
    assert await store.delete("c", "c") == 1


async def test_a_fill_an_invalidation_overtook_is_not_stored(harness: Harness) -> None:
    store = harness.store
    token, _, generations = await store.lock("{a}", 5, ["{t}:g"])
    assert token is not None and generations == (0,)
    assert await store.invalidate(["{t}:tag"], ["{t}:g"], json.dumps(["t"])) == 0  # nothing indexed yet
    assert await store.fill("{a}", b"old", 60, token, ["{t}:tag"], ["{t}:g"], generations) is False
    assert await store.get("{a}") is None
    assert (await store.lock("{a}", 5, ["{t}:g"]))[0] is not None  # the refused fill released its lock too


async def test_invalidate_drops_what_its_tags_index(harness: Harness) -> None:
    store = harness.store
    for key, tags in (("{a}", ["{t}:tag"]), ("{b}", ["{t}:tag", "{u}:tag"]), ("{c}", ["{u}:tag"])):
        token, _, generations = await store.lock(key, 5, [])
        assert await store.fill(key, b"v", 60, token, tags, [], generations)
    assert await store.invalidate(["{t}:tag"], ["{t}:g"], json.dumps(["t"])) == 2
    assert [await store.get(key) for key in ("{a}", "{b}", "{c}")] == [None, None, b"v"]
    assert (await store.lock("{d}", 5, ["{t}:g"]))[2] == (1,)  # the generation moved on


async def test_unlock_releases_only_its_own_lock(harness: Harness) -> None:
    store = harness.store
    token, _, _ = await store.lock("{a}", 5, [])
    assert token is not None
    await store.unlock("{a}", "someone else's")
    assert (await store.lock("{a}", 5, []))[0] is None  # still held
    await store.unlock("{a}", token)
    assert (await store.lock("{a}", 5, []))[0] is not None


async def test_purge_drops_the_matching_entries_and_moves_the_generation(harness: Harness) -> None:
    store = harness.store
    for key in ("p:{1}", "p:{2}", "q:{3}"):
        await store.set(key, b"v", 60)
    assert await store.purge("p:*}", "{all}:g", json.dumps(["*"])) == 2
    assert [await store.get(key) for key in ("p:{1}", "p:{2}", "q:{3}")] == [None, None, b"v"]
    assert (await store.lock("p:{1}", 5, ["{all}:g"]))[2] == (1,)


# --- soft purges: entries marked stale in place (cachemw.core.entry.soften) ----------------------

SOFT_ENTRY = Entry(200, ((b"content-type", b"text/plain"),), b"old body", 0.0, b'"e"', ("t",))


def entry_bytes(stored_at: float, stale_while_revalidate: float = 600.0) -> bytes:
    return encode_entry(replace(SOFT_ENTRY, stored_at=stored_at), ttl=60.0,
                        stale_while_revalidate=stale_while_revalidate)


async def test_a_soft_invalidation_marks_entries_stale_and_drops_what_cannot_be(harness: Harness) -> None:
    store = harness.store
    now = time.time()
    stale_from = now + 0.123456789  # any time: written exactly as Python computes it, in Redis as here
    fresh, already_stale = entry_bytes(now), entry_bytes(now - 120)
    values = {"{a}": fresh, "{b}": already_stale, "{c}": entry_bytes(now, stale_while_revalidate=0),
              "{d}": fresh[:3] + b"\x01" + fresh[4:WINDOWS_OFFSET] + fresh[HEAD_SIZE:],  # an older cachemw's
              "{e}": PASS_MARKER, "{f}": b"CMW\x02 but short", "{g}": b"\x80\x04\x95pickle"}
    for key, value in values.items():
        token, _, generations = await store.lock(key, 5, [])
        assert await store.fill(key, value, 3600, token, ["{t}:tag"], [], generations)
    assert await store.invalidate(["{t}:tag"], ["{t}:g"], json.dumps(["t"]), stale_from=stale_from) == len(values)
    softened = await store.get("{a}")
    assert softened == soften(fresh, stale_from)
    assert decode_entry(softened or b"") == replace(SOFT_ENTRY, stored_at=stale_from - 60.0)
    assert await store.get("{b}") == already_stale  # stale already: not made younger
    assert [await store.get(key) for key in ("{c}", "{d}", "{e}", "{f}", "{g}")] == [None] * 5
    assert (await store.lock("{x}", 5, ["{t}:g"]))[2] == (1,)  # the generation moved, as for a hard purge
    if isinstance(store, RedisStore):
        assert await store.client.pttl("{a}") > 3_500_000  # rewritten in place: its expiry kept
    # Still indexed under its tag: a hard purge later finds it.
    assert await store.invalidate(["{t}:tag"], ["{t}:g"], json.dumps(["t"])) == 2
    assert await store.get("{a}") is None and await store.get("{b}") is None


async def test_a_fill_a_soft_invalidation_overtook_is_not_stored(harness: Harness) -> None:
    store = harness.store
    old = entry_bytes(time.time())
    token, _, generations = await store.lock("{a}", 5, ["{t}:g"])
    assert await store.fill("{a}", old, 3600, token, ["{t}:tag"], ["{t}:g"], generations)
    token, _, generations = await store.lock("{a}", 5, ["{t}:g"])  # a refresh: it reads the old row now
    assert await store.invalidate(["{t}:tag"], ["{t}:g"], json.dumps(["t"]), stale_from=time.time()) == 1
    refill = entry_bytes(time.time())
    assert await store.fill("{a}", refill, 3600, token, ["{t}:tag"], ["{t}:g"], generations) is False
    # The stale entry, or nothing (a Cluster's fill stores, compares, then deletes): never the refused fill.
    left = await store.get("{a}")
    assert left != refill and (left is None or decode_entry(left).stored_at < time.time() - 59)


async def test_a_soft_purge_of_everything_marks_the_matching_entries(harness: Harness) -> None:
    store = harness.store
    now = time.time()
    for key in ("p:{1}", "p:{2}", "q:{3}"):
        await store.set(key, entry_bytes(now), 60)
    assert await store.purge("p:*}", "{all}:g", json.dumps(["*"]), stale_from=now) == 2
    assert [decode_entry(await store.get(key) or b"").stored_at for key in ("p:{1}", "p:{2}", "q:{3}")] == [
        now - 60.0, now - 60.0, now]
    assert (await store.lock("p:{1}", 5, ["{all}:g"]))[2] == (1,)


async def test_redis_soft_invalidation_drops_a_foreign_key_of_another_type(shared_url: str) -> None:
    store = RedisStore.from_url(shared_url, timeout=REDIS_TIMEOUT)
    try:
        await store.client.sadd("{w}", "not an entry")  # anyone who reaches the Redis can write under our names
        await store.client.zadd("{t}:tag", {"{w}": 1e12})
        assert await store.invalidate(["{t}:tag"], ["{t}:g"], json.dumps(["t"]), stale_from=time.time()) == 1
        assert await store.client.exists("{w}") == 0
    finally:
        await store.aclose()


async def test_aclose(harness: Harness) -> None:
    await harness.store.set("k", b"v", 60)
    await harness.store.aclose()  # the fixture closes again: must be harmless


# --- MemoryStore ----------------------------------------------------------------


async def cost_of(key: str, value: bytes) -> int:
    """What one entry counts against the bound (its objects as the process holds them, not len(key + value))."""
    store = MemoryStore()
    await store.set(key, value, 60)
    return store.bytes_used


async def test_memory_lru_eviction_by_bytes() -> None:
    one = await cost_of("a", b"x" * 9)
    assert one > 10  # the key's and value's objects, not their 10 bytes
    store = MemoryStore(max_bytes=3 * one)
    for key in "abc":
        await store.set(key, b"x" * 9, 60)  # exactly full
    assert len(store) == 3
    assert store.bytes_used == 3 * one
    await store.set("d", b"x" * 9, 60)
    assert await store.get("a") is None
    assert [await store.get(k) for k in "bcd"] == [b"x" * 9] * 3
    assert store.evictions == 1
    assert store.bytes_used == 3 * one
    # A bigger value (more than one entry, at most two) evicts as many as needed.
    big = b"x" * 9
    while await cost_of("e", big) <= one:
        big += b"x" * 16
    assert await cost_of("e", big) <= 2 * one
    await store.set("e", big, 60)
    assert await store.get("d") == b"x" * 9  # b and c made room, d stays
    assert store.stats.evictions == 3
    assert len(store) == 2
    assert store.bytes_used == one + await cost_of("e", big)


async def test_memory_get_refreshes_recency() -> None:
    store = MemoryStore(max_bytes=3 * await cost_of("a", b"x" * 9))
    for key in "abc":
        await store.set(key, b"x" * 9, 60)
    assert await store.get("a") == b"x" * 9
    await store.set("d", b"x" * 9, 60)
    assert await store.get("b") is None
    assert await store.get("a") is not None


async def test_memory_oversized_value_is_not_stored() -> None:
    store = MemoryStore(max_bytes=await cost_of("small", b"x" * 5) + 100)
    await store.set("small", b"x" * 5, 60)
    await store.set("big", b"x" * store.max_bytes, 60)  # alone more than the bound
    assert await store.get("big") is None
    assert await store.get("small") == b"x" * 5  # the cache was not flushed for it
    assert store.rejected == 1
    assert store.evictions == 0


async def test_memory_oversized_replacement_drops_old_value() -> None:
    store = MemoryStore(max_bytes=await cost_of("k", b"old") + 16)
    await store.set("k", b"old", 60)
    assert await store.get("k") == b"old"
    await store.set("k", b"x" * 200, 60)
    assert await store.get("k") is None
    assert store.bytes_used == 0


async def test_memory_overwrite_accounts_bytes() -> None:
    store = MemoryStore()
    await store.set("k", b"x" * 100, 60)
    await store.set("k", b"x" * 10, 60)
    assert store.bytes_used == await cost_of("k", b"x" * 10)
    assert len(store) == 1
    await store.delete("k")
    assert store.bytes_used == 0


async def test_memory_expired_entries_are_dropped_on_access() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    await store.set("k", b"v", 5)
    clock.advance(4.999)
    assert await store.get("k") == b"v"
    clock.advance(0.001)
    assert await store.get("k") is None
    assert len(store) == 0
    assert store.bytes_used == 0
    assert store.stats.expirations == 1


async def test_memory_delete_does_not_count_expired() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    await store.set("k", b"v", 5)
    clock.advance(6)
    assert await store.delete("k") == 0
    assert store.bytes_used == 0


async def test_memory_empty_store_is_truthy() -> None:
    # __len__ alone would make an empty store falsy: ``store or default`` would misfire.
    assert MemoryStore()


def test_memory_rejects_negative_bound() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryStore(max_bytes=-1)


# --- RedisStore: plumbing -------------------------------------------------------


async def test_redis_unix_socket_url(redis_url: str, redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.unix_url, timeout=REDIS_TIMEOUT)
    try:
        await store.set("k", b"via unix", 60)
        assert await store.get("k") == b"via unix"
    finally:
        await store.aclose()


async def test_redis_values_stay_bytes_whatever_the_url_says(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url + "?decode_responses=True", timeout=REDIS_TIMEOUT)
    try:
        await store.set("k", b"\xff\xfe", 60)
        assert await store.get("k") == b"\xff\xfe"
    finally:
        await store.aclose()


async def test_redis_ttl_is_set_in_milliseconds(redis_url: str, redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_url, timeout=REDIS_TIMEOUT)
    try:
        await store.set("k", b"v", 1.5)
        await store.set("tiny", b"v", 0.0001)
    finally:
        await store.aclose()
    with redis_server.client() as client:
        assert 1000 < client.pttl("k") <= 1500
        assert client.pttl("tiny") in (-2, 0, 1)  # 1 ms, or already gone


async def test_redis_pool_waits_instead_of_failing(shared_url: str) -> None:
    # redis-py's default pool raises MaxConnectionsError beyond its size; ours waits,
    # whatever mix of lookups, locks, fills and releases runs at once.
    store = RedisStore.from_url(shared_url, timeout=2.0, max_connections=4)
    try:
        await store.set("k", b"v", 60)
        results: list[bytes | None] = []

        async def read() -> None:
            results.append(await store.get("k"))

        async def miss(i: int) -> None:
            key = f"pool:{{k{i}}}"
            token, _, generations = await store.lock(key, 5, [])
            assert token is not None
            await store.fill(key, b"x", 60, token, [], [], generations)
            await store.unlock(key, token)

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(read)
                if i % 2:
                    tg.start_soon(miss, i)
        assert results == [b"v"] * 200
    finally:
        await store.aclose()


async def test_redis_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0)
    with pytest.raises(ValueError):
        RedisStore.from_url("http://127.0.0.1:1/0")


async def test_store_from_url(redis_url: str) -> None:
    memory = store_from_url(None, timeout=0.05, memory_max_bytes=1234)
    assert isinstance(memory, MemoryStore)
    assert memory.max_bytes == 1234
    for url in (redis_url, "rediss://127.0.0.1:1/0", "unix:///tmp/nowhere.sock"):
        store = store_from_url(url, timeout=0.05, memory_max_bytes=1234)
        assert isinstance(store, RedisStore)
        await store.aclose()
    with pytest.raises(ValueError, match=r"memcached://.*redis://, rediss://, unix://") as info:
        store_from_url("memcached://user:secret@host:11211", timeout=0.05, memory_max_bytes=1)
    assert "secret" not in str(info.value)
    with pytest.raises(ValueError, match="redis://"):
        store_from_url("localhost:6379", timeout=0.05, memory_max_bytes=1)


# --- RedisStore: faults ---------------------------------------------------------


async def test_redis_stopped_server_fails_fast(redis_store: RedisStore, redis_server: RedisServer) -> None:
    await redis_store.set("k", b"v", 60)  # a pooled, connected connection
    redis_server.stop()
    for operation in (
        lambda: redis_store.get("k"),
        lambda: redis_store.set("k", b"v", 60),
        lambda: redis_store.delete("k"),
    ):
        with anyio.fail_after(1), pytest.raises(StoreError) as info:
            await operation()
        assert isinstance(info.value.__cause__, (redis.exceptions.RedisError, OSError))


async def test_redis_unreachable_from_the_start_fails_fast(redis_server: RedisServer) -> None:
    redis_server.stop()
    store = RedisStore.from_url(redis_server.url, timeout=0.1)
    try:
        with anyio.fail_after(1), pytest.raises(StoreError):
            await store.get("k")
    finally:
        await store.aclose()


def _timed_out(error: StoreError) -> bool:
    """A timeout, whether the pipelined connection's own or redis-py's."""
    return isinstance(error, TimeoutError) or isinstance(error.__cause__, redis.exceptions.TimeoutError)


async def test_redis_frozen_server_times_out_and_no_stale_reply(
    redis_store: RedisStore, redis_server: RedisServer
) -> None:
    await redis_store.set("k1", b"a", 60)
    await redis_store.set("k2", b"b", 60)
    redis_server.pause()
    try:
        with anyio.fail_after(1), pytest.raises(StoreError) as info:
            await redis_store.get("k1")
        assert _timed_out(info.value)
    finally:
        redis_server.resume()
    # The frozen server now answers the GET k1 it had queued; that reply must not be
    # taken as the answer to the next command (the timed-out connection is dropped).
    assert await redis_store.get("k2") == b"b"
    assert await redis_store.get("k1") == b"a"


async def test_redis_recovers_after_restart(redis_store: RedisStore, redis_server: RedisServer) -> None:
    await redis_store.set("k", b"v", 60)
    redis_server.stop()
    with anyio.fail_after(1), pytest.raises(StoreError):
        await redis_store.get("k")
    redis_server.start()
    # No persistence: the data is gone, but the store works again without help.
    assert await redis_store.get("k") is None
    await redis_store.set("k", b"again", 60)
    assert await redis_store.get("k") == b"again"


async def test_redis_recovers_after_unnoticed_restart(
    redis_store: RedisStore, redis_server: RedisServer
) -> None:
    # The pooled connection died while nobody used it: the next call must not fail.
    await redis_store.set("k", b"v", 60)
    redis_server.stop()
    # In a running app the event loop sees the server's FIN while the connection idles
    # (the pool then replaces it before use); let it. Without this, the first call after
    # a restart fails once with StoreError: no retries, by design.
    await anyio.sleep(0.05)
    redis_server.start()
    assert await redis_store.get("k") is None
    await redis_store.set("k", b"again", 60)
    assert await redis_store.get("k") == b"again"


async def test_redis_busy_server_times_out_and_no_stale_reply(
    redis_store: RedisStore, redis_server: RedisServer
) -> None:
    # A server that is alive but slow (DEBUG SLEEP) answers the timed-out GET late.
    await redis_store.set("k1", b"a", 60)
    await redis_store.set("k2", b"b", 60)

    def debug_sleep() -> None:
        with redis_server.client() as client:
            client.execute_command("DEBUG", "SLEEP", "0.5")

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, debug_sleep)
        deadline = time.monotonic() + 0.4
        while True:  # until a GET lands while the server sleeps
            with anyio.fail_after(1):
                try:
                    assert await redis_store.get("k1") == b"a"
                except StoreError as exc:
                    assert _timed_out(exc)
                    break
            assert time.monotonic() < deadline, "the server never seemed busy"
    assert await redis_store.get("k2") == b"b"
    assert await redis_store.get("k1") == b"a"


async def test_fills_are_announced_only_when_another_process_waits(redis_store: RedisStore,
                                                                    redis_server: RedisServer) -> None:
    """Announcing every fill would make every subscriber read every fill; only waiters need to hear."""
    with redis_server.client() as raw, raw.pubsub() as pubsub:
        pubsub.subscribe(redis_store.channel)
        assert pubsub.get_message(timeout=1)["type"] == "subscribe"

        token, _, generations = await redis_store.lock("alone", 5, ["g"])
        assert token is not None
        assert await redis_store.fill("alone", b"v", 60, token, [], ["g"], generations)

        token, _, generations = await redis_store.lock("awaited", 5, ["g"])
        assert token is not None
        other, _, _ = await redis_store.lock("awaited", 5, ["g"])  # another process finds it taken: it waits
        assert other is None
        assert await redis_store.fill("awaited", b"v", 60, token, [], ["g"], generations)

        token, _, _ = await redis_store.lock("given-up", 5, ["g"])
        assert token is not None
        assert (await redis_store.lock("given-up", 5, ["g"]))[0] is None
        await redis_store.unlock("given-up", token)  # released without a fill: the waiter must hear it too

        heard: list[bytes] = []
        deadline = time.monotonic() + 2
        while len(heard) < 2 and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message is not None and message["type"] == "message":
                heard.append(message["data"])
        assert heard == [b"awaited", b"given-up"]  # nothing for "alone"
