"""What the cache counts, and the three ways out: the snapshot, Prometheus, the fleet view in Redis."""

from __future__ import annotations

import collections
import json
import sys
import time as real_time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any, cast

import anyio
import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

import cachemw.asgi.handler
import cachemw.asgi.responses
import cachemw.runtime.locks
from cachemw import CacheMiddleware, MemoryStore, Settings, cache
from cachemw.observe import (
    aggregate,
    enable_fleet_metrics,
    enable_history,
    find_cache,
    flush_fleet_metrics,
    full_snapshot,
    history,
    metrics_app,
    quantile,
    read_fleet,
    snapshot,
)
from cachemw.observe.prometheus import CacheCollector
from cachemw.observe.snapshot import COUNTERS
from cachemw.runtime.shell import CacheShell
from tests.helpers import client, eventually, lifespan

pytestmark = pytest.mark.anyio

calls: collections.Counter[str] = collections.Counter()
failing: set[str] = set()


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    failing.clear()


class Clock:
    """The middleware's wall clock, moved by the test; durations still come from the real counters."""

    def __init__(self) -> None:
        self.now = real_time.time()

    def time(self) -> float:
        return self.now

    perf_counter = staticmethod(real_time.perf_counter)
    monotonic = staticmethod(real_time.monotonic)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    for module in (cachemw.asgi.handler, cachemw.asgi.responses, cachemw.runtime.locks):  # where entries age
        monkeypatch.setattr(module, "time", fake)
    return fake


def answer(name: str) -> Response:
    calls[name] += 1
    if name in failing:
        return PlainTextResponse("origin down", status_code=503)
    return PlainTextResponse(f"{name} {calls[name]}")


@cache(ttl="5m", tags=["product:{id}"])
async def product(request: Request) -> Response:
    return answer("product")


@cache(ttl=60, stale_while_revalidate=3600)
async def news(request: Request) -> Response:
    return answer("news")


@cache(ttl=60, stale_if_error=3600)
async def flaky(request: Request) -> Response:
    return answer("flaky")


@cache(ttl=60, stale_while_revalidate=3600)
async def broken_refresh(request: Request) -> Response:
    return answer("broken")


@cache("realtime")
async def cart(request: Request) -> Response:
    return answer("cart")


@cache("minutes")
async def slow(request: Request) -> Response:
    await anyio.sleep(0.3)
    return answer("slow")


async def plain(request: Request) -> Response:
    return answer("plain")


def routes() -> list[Any]:
    return [
        Route("/products/{id:int}", product),
        Route("/news", news),
        Route("/flaky", flaky),
        Route("/broken", broken_refresh),
        Route("/cart", cart),
        Route("/slow/{id}", slow),
        Route("/plain", plain),
        Mount("/metrics", app=metrics_app()),
    ]


def make_app(**options: Any) -> Starlette:
    app = Starlette(routes=routes())
    app.add_middleware(CacheMiddleware, **options)
    return app


@pytest.fixture
async def app() -> AsyncIterator[Starlette]:
    app = make_app(store=MemoryStore())
    async with lifespan(app):
        yield app


