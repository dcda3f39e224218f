"""Memory under many distinct keys: 100,000 keys through the middleware, RSS, and the configured bounds.

Two cases, each in a fresh Python process of its own (so its RSS is that case's alone):

- ``memory``: the in-process memory store (no Redis URL), bounded by ``memory_max_bytes``;
- ``l1``: a private redis-server as the store and the per-process L1 in front of it
  (the route has ``sync="1h"``), bounded by ``l1_max_bytes``. Redis itself keeps
  every entry (no maxmemory): only the L1 is bounded in the app's process.

Each case builds a Starlette app behind ``CacheMiddleware`` with ``/item/{id:int}``
under ``@cache(ttl="1h")`` (``sync="1h"`` for ``l1``) answering a ~1 KB JSON body,
distinct per id, at once (no database sleep). It runs the lifespan (so background
fills run in the supervisor as in production), then sends ``--keys`` GETs for
``/item/0`` .. ``/item/N-1``, each id once (for ``l1`` each id is read again 512 ids
later, a Redis hit that the L1 keeps: a fill's own copy is dropped by the invalidation
its write sends back), from ``--concurrency`` asyncio tasks
calling the ASGI app in process (no HTTP server; each task yields to the event
loop between two requests, as a server does while it reads the next one). It waits
until the supervisor has no job left, then reports RSS before (after startup) and
after (``VmRSS``, after glibc's ``malloc_trim(0)`` too, and the
peak ``VmHWM``) from ``/proc/self/status``, the store's or L1's accounted bytes and
entries against the bound (also checked every 1,000 requests during the fill), the
Python objects behind them (a deep ``sys.getsizeof``), a timeline of RSS during the
fill, and a re-request of the first ids (evicted: MISS, or for ``l1`` answered by
Redis, not the L1) and of the last ids (HIT from the store or the L1).

The target (issue #15): RSS growth at most 1.3x the bounds in play summed: the memory
store's or the L1's, the decode memo's and the background queue's (``queue_max_bytes``).
``--rounds`` repeats both cases, interleaved, and reports the min-max.

    .venv/bin/python bench/memory.py                 # ~1-2 min: both cases, 100,000 keys
    .venv/bin/python bench/memory.py --cases memory --keys 20000 --no-write

Writes ``bench/results/memory.md`` unless ``--no-write`` (``--output`` elsewhere).
Exit status 0 when every case measured, its bound held, its RSS growth stayed within 1.3x the
bounds in play summed (the store's or the L1's, the decode memo's, the background queue's) and all
requests were answered 200; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

CASES = ("memory", "l1")
READ_BACK_LAG = 512  # l1: ids behind the newest fill that are read again (filled by then: a Redis hit)
RSS_TARGET = 1.3  # issue #15: RSS growth at most 1.3x the configured bounds summed
MIB = 1024 * 1024
BODY_BYTES = 1024
SAMPLE_IDS = 5  # re-requested at each end of the id range
BOUND_CHECK_EVERY = 1000  # requests between two looks at the accounted bytes
TIMELINE_POINTS = 10


# -- the child: one case in this process ----------------------------------------------------------


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    found: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) * 1024
    return found


def _rss_after_trim() -> int | None:
    """VmRSS once glibc has handed free heap memory back to the system: live memory, not the allocator's spare."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return _proc_status()["VmRSS"]


