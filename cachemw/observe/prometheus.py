"""Prometheus exposition of a snapshot (needs the ``prometheus`` extra: ``pip install 'cachemw[prometheus]'``).

Nothing is recorded through prometheus-client on the request path: a collector
turns the middleware's own counters into metric families when scraped.

- ``metrics_app()``: an ASGI app to mount, e.g. ``Mount("/metrics", app=metrics_app())``;
- ``CacheCollector(cache)``: for a registry of your own (``REGISTRY.register(...)``).

All series are this process's, except ``cachemw_writebehind_*``: a write-behind
queue's numbers live in Redis and are the same from every process (aggregate
them with ``max``, not ``sum``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from starlette.types import Receive, Scope, Send

from cachemw.observe.snapshot import CacheSource, full_snapshot, resolve_cache, snapshot

__all__ = ["CacheCollector", "MetricsApp", "families", "metrics_app"]

_ROUTE = ["route", "policy"]
_STATES = ("hit", "stale", "miss", "bypass")
_OUTCOMES = ("done", "failed", "shed", "abandoned")
_BREAKER_STATES = ("closed", "open", "half-open")
_WB_GAUGES = {
    "backlog": "Writes put and not yet acknowledged by the flush function.",
    "pending": "Writes of the backlog held by a flusher right now.",
    "lag": "Age in seconds of the oldest write not yet flushed.",
    "dead": "Writes parked in the dead-letter stream.",
    "flushers": "Flushers (consumers) registered for the queue.",
}
_WB_COUNTERS = {
    "flushed": "Writes acknowledged after a successful flush.",
    "failed_flushes": "Flush calls that raised or timed out.",
    "retried": "Writes handed to flush again after a failure.",
    "dead_lettered": "Writes moved to the dead-letter stream.",
    "claimed": "Writes taken over from a flusher that stopped.",
    "requeued": "Dead letters moved back to the stream.",
}


def _buckets(histogram: dict[str, Any]) -> list[tuple[str, float]]:
    bounds = [*histogram["buckets"], float("inf")]
    # As Prometheus writes "le": 0.25, 1.0, +Inf.
    return [("+Inf" if math.isinf(bound) else repr(float(bound)), float(n))
            for bound, n in zip(bounds, histogram["cumulative"], strict=True)]


def families(data: dict[str, Any]) -> Iterator[Metric]:
    """The metric families of one snapshot (``snapshot`` or ``full_snapshot``)."""
    yield from _route_families(data["routes"])
    yield from _job_families(data["supervisor"])
    yield from _store_families(data["store"])
    yield from _l1_families(data["l1"])
    yield from _write_behind_families([s for s in data.get("write_behind", []) if "backlog" in s])


def _route_families(routes: list[dict[str, Any]]) -> Iterator[Metric]:
    requests = CounterMetricFamily("cachemw_requests", "Requests by X-Cache state.", labels=[*_ROUTE, "state"])
    stale_if_error = CounterMetricFamily("cachemw_stale_if_error", "STALE answers because the origin failed.",
                                         labels=_ROUTE)
    collapsed = CounterMetricFamily("cachemw_collapsed", "Misses answered by another request's fill.",
                                    labels=_ROUTE)
    refreshes = CounterMetricFamily("cachemw_refreshes", "Background refreshes of stale entries.",
                                    labels=[*_ROUTE, "result"])
    stored_bytes = CounterMetricFamily("cachemw_stored_bytes", "Bytes of entries stored.", labels=_ROUTE)
    stored_entries = CounterMetricFamily("cachemw_stored_entries", "Entries stored.", labels=_ROUTE)
    origin_busy = CounterMetricFamily("cachemw_origin_busy", "Requests past origin_concurrency: answered from a "
                                      "stale entry, or 503 with Retry-After, instead of calling the app.",
                                      labels=_ROUTE)
    fills_shed = CounterMetricFamily("cachemw_fills_shed", "Misses answered but not stored: the background queue "
                                     "was full.", labels=_ROUTE)
    origin = HistogramMetricFamily("cachemw_origin_latency_seconds", "Time the app took on misses and bypasses.",
                                   labels=_ROUTE)
    hit = HistogramMetricFamily("cachemw_hit_latency_seconds", "Time to answer HIT and STALE from the cache.",
                                labels=_ROUTE)
    for row in routes:
        if row.get("policy") is None:
            continue  # a route without a policy is passed through uncounted
        labels = [row["route"], row["policy"]]
        for state in _STATES:
            requests.add_metric([*labels, state], row[state])
        stale_if_error.add_metric(labels, row["stale_if_error"])
        collapsed.add_metric(labels, row["collapsed"])
        refreshes.add_metric([*labels, "ok"], row["refresh_ok"])
        refreshes.add_metric([*labels, "failed"], row["refresh_failed"])
        stored_bytes.add_metric(labels, row["stored_bytes"])
        stored_entries.add_metric(labels, row["stored_entries"])
        origin_busy.add_metric(labels, row.get("origin_busy", 0))
        fills_shed.add_metric(labels, row.get("fills_shed", 0))
        origin.add_metric(labels, _buckets(row["origin_latency"]), row["origin_latency"]["sum"])
        hit.add_metric(labels, _buckets(row["hit_latency"]), row["hit_latency"]["sum"])
    yield from (requests, stale_if_error, collapsed, refreshes, stored_bytes, stored_entries, origin_busy,
                fills_shed, origin, hit)


def _job_families(supervisor: dict[str, Any]) -> Iterator[Metric]:
    queued = GaugeMetricFamily("cachemw_jobs_queued", "Background jobs waiting, by kind.", labels=["kind"])
    running = GaugeMetricFamily("cachemw_jobs_running", "Background jobs running, by kind.", labels=["kind"])
    jobs = CounterMetricFamily("cachemw_jobs", "Background jobs finished, failed, shed (queue full) or abandoned "
                               "(at shutdown), by kind.", labels=["kind", "outcome"])
    for kind, counts in supervisor["kinds"].items():
        queued.add_metric([kind], counts["queued"])
        running.add_metric([kind], counts["running"])
        for outcome in _OUTCOMES:
            jobs.add_metric([kind, outcome], counts[outcome])
    yield from (queued, running, jobs)
    yield GaugeMetricFamily("cachemw_jobs_queue_capacity", "Most background jobs that may wait (per lane).",
                            value=supervisor["queue_size"])


def _store_families(store: dict[str, Any]) -> Iterator[Metric]:
    latency = HistogramMetricFamily("cachemw_store_latency_seconds", "Time of store lookups on the request path.")
    latency.add_metric([], _buckets(store["latency"]), store["latency"]["sum"])
    yield latency
    yield CounterMetricFamily("cachemw_store_errors", "Store calls that failed or timed out.", value=store["errors"])
    yield CounterMetricFamily("cachemw_store_loop_lag_timeouts", "Store timeouts that were this process's own event "
                              "loop lag, not the store's (the breaker does not count them).",
                              value=store.get("loop_lag_timeouts", 0))
    yield CounterMetricFamily("cachemw_store_late_replies", "Store replies that came half a budget or more past "
                              "the request budget while this process's event loop ran late, and were used (the "
                              "store grace).",
                              value=store.get("late_replies", 0))
    if "loop_lag" in store:
        lag = HistogramMetricFamily("cachemw_loop_lag_seconds", "How late this process's event loop ran a timer.")
        lag.add_metric([], _buckets(store["loop_lag"]), store["loop_lag"]["sum"])
        yield lag
    breaker = GaugeMetricFamily("cachemw_store_breaker_state", "The store's circuit breaker: 1 for its state.",
                                labels=["state"])
    for state in _BREAKER_STATES:
        breaker.add_metric([state], 1.0 if store["breaker"] == state else 0.0)
    yield breaker
    yield GaugeMetricFamily("cachemw_store_listening", "1 while invalidations from other processes arrive.",
                            value=1.0 if store["listening"] else 0.0)
    yield GaugeMetricFamily("cachemw_store_tracking", "1 while Redis reports changed entry keys to this L1.",
                            value=1.0 if store.get("tracking") else 0.0)
    yield CounterMetricFamily("cachemw_store_rejected_messages", "Messages on cachemw's pub/sub channels that were "
                              "not well-formed announcements: dropped.", value=store.get("rejected_messages", 0))
    yield GaugeMetricFamily("cachemw_waiting_on_fills", "Requests waiting for another request's origin call.",
                            value=store.get("waiting_on_fills", 0))
    ping = store.get("ping")
    if ping is not None:
        yield GaugeMetricFamily("cachemw_store_up", "1 if Redis answered a PING at scrape time.",
                                value=1.0 if ping["ok"] else 0.0)
        if ping["ok"]:
            yield GaugeMetricFamily("cachemw_store_ping_seconds", "Round trip of that PING.", value=ping["ms"] / 1000)


def _l1_families(l1: dict[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily("cachemw_l1_entries", "Entries in this process's L1.", value=l1["entries"])
    yield GaugeMetricFamily("cachemw_l1_bytes", "Bytes used by the L1.", value=l1["bytes_used"])
    yield GaugeMetricFamily("cachemw_l1_max_bytes", "Bound of the L1 in bytes.", value=l1["max_bytes"])
    yield CounterMetricFamily("cachemw_l1_hits", "HITs answered from the L1 (no Redis round trip).", value=l1["hits"])
    yield CounterMetricFamily("cachemw_l1_dropped", "L1 entries dropped by invalidations.", value=l1["dropped"])
    yield GaugeMetricFamily("cachemw_l1_hit_share_ratio", "Share of HITs answered from the L1 (0 to 1).",
                            value=l1["hit_share"])


def _write_behind_families(statuses: list[dict[str, Any]]) -> Iterator[Metric]:
    """Only for the queues whose status was read (``full_snapshot``): none at all otherwise."""
    if statuses:
        gauges = {field: GaugeMetricFamily(f"cachemw_writebehind_{field}{'_seconds' if field == 'lag' else ''}",
                                           doc + " Fleet-wide.", labels=["name"])
                  for field, doc in _WB_GAUGES.items()}
        counters = {field: CounterMetricFamily(f"cachemw_writebehind_{field}", doc + " Fleet-wide.",
                                               labels=["name"])
                    for field, doc in _WB_COUNTERS.items()}
        for status in statuses:
            for field, family in gauges.items():
                family.add_metric([status["name"]], float(status.get(field, 0)))
            for field, counter in counters.items():
                counter.add_metric([status["name"]], float(status.get(field, 0)))
        yield from gauges.values()
        yield from counters.values()


class CacheCollector(Collector):
    """Reads the middleware's counters at each scrape: ``REGISTRY.register(CacheCollector(cache))``.

    Scrapes are synchronous: write-behind numbers are those the last ``full_snapshot``
    read (the dashboard, the fleet service or ``metrics_app`` refresh them), and there
    is no PING. ``metrics_app`` has both, fresh.
    """

    def __init__(self, cache: CacheSource = None) -> None:
        self._source = cache

    def collect(self) -> Iterable[Metric]:
        return families(snapshot(resolve_cache(self._source)))

    def describe(self) -> Iterable[Metric]:
        return []  # names are only known at scrape time; nothing to check at registration


class _Fixed(Collector):
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def collect(self) -> Iterable[Metric]:
        return families(self._data)


def render(data: dict[str, Any], accept: str | None = None) -> tuple[bytes, str]:
    """A snapshot in the exposition format ``accept`` asks for (Prometheus text, or OpenMetrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(data))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class MetricsApp:
    """The ASGI app ``metrics_app()`` returns. An object, not a function: Starlette's ``Route`` takes
    it as an ASGI app (a function would be called as a request handler), so ``Route("/metrics", ...)``
    answers ``/metrics`` itself, where a ``Mount`` only answers ``/metrics/`` and redirects ``/metrics``."""

    def __init__(self, cache: CacheSource = None) -> None:
        self._cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # run standalone: nothing to start
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", "text/plain; charset=utf-8", [(b"allow", b"GET, HEAD")])
            return
        try:
            found = resolve_cache(self._cache, scope)
        except LookupError as exc:
            await _respond(send, 500, f"cachemw: {exc}\n".encode(), "text/plain; charset=utf-8")
            return
        accept = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"accept"), None)
        body, content_type = render(await full_snapshot(found), accept)
        await _respond(send, 200, b"" if scope["method"] == "HEAD" else body, content_type,
                       content_length=len(body))


def metrics_app(cache: CacheSource = None) -> MetricsApp:
    """An ASGI app answering GET with this process's metrics: ``Route("/metrics", metrics_app())``.

    ``cache`` is the CacheMiddleware, or a function returning it; by default the one
    handling the request (put the route inside the cached app). Anyone who can reach
    it can read route names and counts: expose it to your Prometheus, not the world.
    """
    return MetricsApp(cache)


async def _respond(send: Send, status: int, body: bytes, content_type: str,
                   extra: list[tuple[bytes, bytes]] | None = None, content_length: int | None = None) -> None:
    headers = [(b"content-type", content_type.encode("latin-1")),
               (b"content-length", str(len(body) if content_length is None else content_length).encode()),
               (b"cache-control", b"no-store"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
