"""See what the cache is doing: snapshots, Prometheus, the fleet view in Redis, the dashboard's history.

- ``snapshot(cache)`` / ``await full_snapshot(cache)``: this process's counters as plain data;
- ``metrics_app()``: Prometheus exposition to mount (the ``prometheus`` extra);
- ``enable_fleet_metrics(cache)``: write the counters to Redis every few seconds, for ``cachemw stats``;
- ``enable_history(cache)``: keep recent counts for the dashboard's chart (``cachemw.observe.dashboard``).
"""

from __future__ import annotations

from typing import Any

from cachemw.observe.fleet import aggregate, enable_fleet_metrics, flush_fleet_metrics, read_fleet
from cachemw.observe.snapshot import (
    CacheSource,
    enable_history,
    find_cache,
    full_snapshot,
    history,
    quantile,
    resolve_cache,
    sample_history,
    snapshot,
)

__all__ = [
    "CacheSource",
    "aggregate",
    "enable_fleet_metrics",
    "enable_history",
    "find_cache",
    "flush_fleet_metrics",
    "full_snapshot",
    "history",
    "metrics_app",
    "quantile",
    "read_fleet",
    "resolve_cache",
    "sample_history",
    "snapshot",
]


def metrics_app(cache: CacheSource = None) -> Any:
    """Prometheus exposition as an ASGI app; see ``cachemw.observe.prometheus.metrics_app``."""
    try:
        from cachemw.observe.prometheus import metrics_app as make
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("prometheus_client"):
            raise
        raise ImportError("cachemw's Prometheus endpoint needs prometheus-client. "
                          "HINT: pip install 'cachemw[prometheus]'") from None
    return make(cache)
