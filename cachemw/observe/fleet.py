"""The fleet view: every process writes its counters to Redis now and then; anyone can add them up.

Each CacheMiddleware with ``enable_fleet_metrics`` writes its snapshot as JSON
under ``{prefix}:m:{host}:{pid}:{instance}`` every ``interval`` seconds, with a
TTL of three intervals, and deletes it when it shuts down: the keys present are
the processes alive now (one that died is gone within three intervals). Reading
is a SCAN of ``{prefix}:m:*`` and a sum (``aggregate``): no Prometheus server
needed. The counts are those since each live process started, so the totals drop
when a process restarts; for rates over time, use the Prometheus endpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from cachemw.core import keyspace
from cachemw.core.metrics import BUCKETS
from cachemw.observe.snapshot import COUNTERS, HOST, JOB_FIELDS, by_policy, full_snapshot, observed, totals
from cachemw.runtime.shell import CacheShell
from cachemw.store.redis import DRIVER_ERRORS as _DRIVER_ERRORS

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster


__all__ = ["aggregate", "enable_fleet_metrics", "fleet_key", "flush_fleet_metrics", "read_fleet"]

logger = logging.getLogger(__name__)

_L1_FIELDS = ("entries", "bytes_used", "max_bytes", "hits", "dropped")


def fleet_key(prefix: str, cache: CacheShell) -> str:
    return keyspace.fleet_key(prefix, HOST, os.getpid(), observed(cache).instance)


async def _document(cache: CacheShell, interval: float) -> dict[str, Any]:
    """The snapshot without what only one process can use (routes without a policy, descriptions)."""
    data = await full_snapshot(cache)  # with the write-behind statuses, read now
    data["interval"] = interval
    data["routes"] = [{k: v for k, v in row.items() if k not in ("description", "name", "tags")}
                      for row in data["routes"] if row["policy"] is not None]
    return data


async def flush_fleet_metrics(cache: CacheShell, interval: float) -> bool:
    """Write this process's counters to Redis once; False if there is no Redis or it did not answer."""
    client: Redis | None = getattr(cache.store, "client", None)
    if client is None or cache.settings is None or cache.breaker.state == "open":
        return False  # the memory store: this process is the fleet; an open breaker: Redis is down
    key = fleet_key(cache.settings.key_prefix, cache)
    try:
        with anyio.fail_after(max(interval, 3.0)):
            payload = json.dumps(await _document(cache, interval), separators=(",", ":"))
            await client.set(key, payload, px=max(1, round(interval * 3000)))
    except _DRIVER_ERRORS as exc:
        logger.debug("cachemw: writing fleet metrics to %s failed: %r", key, exc)
        return False
    return True


def enable_fleet_metrics(cache: CacheShell, interval: float = 5.0) -> None:
    """Write this process's counters to the shared Redis every ``interval`` seconds (for ``cachemw stats``).

    Runs as a supervisor service: call it once ``cache.supervisor`` is final (after
    ``cache.prepare(app)``, or with a ``supervisor=`` you passed). With the memory
    store there is nothing to share and the service only waits.
    """
    if not 0 < interval <= 3600:
        raise ValueError(f"interval must be a number of seconds in (0, 3600], got {interval!r}")

    async def report(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await flush_fleet_metrics(cache, interval)
                await anyio.sleep(interval)
        finally:
            # Gone at once rather than after three intervals: the fleet view shows live processes.
            client: Redis | None = getattr(cache.store, "client", None)
            if client is not None and cache.settings is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0), \
                        contextlib.suppress(*_DRIVER_ERRORS):
                    await client.delete(fleet_key(cache.settings.key_prefix, cache))

    cache.supervisor.add_service("observe:fleet", report)


async def read_fleet(client: Redis | RedisCluster, prefix: str) -> list[dict[str, Any]]:
    """Every live process's document under ``prefix`` (raises the driver's errors); on a Cluster, from every master."""
    keys = [key async for key in client.scan_iter(match=keyspace.fleet_pattern(prefix), count=1000)]
    documents: list[dict[str, Any]] = []
    for start in range(0, len(keys), 500):
        # One GET per key, pipelined: an MGET would cross Redis Cluster slots.
        async with client.pipeline(transaction=False) as pipe:
            for key in keys[start : start + 500]:
                pipe.get(key)
            values = await pipe.execute()
        for value in values:
            document = _parse(value)
            if document is not None:
                documents.append(document)
    documents.sort(key=lambda d: (d["process"]["host"], d["process"]["pid"], d["process"]["instance"]))
    return documents


def _parse(value: object) -> dict[str, Any] | None:
    if not isinstance(value, (bytes, str)):
        return None
    try:
        document = json.loads(value)
    except ValueError:
        return None
    # A foreign value, or one of a newer cachemw: skipped, not guessed at.
    if not isinstance(document, dict) or document.get("version") != 1:
        return None
    process, routes = document.get("process"), document.get("routes")
    if not isinstance(process, dict) or not {"host", "pid", "instance"} <= set(process):
        return None
    if not isinstance(routes, list) or not all(isinstance(row, dict) and "route" in row for row in routes):
        return None
    return document


