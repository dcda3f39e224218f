"""Server-assisted L1 invalidation: Redis tracks the entry keys and every server's L1 evicts what changed.

Two app instances on one real Redis (a Sentinel-named master, or a 3-master Cluster, where each master tracks its
own keys), ``sync`` 30 s: only Redis's tracking messages can explain B dropping its L1
copy within the condition budget. Each test fails with
tracking off (``servers(..., tracking=False)``: B keeps answering its old copy).
"""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from cachemw import CacheMiddleware, RedisStore, Settings, cache
from cachemw.core.entry import decode_entry, encode_entry
from tests.helpers import SpyStore, client, eventually, find_middleware, lifespan, node_urls, raw_redis, store_of
from tests.redis_server import RedisServer
from tests.runtime.test_invalidation import Database, servers, version, warm

pytestmark = pytest.mark.anyio

SYNC = 30.0  # far longer than any wait here: an eviction within it is the tracking's doing
TRACKING = True  # set False once to see every test here fail


async def _true(value: bool) -> bool:
    return value


def _redis(spy: object) -> RedisStore:
    inner = getattr(spy, "inner", None)
    assert isinstance(inner, RedisStore)
    return inner


async def _hit(b: httpx.AsyncClient) -> bool:
    return (await version(b))[0] == "HIT"


async def _b_sees(b: httpx.AsyncClient, expected: int) -> bool:
    return (await version(b))[1] == expected


async def _changed_behind_our_back(url: str, db: Database, key: str, new_version: int, b: httpx.AsyncClient) -> None:
    """The database moves on and the entry is deleted by another tool (no broadcast): B must see it soon."""
    db.versions[1] = new_version
    async with raw_redis(url) as raw:
        await raw.delete(key)
    await eventually(lambda: _b_sees(b, new_version), what=f"B hearing the change to version {new_version}")


async def _warm_tracked(b: httpx.AsyncClient, store_b: SpyStore) -> RedisStore:
    store = _redis(store_b)
    await _tracked(store)
    await warm(b, store_b)
    return store


async def _tracked(store: RedisStore) -> None:
    await eventually(lambda: _true(store.listening and store.tracking), within=10,
                     what="the subscription listening with tracking on")


async def test_a_purge_on_a_evicts_bs_copy_without_any_broadcast(shared_url: str) -> None:
    await _purge_on_a_reaches_b(shared_url)


async def test_a_sentinel_named_master_is_tracked(sentinel_url: str) -> None:
    await _purge_on_a_reaches_b(sentinel_url)


async def _purge_on_a_reaches_b(url: str) -> None:
    async with servers(url, sync=SYNC, tracking=TRACKING) as (db, apps, (_a, b), (store_a, store_b)):
        # A announces its purges on a channel nobody hears: only Redis's own messages reach B.
        _redis(store_a).invalidation_channel = "elsewhere:invalidations"
        await warm(b, store_b)
        db.versions[1] = 2
        invalidator = find_middleware(apps[0]).invalidator
        assert invalidator is not None
        assert await invalidator.tags("product:1") == 1
        await eventually(lambda: _b_sees(b, 2), what="server B evicting its L1 copy after A's purge")


async def test_an_entry_overwritten_elsewhere_is_evicted_from_bs_l1(shared_url: str) -> None:
    async with servers(shared_url, sync=SYNC, tracking=TRACKING) as (_db, _, (_a, b), (_, store_b)):
        await _warm_tracked(b, store_b)
        key = store_b.keys_set[-1]
        async with raw_redis(shared_url) as raw:
            data = await raw.get(key)
            assert isinstance(data, bytes)
            entry = decode_entry(data)
            newer = dataclasses.replace(entry, body=json.dumps({"id": 1, "version": 7}).encode())
            await raw.set(key, encode_entry(newer))  # another server's refresh, as Redis sees it
        await eventually(lambda: _b_sees(b, 7), what="server B answering the overwritten entry")
        assert (await version(b)) == ("HIT", 7)


