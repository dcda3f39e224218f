"""In-process cost of a cachemw miss next to the uncached request it saves (issue 15, item 7).

The FastAPI apps of ``bench/peers.py`` (``peer_fastapi:app``, uncached; and
``peer_cachemw.create_fastapi_redis``: the same route under ``@cache``), called
straight through ASGI (uvloop) from ``--concurrency`` tasks, a new id per request,
against a private redis-server. CPU per request counts this process (request,
response, and the background fill after it) and its redis-server.

    .venv/bin/python bench/misspath.py                      # cpu: interleaved rounds, both apps
    .venv/bin/python bench/misspath.py --mode cprofile      # where a miss's Python time goes
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/misspath.py \\
        --mode count --requests 3000    # instructions: run twice (N and 0) and subtract

``--db-ms`` is the handler's sleep (20 ms as in peers.py; 0 for callgrind, where
timing must not steer what is batched). ``count`` runs a fixed number of requests
(``--case``) and exits, for instruction counts that other load cannot disturb.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import itertools
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "apps"))
sys.path.insert(0, str(HERE))

import peer_common  # noqa: E402
from hitpath import _drive, _Lifespan, _receive, _redis_cpu, _scope, pinned_redis  # noqa: E402

CASES = ("uncached", "miss", "hit")  # hit: count mode only, 100 ids warmed first


def _app(case: str, redis_url: str, store_timeout: float | None = None) -> Any:
    if case == "uncached":
        import peer_fastapi
        return peer_fastapi.app
    import peer_cachemw

    from cachemw import Settings
    settings = None if store_timeout is None else Settings(store_timeout=store_timeout)
    return peer_cachemw.create_fastapi_redis(redis_url, settings)


async def _measure(case: str, redis_url: str, redis_pid: int | None, seconds: float, concurrency: int,
                   base: int) -> dict[str, float]:
    app = _app(case, redis_url)
    counter = itertools.count(base)

    def paths() -> str:
        return f"/item/{next(counter)}"

    async with _Lifespan(app):
        await _drive(app, paths, 0.5, concurrency)
        await asyncio.sleep(0.3)
        cpu0, redis0, wall0 = time.process_time(), _redis_cpu(redis_pid), time.perf_counter()
        done, sink = await _drive(app, paths, seconds, concurrency)
        wall1 = time.perf_counter()
        await _fills_done(app)
        cpu1, redis1 = time.process_time(), _redis_cpu(redis_pid)
    if set(sink.statuses) != {200}:
        raise SystemExit(f"{case}: statuses {sink.statuses}")
    return {"requests": done, "app_us": (cpu1 - cpu0) / done * 1e6, "redis_us": (redis1 - redis0) / done * 1e6,
            "rps": done / (wall1 - wall0)}


def _supervisor(app: Any) -> Any:
    """The CacheMiddleware's supervisor inside a FastAPI app (None for the uncached one)."""
    stack = getattr(app, "middleware_stack", None)
    while stack is not None:
        if hasattr(stack, "supervisor"):
            return stack.supervisor
        stack = getattr(stack, "app", None)
    return None


async def _fills_done(app: Any, deadline_s: float = 30.0) -> None:
    """The background jobs of the measured requests count as theirs: wait until none is queued or running."""
    supervisor = _supervisor(app)
    if supervisor is None:
        return
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if all(c.queued == 0 and c.running == 0 for c in supervisor.counters.values()):
            return
        await asyncio.sleep(0.01)
    raise SystemExit("background jobs did not finish")


async def _count(case: str, redis_url: str, requests: int, concurrency: int, base: int,
                 profile: cProfile.Profile | None = None, store_timeout: float | None = None) -> None:
    app = _app("miss" if case == "hit" else case, redis_url, store_timeout)
    counter = itertools.count(base)
    per_client = requests // concurrency

    def path() -> str:
        n = next(counter)
        return f"/item/{base + (n - base) % 100}" if case == "hit" else f"/item/{n}"

    async def client() -> None:
        for _ in range(per_client):
            await app(_scope(path()), _receive, _discard)

    async with _Lifespan(app):
        if case == "hit":  # the 100 entries first, in every run (N = 0 too): only the hits differ
            for i in range(100):
                await app(_scope(f"/item/{base + i}"), _receive, _discard)
            await _fills_done(app)
        if profile is not None:
            profile.enable()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        await _fills_done(app)
        if profile is not None:
            profile.disable()


