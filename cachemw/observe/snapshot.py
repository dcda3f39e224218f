"""One process's view of its cache as plain data: what the dashboard, Prometheus and the fleet view read.

Nothing here runs on the request path: a snapshot reads the counters the
middleware keeps (``cachemw.core.metrics``, the supervisor's, the L1's, the
breaker's) when someone asks. ``snapshot`` is synchronous and reads only
process memory; ``full_snapshot`` also asks Redis (a PING) and each
write-behind queue for its status, each under a short timeout.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from anyio.abc import TaskStatus

from cachemw.core.describe import describe_policy
from cachemw.core.metrics import BUCKETS, RouteMetrics
from cachemw.core.rules import RouteRule
from cachemw.runtime.context import current_cache
from cachemw.runtime.shell import CacheShell

__all__ = [
    "COUNTERS",
    "CacheSource",
    "by_policy",
    "enable_history",
    "find_cache",
    "full_snapshot",
    "history",
    "quantile",
    "resolve_cache",
    "sample_history",
    "snapshot",
    "totals",
]

HOST = socket.gethostname()
SNAPSHOT_VERSION = 1
# The per-route counters that add up across processes (everything else is derived or a histogram).
COUNTERS = ("requests", "hit", "l1_hits", "stale", "miss", "bypass", "stale_if_error", "collapsed", "refresh_ok",
            "refresh_failed", "stored_bytes", "stored_entries", "origin_busy",
            "fills_shed")
JOB_FIELDS = ("queued", "running", "done", "failed", "shed", "abandoned")
_STATUS_TIMEOUT = 1.0  # seconds for a PING or a write-behind status: a dashboard poll must not hang

# What the observing functions accept: the middleware, a getter returning it, or None for
# "the CacheMiddleware handling this request" (``current_cache()``).
CacheSource = CacheShell | Callable[[], CacheShell] | None


class _Observed:
    """What observing one CacheMiddleware keeps beside it (never on the request path)."""

    __slots__ = ("__weakref__", "history", "history_interval", "instance", "started", "write_behind",
                 "write_behind_at")

    def __init__(self) -> None:
        # Two CacheMiddleware in one process (two mounted apps) report separately.
        self.instance = secrets.token_hex(3)
        self.started = time.time()
        self.history: deque[dict[str, Any]] = deque(maxlen=150)
        self.history_interval = 2.0
        self.write_behind: list[dict[str, Any]] = []
        self.write_behind_at: float | None = None


_observed: weakref.WeakKeyDictionary[object, _Observed] = weakref.WeakKeyDictionary()


def observed(cache: CacheShell) -> _Observed:
    state = _observed.get(cache)
    if state is None:
        state = _observed[cache] = _Observed()
    return state


# -- finding the middleware ----------------------------------------------------------------------


def find_cache(app: Any) -> CacheShell:
    """The CacheMiddleware inside a Starlette/FastAPI app (or the middleware itself, or an app it wraps).

    Walks the built middleware stack (``app.middleware_stack``), following each
    middleware's ``.app``. The stack is built at the app's first request or
    lifespan; before that there is no instance to find.
    """

    seen: set[int] = set()
    node: Any = app
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, CacheShell):
            return node
        stack = getattr(node, "middleware_stack", None)
        if stack is not None:
            node = stack
            continue
        # A Starlette app whose stack is not built yet: building it here would freeze its middleware list.
        user_middleware = getattr(node, "user_middleware", None) or ()
        if any(isinstance(m.cls, type) and issubclass(m.cls, CacheShell) for m in user_middleware):
            raise LookupError("the app's CacheMiddleware does not exist yet: Starlette builds its middleware "
                                  "at the first request or lifespan. HINT: look it up from a request (or pass "
                                  "nothing: the current request's CacheMiddleware is used).")
        node = getattr(node, "app", None)
    raise LookupError("no CacheMiddleware found in the app. HINT: app.add_middleware(CacheMiddleware, ...)")


def resolve_cache(source: CacheSource, scope: Any = None) -> CacheShell:
    """The middleware ``source`` names; None means the one handling this request, else the scope's app's."""

    if isinstance(source, CacheShell):
        return source
    if source is not None:
        return source()
    try:
        return current_cache()
    except RuntimeError:
        app = scope.get("app") if isinstance(scope, dict) else None
        if app is None:
            raise LookupError("no CacheMiddleware handles this request. HINT: mount this app inside an app with "
                              "CacheMiddleware, or pass the middleware (or a function returning it).") from None
        return find_cache(app)


# -- the snapshot ----------------------------------------------------------------------------------


def snapshot(cache: CacheShell, *, now: float | None = None) -> dict[str, Any]:
    """Everything this process counts for ``cache``, as JSON-able data; reads memory only.

    ``write_behind`` holds the statuses the last ``full_snapshot`` read (``write_behind_at``).
    """
    now = time.time() if now is None else now
    state = observed(cache)
    routes = _routes(cache)
    return {
        "version": SNAPSHOT_VERSION,
        "time": now,
        "process": {"host": HOST, "pid": os.getpid(), "instance": state.instance, "started": state.started},
        "prefix": cache.settings.key_prefix if cache.settings is not None else None,
        "routes": routes,
        "policies": by_policy(routes),
        "totals": totals(routes),
        "supervisor": _supervisor(cache),
        "store": _store(cache),
        "l1": _l1(cache, sum(row["hit"] for row in routes)),
        "write_behind": list(state.write_behind),
        "write_behind_at": state.write_behind_at,
    }


async def full_snapshot(cache: CacheShell, *, now: float | None = None) -> dict[str, Any]:
    """``snapshot`` plus what needs a round trip: a PING of Redis and each write-behind queue's status."""
    state = observed(cache)
    statuses: list[dict[str, Any]] = []
    for queue in _write_behinds(cache):
        statuses.append(await _write_behind_status(queue))
    state.write_behind = statuses
    state.write_behind_at = time.time()
    data = snapshot(cache, now=now)
    data["store"]["ping"] = await _ping(cache)
    return data


