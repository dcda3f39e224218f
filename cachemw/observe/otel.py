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
  (``cachemw.store.lookups`` by ``cachemw.within``): an SDK ``record`` costs about
  9 µs here (SDK 1.45), more than half of what a Redis hit costs.
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
from cachemw.runtime.supervisor import JobCounters, JobFunction

__all__ = ["SPAN_KINDS", "instrument"]

# The background jobs that get a span, and its name; other kinds (lock releases, log records) would be noise.
SPAN_KINDS = {"fill": "cachemw.fill", "refresh": "cachemw.refresh", "purge": "cachemw.purge"}
_OUTCOMES = ("done", "failed", "shed", "abandoned")
_WITHIN = (*(repr(float(bound)) for bound in BUCKETS), "+Inf")

Reading = Iterable[tuple[float, dict[str, str]]]
_instrumented: weakref.WeakSet[CacheShell] = weakref.WeakSet()


def instrument(cache: CacheShell, *, meter_provider: MeterProvider | None = None,
               tracer_provider: TracerProvider | None = None) -> None:
    """Report ``cache``'s metrics and background-work spans through OpenTelemetry; once per cache.

    By default to the global providers the app set up (``opentelemetry.metrics.set_meter_provider``, ...).
    Call it once the cache's supervisor is final: from the app's lifespan startup
    (``instrument(find_cache(app))``), or let ``otel = true`` in the settings do it.
    Several caches of one process (two mounted apps) report to one provider together: their
    counts of a route template add up.
    """
    if cache.runtime is None:
        raise RuntimeError("cachemw.otel.instrument: this CacheMiddleware has not started yet. HINT: call it from "
                           "the app's lifespan startup, or set otel = true in cachemw's settings.")
    if cache in _instrumented:
        return
    _instrumented.add(cache)
    from cachemw import __version__

    provider = meter_provider or metrics.get_meter_provider()
    reporter = _reporters.get(provider)
    if reporter is None:
        reporter = _reporters[provider] = _Reporter(metrics.get_meter("cachemw", __version__,
                                                                      meter_provider=provider))
    reporter.caches.add(cache)
    origin = reporter.origin
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


def _routes(cache: CacheShell) -> list[RouteMetrics]:
    return list(cache.metrics.routes.values())  # a copy: the loop may add a route while a reader collects


def _requests(cache: CacheShell) -> Reading:
    for m in _routes(cache):
        attributes = _route_attributes(m)
        for outcome, tier, count in outcomes(m):
            yield count, {**attributes, "cachemw.outcome": outcome, "cachemw.tier": tier}


def _refreshes(cache: CacheShell) -> Reading:
    for m in _routes(cache):
        attributes = _route_attributes(m)
        yield m.refresh_ok, {**attributes, "cachemw.result": "ok"}
        yield m.refresh_failed, {**attributes, "cachemw.result": "failed"}


def _per_route(read: Callable[[RouteMetrics], int]) -> Callable[[CacheShell], Reading]:
    return lambda cache: [(read(m), _route_attributes(m)) for m in _routes(cache)]


def _jobs(read: Callable[[JobCounters], Reading]) -> Callable[[CacheShell], Reading]:
    def reading(cache: CacheShell) -> Reading:
        for kind, counts in list(cache.supervisor.counters.items()):
            for value, extra in read(counts):
                yield value, {"cachemw.job.kind": kind, **extra}

    return reading


def _lookups(cache: CacheShell) -> Reading:
    counts = list(cache.metrics.store_latency.counts)
    return [(n, {"cachemw.within": within}) for n, within in zip(counts, _WITHIN, strict=True)]


def _one(read: Callable[[CacheShell], float]) -> Callable[[CacheShell], Reading]:
    return lambda cache: [(read(cache), {})]


class _Reporter:
    """The instruments of one meter provider, made once, reading every cache instrumented for it."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.caches: weakref.WeakSet[CacheShell] = weakref.WeakSet()
        counter, up_down = meter.create_observable_counter, meter.create_observable_up_down_counter
        counter("cachemw.requests", [self.summed(_requests)], unit="{request}",
                description="Requests of cached routes, by outcome and tier.")
        counter("cachemw.refreshes", [self.summed(_refreshes)], unit="{refresh}",
                description="Background refreshes of stale entries, by result.")
        counter("cachemw.stored.entries", [self.summed(_per_route(lambda m: m.stored_entries))], unit="{entry}",
                description="Entries stored.")
        counter("cachemw.stored.size", [self.summed(_per_route(lambda m: m.stored_bytes))], unit="By",
                description="Bytes of the entries stored.")
        counter("cachemw.origin.busy", [self.summed(_per_route(lambda m: m.origin_busy))], unit="{request}",
                description="Requests past origin_concurrency: answered stale, or 503, instead of calling the app.")
        counter("cachemw.fills.shed", [self.summed(_per_route(lambda m: m.fills_shed))], unit="{fill}",
                description="Misses answered but not stored: the background queue was full.")
        up_down("cachemw.jobs.queued", [self.summed(_jobs(lambda c: [(c.queued, {})]))], unit="{job}",
                description="Background jobs waiting: the queue's depth.")
        up_down("cachemw.jobs.running", [self.summed(_jobs(lambda c: [(c.running, {})]))], unit="{job}",
                description="Background jobs running.")
        counter("cachemw.jobs",
                [self.summed(_jobs(lambda c: [(getattr(c, o), {"cachemw.job.outcome": o}) for o in _OUTCOMES]))],
                unit="{job}", description="Background jobs done, failed, shed (queue full) or abandoned (at "
                                          "shutdown).")
        counter("cachemw.store.lookups", [self.summed(_lookups)], unit="{lookup}",
                description="Store lookups on the request path, by the bucket of their duration (cachemw.within: "
                            "its upper bound in seconds).")
        counter("cachemw.store.lookup.time", [self.summed(_one(lambda c: c.metrics.store_latency.sum))], unit="s",
                description="Time spent in store lookups on the request path.")
        counter("cachemw.store.errors", [self.summed(_one(lambda c: c.store_errors))], unit="{error}",
                description="Store calls that failed or timed out.")
        up_down("cachemw.l1.entries", [self.summed(_one(lambda c: len(c.l1)))], unit="{entry}",
                description="Entries in this process's L1.")
        up_down("cachemw.l1.size", [self.summed(_one(lambda c: c.l1.bytes_used))], unit="By",
                description="Bytes the L1 holds.")
        self.origin = meter.create_histogram("cachemw.origin.duration", unit="s",
                                             description="Time the app took on misses and bypasses.",
                                             explicit_bucket_boundaries_advisory=list(BUCKETS))

    def summed(self, read: Callable[[CacheShell], Reading]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """A callback over every cache: one observation per attribute set, the caches' values added up."""
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            totals: dict[tuple[tuple[str, str], ...], float] = {}
            for cache in list(self.caches):
                for value, attributes in read(cache):
                    key = tuple(sorted(attributes.items()))
                    totals[key] = totals.get(key, 0) + value
            return [Observation(value, dict(key)) for key, value in totals.items()]

        return callback


_reporters: weakref.WeakKeyDictionary[MeterProvider, _Reporter] = weakref.WeakKeyDictionary()


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