def _histogram(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    cumulative = [0] * (len(BUCKETS) + 1)
    total = 0.0
    for part in parts:
        if len(part.get("cumulative", ())) != len(cumulative):
            continue  # other buckets (another version): cannot be added
        cumulative = [a + b for a, b in zip(cumulative, part["cumulative"], strict=True)]
        total += part.get("sum", 0.0)
    return {"buckets": list(BUCKETS), "cumulative": cumulative, "count": cumulative[-1], "sum": total}


def aggregate(documents: Iterable[dict[str, Any]], *, now: float | None = None) -> dict[str, Any]:
    """Add up process documents: counters and histograms summed, breaker states counted.

    Write-behind statuses are already fleet-wide (kept in Redis): the newest one of each queue is kept.
    """
    now = time.time() if now is None else now
    docs = list(documents)
    rows = _route_rows(docs)
    summed = totals(rows)
    kinds = _job_kinds(docs)
    stores = [doc.get("store", {}) for doc in docs]
    l1s = [doc.get("l1", {}) for doc in docs]
    l1_hits = sum(int(l1.get("hits", 0)) for l1 in l1s)
    return {
        "time": now,
        "processes": [
            {**doc["process"], "age": round(now - doc.get("time", now), 3), "interval": doc.get("interval")}
            for doc in docs
        ],
        "routes": rows,
        "policies": by_policy(rows),
        "totals": summed,
        "supervisor": {
            "kinds": dict(sorted(kinds.items())),
            "totals": {name: sum(counts[name] for counts in kinds.values()) for name in JOB_FIELDS},
        },
        "store": {
            "kinds": dict(Counter(str(s.get("kind")) for s in stores)),
            "breaker": dict(Counter(str(s.get("breaker")) for s in stores)),
            "listening": sum(1 for s in stores if s.get("listening")),
            "tracking": sum(1 for s in stores if s.get("tracking")),
            "errors": sum(int(s.get("errors", 0)) for s in stores),
            "loop_lag_timeouts": sum(int(s.get("loop_lag_timeouts", 0)) for s in stores),
            "late_replies": sum(int(s.get("late_replies", 0)) for s in stores),
            "latency": _histogram(s["latency"] for s in stores if isinstance(s.get("latency"), dict)),
            "loop_lag": _histogram(s["loop_lag"] for s in stores if isinstance(s.get("loop_lag"), dict)),
        },
        "l1": {
            **{name: sum(int(l1.get(name, 0)) for l1 in l1s) for name in _L1_FIELDS},
            "hit_share": round(l1_hits / summed["hit"], 4) if summed["hit"] else 0.0,
        },
        "write_behind": _newest_write_behind(docs),
    }


def _route_rows(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (route, policy) across the processes: counters and histograms added, the hit ratio anew."""
    routes: dict[tuple[str, str], dict[str, Any]] = {}
    histograms: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for doc in docs:
        for row in doc["routes"]:
            key = (row["route"], row.get("policy") or "-")
            merged = routes.setdefault(key, {"route": key[0], "policy": key[1], "source": row.get("source"),
                                             "cached": row.get("cached", True), **dict.fromkeys(COUNTERS, 0)})
            for name in COUNTERS:
                merged[name] += int(row.get(name, 0))
            parts = histograms.setdefault(key, {"origin_latency": [], "hit_latency": []})
            for name in parts:
                if isinstance(row.get(name), dict):
                    parts[name].append(row[name])
    rows = []
    for key, merged in routes.items():
        served = merged["hit"] + merged["stale"] + merged["miss"]
        merged["hit_ratio"] = round((merged["hit"] + merged["stale"]) / served, 4) if served else 0.0
        for name, parts_of in histograms[key].items():
            merged[name] = _histogram(parts_of)
        rows.append(merged)
    return rows


def _job_kinds(docs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    kinds: dict[str, dict[str, int]] = {}
    for doc in docs:
        for kind, counts in doc.get("supervisor", {}).get("kinds", {}).items():
            into = kinds.setdefault(kind, dict.fromkeys(JOB_FIELDS, 0))
            for name in JOB_FIELDS:
                into[name] += int(counts.get(name, 0))
    return kinds


def _newest_write_behind(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each queue's status from the process that reported last (each is fleet-wide already), by name."""
    newest: dict[str, tuple[float, dict[str, Any]]] = {}
    for doc in docs:
        at = doc.get("write_behind_at") or 0.0
        for status in doc.get("write_behind", []):
            name = status.get("name", "?")
            if name not in newest or newest[name][0] < at:
                newest[name] = (at, status)
    return [status for _, (_, status) in sorted(newest.items())]
