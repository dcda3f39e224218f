"""OpenTelemetry: what the SDK's in-memory reader and exporter receive from a real app on a real Redis.

The counts per outcome must be the ``X-Cache``/``Cache-Status`` the client saw; the
span of a fill or a refresh, which runs after the response in a worker task, must be
a child of the span of the request that caused it.
"""

from __future__ import annotations

import collections
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import cachemw.otel
from cachemw import CacheMiddleware, Settings, cache
from cachemw.observe import find_cache, snapshot
from cachemw.runtime.shell import CacheShell
from tests.helpers import client, eventually, lifespan
from tests.observe import test_metrics

pytestmark = pytest.mark.anyio

clock = test_metrics.clock  # the middleware's wall clock, moved by the test: entries go stale without waiting
# The routes of the Prometheus tests (their origin fails on demand: test_metrics.failing), and one with an L1.
news, flaky, cart, slow = test_metrics.news, test_metrics.flaky, test_metrics.cart, test_metrics.slow


@pytest.fixture(autouse=True)
def _reset() -> None:
    test_metrics.calls.clear()
    test_metrics.failing.clear()


@cache(ttl="5m", sync="30s")
async def product(request: Request) -> Response:
    return PlainTextResponse("product")


TEMPLATES = {"/products/1": "/products/{id:int}", "/products/2": "/products/{id:int}", "/news": "/news",
             "/flaky": "/flaky", "/cart": "/cart", "/slow/1": "/slow/{id}"}


@dataclass
class Seen:
    """What one request looked like from outside: its path, its cache headers, the span around it."""

    path: str
    x_cache: str
    cache_status: str
    span: SpanContext

    @property
    def outcome(self) -> str:
        if self.x_cache == "STALE":
            return "stale-if-error" if "stale-if-error" in self.cache_status else "stale"
        if self.x_cache == "MISS":
            return "collapsed" if "collapsed" in self.cache_status else "miss"
        return self.x_cache.lower()


