"""Counters and latency histograms, per route, kept in process memory.

Recording is a few attribute increments on the request path (no I/O, no locks:
one event loop); exposing them (snapshots, Prometheus, the fleet view in Redis)
happens elsewhere, off the request path.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BUCKETS", "Histogram", "Metrics", "RouteMetrics", "TeedHistogram"]

Sink = Callable[[float], None]

# Seconds: from a memory hit to a slow origin.
BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                              1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Cumulative-on-read histogram with fixed buckets (Prometheus style)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> dict[str, Any]:
        cumulative: list[int] = []
        running = 0
        for n in self.counts:
            running += n
            cumulative.append(running)
        return {"buckets": list(BUCKETS), "cumulative": cumulative, "count": running, "sum": self.sum}


class TeedHistogram(Histogram):
    """A histogram that also hands each observation to ``sink`` (an OpenTelemetry histogram's ``record``).

    A subclass put in place of a plain ``Histogram`` only when an observer asks
    (``Metrics.tee_origin``): without one, observing pays nothing for the possibility.
    """

    __slots__ = ("sink",)

    def __init__(self, sink: Sink, of: Histogram | None = None) -> None:
        super().__init__()
        self.sink = sink
        if of is not None:  # the counts so far carry over: a snapshot never goes backwards
            self.counts = list(of.counts)
            self.sum = of.sum

    def observe(self, seconds: float) -> None:
        Histogram.observe(self, seconds)
        self.sink(seconds)


@dataclass(slots=True)
class RouteMetrics:
    route: str
    policy: str
    hit: int = 0
    l1_hits: int = 0  # of the HITs, those answered from this process's L1 (no store round trip)
    stale: int = 0
    miss: int = 0
    bypass: int = 0
    stale_if_error: int = 0
    collapsed: int = 0
    refresh_ok: int = 0
    refresh_failed: int = 0
    stored_bytes: int = 0
    stored_entries: int = 0
    origin_busy: int = 0  # past origin_concurrency: answered stale or 503 instead of calling the app
    fills_shed: int = 0  # answered, but not stored: the background queue was full (its lock was still released)
    origin_latency: Histogram = field(default_factory=Histogram)
    hit_latency: Histogram = field(default_factory=Histogram)

    @property
    def requests(self) -> int:
        return self.hit + self.stale + self.miss + self.bypass

    @property
    def hit_ratio(self) -> float:
        served = self.hit + self.stale + self.miss
        return (self.hit + self.stale) / served if served else 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "route": self.route, "policy": self.policy, "requests": self.requests, "hit": self.hit,
            "l1_hits": self.l1_hits,
            "stale": self.stale, "miss": self.miss, "bypass": self.bypass, "stale_if_error": self.stale_if_error,
            "collapsed": self.collapsed, "refresh_ok": self.refresh_ok, "refresh_failed": self.refresh_failed,
            "stored_bytes": self.stored_bytes, "stored_entries": self.stored_entries, "origin_busy": self.origin_busy,
            "fills_shed": self.fills_shed, "hit_ratio": round(self.hit_ratio, 4),
            "origin_latency": self.origin_latency.snapshot(), "hit_latency": self.hit_latency.snapshot(),
        }


class Metrics:
    """Everything one CacheMiddleware counts."""

    def __init__(self) -> None:
        self.routes: dict[str, RouteMetrics] = {}
        self.store_latency = Histogram()
        self.store_errors = 0
        self.waiting_on_fills = 0  # a gauge: requests of this process waiting for another's origin call
        self._origin_sinks: Callable[[RouteMetrics], Sink] | None = None

    def route(self, template: str, policy: str) -> RouteMetrics:
        metrics = self.routes.get(template)
        if metrics is None:
            metrics = self.routes[template] = RouteMetrics(template, policy)
            if self._origin_sinks is not None:
                metrics.origin_latency = TeedHistogram(self._origin_sinks(metrics))
        return metrics

    def tee_origin(self, sinks: Callable[[RouteMetrics], Sink]) -> None:
        """From now on hand every origin duration of a route to ``sinks(route_metrics)`` too.

        For an observer that needs each value (an OpenTelemetry histogram): only the
        origin calls pay for it, never a hit.
        """
        self._origin_sinks = sinks
        for metrics in self.routes.values():
            metrics.origin_latency = TeedHistogram(sinks(metrics), metrics.origin_latency)