def body_for(item_id: int) -> bytes:
    """A ~1 KB JSON document, different for every id (padding from a digest of the id)."""
    digest = hashlib.sha256(str(item_id).encode()).hexdigest()
    doc = {"id": item_id, "name": f"item {item_id}", "price": 12.5, "tags": ["a", "b"], "padding": ""}
    room = BODY_BYTES - len(json.dumps(doc, separators=(",", ":")))
    doc["padding"] = (digest * (room // len(digest) + 1))[: max(0, room)]
    return json.dumps(doc, separators=(",", ":")).encode()


handler_runs = 0


def build_app(case: str, memory_max_bytes: int, l1_max_bytes: int, queue_max_bytes: int, redis_url: str | None
              ) -> Any:
    """The app of one case: ``CacheMiddleware`` around a Starlette app (returned, so its store and L1 are at hand)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from cachemw import CacheMiddleware, Settings, cache

    fields: dict[str, str] = {"ttl": "1h"} if case == "memory" else {"ttl": "1h", "sync": "1h"}

    @cache(**fields)
    async def item(request: Request) -> Response:
        global handler_runs
        handler_runs += 1
        return Response(body_for(request.path_params["id"]), media_type="application/json")

    app = Starlette(routes=[Route("/item/{id:int}", item)])
    settings = Settings(redis_url=redis_url if case == "l1" else None, memory_max_bytes=memory_max_bytes,
                        l1_max_bytes=l1_max_bytes, queue_max_bytes=queue_max_bytes)
    return CacheMiddleware(app, settings=settings)


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 40000), "scheme": "http", "method": "GET",
        "root_path": "", "path": path, "raw_path": path.encode(), "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench-memory"), (b"accept", b"*/*")],
        "state": {},
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


class _Tally:
    """The server's side of ``send``: counts statuses and X-Cache values, keeps no body."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.x_cache: Counter[str] = Counter()
        self.last_x_cache = ""

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.statuses[message["status"]] += 1
            value = next((v for n, v in message.get("headers", ()) if n.lower() == b"x-cache"), b"-")
            self.last_x_cache = value.decode("latin-1")
            self.x_cache[self.last_x_cache] += 1


class _Lifespan:
    """Run the app's lifespan around the load, as a server would (so the supervisor owns the fills)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.ensure_future(self.app(scope, self.inbox.get, self.outbox.put))
        await self.inbox.put({"type": "lifespan.startup"})
        message = await self.outbox.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"startup failed: {message}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self.outbox.get()
        assert self.task is not None
        await self.task


def _accounted(case: str, mw: Any) -> tuple[int, int]:
    """(accounted bytes, entries) of what the case bounds: the memory store, or the L1."""
    if case == "memory":
        return int(mw.store.bytes_used), len(mw.store)
    return int(mw.l1.bytes_used), len(mw.l1)


def _health(mw: Any) -> dict[str, Any]:
    """What tells whether the cache worked during the fill: breaker, store errors, jobs shed, GC."""
    return {"breaker": mw.breaker.state, "transitions": mw.breaker.transitions, "store_errors": mw.store_errors,
            "loop_lag_timeouts": mw.loop_lag_timeouts,
            "shed": sum(c.shed for c in mw.supervisor.counters.values()),
            "queued": sum(c.queued for c in mw.supervisor.counters.values()),
            "gc_max_ms": _gc["max"] * 1000, "gc2": _gc["gen2"]}


_gc: dict[str, float] = {"started": 0.0, "max": 0.0, "gen2": 0, "seconds": 0.0}


def _gc_callback(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc["started"] = time.perf_counter()
        return
    pause = time.perf_counter() - _gc["started"]
    _gc["max"] = max(_gc["max"], pause)
    _gc["seconds"] += pause
    if info.get("generation") == 2:
        _gc["gen2"] += 1


def _jobs_pending(mw: Any) -> int:
    return sum(c.queued + c.running for c in mw.supervisor.counters.values())


async def _wait_settled(case: str, mw: Any, deadline: float) -> float:
    """Until no background job is queued or running and the bounded structure stopped changing."""
    began = time.perf_counter()
    last: tuple[int, int] | None = None
    quiet = 0
    while time.perf_counter() - began < deadline:
        now = _accounted(case, mw)
        if _jobs_pending(mw) == 0 and now == last:
            quiet += 1
            if quiet >= 3:
                break
        else:
            quiet = 0
        last = now
        await asyncio.sleep(0.05)
    return time.perf_counter() - began


_DESCEND = (dict, list, tuple, set, frozenset)


def deep_size(roots: list[Any], seen: set[int], stop_at: tuple[type, ...] = ()) -> int:
    """Bytes of the Python objects reachable from ``roots`` through containers and slotted records.

    ``seen`` is shared between calls so an object two structures share counts once.
    Functions, events and other objects outside these types count their own size only.
    """
    total = 0
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, _DESCEND):
            stack.extend(obj)
        elif not isinstance(obj, stop_at):
            slots = getattr(type(obj), "__slots__", None)
            if slots and type(obj).__module__.startswith("cachemw"):
                stack.extend(getattr(obj, name) for name in slots if hasattr(obj, name))
    return total


def _heap_breakdown(case: str, mw: Any) -> list[dict[str, Any]]:
    """What holds memory in the process, structure by structure, with the part the bound accounts for."""
    seen: set[int] = set()
    rows: list[dict[str, Any]] = []

    def row(name: str, count: int, accounted: int | None, roots: list[Any], note: str = "") -> None:
        rows.append({"structure": name, "items": count, "accounted": accounted,
                     "python_bytes": deep_size(roots, seen), "note": note})

    if case == "memory":
        store = mw.store
        members = sum(len(m) for m in store._tag_sets.values())
        now = store._clock()
        expired = sum(1 for _, until in store._locks.values() if until <= now)
        row("MemoryStore: entries, tag index, locks", len(store._data), store.bytes_used,
            [store._data, store._tag_sets, store._locks],
            f"{len(store._data):,} entries; {members:,} members in {len(store._tag_sets):,} tag sets; "
            f"{len(store._locks):,} fill locks ({expired:,} expired); all inside memory_max_bytes")
        row("MemoryStore._generations", len(store._generations), None, [store._generations])
    else:
        l1 = mw.l1
        members = sum(len(m) for m in l1._by_tag.values())
        row("L1: entries and tag index", len(l1._slots), l1.bytes_used, [l1._slots, l1._by_tag],
            f"{members:,} members in {len(l1._by_tag):,} tag sets; all inside l1_max_bytes")
    runtime = mw.runtime
    row("CacheRuntime.decoded (decode memo)", len(runtime.decoded), runtime.decoded.bytes_used,
        [runtime.decoded.entries], f"emptied when {runtime.decoded.max_bytes / MIB:.0f} MiB would be passed")
    row("CacheRuntime.keys (key memo)", len(runtime.keys._memo), None, [runtime.keys._memo],
        f"emptied at {runtime.keys.size:,}; outside the bounds")
    row("RuleTable._memo (route matches)", len(mw.table._memo), None, [mw.table._memo],
        "emptied at 4,096; outside the bounds")
    from cachemw.core.keyspace import tag_keys
    info = tag_keys.cache_info()
    row("keyspace.tag_keys lru_cache", info.currsize, None, [],
        f"~{info.currsize:,} x (tuple of 2 key strings + cache node); maxsize {info.maxsize:,}; outside the bounds; "
        f"not walked")
    row("FillLocks.pending_releases", len(runtime.locks.pending_releases), None, [runtime.locks.pending_releases],
        "lock releases shed with a full queue, waiting for the releases service (those it is sending are not "
        "visible here); outside the bounds")
    row("Flights.active, Fills.refreshing", len(runtime.flights.active) + len(runtime.fills.refreshing), None,
        [runtime.flights.active, runtime.fills.refreshing])
    row("store.notifications.waiters", len(mw.store.notifications.waiters), None, [mw.store.notifications.waiters])
    return rows


async def _request(app: Any, item_id: int) -> str:
    tally = _Tally()
    await app(_scope(f"/item/{item_id}"), _receive, tally.send)
    return tally.last_x_cache if tally.statuses.get(200) else f"status {dict(tally.statuses)}"


def _held(case: str, mw: Any, item_id: int) -> bool:
    """Is the id's entry in the bounded structure now? (Its key as the middleware computes it.)"""
    from cachemw.core.keys import RequestHeaders, route_path

    scope = _scope(f"/item/{item_id}")
    match = mw.table.match(route_path(scope), "GET")
    key = mw.runtime.keys.key(scope, RequestHeaders(scope), match.rule.policy, match.rule.label, mw.runtime.prefix,
                              None).key
    return key in (mw.store._data if case == "memory" else mw.l1._slots)


async def _samples(case: str, mw: Any, keys: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Re-request the last ids held (recent) and then the first ids (evicted long ago).

    The very last ids may never have been stored (a shed fill, a failing store): the
    recent group is the last ``SAMPLE_IDS`` ids that are held, and how many of the
    last ids were skipped is counted, with how many of the last 1,000 are held.
    """
    window = range(keys - 1, max(-1, keys - 1001), -1)
    held_last = [i for i in window if _held(case, mw, i)]
    recent = sorted(held_last[:SAMPLE_IDS])
    skipped = (keys - recent[0] - len(recent)) if recent else len(window)
    early = [i for i in range(min(SAMPLE_IDS, keys)) if i not in recent]
    coverage = {"last_1000_held": len(held_last), "last_1000": len(window), "recent_skipped": skipped}
    out = []
    for group, ids in (("recent", recent), ("early", early)):
        for item_id in ids:
            runs, l1_hits, l1_misses = handler_runs, mw.l1.hits, mw.l1.misses
            x_cache = await _request(mw, item_id)
            if handler_runs > runs:
                answered = "app (handler ran)"
            elif case == "l1" and mw.l1.hits > l1_hits:
                answered = "L1"
            elif case == "l1" and mw.l1.misses > l1_misses:
                answered = "Redis (not in L1)"
            else:
                answered = "memory store"
            out.append({"group": group, "id": item_id, "x_cache": x_cache, "answered_by": answered})
    return out, coverage


async def run_case(case: str, keys: int, concurrency: int, memory_max_bytes: int, l1_max_bytes: int,
                   queue_max_bytes: int, redis_url: str | None) -> dict[str, Any]:
    mw = build_app(case, memory_max_bytes, l1_max_bytes, queue_max_bytes, redis_url)
    bound = memory_max_bytes if case == "memory" else l1_max_bytes
    result: dict[str, Any] = {"case": case, "keys": keys, "bound": bound, "concurrency": concurrency}
    async with _Lifespan(mw):
        if case == "l1":
            waited = time.perf_counter()
            while not mw.store.listening and time.perf_counter() - waited < 10:
                await asyncio.sleep(0.02)  # the L1 answers only while invalidations are heard
            if not mw.store.listening:
                raise SystemExit("l1: the store never subscribed to invalidations; the L1 would not be used")
        # The four bounds as the running middleware has them; the one whose structure this case never fills
        # (the L1 without a remote store, the memory store behind Redis) is reported, not summed.
        result["bounds"] = {
            "memory_max_bytes": memory_max_bytes if case == "memory" else None,
            "l1_max_bytes": mw.l1.max_bytes if case == "l1" else None,
            "decode memo (DecodedMemo.max_bytes)": mw.runtime.decoded.max_bytes,
            "queue_max_bytes": mw.supervisor.queue_max_bytes,
        }
        result["unused_bound"] = (f"l1_max_bytes = {_mib(l1_max_bytes)} MiB (no L1 without a remote store)"
                                  if case == "memory" else
                                  f"memory_max_bytes = {_mib(memory_max_bytes)} MiB (no memory store behind Redis)")
        max_queued_bytes = 0
        gc.collect()
        gc.callbacks.append(_gc_callback)
        before = _proc_status()
        result["rss_before"] = before["VmRSS"]
        result["gc_frozen"] = gc.get_freeze_count()  # > 0: gc.freeze() ran at startup (cachemw's gc_freeze)
        print(f"{case}: started, RSS {before['VmRSS'] / MIB:.1f} MiB; filling {keys:,} keys", file=sys.stderr,
              flush=True)

        tally = _Tally()
        read_backs = _Tally()  # l1: the second request of each id, READ_BACK_LAG ids behind its fill
        ids: Iterator[int] = iter(range(keys))
        done = 0
        max_accounted = 0
        timeline: list[dict[str, Any]] = []
        step = max(1, keys // TIMELINE_POINTS)
        began = time.perf_counter()

        def look() -> None:
            nonlocal max_accounted, max_queued_bytes
            accounted, entries = _accounted(case, mw)
            max_accounted = max(max_accounted, accounted)
            max_queued_bytes = max(max_queued_bytes, mw.supervisor.queued_bytes)
            if done % step == 0 or done == keys:
                status = _proc_status()
                timeline.append({"requests": done, "seconds": time.perf_counter() - began, "rss": status["VmRSS"],
                                 "accounted": accounted, "entries": entries, **_health(mw)})

        async def client() -> None:
            nonlocal done
            for item_id in ids:  # one shared iterator: every id is requested once
                await mw(_scope(f"/item/{item_id}"), _receive, tally.send)
                if case == "l1" and item_id >= READ_BACK_LAG:
                    # A fill's own write comes back as an invalidation on the tracking link and drops
                    # the fill's L1 copy: the L1 fills from reads (a Redis hit keeps its copy).
                    await mw(_scope(f"/item/{item_id - READ_BACK_LAG}"), _receive, read_backs.send)
                done += 1
                if done % BOUND_CHECK_EVERY == 0 or done % step == 0 or done == keys:
                    look()
                # A server reads the next request from its socket: the loop runs other tasks (the
                # supervisor's fills) between two requests of a connection. Without this a memory-store
                # request never suspends, and the fills would only run once the whole fill is over.
                await asyncio.sleep(0)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        fill_seconds = time.perf_counter() - began
        settle_seconds = await _wait_settled(case, mw, deadline=120.0)
        look_accounted, _ = _accounted(case, mw)
        max_accounted = max(max_accounted, look_accounted)
        gc.callbacks.remove(_gc_callback)
        gc.collect()
        after = _proc_status()
        result["gc_objects"] = len(gc.get_objects())
        result["rss_trimmed"] = _rss_after_trim()
        accounted, entries = _accounted(case, mw)
        timeline.append({"requests": done, "seconds": time.perf_counter() - began, "rss": after["VmRSS"],
                         "accounted": accounted, "entries": entries, "label": "settled, after gc.collect()",
                         **_health(mw)})
        print(f"{case}: {done:,} requests in {fill_seconds:.1f} s (+{settle_seconds:.1f} s for the fills), "
              f"RSS {after['VmRSS'] / MIB:.1f} MiB, accounted {accounted / MIB:.2f} MiB in {entries:,} entries",
              file=sys.stderr, flush=True)
        result.update({
            "rss_after": after["VmRSS"], "hwm": after["VmHWM"], "accounted": accounted, "entries": entries,
            "max_accounted": max_accounted, "statuses": {str(k): v for k, v in tally.statuses.items()},
            "x_cache": dict(tally.x_cache), "handler_runs": handler_runs, "fill_seconds": fill_seconds,
            "settle_seconds": settle_seconds, "timeline": timeline,
            "jobs": {kind: {"done": c.done, "failed": c.failed, "shed": c.shed, "abandoned": c.abandoned}
                     for kind, c in mw.supervisor.counters.items()},
            "store_errors": mw.store_errors, "loop_lag_timeouts": mw.loop_lag_timeouts,
            "breaker_transitions": mw.breaker.transitions, "gc": dict(_gc), "max_queued_bytes": max_queued_bytes,
            "max_memo_bytes": mw.runtime.decoded.bytes_used,
        })
        if case == "memory":
            stats = mw.store.stats
            result.update({"evictions": stats.evictions, "expirations": stats.expirations,
                           "rejected": stats.rejected})
        else:
            result.update({"l1_hits": mw.l1.hits, "l1_misses": mw.l1.misses, "l1_dropped": mw.l1.dropped,
                           "read_backs": dict(read_backs.x_cache)})
        result["samples"], result["coverage"] = await _samples(case, mw, keys)
        await _wait_settled(case, mw, deadline=30.0)
        result["heap"] = _heap_breakdown(case, mw)
        result["accounted_after_samples"], result["entries_after_samples"] = _accounted(case, mw)
    return result


def child_main(args: argparse.Namespace) -> int:
    try:
        import uvloop
        runner: Callable[..., Any] = uvloop.run
        loop = "uvloop"
    except ImportError:  # pragma: no cover - the project venv has it
        runner = asyncio.run
        loop = "asyncio"
    result = runner(run_case(args.case, args.keys, args.concurrency, args.memory_max_bytes, args.l1_max_bytes,
                             args.queue_max_bytes, args.redis_url))
    result["loop"] = loop
    Path(args.result_file).write_text(json.dumps(result))
    return 0


# -- the parent: one fresh process per case, then the report ----------------------------------------


def _redis_side(redis: common.RedisProcess) -> dict[str, Any]:
    """What Redis holds after the l1 case: every entry (Redis is not bounded here), and its memory."""
    from cachemw.core.keyspace import entry_pattern

    info = redis.command("INFO", "memory").decode()
    used = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("used_memory:")),
                "0")
    entries = 0
    cursor = "0"
    while True:
        raw_cursor, batch = redis.command("SCAN", cursor, "MATCH", entry_pattern("cachemw"), "COUNT", "10000")
        entries += len(batch)
        cursor = raw_cursor.decode()
        if cursor == "0":
            break
    return {"dbsize": redis.dbsize(), "entries": entries, "used_memory": int(used)}


def _run_child(case: str, args: argparse.Namespace, scratch: Path, redis_url: str | None) -> dict[str, Any]:
    result_file = scratch / f"{case}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--keys", str(args.keys),
               "--concurrency", str(args.concurrency), "--memory-max-bytes", str(args.memory_max_bytes),
               "--l1-max-bytes", str(args.l1_max_bytes), "--queue-max-bytes", str(args.queue_max_bytes),
               "--result-file", str(result_file)]
    if redis_url:
        command += ["--redis-url", redis_url]
    env = {k: v for k, v in os.environ.items() if k != "CACHEMW_REDIS_URL"}
    done = subprocess.run(command, env=env, timeout=args.timeout, check=False)
    if done.returncode != 0 or not result_file.exists():
        raise common.HarnessError(f"case {case}: the measuring process exited with {done.returncode}")
    result: dict[str, Any] = json.loads(result_file.read_text())
    return result


def _mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def _summed(r: dict[str, Any]) -> int:
    """The bounds of the structures this case fills, summed."""
    return sum(v for v in r["bounds"].values() if v is not None)


def _growth(r: dict[str, Any]) -> int:
    return int(r["rss_after"] - r["rss_before"])


def _verdicts(r: dict[str, Any]) -> dict[str, Any]:
    """The bound and the 200s decide the exit status; the re-requests are counted (x of n)."""
    recent = [s for s in r["samples"] if s["group"] == "recent"]
    early = [s for s in r["samples"] if s["group"] == "early"]
    held = "memory store" if r["case"] == "memory" else "L1"
    return {
        "bound": r["max_accounted"] <= r["bound"] and r["accounted_after_samples"] <= r["bound"],
        "rss": _growth(r) <= RSS_TARGET * _summed(r),
        "all_200": r["statuses"] == {"200": r["keys"]},
        "early_evicted": f"{sum(s['answered_by'] != held for s in early)} of {len(early)}",
        "last_held": f"{r['coverage']['last_1000_held']:,} of {r['coverage']['last_1000']:,}",
        "recent_held": f"{sum(s['answered_by'] == held and s['x_cache'] == 'HIT' for s in recent)} of {len(recent)}",
    }


def report(args: argparse.Namespace, results: list[dict[str, Any]], redis: dict[str, Any] | None,
           command: str, redis_binary: str | None) -> list[str]:
    facts = common.machine_description(redis_binary=redis_binary)
    loop = results[0].get("loop", "?") if results else "?"
    lines = common.results_preamble(
        f"{args.keys:,} distinct keys through cachemw: RSS and the configured bounds", facts, command,
        [f"each case in a fresh Python process; {args.keys:,} GETs of /item/0 .. /item/{args.keys - 1} (each id "
         f"once, ~{BODY_BYTES} B JSON bodies, no database sleep) from {args.concurrency} asyncio tasks calling the "
         f"ASGI app in process ({loop}), lifespan running (background fills in the supervisor)",
         "RSS from /proc/self/status: 'before' after startup and gc.collect(), 'after' once no background job "
         "was left and after gc.collect(); 'peak' is VmHWM over the process's life",
         f"accounted bytes: the store's or L1's own `bytes_used` (what its bound limits), looked at every "
         f"{BOUND_CHECK_EVERY:,} requests during the fill, after it, and after the re-requests"])
    lines += [
        "## Summary", "",
        f"| case | round | bounds in play | bounds summed | RSS before | RSS after | RSS growth "
        f"| growth / bounds summed | <= {RSS_TARGET}x | peak RSS | entries held | accounted (max seen) "
        f"| accounted <= bound | 200s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        v = _verdicts(r)
        name = "memory store" if r["case"] == "memory" else "Redis + L1"
        bounds = "; ".join(f"{k} {_mib(b)} MiB" for k, b in r["bounds"].items() if b is not None)
        lines.append(
            f"| {name} | {r.get('round', 1)} | {bounds} | {_mib(_summed(r))} MiB | {_mib(r['rss_before'])} MiB "
            f"| {_mib(r['rss_after'])} MiB "
            f"| +{_mib(_growth(r))} MiB | **{_growth(r) / _summed(r):.2f}x** | {'**yes**' if v['rss'] else '**NO**'} "
            f"| {_mib(r['hwm'])} MiB | {r['entries']:,} | {_mib(r['accounted'])} MiB ({_mib(r['max_accounted'])}) "
            f"| {'**yes**' if v['bound'] else '**NO**'} | {r['statuses'].get('200', 0):,} / {r['keys']:,} |")
    lines.append("")
    for case in dict.fromkeys(r["case"] for r in results):
        ratios = [_growth(r) / _summed(r) for r in results if r["case"] == case]
        lines.append(f"- {case}: RSS growth / bounds summed {min(ratios):.2f}x to {max(ratios):.2f}x over "
                     f"{len(ratios)} round(s)")
    last = {r["case"]: r for r in results}  # the details below are of each case's last round
    lines += ["", "Not summed: " + "; ".join(f"{r['case']} case: {r['unused_bound']}" for r in last.values()) + ". "
              "RSS is measured as it is, after the fill settled and `gc.collect()`: memory the allocators keep "
              "(pymalloc arenas, glibc's heap) counts; `malloc_trim` is reported below, not used for the verdict. "
              "The sections below are each case's last round.", ""]
    for r in last.values():
        v = _verdicts(r)
        name = "memory store" if r["case"] == "memory" else "Redis + L1"
        held_in = "memory store" if r["case"] == "memory" else "L1"
        lines += [f"## {name}", ""]
        per_entry = r["accounted"] / r["entries"] if r["entries"] else 0
        growth_per_entry = (r["rss_after"] - r["rss_before"]) / r["entries"] if r["entries"] else 0
        lines += [
            f"- fill: {r['fill_seconds']:.1f} s for {r['keys']:,} requests "
            f"({r['keys'] / r['fill_seconds']:,.0f} req/s), then {r['settle_seconds']:.1f} s until no background "
            f"job was left; X-Cache during the fill: {_counts(r['x_cache'])}; handler runs {r['handler_runs']:,}",
            f"- held at the end: {r['entries']:,} entries, {r['accounted']:,} accounted bytes "
            f"({per_entry:,.0f} B per entry, what the process holds for it) against a bound of {r['bound']:,}; "
            f"RSS growth per entry held {growth_per_entry:,.0f} B",
            f"- background queue: at most {r['max_queued_bytes']:,} bytes held by queued and running jobs when "
            f"looked at (bound {r['bounds']['queue_max_bytes']:,}); decode memo at the end "
            f"{r['max_memo_bytes']:,} bytes (bound {r['bounds']['decode memo (DecodedMemo.max_bytes)']:,})",
            f"- RSS after the fill {_mib(r['rss_after'])} MiB; after glibc's `malloc_trim(0)` "
            f"{_mib(r['rss_trimmed']) + ' MiB' if r['rss_trimmed'] else 'n/a'} (the rest of the difference is free "
            f"memory the allocator kept); {r['gc_objects']:,} objects tracked by the GC "
            f"({r['gc_frozen']:,} frozen by gc.freeze() at startup)",
            f"- background jobs: {_jobs(r['jobs'])}; store errors {r['store_errors']} (of which "
            f"{r['loop_lag_timeouts']} time-outs put down to loop lag), breaker transitions "
            f"{r['breaker_transitions']}; GC during the fill: {r['gc']['gen2']} gen-2 collections, "
            f"{r['gc']['seconds'] * 1000:,.0f} ms in all, longest pause {r['gc']['max'] * 1000:.0f} ms",
        ]
        fills = r["jobs"].get("fill", {})
        if fills.get("shed"):
            unlocks = r["jobs"].get("unlock", {}).get("shed", 0)
            lines.append(f"- **{fills['shed']:,} fills were shed** (the supervisor's queue was full: `queue_size` "
                         f"jobs or `queue_max_bytes` bytes): those responses were served but never stored, and "
                         f"{unlocks:,} releases of fill locks (`unlock` jobs in the same queue) were shed too and left "
                         f"to the releases service. Each of the "
                         f"{r['concurrency']} request tasks yields once per request and each of the supervisor's "
                         f"`concurrency` workers (32 by default) takes one job per turn of the loop; "
                         f"`--concurrency` at or below the workers' number stores every fill")
        if r["case"] == "memory":
            lines.append(f"- evictions {r['evictions']:,}, expirations {r['expirations']:,}, "
                         f"rejected {r['rejected']:,}")
        else:
            lines.append(f"- L1 lookups during the run: {r['l1_hits']:,} hits, {r['l1_misses']:,} misses "
                         f"(every fill request looks first), {r['l1_dropped']:,} dropped by invalidation; "
                         f"read-backs ({READ_BACK_LAG} ids behind each fill), X-Cache: "
                         + ", ".join(f"{k} {v:,}" for k, v in sorted(r.get("read_backs", {}).items())))
            if redis is not None:
                lines.append(f"- Redis (not bounded here, no maxmemory): {redis['entries']:,} entries, "
                             f"{redis['dbsize']:,} keys in all (tag indexes included), used_memory "
                             f"{_mib(redis['used_memory'])} MiB; its memory is the redis-server's, not this "
                             f"process's")
        lines.append(f"- verdicts: RSS growth <= {RSS_TARGET}x the bounds summed **{_yes(v['rss'])}** "
                     f"({_growth(r) / _summed(r):.2f}x), accounted <= bound **{_yes(v['bound'])}**, "
                     f"all {r['keys']:,} answered 200 "
                     f"**{_yes(v['all_200'])}**; last ids held in the {held_in} **{v['last_held']}**; "
                     f"re-requested: first ids evicted from it **{v['early_evicted']}**, last held ids answered "
                     f"from it **{v['recent_held']}**")
        lines += ["", "RSS during the fill (accounted bytes lag the requests by the fills still queued; breaker, "
                  "store errors, jobs shed and GC are running totals):", "",
                  "| requests | s | RSS MiB | accounted MiB | entries | jobs queued | jobs shed (all kinds) | breaker "
                  "(transitions) | store errors (loop lag) | gen-2 GCs | longest GC ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for point in r["timeline"]:
            label = f" ({point['label']})" if point.get("label") else ""
            lines.append(f"| {point['requests']:,}{label} | {point['seconds']:.1f} | {_mib(point['rss'])} | "
                         f"{_mib(point['accounted'])} | {point['entries']:,} | {point['queued']:,} | "
                         f"{point['shed']:,} | {point['breaker']} ({point['transitions']}) | {point['store_errors']} "
                         f"({point['loop_lag_timeouts']}) | {point['gc2']} | {point['gc_max_ms']:.0f} |")
        cov = r["coverage"]
        lines += ["", f"Re-requests after the fill: the last ids held, then the first ids. Of the last "
                  f"{cov['last_1000']:,} ids, {cov['last_1000_held']:,} are held in the {held_in}; "
                  f"{cov['recent_skipped']:,} of the very last ids were skipped to find {SAMPLE_IDS} held ones "
                  f"(never stored: their fill was shed, or the store was failing).", "",
                  "| ids | id | X-Cache | answered by |", "|---|---|---|---|"]
        for s in r["samples"]:
            lines.append(f"| {s['group']} | {s['id']} | {s['x_cache']} | {s['answered_by']} |")
        lines += ["", "Python objects behind it after the re-requests (deep `sys.getsizeof`; RSS also holds the "
                  "allocator's free space and fragmentation):", "",
                  "| structure | items | accounted MiB | Python objects MiB | note |", "|---|---|---|---|---|"]
        for h in r["heap"]:
            accounted = "-" if h["accounted"] is None else f"{h['accounted'] / MIB:.2f}"
            lines.append(f"| {h['structure']} | {h['items']:,} | {accounted} | {h['python_bytes'] / MIB:.2f} | "
                         f"{h['note']} |")
        lines.append("")
    return lines


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1])) or "-"


def _jobs(jobs: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{kind}: done {c['done']:,}, failed {c['failed']:,}, shed {c['shed']:,}, abandoned "
                     f"{c['abandoned']}" for kind, c in sorted(jobs.items())) or "none"


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000, help="distinct ids to request (default 100000)")
    parser.add_argument("--memory-max-bytes", type=int, default=32 * MIB,
                        help="memory store bound of the 'memory' case (default 32 MiB)")
    parser.add_argument("--l1-max-bytes", type=int, default=16 * MIB,
                        help="L1 bound of the 'l1' case (default 16 MiB)")
    parser.add_argument("--queue-max-bytes", type=int, default=8 * MIB,
                        help="bound of the background queue in bytes, both cases (default 8 MiB, cachemw's default)")
    parser.add_argument("--cases", default=",".join(CASES), help="memory,l1 (default both)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of all cases, interleaved; the summary gives every round and the min-max")
    parser.add_argument("--concurrency", type=int, default=64, help="asyncio tasks sending requests (default 64)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one case may take at most")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument("--output", default=str(common.RESULTS_DIR / "memory.md"))
    # The measuring process (one per case), started by this script itself.
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.keys < 2 * SAMPLE_IDS:
        parser.error(f"--keys must be at least {2 * SAMPLE_IDS}")
    if args.case:
        return child_main(args)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}")

    scratch = common.workdir("cachemw-memory-")
    results: list[dict[str, Any]] = []
    redis_side: dict[str, Any] | None = None
    redis_binary: str | None = None
    try:
        for round_ in range(1, args.rounds + 1):  # interleaved: a busy spell of the machine hits both cases
            for case in cases:
                if case == "l1":
                    with common.RedisProcess(scratch / f"redis-{round_}") as redis:
                        redis_binary = redis.binary
                        results.append({**_run_child(case, args, scratch, redis.url), "round": round_})
                        redis_side = _redis_side(redis)
                else:
                    results.append({**_run_child(case, args, scratch, None), "round": round_})
    except (common.HarnessError, subprocess.TimeoutExpired) as exc:
        print(f"bench/memory.py: could not measure: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
    shown = " ".join([os.path.relpath(sys.executable, common.REPO_ROOT), "bench/memory.py",
                      *(argv if argv is not None else sys.argv[1:])])
    lines = report(args, results, redis_side, shown, redis_binary)
    print("\n".join(lines))
    if not args.no_write:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("\n".join(lines) + "\n")
        print(f"written to {args.output}", file=sys.stderr)
    ok = all(_verdicts(r)["bound"] and _verdicts(r)["all_200"] and _verdicts(r)["rss"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