async def test_a_killed_tracking_link_flushes_the_l1_and_tracking_comes_back(shared_url: str) -> None:
    async with servers(shared_url, sync=SYNC, tracking=TRACKING) as (db, apps, (_a, b), (_, store_b)):
        store = await _warm_tracked(b, store_b)
        l1 = find_middleware(apps[1]).l1
        assert l1.get(store_b.keys_set[-1]) is not None
        # On a cluster, the last node's links only: a link to one master lost is enough to flush.
        raw = redis.asyncio.Redis.from_url(node_urls(shared_url)[-1])
        try:
            assert await raw.client_kill_filter(_type="pubsub") >= 2  # both servers' links
        finally:
            await raw.aclose()
        await eventually(lambda: _true(l1.get(store_b.keys_set[-1]) is None), what="B flushing its L1")
        await _tracked(store)
        # The new link tracks again: a delete behind cachemw's back is heard at once.
        await _changed_behind_our_back(shared_url, db, store_b.keys_set[-1], 3, b)


async def test_the_l1_is_flushed_when_the_link_goes_silent(killable: RedisServer) -> None:
    """The link's PING watchdog (not tracking itself: it guards the pub/sub announcements too)."""
    async with servers(killable.url, sync=SYNC, tracking=TRACKING) as (_db, apps, (_a, b), (_, store_b)):
        store = await _warm_tracked(b, store_b)
        l1 = find_middleware(apps[1]).l1
        assert l1.get(store_b.keys_set[-1]) is not None
        killable.pause()  # SIGSTOP: the connections stay open, nothing answers
        try:
            await eventually(lambda: _true(not store.listening), within=5, what="B noticing its link is silent")
            assert l1.get(store_b.keys_set[-1]) is None  # its copies no longer answer as fresh
        finally:
            killable.resume()
        await _tracked(store)


async def test_a_restarted_empty_redis_is_tracked_again(killable: RedisServer) -> None:
    async with servers(killable.url, sync=SYNC, tracking=TRACKING) as (db, _, (_a, b), (_, store_b)):
        store = _redis(store_b)
        await warm(b, store_b)
        killable.stop()
        await eventually(lambda: _true(not store.listening), what="B noticing Redis is gone")
        killable.start()  # empty: nothing on disk
        await _tracked(store)
        await eventually(lambda: _hit(b), what="the entry filled again and kept in B's L1")
        await _changed_behind_our_back(killable.url, db, store_b.keys_set[-1], 4, b)


async def test_garbage_on_the_tracking_channel_and_foreign_keys_break_nothing(redis_url: str) -> None:
    async with servers(redis_url, sync=SYNC, tracking=TRACKING) as (db, _, (_a, b), (_, store_b)):
        store = await _warm_tracked(b, store_b)
        raw = redis.asyncio.Redis.from_url(redis_url)
        try:
            for junk in (b"not a list", b"\xff" * 10, b"[" * 5000):
                await raw.publish("__redis__:invalidate", junk)  # an ordinary channel: anyone may publish
            await raw.set(b"cachemw:e:\xff\xfe not ours", b"x")  # foreign keys under the tracked prefix
            await raw.set(b"cachemw:e:" + b"k" * 70000 + b"}", b"x")
            await raw.delete(b"cachemw:e:nothing}")
            await eventually(lambda: _true(store.notifications.rejected >= 3), what="the garbage counted")
            assert store.listening and store.tracking
            await eventually(lambda: _hit(b), what="the entry back in B's L1 (the garbage flushed it)")
        finally:
            await raw.aclose()
        await _changed_behind_our_back(redis_url, db, store_b.keys_set[-1], 5, b)



@pytest.mark.parametrize("tracking", [True, False])
async def test_the_tracking_setting_turns_the_link_on_and_off(redis_url: str, tracking: bool) -> None:
    @cache(ttl="5m", sync=SYNC)
    async def page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("page")

    app = Starlette(routes=[Route("/page", page)])
    app.add_middleware(CacheMiddleware, redis_url=redis_url, settings=Settings(tracking=tracking))
    async with lifespan(app), client(app) as http:
        assert (await http.get("/page")).status_code == 200
        store = store_of(app)
        assert isinstance(store, RedisStore)
        await eventually(lambda: _true(store.listening), what="the subscription listening")
        if tracking:
            await _tracked(store)
        else:
            assert not store.tracking
        async with raw_redis(redis_url) as raw:
            trackers = [entry for entry in await raw.client_list() if "t" in entry.get("flags", "")]
        assert bool(trackers) is tracking
