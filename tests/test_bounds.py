"""Memory stays bounded: 100,000 distinct keys through the middleware on a small memory store."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message

from cachemw import CacheMiddleware, MemoryStore, cache

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
    assert cache_layer._flights == {} and cache_layer._refreshing == set()
    indexed = sum(len(members) for members in store._tag_sets.values())
    assert indexed <= 4 * len(store) + 3 * 128  # the tag index follows the live entries


async def test_memory_store_forgets_tag_sets_and_locks_of_entries_long_gone() -> None:
    """One ``path:`` tag set per URL and locks whose release was shed must not pile up for ever."""
    clock = [0.0]
    store = MemoryStore(max_bytes=64 * 1024, clock=lambda: clock[0])
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


async def test_memory_store_sweeps_stay_amortised_when_a_tag_set_is_refilled_at_its_threshold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tag of exactly 64 live entries, refilled over and over: not one full sweep per fill."""
    store = MemoryStore()
    prunes = [0]
    prune = MemoryStore._prune

    def counting(self: MemoryStore, members: dict[str, float], now: float) -> int:
        prunes[0] += 1
        return prune(self, members, now)

    monkeypatch.setattr(MemoryStore, "_prune", counting)
    for _ in range(20):
        for i in range(64):
            await store.fill(f"e{i}", b"x", 60, None, ["tag:hot"], [], [])
    assert prunes[0] <= 2  # the first time the set reached 64, not ~1,200 times
