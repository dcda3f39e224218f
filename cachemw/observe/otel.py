"""OpenTelemetry for cachemw (the ``otel`` extra): the cache's own counters as metrics, its background work as spans.

No semantic convention covers HTTP caches yet (open-telemetry/semantic-conventions#1747),
so the names live under ``cachemw.``; ``docs/reference/metrics.md`` lists them.

Nothing goes through OpenTelemetry on a hit. Observable instruments read, when a
reader collects, the counters the middleware keeps anyway (``cachemw.core.metrics``,
the supervisor's, the L1's): the same numbers as ``X-Cache``/``Cache-Status``, the
snapshot and Prometheus. Two things cannot wait for a collection:

- origin durations: a histogram takes each value, so the origin calls (misses,
  bypasses) hand theirs over as they are observed; a hit never does. Store lookups,
  which every hit makes, are reported from the cache's own buckets instead
  (``cachemw.store.lookups`` by ``cachemw.within``): an SDK ``record`` costs a few
  microseconds, as much as a fifth of a hit.
- spans: a fill, refresh or purge job is wrapped when it is submitted, in the
  request's context, and runs in a span that is a child of the request's span
  (when one is active: an ASGI instrumentation around the app), although it runs
  after the response in a worker task of the supervisor.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider, Observation
from opentelemetry.trace import SpanKind, TracerProvider

from cachemw.core.metrics import BUCKETS, RouteMetrics
from cachemw.runtime.shell import CacheShell
from cachemw.runtime.supervisor import JobFunction

__all__ = ["SPAN_KINDS", "instrument"]

# The background jobs that get a span, and its name; other kinds (lock releases, log records) would be noise.
SPAN_KINDS = {"fill": "cachemw.fill", "refresh": "cachemw.refresh", "purge": "cachemw.purge"}
_OUTCOMES = ("done", "failed", "shed", "abandoned")
_WITHIN = (*(repr(float(bound)) for bound in BUCKETS), "+Inf")

_instrumented: weakref.WeakSet[CacheShell] = weakref.WeakSet()


def instrument(cache: CacheShell, *, meter_provider: MeterProvider | None = None,
               tracer_provider: TracerProvider | None = None) -> None:
    """Report ``cache``'s metrics and background-work spans through OpenTelemetry; once per cache.

    By default to the global providers the app set up (``opentelemetry.metrics.set_meter_provider``, ...).
    Call it once the cache's supervisor is final: from the app's lifespan startup
    (``instrument(find_cache(app))``), or let ``otel = true`` in the settings do it.
    """
    if cache.runtime is None:
        raise RuntimeError("cachemw.otel.instrument: this CacheMiddleware has not started yet. HINT: call it from "
                           "the app's lifespan startup, or set otel = true in cachemw's settings.")
    if cache in _instrumented:
        return
    _instrumented.add(cache)
    from cachemw import __version__

    meter = metrics.get_meter("cachemw", __version__, meter_provider=meter_provider)
    _observe_routes(meter, cache)
    _observe_process(meter, cache)
    origin = meter.create_histogram("cachemw.origin.duration", unit="s",
                                    description="Time the app took on misses and bypasses.",
                                    explicit_bucket_boundaries_advisory=list(BUCKETS))
    cache.metrics.tee_origin(lambda route_metrics: _recorder(origin, route_metrics))
    tracer = trace.get_tracer("cachemw", __version__, tracer_provider=tracer_provider)
    cache.supervisor.wrap_job = _JobSpans(tracer).wrap


def _route_attributes(route_metrics: RouteMetrics) -> dict[str, str]:
    return {"http.route": route_metrics.route, "cachemw.policy": route_metrics.policy}


def _recorder(histogram: Histogram, route_metrics: RouteMetrics) -> Callable[[float], None]:
    attributes = _route_attributes(route_metrics)  # made once per route, not per call
    record = histogram.record

    def sink(seconds: float) -> None:
        record(seconds, attributes)

    return sink


def outcomes(route_metrics: RouteMetrics) -> Iterator[tuple[str, str, int]]:
    """(outcome, tier, count) of one route's requests: each request counted once, as its headers said it.

    ``X-Cache`` STALE covers ``stale`` and ``stale-if-error``, MISS covers ``miss``
    and ``collapsed`` (answered by another request's origin call); ``Cache-Status``
    tells them apart. The tier is where the answer came from: this process's ``l1``,
    the shared ``store``, or the ``origin``.
    """
    m = route_metrics
    yield "hit", "l1", m.l1_hits
    yield "hit", "store", m.hit - m.l1_hits
    yield "stale", "store", m.stale - m.stale_if_error
    yield "stale-if-error", "store", m.stale_if_error
    yield "miss", "origin", m.miss - m.collapsed
    yield "collapsed", "origin", m.collapsed
    yield "bypass", "origin", m.bypass


def _observe_routes(meter: metrics.Meter, cache: CacheShell) -> None:
    def routes() -> list[RouteMetrics]:
        return list(cache.metrics.routes.values())  # a copy: the loop may add a route while a reader collects

    def requests(options: CallbackOptions) -> Iterable[Observation]:
        for m in routes():
            attributes = _route_attributes(m)
            for outcome, tier, count in outcomes(m):
                yield Observation(count, {**attributes, "cachemw.outcome": outcome, "cachemw.tier": tier})

    def refreshes(options: CallbackOptions) -> Iterable[Observation]:
        for m in routes():
            attributes = _route_attributes(m)
            yield Observation(m.refresh_ok, {**attributes, "cachemw.result": "ok"})
            yield Observation(m.refresh_failed, {**attributes, "cachemw.result": "failed"})

    def per_route(read: Callable[[RouteMetrics], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read(m), _route_attributes(m)) for m in routes()]

        return callback

    meter.create_observable_counter("cachemw.requests", [requests], unit="{request}",
                                    description="Requests of cached routes, by outcome and tier.")
    meter.create_observable_counter("cachemw.refreshes", [refreshes], unit="{refresh}",
                                    description="Background refreshes of stale entries, by result.")
    meter.create_observable_counter("cachemw.stored.entries", [per_route(lambda m: m.stored_entries)],
                                    unit="{entry}", description="Entries stored.")
    meter.create_observable_counter("cachemw.stored.size", [per_route(lambda m: m.stored_bytes)], unit="By",
                                    description="Bytes of the entries stored.")
    meter.create_observable_counter("cachemw.origin.busy", [per_route(lambda m: m.origin_busy)], unit="{request}",
                                    description="Requests past origin_concurrency: answered stale, or 503, "
                                                "instead of calling the app.")
    meter.create_observable_counter("cachemw.fills.shed", [per_route(lambda m: m.fills_shed)], unit="{fill}",
                                    description="Misses answered but not stored: the background queue was full.")


def _observe_process(meter: metrics.Meter, cache: CacheShell) -> None:
    def jobs(read: Callable[[Any], Iterable[tuple[int, dict[str, str]]]]
             ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            counters = list(cache.supervisor.counters.items())
            return [Observation(value, {"cachemw.job.kind": kind, **extra})
                    for kind, counts in counters for value, extra in read(counts)]

        return callback

    def lookups(options: CallbackOptions) -> Iterable[Observation]:
        counts = list(cache.metrics.store_latency.counts)
        return [Observation(n, {"cachemw.within": within}) for n, within in zip(counts, _WITHIN, strict=True)]

    def one(read: Callable[[], float]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        return lambda options: [Observation(read())]

    meter.create_observable_up_down_counter("cachemw.jobs.queued", [jobs(lambda c: [(c.queued, {})])],
                                            unit="{job}", description="Background jobs waiting: the queue's depth.")
    meter.create_observable_up_down_counter("cachemw.jobs.running", [jobs(lambda c: [(c.running, {})])],
                                            unit="{job}", description="Background jobs running.")
    meter.create_observable_counter(
        "cachemw.jobs", [jobs(lambda c: [(getattr(c, o), {"cachemw.job.outcome": o}) for o in _OUTCOMES])],
        unit="{job}", description="Background jobs done, failed, shed (queue full) or abandoned (at shutdown).")
    meter.create_observable_counter("cachemw.store.lookups", [lookups], unit="{lookup}",
                                    description="Store lookups on the request path, by the bucket of their "
                                                "duration (cachemw.within: its upper bound in seconds).")
    meter.create_observable_counter("cachemw.store.lookup.time", [one(lambda: cache.metrics.store_latency.sum)],
                                    unit="s", description="Time spent in store lookups on the request path.")
    meter.create_observable_counter("cachemw.store.errors", [one(lambda: cache.store_errors)], unit="{error}",
                                    description="Store calls that failed or timed out.")
    meter.create_observable_up_down_counter("cachemw.l1.entries", [one(lambda: len(cache.l1))], unit="{entry}",
                                            description="Entries in this process's L1.")
    meter.create_observable_up_down_counter("cachemw.l1.size", [one(lambda: cache.l1.bytes_used)], unit="By",
                                            description="Bytes the L1 holds.")


class _JobSpans:
    """Wraps fills, refreshes and purges as they are submitted: a span each, under the submitter's context."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    def wrap(self, kind: str, key: str, function: JobFunction) -> JobFunction:
        name = SPAN_KINDS.get(kind)
        if name is None:
            return function
        parent = otel_context.get_current()  # the request's, with its span: the job runs in another task
        tracer = self.tracer
        attributes = {"cachemw.job.kind": kind, "cachemw.key": key}

        async def traced(*args: Any) -> Any:
            with tracer.start_as_current_span(name, context=parent, kind=SpanKind.INTERNAL, attributes=attributes):
                return await function(*args)

        return traced