def jobs_done(cache_: CacheShell, kind: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return cache_.supervisor.counters_for(kind).done >= n

    return check


def route_of(data: dict[str, Any], template: str) -> dict[str, Any]:
    [row] = [row for row in data["routes"] if row["route"] == template]
    found: dict[str, Any] = row
    return found


def counters(row: dict[str, Any]) -> dict[str, int]:
    skipped = ("stored_bytes", "origin_busy", "fills_shed", "l1_hits")
    return {name: row[name] for name in COUNTERS if name not in skipped}


async def scripted(app: Starlette, clock: Clock) -> CacheShell:
    """A fixed sequence of requests; returns the middleware that counted them."""
    async with client(app) as http:

        async def get(path: str, expected: str, **headers: str) -> None:
            response = await http.get(path, headers=headers)
            assert response.headers["x-cache"] == expected, (path, response.headers["x-cache"], response.text)

        await get("/products/1", "MISS")
        cache_ = find_cache(app)
        await eventually(jobs_done(cache_, "fill", 1), what="the first fill")
        for _ in range(3):
            await get("/products/1", "HIT")
        await get("/products/2", "MISS")
        await get("/products/1", "BYPASS", authorization="Bearer x")  # credentials on a shared route
        await get("/cart", "BYPASS")
        await get("/cart", "BYPASS")
        for _ in range(2):  # no policy: passed through, not counted
            assert "x-cache" not in (await http.get("/plain")).headers

        await get("/news", "MISS")
        await get("/flaky", "MISS")
        await get("/broken", "MISS")
        await eventually(jobs_done(cache_, "fill", 5), what="five fills")

        clock.now += 61  # past every ttl: news and broken are stale, flaky only usable if the origin fails
        await get("/news", "STALE")
        await eventually(jobs_done(cache_, "refresh", 1), what="the refresh of /news")
        await get("/news", "HIT")  # the refresh stored a new entry

        failing.update({"flaky", "broken"})
        await get("/flaky", "STALE")  # stale-if-error: the origin answered 503
        await get("/broken", "STALE")
        await eventually(jobs_done(cache_, "refresh", 2), what="the failed refresh of /broken")

        async with anyio.create_task_group() as tg:  # two at once on one key: one fill, one coalesced wait
            tg.start_soon(get, "/slow/1", "MISS")
            await anyio.sleep(0.05)
            tg.start_soon(get, "/slow/1", "MISS")
        await eventually(jobs_done(cache_, "fill", 6), what="the slow fill")
    return cache_


async def test_counters_match_a_scripted_sequence(app: Starlette, clock: Clock) -> None:
    cache_ = await scripted(app, clock)
    data = snapshot(cache_)
    products = route_of(data, "/products/{id:int}")
    assert counters(products) == {"requests": 6, "hit": 3, "stale": 0, "miss": 2, "bypass": 1, "stale_if_error": 0,
                                  "collapsed": 0, "refresh_ok": 0, "refresh_failed": 0, "stored_entries": 2}
    assert products["policy"] == "custom"
    assert products["source"] == "decorator"
    assert products["tags"] == ["product:{id}"]
    assert products["hit_ratio"] == 0.6
    assert products["origin_latency"]["count"] == 3  # two misses and the bypass called the app
    assert products["hit_latency"]["count"] == 3
    store = cache_.store
    assert isinstance(store, MemoryStore)
    assert products["stored_bytes"] == sum(len(value) for key, (value, *_) in store._data.items()
                                           if ":e:/products/<id>:" in key)

    assert counters(route_of(data, "/cart")) == {**dict.fromkeys(counters(products), 0), "requests": 2, "bypass": 2}
    assert route_of(data, "/cart")["policy"] == "realtime"
    assert route_of(data, "/cart")["cached"] is False

    news_row = route_of(data, "/news")
    assert counters(news_row) == {"requests": 3, "hit": 1, "stale": 1, "miss": 1, "bypass": 0, "stale_if_error": 0,
                                  "collapsed": 0, "refresh_ok": 1, "refresh_failed": 0, "stored_entries": 2}
    assert news_row["hit_latency"]["count"] == 2
    assert news_row["origin_latency"]["count"] == 1  # a refresh is not a request

    assert counters(route_of(data, "/flaky")) == {"requests": 2, "hit": 0, "stale": 1, "miss": 1, "bypass": 0,
                                                  "stale_if_error": 1, "collapsed": 0, "refresh_ok": 0,
                                                  "refresh_failed": 0, "stored_entries": 1}
    assert route_of(data, "/flaky")["hit_latency"]["count"] == 0  # waited on the origin first
    assert counters(route_of(data, "/broken")) == {"requests": 2, "hit": 0, "stale": 1, "miss": 1, "bypass": 0,
                                                   "stale_if_error": 0, "collapsed": 0, "refresh_ok": 0,
                                                   "refresh_failed": 1, "stored_entries": 1}
    slow_row = route_of(data, "/slow/{id}")
    assert counters(slow_row) == {"requests": 2, "hit": 0, "stale": 0, "miss": 2, "bypass": 0, "stale_if_error": 0,
                                  "collapsed": 1, "refresh_ok": 0, "refresh_failed": 0, "stored_entries": 1}
    assert slow_row["policy"] == "minutes"
    assert slow_row["origin_latency"]["count"] == 1
    assert quantile(slow_row["origin_latency"], 0.5) == 0.5  # 0.3 s falls in the (0.25, 0.5] bucket
    assert calls["slow"] == 1

    plain_row = route_of(data, "/plain")
    assert plain_row["policy"] is None
    assert plain_row["requests"] == 0  # passed through untouched

    totals = data["totals"]
    assert totals["requests"] == 6 + 2 + 3 + 2 + 2 + 2
    assert totals["hit"] == 4
    assert totals["stale"] == 3
    assert data["policies"]["custom"]["requests"] == 6 + 3 + 2 + 2
    assert data["policies"]["minutes"]["collapsed"] == 1
    assert data["policies"]["realtime"]["bypass"] == 2

    kinds = data["supervisor"]["kinds"]
    assert kinds["fill"]["done"] == 6  # the stored misses; a refresh stores its entry itself
    assert kinds["refresh"]["done"] == 2  # a failed refresh is a job that ran to its end
    assert all(counts["failed"] == 0 and counts["shed"] == 0 for counts in kinds.values())
    assert data["supervisor"]["running"] is True
    assert data["store"]["kind"] == "memory"
    assert data["store"]["breaker"] == "closed"
    assert data["store"]["errors"] == 0
    assert data["store"]["memory"]["entries"] == 6
    assert data["l1"]["entries"] == 0  # no L1 in front of an in-process store
    json.dumps(data)  # plain data


async def test_the_snapshot_is_plain_json_before_startup_and_after_shutdown() -> None:
    app = make_app(store=MemoryStore())
    async with lifespan(app), client(app) as http:
        await http.get("/products/1")
        cache_ = find_cache(app)
        assert snapshot(cache_)["supervisor"]["running"] is True
    after = snapshot(cache_)
    assert after["supervisor"]["running"] is False
    assert route_of(after, "/products/{id:int}")["miss"] == 1  # the table is gone, the counts are not
    json.dumps(after)
    fresh = CacheMiddleware(Starlette(routes=routes()))
    before = snapshot(fresh)
    assert before["routes"] == []
    assert before["store"]["kind"] == "none"


async def test_find_cache(app: Starlette) -> None:
    unstarted = make_app()
    with pytest.raises(LookupError, match=r"does not exist yet.*HINT"):
        find_cache(unstarted)
    with pytest.raises(LookupError, match="no CacheMiddleware"):
        find_cache(Starlette())
    found = find_cache(app)
    assert isinstance(found, CacheMiddleware)
    assert find_cache(found) is found
    wrapped = CacheMiddleware(Starlette())
    assert find_cache(wrapped) is wrapped


# -- Prometheus ---------------------------------------------------------------------------------------


def samples(text: str, parse: Any = text_string_to_metric_families) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                                             float]:
    found = {}
    for family in parse(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def labels(**pairs: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(pairs.items()))


async def test_prometheus_output_parses_and_matches_the_counts(app: Starlette, clock: Clock) -> None:
    cache_ = await scripted(app, clock)
    async with client(app) as http:
        response = await http.get("/metrics/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert response.headers["cache-control"] == "no-store"
    found = samples(response.text)
    data = snapshot(cache_)
    for row in data["routes"]:
        if row["policy"] is None:
            assert not any(dict(key[1]).get("route") == row["route"] for key in found)
            continue
        route = {"route": row["route"], "policy": row["policy"]}
        for state in ("hit", "stale", "miss", "bypass"):
            assert found[("cachemw_requests_total", labels(**route, state=state))] == row[state]
        assert found[("cachemw_stale_if_error_total", labels(**route))] == row["stale_if_error"]
        assert found[("cachemw_collapsed_total", labels(**route))] == row["collapsed"]
        assert found[("cachemw_refreshes_total", labels(**route, result="ok"))] == row["refresh_ok"]
        assert found[("cachemw_refreshes_total", labels(**route, result="failed"))] == row["refresh_failed"]
        assert found[("cachemw_stored_bytes_total", labels(**route))] == row["stored_bytes"]
        assert found[("cachemw_origin_busy_total", labels(**route))] == row["origin_busy"] == 0
        assert found[("cachemw_origin_latency_seconds_count", labels(**route))] == row["origin_latency"]["count"]
        assert found[("cachemw_origin_latency_seconds_bucket", labels(**route, le="+Inf"))] == \
            row["origin_latency"]["count"]
        assert found[("cachemw_hit_latency_seconds_count", labels(**route))] == row["hit_latency"]["count"]
        assert found[("cachemw_hit_latency_seconds_sum", labels(**route))] == pytest.approx(row["hit_latency"]["sum"])
    slow_route = {"route": "/slow/{id}", "policy": "minutes"}
    assert found[("cachemw_origin_latency_seconds_bucket", labels(**slow_route, le="0.25"))] == 0
    assert found[("cachemw_origin_latency_seconds_bucket", labels(**slow_route, le="0.5"))] == 1
    assert found[("cachemw_jobs_total", labels(kind="fill", outcome="done"))] == 6
    assert found[("cachemw_jobs_queued", labels(kind="fill"))] == 0
    assert found[("cachemw_store_breaker_state", labels(state="closed"))] == 1
    assert found[("cachemw_store_breaker_state", labels(state="open"))] == 0
    assert found[("cachemw_store_errors_total", ())] == 0
    assert found[("cachemw_l1_entries", ())] == 0
    assert ("cachemw_store_up", ()) not in found  # no Redis to ping
    assert found[("cachemw_store_rejected_messages_total", ())] == 0
    assert found[("cachemw_waiting_on_fills", ())] == 0


async def test_prometheus_openmetrics_and_a_collector_of_your_own(app: Starlette, clock: Clock) -> None:
    cache_ = await scripted(app, clock)
    async with client(app) as http:
        response = await http.get("/metrics/", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        assert (await http.post("/metrics/")).status_code == 405
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    found = samples(response.text, parse_openmetrics)
    assert found[("cachemw_requests_total", labels(route="/news", policy="custom", state="stale"))] == 1

    registry = CollectorRegistry()
    registry.register(CacheCollector(cache_))
    again = samples(generate_latest(registry).decode())
    assert again[("cachemw_requests_total", labels(route="/products/{id:int}", policy="custom", state="hit"))] == 3
    assert again[("cachemw_collapsed_total", labels(route="/slow/{id}", policy="minutes"))] == 1


async def test_metrics_app_outside_a_cached_app_is_a_clear_error() -> None:
    lonely = Starlette(routes=[Mount("/metrics", app=metrics_app())])
    async with client(lonely) as http:
        response = await http.get("/metrics/")
    assert response.status_code == 500
    assert "no CacheMiddleware" in response.text


def test_metrics_app_without_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in sys.modules if name.split(".")[0] == "prometheus_client"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "cachemw.observe.prometheus")
    with pytest.raises(ImportError, match=r"pip install 'cachemw\[prometheus\]'"):
        metrics_app()


async def test_metrics_of_a_redis_store_include_a_ping(redis_url: str) -> None:
    app = make_app(redis_url=redis_url, key_prefix="pingtest")
    async with lifespan(app), client(app) as http:
        await http.get("/products/1")
        response = await http.get("/metrics/")
        data = await full_snapshot(find_cache(app))
    found = samples(response.text)
    assert found[("cachemw_store_up", ())] == 1
    assert found[("cachemw_store_listening", ())] == 1
    assert found[("cachemw_store_latency_seconds_count", ())] >= 1
    assert data["store"]["kind"] == "redis"
    assert data["store"]["ping"]["ok"] is True
    assert data["store"]["where"] is not None and "@" not in data["store"]["where"]


async def test_write_behind_statuses_are_read_duck_typed() -> None:
    class Queue:
        def __init__(self, name: str, fail: bool = False) -> None:
            self.name = name
            self.fail = fail

        async def status(self) -> Any:
            if self.fail:
                raise ConnectionError("redis is down")
            return SimpleNamespace(as_dict=lambda: {"name": self.name, "backend": "memory", "backlog": 3,
                                                    "pending": 1, "lag": 1.5, "dead": 0, "flushers": 1, "flushed": 9,
                                                    "failed_flushes": 0, "retried": 0, "dead_lettered": 0,
                                                    "claimed": 0, "requeued": 0})

    cache_ = CacheMiddleware(Starlette(routes=routes()), store=MemoryStore())
    cast(Any, cache_).write_behinds = [Queue("cart"), Queue("orders", fail=True)]  # read duck-typed
    data = await full_snapshot(cache_)
    assert data["write_behind"][0]["backlog"] == 3
    assert data["write_behind"][1] == {"name": "orders", "error": "redis is down"}
    assert snapshot(cache_)["write_behind"] == data["write_behind"]  # the last statuses read
    found = samples(_render(data))
    assert found[("cachemw_writebehind_backlog", labels(name="cart"))] == 3
    assert found[("cachemw_writebehind_lag_seconds", labels(name="cart"))] == 1.5
    assert found[("cachemw_writebehind_flushed_total", labels(name="cart"))] == 9
    assert not any(dict(key[1]).get("name") == "orders" for key in found)


async def test_a_real_write_behind_queue_shows_its_backlog() -> None:
    from cachemw.writebehind import WriteBehind

    cache_ = CacheMiddleware(Starlette(routes=routes()), store=MemoryStore())
    queue: WriteBehind[Any] = WriteBehind("cart")  # no flush function here: the writes wait
    queue.attach(cache_.supervisor)
    cast(Any, cache_).write_behinds = (queue,)  # what CacheMiddleware(write_behind=[...]) keeps
    await queue.put("user:1", {"items": 1})
    await queue.put("user:2", {"items": 2})
    data = await full_snapshot(cache_)
    [status] = data["write_behind"]
    assert (status["name"], status["backend"], status["backlog"], status["dead"]) == ("cart", "memory", 2, 0)
    assert status["lag"] >= 0
    found = samples(_render(data))
    assert found[("cachemw_writebehind_backlog", labels(name="cart"))] == 2


def _render(data: dict[str, Any]) -> str:
    from cachemw.observe.prometheus import render

    body, _ = render(data)
    return body.decode()


# -- history for the dashboard's chart ------------------------------------------------------------


async def test_history_samples_running_totals() -> None:
    inner = Starlette(routes=routes())
    cache_ = CacheMiddleware(inner, store=MemoryStore())
    cache_.prepare(inner)
    enable_history(cache_, interval=0.05, keep=5)
    async with lifespan(cache_), client(cache_) as http:
        await eventually(_samples_at_least(cache_, 2), what="two samples")
        await http.get("/products/1")
        await eventually(jobs_done(cache_, "fill", 1), what="the fill")
        await http.get("/products/1")
        await eventually(_samples_at_least(cache_, 5), what="five samples")
        await anyio.sleep(0.2)
    samples_ = history(cache_)
    assert len(samples_) == 5  # bounded
    assert samples_[-1]["miss"] == 1
    assert samples_[-1]["hit"] == 1
    assert samples_[-1]["routes"]["/products/{id:int}"] == [1, 0, 1, 0]
    assert [s["t"] for s in samples_] == sorted(s["t"] for s in samples_)
    with pytest.raises(ValueError):
        enable_history(cache_, interval=0)


def _samples_at_least(cache_: CacheMiddleware, n: int) -> Any:
    async def check() -> bool:
        return len(history(cache_)) >= n

    return check


# -- the fleet view: two processes' counters added up in Redis -------------------------------------


def fleet_member(redis_url: str, interval: float) -> CacheMiddleware:
    inner = Starlette(routes=routes())
    member = CacheMiddleware(inner, redis_url=redis_url, key_prefix="fleet")
    member.prepare(inner)
    enable_fleet_metrics(member, interval=interval)
    return member


@pytest.fixture
async def direct(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    connection = redis.asyncio.Redis.from_url(redis_url)
    yield connection
    await connection.aclose()


async def test_the_fleet_view_sums_two_processes(redis_url: str, direct: redis.asyncio.Redis) -> None:
    first, second = fleet_member(redis_url, 0.1), fleet_member(redis_url, 0.1)
    async with lifespan(first), client(first) as a:
        async with lifespan(second), client(second) as b:
            assert (await a.get("/products/1")).headers["x-cache"] == "MISS"
            await eventually(jobs_done(first, "fill", 1), what="the fill")
            assert (await a.get("/products/1")).headers["x-cache"] == "HIT"
            assert (await b.get("/products/1")).headers["x-cache"] == "HIT"  # one Redis
            assert (await b.get("/products/2")).headers["x-cache"] == "MISS"
            assert (await b.get("/cart")).headers["x-cache"] == "BYPASS"
            await eventually(jobs_done(second, "fill", 1), what="the second fill")

            async def reported() -> bool:
                view = aggregate(await read_fleet(direct, "fleet"))
                return len(view["processes"]) == 2 and view["totals"]["requests"] == 5 \
                    and view["supervisor"]["kinds"].get("fill", {}).get("done") == 2

            await eventually(reported, what="both processes' reports")
            documents = await read_fleet(direct, "fleet")
            view = aggregate(documents)
            mine = [snapshot(first), snapshot(second)]
            for template in ("/products/{id:int}", "/cart"):
                row = route_of(view, template)
                for name in COUNTERS:
                    assert row[name] == sum(route_of(d, template)[name] for d in mine), (template, name)
                for name in ("origin_latency", "hit_latency"):
                    assert row[name]["count"] == sum(route_of(d, template)[name]["count"] for d in mine)
            products = route_of(view, "/products/{id:int}")
            assert (products["hit"], products["miss"], products["requests"]) == (2, 2, 4)
            assert products["hit_ratio"] == 0.5
            assert view["totals"]["bypass"] == 1
            assert view["store"]["kinds"] == {"redis": 2}
            assert view["store"]["breaker"] == {"closed": 2}
            assert view["store"]["listening"] == 2
            assert view["supervisor"]["kinds"]["fill"]["done"] == 2
            assert {p["instance"] for p in view["processes"]} == {d["process"]["instance"] for d in mine}
            assert all(0 <= p["age"] < 5 for p in view["processes"])
            keys = sorted(await direct.keys("fleet:m:*"))
            assert len(keys) == 2
            ttl = await direct.pttl(keys[0])
            assert 0 < ttl <= 300  # three intervals
        # The second process shut down: its report is gone at once, not after its TTL.
        assert len(await read_fleet(direct, "fleet")) == 1
    assert await read_fleet(direct, "fleet") == []


@pytest.mark.parametrize("interval", [0.1, 0.0])
async def test_the_metrics_interval_setting_alone_turns_fleet_reports_on_or_off(
        redis_url: str, direct: redis.asyncio.Redis, interval: float) -> None:
    inner = Starlette(routes=routes())
    member = CacheMiddleware(inner, redis_url=redis_url, key_prefix="fleetset",
                             settings=Settings(metrics_interval=interval))
    async with lifespan(member), client(member) as http:
        assert (await http.get("/products/1")).status_code == 200
        if interval:
            async def reported() -> bool:
                return len(await read_fleet(direct, "fleetset")) == 1

            await eventually(reported, what="the report the setting asked for")
        else:
            await eventually(jobs_done(member, "fill", 1), what="the fill")
            assert await direct.keys("fleetset:m:*") == []


async def test_the_fleet_reader_skips_foreign_values(redis_url: str, direct: redis.asyncio.Redis) -> None:
    await direct.set("fleet:m:junk", b"not json")
    await direct.set("fleet:m:other", json.dumps({"version": 99, "routes": []}))
    await direct.set("fleet:m:half", json.dumps({"version": 1, "routes": [], "process": {}}))
    await direct.set("other:m:x", b"{}")
    assert await read_fleet(direct, "fleet") == []
    view = aggregate([])
    assert view["processes"] == [] and view["routes"] == [] and view["totals"]["requests"] == 0


async def test_fleet_metrics_need_redis_and_an_interval() -> None:
    member = CacheMiddleware(Starlette(routes=routes()), store=MemoryStore())
    member.prepare(member.app)
    assert await flush_fleet_metrics(member, 1.0) is False  # nothing to share an in-process store with
    with pytest.raises(ValueError, match="interval"):
        enable_fleet_metrics(member, interval=0)
    enable_fleet_metrics(member, interval=0.05)
    async with lifespan(member), client(member) as http:
        assert (await http.get("/products/1")).status_code == 200
        await anyio.sleep(0.15)  # the service runs and does nothing


async def test_a_fleet_report_is_skipped_while_the_breaker_is_open(redis_url: str,
                                                                   direct: redis.asyncio.Redis) -> None:
    member = fleet_member(redis_url, 1.0)
    async with lifespan(member):
        await eventually(_keys(direct, 1), what="the first report")
        await direct.delete(*(await direct.keys("fleet:m:*")))
        member.breaker.state = "open"
        assert await flush_fleet_metrics(member, 1.0) is False
        member.breaker.state = "closed"
        assert await flush_fleet_metrics(member, 1.0) is True
        assert len(await direct.keys("fleet:m:*")) == 1


def _keys(client_: redis.asyncio.Redis, n: int) -> Any:
    async def check() -> bool:
        return len(await client_.keys("fleet:m:*")) == n

    return check


@pytest.mark.anyio
async def test_metrics_app_as_a_route_answers_its_own_path() -> None:
    app = Starlette(routes=[Route("/products/{id:int}", product), Route("/metrics", metrics_app())])
    app.add_middleware(CacheMiddleware)
    async with lifespan(app), client(app) as http:
        await http.get("/products/1")
        response = await http.get("/metrics")  # a Mount would answer this with an empty 307
        assert response.status_code == 200, response.text
        assert 'route="/products/{id:int}"' in response.text
        assert (await http.head("/metrics")).status_code == 200
        assert (await http.post("/metrics")).status_code == 405