async def _store_calls(redis_url: str, requests: int) -> None:
    """What the cached app asks Redis for on ``requests`` misses (the lookup-or-lock, then the fill),
    one after another: for counting redis-server's instructions (run it under callgrind)."""
    from cachemw.core.keyspace import tag_keys
    from cachemw.store.redis import RedisStore

    store = RedisStore.from_url(redis_url, timeout=30.0)
    await store.connect(30.0)
    route_set, route_generation = tag_keys("cachemw", "route:/item/{id}")
    every_generation = tag_keys("cachemw", "*")[1]
    value = peer_common.payload_bytes(1) + b"x" * 160  # about an encoded entry's size
    try:
        for i in range(requests):
            key = f"cachemw:e:/item/<id>:{{{i:032x}}}"
            path_set, path_generation = tag_keys("cachemw", f"path:/item/{i}")
            generation_keys = (route_generation, path_generation, every_generation)
            token, current, generations = await store.get_or_lock(key, 5.0, generation_keys, f"t{i}")
            if token is None or current is not None:
                raise SystemExit(f"{key}: expected a free lock on an empty key, got {(token, current)}")
            await store.fill(key, value, 3600.0, token, [route_set, path_set], generation_keys, generations)
    finally:
        await store.aclose()


async def _discard(message: Any) -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("cpu", "cprofile", "count", "store"), default="cpu",
                        help="store: only the store calls of --requests misses, against --redis-url")
    parser.add_argument("--case", choices=CASES, default="miss", help="for cprofile and count")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000, help="for count and cprofile")
    parser.add_argument("--db-ms", type=float, default=20.0, help="the handler's sleep (default: %(default)s)")
    parser.add_argument("--redis-url", help="use this redis (count mode under valgrind: started outside)")
    parser.add_argument("--top", type=int, default=40, help="cprofile: functions shown")
    parser.add_argument("--store-timeout", type=float, help="the cached app's store budget (under valgrind: 5)")
    args = parser.parse_args(argv)
    peer_common.database.__defaults__ = (args.db_ms / 1000,)
    base = 10_000_000_000 + int(time.time() * 1000) % 10_000_000 * 1000
    if args.mode == "store":
        if not args.redis_url:
            parser.error("--mode store needs --redis-url (the redis-server to count, e.g. under callgrind)")
        uvloop.run(_store_calls(args.redis_url, args.requests))
        return 0
    if args.mode == "count" and args.redis_url:
        uvloop.run(_count(args.case, args.redis_url, args.requests, args.concurrency, base,
                          store_timeout=args.store_timeout))
        return 0
    import cachemw
    print(f"cachemw from {Path(cachemw.__file__).parent}", flush=True)
    with pinned_redis("misspath") as redis:
        url = redis.url
        if args.mode == "count":
            uvloop.run(_count(args.case, url, args.requests, args.concurrency, base))
            return 0
        if args.mode == "cprofile":
            profile = cProfile.Profile(time.thread_time)  # CPU, not wall time: the machine is shared
            uvloop.run(_count(args.case, url, args.requests, args.concurrency, base, profile, args.store_timeout))
            out = io.StringIO()
            stats = pstats.Stats(profile, stream=out)
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats("cachemw", args.top)
            print(out.getvalue())
            return 0
        results: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
        for round_no in range(args.rounds):
            for case in CASES:
                redis.flushall()
                pid = redis.proc.pid if redis.proc else None
                result = uvloop.run(_measure(case, url, pid, args.seconds, args.concurrency,
                                             base + round_no * 100_000_000 + CASES.index(case) * 10_000_000))
                results[case].append(result)
                print(f"round {round_no + 1} {case:9s} {result['app_us']:7.1f} µs app + {result['redis_us']:5.1f}"
                      f" µs redis per request, {result['rps']:7.0f} req/s", flush=True)
        total = {case: [r["app_us"] + r["redis_us"] for r in results[case]] for case in CASES}
        ratio = [m / u for m, u in zip(total["miss"], total["uncached"], strict=True)]
        for case in CASES:
            app_us = [r["app_us"] for r in results[case]]
            redis_us = [r["redis_us"] for r in results[case]]
            print(f"{case:9s} app {statistics.median(app_us):.1f} ({min(app_us):.1f}-{max(app_us):.1f}) µs, redis "
                  f"{statistics.median(redis_us):.1f} ({min(redis_us):.1f}-{max(redis_us):.1f}) µs, total "
                  f"{statistics.median(total[case]):.1f} ({min(total[case]):.1f}-{max(total[case]):.1f}) µs")
        print(f"CPU per miss / per uncached request: {statistics.median(ratio):.2f} ({min(ratio):.2f}-"
              f"{max(ratio):.2f}) over {args.rounds} interleaved rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
