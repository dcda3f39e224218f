"""Memory stays bounded: 100,000 distinct keys through the middleware on a small memory store."""

from __future__ import annotations

import contextlib
import gc
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message

from cachemw import CacheMiddleware, MemoryStore, cache
from cachemw.core.entry import DecodedMemo, Entry, decode_entry, encode_entry
from cachemw.store.l1 import L1

pytestmark = pytest.mark.anyio


@cache(ttl="5m", tags=["page"])
async def page(request: Request) -> Response:
    return PlainTextResponse("x" * 200)


async def test_a_hundred_thousand_distinct_keys_stay_within_the_bounds() -> None:
    store = MemoryStore(max_bytes=1024 * 1024)
    app = Starlette(routes=[Route("/page", page)])
    app.add_middleware(CacheMiddleware, store=store)
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for i in range(100_000):
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": "/page", "raw_path": b"/page", "query_string": b"q=%d" % i,
            "root_path": "", "headers": [(b"host", b"testserver")], "server": ("testserver", 80),
            "client": ("127.0.0.1", 1), "app": app,
        }
        await app(scope, receive, send)
    assert statuses == [200] * 100_000
    assert store.bytes_used <= store.max_bytes and store.evictions > 90_000
    cache_layer: Any = app.middleware_stack
    while not isinstance(cache_layer, CacheMiddleware):
        cache_layer = cache_layer.app
    runtime = cache_layer.runtime
    assert runtime is not None
    assert runtime.flights.active == {} and runtime.fills.refreshing == set()
    indexed = sum(len(members) for members in store._tag_sets.values())
    assert indexed <= 4 * len(store) + 3 * 128  # the tag index follows the live entries


async def test_memory_store_forgets_tag_sets_and_locks_of_entries_long_gone() -> None:
    """One ``path:`` tag set per URL and locks whose release was shed must not pile up for ever."""
    clock = [0.0]
    # Locks count in the bound (~340 B each): ~500 live at a time must leave room for entries.
    store = MemoryStore(max_bytes=1024 * 1024, clock=lambda: clock[0])
    for i in range(5000):
        key = f"e{i}"
        token, _, generations = await store.lock(key, 5, ["g"])
        assert token is not None
        if i % 2:  # half of them filled (and released), half never released
            await store.fill(key, b"x" * 100, 10, token, [f"path:/item/{i}", "route:/item/{id}"], ["g"],
                             generations)
        clock[0] += 0.01  # 50 s in all: early entries and locks expire along the way
    assert len(store._tag_sets) < 1100  # ~ the live entries' sets, not 2,500 + 1
    assert len(store._locks) < 1100  # not 2,500 abandoned ones
    assert len(store) > 0


async def test_memory_store_tag_index_holds_exactly_the_live_entries() -> None:
    """Refilled, evicted or deleted, an entry leaves no member behind in its tag sets."""
    store = MemoryStore(max_bytes=64 * 1024)
    for _ in range(20):
        for i in range(64):
            await store.fill(f"e{i}", b"x" * 100, 60, None, ["tag:hot", f"path:/e{i}"], [], [])
    live = {f"e{i}" for i in range(64) if await store.get(f"e{i}") is not None}
    assert 0 < len(live) < 64 and store.evictions > 0  # the bound made room
    assert store._tag_sets["tag:hot"] == live
    assert set(store._tag_sets) == {"tag:hot", *(f"path:/{key}" for key in live)}
    await store.delete(*live)
    assert store._tag_sets == {} and store.bytes_used == 0


@contextlib.contextmanager
def _tracing() -> Iterator[list[int]]:
    """Bytes of the Python objects made in the block and alive at its end, as ``held[0]``.

    A full collection on both sides empties the free lists of tuples, floats, ... first.
    """
    held = [0]
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        yield held
        gc.collect()
        held[0] = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def _varied_value(i: int) -> bytes:
    return bytes([65 + i % 26]) * (10 + (i * 7919) % 6000)  # 10 B to 6 KB bodies, pymalloc's and malloc's sizes