@dataclass
class RequestSpans:
    """A server span around each request, as an ASGI instrumentation in front of the app makes one."""

    app: ASGIApp
    tracer: trace.Tracer
    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.tracer.start_as_current_span(f"GET {scope['path']}", kind=trace.SpanKind.SERVER) as span:
            async def watch(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = {k.decode(): v.decode() for k, v in message["headers"]}
                    self.seen.append(Seen(scope["path"], headers.get("x-cache", ""), headers.get("cache-status", ""),
                                          span.get_span_context()))
                await send(message)

            await self.app(scope, receive, watch)


@dataclass
class Telemetry:
    reader: InMemoryMetricReader
    exporter: InMemorySpanExporter
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def points(self, name: str) -> list[Any]:
        data: MetricsData | None = self.reader.get_metrics_data()
        assert data is not None
        return [point for resource in data.resource_metrics for scope in resource.scope_metrics
                for metric in scope.metrics if metric.name == name for point in metric.data.data_points]


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Telemetry(reader, exporter, tracer_provider, meter_provider)
    meter_provider.shutdown()
    tracer_provider.shutdown()


def make_app(redis_url: str, telemetry: Telemetry) -> tuple[Starlette, RequestSpans]:
    @asynccontextmanager
    async def startup(app: Starlette) -> AsyncIterator[None]:
        cachemw.otel.instrument(find_cache(app), meter_provider=telemetry.meter_provider,
                                tracer_provider=telemetry.tracer_provider)
        yield

    app = Starlette(routes=[Route("/products/{id:int}", product), Route("/news", news), Route("/flaky", flaky),
                            Route("/cart", cart), Route("/slow/{id}", slow)], lifespan=startup)
    app.add_middleware(CacheMiddleware, redis_url=redis_url, key_prefix=f"otel{secrets.token_hex(4)}")
    spans = RequestSpans(app, telemetry.tracer_provider.get_tracer("test"))
    return app, spans


def jobs_done(cache_: CacheShell, kind: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return cache_.supervisor.counters_for(kind).done >= n

    return check


async def scripted(spans: RequestSpans, app: Starlette, clock: test_metrics.Clock) -> CacheShell:
    """Every outcome at least once: hit (from the L1 and from Redis), stale, stale-if-error, miss, collapsed, bypass."""
    async with client(spans) as http:
        cache_ = find_cache(app)

        async def listening() -> bool:
            return bool(cache_.store is not None and cache_.store.listening)

        await eventually(listening, what="the invalidation subscription")
        for path in ("/products/1", "/news", "/flaky"):
            await http.get(path)
        await eventually(jobs_done(cache_, "fill", 3), what="three fills")
        for _ in range(3):
            await http.get("/products/1")  # the fill put it in the L1 too
        await http.get("/products/2")
        await eventually(jobs_done(cache_, "fill", 4), what="the fourth fill")
        await http.get("/products/2", headers={"authorization": "Bearer x"})  # credentials: bypass
        await http.get("/cart")
        await http.get("/news")
        clock.now += 61  # past every ttl: /news is stale, /flaky usable only if its origin fails
        await http.get("/news")
        await eventually(jobs_done(cache_, "refresh", 1), what="the refresh of /news")
        test_metrics.failing.add("flaky")
        await http.get("/flaky")
        async with anyio.create_task_group() as tg:  # two at once on one key: one origin call, one collapsed
            tg.start_soon(http.get, "/slow/1")
            await anyio.sleep(0.05)
            tg.start_soon(http.get, "/slow/1")
        await eventually(jobs_done(cache_, "fill", 5), what="the slow fill")
    return cache_


async def test_counts_per_outcome_are_the_headers_the_client_saw(redis_url: str, telemetry: Telemetry,
                                                                 clock: test_metrics.Clock) -> None:
    app, spans = make_app(redis_url, telemetry)
    async with lifespan(app):
        cache_ = await scripted(spans, app, clock)
        l1_hits = cache_.l1.hits
        data = snapshot(cache_)
        requests = telemetry.points("cachemw.requests")
        origin = telemetry.points("cachemw.origin.duration")
        lookups = telemetry.points("cachemw.store.lookups")
        jobs = telemetry.points("cachemw.jobs")
        queued = telemetry.points("cachemw.jobs.queued")
    saw = collections.Counter((TEMPLATES[s.path], s.outcome) for s in spans.seen)
    assert {outcome for _, outcome in saw} == {"hit", "stale", "stale-if-error", "miss", "collapsed", "bypass"}
    counted: collections.Counter[tuple[str, str]] = collections.Counter()
    tiers: collections.Counter[str] = collections.Counter()
    for point in requests:
        counted[(point.attributes["http.route"], point.attributes["cachemw.outcome"])] += point.value
        tiers[point.attributes["cachemw.tier"]] += point.value
    assert +counted == saw  # zero counts dropped: every request once, under its own outcome
    assert tiers["l1"] == l1_hits > 0  # /products/1 answered from this process's memory
    by_outcome = collections.Counter(s.outcome for s in spans.seen)
    assert tiers["store"] == by_outcome["hit"] - l1_hits + by_outcome["stale"] + by_outcome["stale-if-error"]
    assert tiers["origin"] == by_outcome["miss"] + by_outcome["collapsed"] + by_outcome["bypass"]
    # Origin durations: each origin call of a request, as the snapshot counted them (a refresh is no request).
    durations = {p.attributes["http.route"]: p.count for p in origin}
    assert durations == {row["route"]: row["origin_latency"]["count"] for row in data["routes"]
                         if row["origin_latency"]["count"]}
    assert durations["/slow/{id}"] == 1
    assert sum(p.value for p in lookups) == data["store"]["latency"]["count"] > 0
    done = {p.attributes["cachemw.job.kind"]: p.value for p in jobs if p.attributes["cachemw.job.outcome"] == "done"}
    assert done["fill"] == data["supervisor"]["kinds"]["fill"]["done"] == 5
    assert done["refresh"] == 1
    assert all(p.value == 0 for p in queued)  # nothing left waiting


async def test_a_fill_and_a_refresh_are_children_of_their_request_span(redis_url: str, telemetry: Telemetry,
                                                                       clock: test_metrics.Clock) -> None:
    app, spans = make_app(redis_url, telemetry)
    async with lifespan(app):
        await scripted(spans, app, clock)
    finished = telemetry.exporter.get_finished_spans()

    def children(seen: Seen, name: str) -> list[ReadableSpan]:
        return [s for s in finished if s.name == name and s.parent is not None
                and s.parent.span_id == seen.span.span_id and s.context is not None
                and s.context.trace_id == seen.span.trace_id]

    misses = [s for s in spans.seen if s.outcome == "miss"]
    assert len(misses) == 5
    for seen in misses:
        [fill] = children(seen, "cachemw.fill")  # stored after the response, in a worker task, under the request
        assert fill.attributes is not None and fill.attributes["cachemw.job.kind"] == "fill"
        assert fill.status.is_ok
    [stale] = [s for s in spans.seen if s.outcome == "stale"]
    [refresh] = children(stale, "cachemw.refresh")
    assert refresh.start_time is not None and refresh.end_time is not None and refresh.end_time >= refresh.start_time
    for seen in spans.seen:
        if seen.outcome != "miss" and seen.outcome != "stale":
            assert not children(seen, "cachemw.fill") and not children(seen, "cachemw.refresh"), seen
    # No other background job (lock releases, log records) is traced.
    assert {s.name for s in finished if s.name.startswith("cachemw.")} == {"cachemw.fill", "cachemw.refresh"}


async def test_without_a_request_span_a_fill_is_a_root_span(redis_url: str, telemetry: Telemetry) -> None:
    app, _ = make_app(redis_url, telemetry)
    async with lifespan(app), client(app) as http:
        assert (await http.get("/products/7")).headers["x-cache"] == "MISS"
        await eventually(jobs_done(find_cache(app), "fill", 1), what="the fill")
    [fill] = [s for s in telemetry.exporter.get_finished_spans() if s.name == "cachemw.fill"]
    assert fill.parent is None


async def test_two_caches_of_one_process_add_up_on_one_provider(redis_url: str, telemetry: Telemetry) -> None:
    (first, _), (second, _) = make_app(redis_url, telemetry), make_app(redis_url, telemetry)
    async with lifespan(first), lifespan(second), client(first) as one, client(second) as two:
        assert (await one.get("/products/1")).headers["x-cache"] == "MISS"
        assert (await two.get("/products/1")).headers["x-cache"] == "MISS"
        assert (await two.get("/cart")).headers["x-cache"] == "BYPASS"
        counts = {(p.attributes["http.route"], p.attributes["cachemw.outcome"]): p.value
                  for p in telemetry.points("cachemw.requests")}
    assert counts[("/products/{id:int}", "miss")] == 2
    assert counts[("/cart", "bypass")] == 1


async def test_the_otel_setting_reports_to_the_global_providers(redis_url: str) -> None:
    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[reader])
    trace.set_tracer_provider(tracer_provider)  # once per process: only this test sets them
    metrics.set_meter_provider(meter_provider)
    try:
        prefix = f"otelsetting{secrets.token_hex(4)}"
        app = Starlette(routes=[Route("/products/{id:int}", product)])
        app.add_middleware(CacheMiddleware, settings=Settings(redis_url=redis_url, key_prefix=prefix, otel=True))
        async with lifespan(app), client(app) as http:
            assert (await http.get("/products/3")).headers["x-cache"] == "MISS"
            await eventually(jobs_done(find_cache(app), "fill", 1), what="the fill")
            assert (await http.get("/products/3")).headers["x-cache"] == "HIT"
            telemetry = Telemetry(reader, exporter, tracer_provider, meter_provider)
            counts = {(p.attributes["cachemw.outcome"], p.attributes["cachemw.tier"]): p.value
                      for p in telemetry.points("cachemw.requests")}
        assert counts[("miss", "origin")] == 1
        assert counts[("hit", "l1")] + counts[("hit", "store")] == 1
        assert [s.name for s in exporter.get_finished_spans()] == ["cachemw.fill"]
    finally:
        meter_provider.shutdown()
        tracer_provider.shutdown()


def test_without_the_extra_the_import_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in sys.modules if name.split(".")[0] == "opentelemetry"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "cachemw.otel")
    monkeypatch.delitem(sys.modules, "cachemw.observe.otel")
    with pytest.raises(ImportError, match=r"pip install 'cachemw\[otel\]'"):
        import cachemw.otel  # noqa: F401


async def test_the_otel_setting_without_the_extra_fails_at_startup(monkeypatch: pytest.MonkeyPatch,
                                                                   redis_url: str) -> None:
    from tests.helpers import LifespanFailed

    for name in [name for name in sys.modules if name.split(".")[0] == "opentelemetry"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "cachemw.observe.otel")
    app = Starlette(routes=[Route("/products/{id:int}", product)])
    app.add_middleware(CacheMiddleware, settings=Settings(redis_url=redis_url, otel=True))
    with pytest.raises(LifespanFailed, match=r"otel = true needs the OpenTelemetry API. HINT: pip install"):
        async with lifespan(app):
            pass