def totals(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The counters of ``rows`` added up, with the hit ratio of the sum."""
    summed: dict[str, Any] = {name: sum(int(row.get(name, 0)) for row in rows) for name in COUNTERS}
    served = summed["hit"] + summed["stale"] + summed["miss"]
    summed["hit_ratio"] = round((summed["hit"] + summed["stale"]) / served, 4) if served else 0.0
    return summed


def by_policy(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The counters of the routes of each policy (preset name, or "custom"), added up."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("policy") is not None:
            groups.setdefault(row["policy"], []).append(row)
    return {policy: totals(group) for policy, group in sorted(groups.items())}


def _rules_by_template(cache: CacheShell) -> dict[str, RouteRule]:
    """One rule per template (GET and POST routes of one path share their metrics), the cached one first."""
    rules: dict[str, RouteRule] = {}
    table = cache.table
    for rule in table.rules if table is not None else ():
        known = rules.get(rule.template)
        if known is None or (known.policy is None and rule.policy is not None):
            rules[rule.template] = rule
    return rules


def _routes(cache: CacheShell) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    rules = _rules_by_template(cache)
    metrics = cache.metrics.routes
    for template, rule in rules.items():
        policy = rule.policy
        label = None if policy is None else (policy.preset or "custom")
        route_metrics = metrics.get(template) or RouteMetrics(template, label or "-")
        row = route_metrics.snapshot()
        row.update(
            policy=route_metrics.policy if template in metrics else label,
            description=describe_policy(policy),
            source=rule.source,
            name=rule.name,
            cached=policy is not None and policy.cacheable,
            tags=list(policy.tags) if policy is not None else [],
        )
        rows.append(row)
    for template, route_metrics in metrics.items():
        if template not in rules:  # after shutdown the table is gone; the counts are not
            row = route_metrics.snapshot()
            row.update(description=None, source=None, name="", cached=True, tags=[])
            rows.append(row)
    return rows


def _supervisor(cache: CacheShell) -> dict[str, Any]:
    supervisor = cache.supervisor
    kinds = {kind: dataclasses.asdict(counters) for kind, counters in sorted(supervisor.counters.items())}
    return {
        "running": supervisor.running,
        "queue_size": supervisor.queue_size,
        "concurrency": supervisor.concurrency,
        "lanes": dict(supervisor.lanes),
        "kinds": kinds,
        "totals": {name: sum(counts[name] for counts in kinds.values()) for name in JOB_FIELDS},
        "service_restarts": dict(supervisor.service_restarts),
    }


def _store(cache: CacheShell) -> dict[str, Any]:
    from cachemw.store import MemoryStore, RedisStore

    store = cache.store
    info: dict[str, Any] = {
        "kind": "none",
        "where": None,
        "listening": False,
        "breaker": cache.breaker.state,
        "breaker_transitions": cache.breaker.transitions,
        "errors": cache.store_errors,
        # Of those, timeouts that were this process's own lateness (not counted by the breaker).
        "loop_lag_timeouts": cache.loop_lag_timeouts,
        # Replies half a budget or more past the budget, used: this process ran late (the store grace waited).
        "late_replies": cache.late_replies,
        "loop_lag": cache.loop_lag.histogram.snapshot(),
        "latency": cache.metrics.store_latency.snapshot(),
        "problem": cache.store_problem,  # why the startup probe could not reach it, if it could not
        "rejected_messages": 0,
        "tracking": False,
        "waiting_on_fills": cache.metrics.waiting_on_fills,
    }
    if store is None:
        return info
    info["listening"] = bool(store.listening)
    # Redis reports changed entry keys on that link: the L1's copies go when they change, not after `sync`.
    info["tracking"] = bool(getattr(store, "tracking", False))
    # Announcements on our channels that did not decode: garbage someone published, dropped and counted.
    info["rejected_messages"] = store.notifications.rejected
    if isinstance(store, RedisStore):
        info["kind"] = "redis"
        info["where"] = _where(store)
    elif isinstance(store, MemoryStore):
        info["kind"] = "memory"
        info["memory"] = dataclasses.asdict(store.stats)
    else:
        info["kind"] = type(store).__name__
    return info


def _where(store: Any) -> str:
    """host:port or the socket path: never the URL, which may carry a password."""
    client = store.client
    if getattr(store, "cluster", False):
        nodes = client.get_nodes() if hasattr(client, "get_nodes") else []
        return "cluster: " + (", ".join(sorted(n.name for n in nodes)) or "(slot map not known yet)")
    pool: Any = getattr(client, "connection_pool", None)
    if type(pool).__name__ == "SentinelConnectionPool":
        return f"sentinel service {pool.service_name}"
    kwargs = pool.connection_kwargs if pool is not None else {}
    if kwargs.get("path"):
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _l1(cache: CacheShell, hits: int) -> dict[str, Any]:
    l1 = cache.l1
    return {
        "entries": len(l1),
        "bytes_used": l1.bytes_used,
        "max_bytes": l1.max_bytes,
        "hits": l1.hits,
        "dropped": l1.dropped,
        # The L1 counts its hits, not its lookups: this is the share of HITs it answered without Redis.
        "hit_share": round(l1.hits / hits, 4) if hits else 0.0,
    }


def _write_behinds(cache: CacheShell) -> Sequence[Any]:
    queues = getattr(cache, "write_behinds", None)
    if queues is None:
        queues = getattr(cache, "write_behind", None)
    return list(queues or ())


async def _write_behind_status(queue: Any) -> dict[str, Any]:
    name = str(getattr(queue, "name", "?"))
    try:
        with anyio.fail_after(_STATUS_TIMEOUT):
            status = await queue.status()
    except Exception as exc:  # a queue we cannot read is shown as such, never breaks the page
        return {"name": name, "error": _one_line(exc)}
    if hasattr(status, "as_dict"):
        found: dict[str, Any] = status.as_dict()
        return found
    if dataclasses.is_dataclass(status) and not isinstance(status, type):
        return dataclasses.asdict(status)
    return {"name": name, "status": str(status)}


async def _ping(cache: CacheShell) -> dict[str, Any] | None:
    client = getattr(cache.store, "client", None)
    if client is None:
        return None
    began = time.perf_counter()
    try:
        with anyio.fail_after(_STATUS_TIMEOUT):
            await client.ping()
    except Exception as exc:  # the answer is "unhealthy", whatever the driver raised
        return {"ok": False, "error": _one_line(exc) or "timed out"}
    return {"ok": True, "ms": round((time.perf_counter() - began) * 1000, 3)}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def quantile(histogram: dict[str, Any], q: float) -> float | None:
    """Upper bound of the bucket holding the ``q`` quantile of a histogram snapshot; None if empty.

    Past the last bucket the answer is ``inf``.
    """
    count = histogram.get("count", 0)
    if not count:
        return None
    rank = q * count
    buckets = list(histogram.get("buckets", BUCKETS))
    for bound, cumulative in zip([*buckets, float("inf")], histogram["cumulative"], strict=False):
        if cumulative >= rank:
            return float(bound)
    return float("inf")


# -- history: recent totals for the dashboard's chart ----------------------------------------------


def sample_history(cache: CacheShell, *, now: float | None = None, force: bool = False) -> bool:
    """Record the current per-route counts, unless one was recorded less than half an interval ago."""
    now = time.time() if now is None else now
    state = observed(cache)
    if not force and state.history and now - state.history[-1]["t"] < state.history_interval / 2:
        return False
    routes = {template: [m.hit, m.stale, m.miss, m.bypass] for template, m in cache.metrics.routes.items()}
    state.history.append({"t": round(now, 3), "routes": routes})
    return True


def history(cache: CacheShell) -> list[dict[str, Any]]:
    """The recorded samples, oldest first: ``{"t", "hit", "stale", "miss", "bypass", "routes"}`` (running totals)."""
    samples: list[dict[str, Any]] = []
    for sample in observed(cache).history:
        sums = [0, 0, 0, 0]
        for counts in sample["routes"].values():
            for i, n in enumerate(counts):
                sums[i] += n
        samples.append({"t": sample["t"], "hit": sums[0], "stale": sums[1], "miss": sums[2], "bypass": sums[3],
                        "routes": sample["routes"]})
    return samples


def enable_history(cache: CacheShell, *, interval: float = 2.0, keep: int = 150) -> None:
    """Sample the counts every ``interval`` seconds (``keep`` samples) for the dashboard's chart.

    Runs as a supervisor service: call it once ``cache.supervisor`` is final (after
    ``cache.prepare(app)``, or with a ``supervisor=`` you passed). Without it the
    dashboard samples whenever it is polled.
    """
    if not 0 < interval < 3600 or keep < 2:
        raise ValueError(f"interval must be in (0, 3600) seconds and keep at least 2; got {interval!r}, {keep!r}")
    state = observed(cache)
    state.history_interval = interval
    if state.history.maxlen != keep:
        state.history = deque(state.history, maxlen=keep)

    async def sample(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            sample_history(cache, force=True)
            await anyio.sleep(interval)

    cache.supervisor.add_service("observe:history", sample)