def _varied_entry(i: int) -> Entry:
    headers = tuple((f"x-header-{j}".encode(), b"v" * ((i + j) % 90)) for j in range(i % 7))
    tags = (*(f"tag:{t}" for t in range(i % 4)), f"path:/item/{i}")
    return Entry(200, (*headers, (b"etag", b'"%d"' % i)), _varied_value(i), 1.0, b'"%d"' % i, tags)


async def test_memory_store_counts_at_least_what_tracemalloc_sees_and_stays_within_its_bound() -> None:
    """Keys, values, records, LRU and tag-index slots, locks: what the process holds is what the bound counts.

    Counting ``len(key) + len(value)`` undercounts every entry by its objects' headers and slots.
    """
    bound = 256 * 1024
    with _tracing() as held:
        store = MemoryStore(max_bytes=bound)
        for i in range(3000):
            key = f"cachemw:e:/item/<id>:{{{i:0{8 + i % 60}x}}}"  # keys of 30 to 90 characters
            if i % 5 == 0:
                await store.lock(key, 60, [])  # some never released
            tag_sets = [f"cachemw:t:{{{t}}}" for t in range(i % 4)] + [f"cachemw:t:{{path{i}}}"]
            await store.fill(key, _varied_value(i), 60, None, tag_sets, [], [])
            assert store.bytes_used <= bound
    assert store.evictions > 2000  # it churned through its bound many times
    assert held[0] <= store.bytes_used <= bound


async def test_memory_store_counts_each_entry_at_least_as_tracemalloc_does() -> None:
    with _tracing() as held:
        store = MemoryStore(max_bytes=2**40)
        for i in range(2000):
            await store.fill(f"cachemw:e:{{{i:0{8 + i % 60}x}}}", _varied_value(i), 60, None,
                             [f"cachemw:t:{{{t}}}" for t in range(i % 4)], [], [])
    lengths = sum(len(key) + len(value) for key, (value, *_) in store._data.items())
    assert held[0] > lengths * 1.05  # the objects cost more than their lengths ...
    assert store.bytes_used >= held[0]  # ... and the store counts what they cost


def test_l1_counts_at_least_what_its_decoded_entries_cost_and_stays_within_its_bound() -> None:
    """Headers as tuples of bytes, bodies, tags and the tag index: an L1 of 256 KiB holds 256 KiB."""
    bound = 256 * 1024
    with _tracing() as held:
        l1 = L1(max_bytes=bound)
        for i in range(3000):
            l1.put(f"cachemw:e:/item/<id>:{{{i:032x}}}", _varied_entry(i), 60)
            assert l1.bytes_used <= bound
    assert len(l1) < 3000
    assert held[0] <= l1.bytes_used <= bound
    l1.clear()
    assert l1.bytes_used == 0


def test_l1_counts_entries_and_tag_sets_and_gives_them_back() -> None:
    l1 = L1(max_bytes=2**40)
    with _tracing() as held:
        for i in range(1000):
            l1.put(f"cachemw:e:{i}", _varied_entry(i), 60)
    assert held[0] <= l1.bytes_used
    l1.drop_tags(["tag:0"])  # every entry with i % 4 != 0
    l1.drop_tags([f"path:/item/{i}" for i in range(0, 1000, 4)])
    assert len(l1) == 0 and l1.bytes_used == 0


def test_the_decode_memo_holds_at_most_its_bytes() -> None:
    memo = DecodedMemo(max_bytes=128 * 1024)
    with _tracing() as held:
        for i in range(2000):
            data = encode_entry(_varied_entry(i))
            memo.put(data, decode_entry(data))
            assert memo.bytes_used <= memo.max_bytes
    assert 0 < len(memo) < 2000
    assert held[0] <= memo.bytes_used
    assert memo.entries.get(data) is not None  # the latest is found with one lookup
