"""In-process cost of cachemw's request path: CPU time per request, without HTTP or a load generator.

``bench/peers.py`` measures what users see over HTTP; this measures what the
middleware itself costs, with far less noise, so one change to the hot path can be
judged before and after. The apps are those of ``bench/apps/peer_cachemw.py``;
requests go straight into the ASGI callable (uvloop) from ``--concurrency``
tasks, each sending requests one after another, like keep-alive connections.

    .venv/bin/python bench/hitpath.py                  # every case, 3 interleaved rounds
    .venv/bin/python bench/hitpath.py --cases redis-hit,memory-hit --seconds 2

Cases: ``raw`` (a constant-body ASGI callable: the floor), ``no-policy`` (a route
without a policy behind the middleware), ``no-mw`` (the same route, no middleware),
``memory-hit``, ``l1-hit``, ``redis-hit`` and ``redis-miss`` (a new id per request;
the handler's 20 ms sleep is skipped, so this is the cache's own cost of a miss).
A case with ``+otel`` (``l1-hit+otel``, ``redis-miss+otel``, ...) is the same with
``cachemw.otel.instrument`` on, to the OpenTelemetry SDK (an in-memory metric reader,
spans to an exporter that drops them): what OpenTelemetry adds to the request path.
The figure per case is µs of CPU (this process + its redis-server) per request,
median over rounds; results go to ``bench/results/hitpath.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "apps"))
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import peer_common  # noqa: E402

CASES = ("raw", "no-mw", "no-policy", "memory-hit", "l1-hit", "redis-hit", "redis-miss")
OTEL = "+otel"


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 40000), "scheme": "http", "method": "GET",
        "root_path": "", "path": path, "raw_path": path.encode(), "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")],
        "state": {},
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


class _Sink:
    """The server's side of ``send``: counts statuses, keeps nothing."""

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status = message["status"]
            self.statuses[status] = self.statuses.get(status, 0) + 1


class _Lifespan:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.ensure_future(self.app(scope, self.queue.get, self.sent.put))
        await self.queue.put({"type": "lifespan.startup"})
        message = await self.sent.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"startup failed: {message}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.queue.put({"type": "lifespan.shutdown"})
        await self.sent.get()
        assert self.task is not None
        await self.task


@contextlib.contextmanager
def pinned_redis(name: str) -> Iterator[common.RedisProcess]:
    """A private redis-server, and this process, on the server's CPU (where uvicorn runs in peers.py)."""
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"cachemw-{name}-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    cpu_app, _ = common.default_cpus()
    with common.RedisProcess(workdir, cpu=cpu_app) as redis:
        if cpu_app is not None:
            os.sched_setaffinity(0, {int(cpu_app)})
        yield redis


def _redis_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(app: Any, paths: Callable[[], str], seconds: float, concurrency: int) -> tuple[int, _Sink]:
    sink = _Sink()
    done = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await app(_scope(paths()), _receive, sink.send)
            done += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done, sink


@contextlib.contextmanager
def _otel(app: Any, on: bool) -> Iterator[None]:
    """``cachemw.otel.instrument`` on the app's cache, to an SDK that keeps metrics in memory and drops spans."""
    if not on:
        yield
        return
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    import cachemw.otel
    from cachemw.observe import find_cache

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(Drop()))
    cachemw.otel.instrument(find_cache(app), meter_provider=meters, tracer_provider=tracers)
    try:
        yield
        reader.get_metrics_data()  # one collection, as a periodic reader would make: it must work
    finally:
        meters.shutdown()
        tracers.shutdown()


def _app_for(case: str, redis_url: str) -> tuple[Any, str, bool]:
    """(ASGI app, path prefix, needs lifespan)."""
    import peer_cachemw
    import peer_raw
    case = case.removesuffix(OTEL)
    if case == "raw":
        return peer_raw.app, "/item/", False
    if case == "no-mw":
        return peer_cachemw.create_starlette(redis_url, middleware=False), "/item/", False
    if case == "no-policy":
        return peer_cachemw.create_starlette(redis_url), "/item/", True
    if case == "memory-hit":
        return peer_cachemw.create_starlette(None), "/hit/", True
    if case == "l1-hit":
        return peer_cachemw.create_starlette(redis_url), "/l1/", True
    if case in ("redis-hit", "redis-miss"):
        return peer_cachemw.create_starlette(redis_url), "/hit/", True
    raise SystemExit(f"unknown case {case!r}; cases: {', '.join(CASES)}")


async def _measure(case: str, redis_url: str, redis_pid: int | None, seconds: float, concurrency: int,
                   ids: int) -> dict[str, float]:
    app, prefix, lifespan = _app_for(case, redis_url)
    otel, case = case.endswith(OTEL), case.removesuffix(OTEL)
    if case == "redis-miss":
        counter = itertools.count(10_000_000 + int(time.time() * 1000) % 1_000_000 * 1000)
        paths: Callable[[], str] = lambda: f"{prefix}{next(counter)}"  # noqa: E731
    else:
        ring = itertools.cycle([f"{prefix}{i}" for i in range(ids)])
        paths = ring.__next__
    async with (_Lifespan(app) if lifespan else contextlib.nullcontext()):
        with _otel(app, otel):
            await _drive(app, paths, 0.5, concurrency)  # warm: fills, L1, decode memo, JIT-free warm caches
            calls_before = sum(peer_common.calls.values())
            cpu0, redis0, wall0 = time.process_time(), _redis_cpu(redis_pid), time.perf_counter()
            done, sink = await _drive(app, paths, seconds, concurrency)
            cpu1, redis1, wall1 = time.process_time(), _redis_cpu(redis_pid), time.perf_counter()
            handler_runs = sum(peer_common.calls.values()) - calls_before
            await asyncio.sleep(0.2)  # let background fills finish before the app shuts down
    if case.endswith("-hit") and handler_runs:
        raise SystemExit(f"{case}: the handler ran {handler_runs} times during a hit run")
    if set(sink.statuses) != {200}:
        raise SystemExit(f"{case}: statuses {sink.statuses}")
    return {"requests": done, "app_us": (cpu1 - cpu0) / done * 1e6, "redis_us": (redis1 - redis0) / done * 1e6,
            "rps": done / (wall1 - wall0), "handler_runs": handler_runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--ids", type=int, default=100)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--output", default=str(HERE / "results" / "hitpath.md"))
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    peer_common.database.__defaults__ = (0.0,)  # a miss costs what the cache costs, not the sleep
    results: dict[str, list[dict[str, float]]] = {case: [] for case in cases}
    with pinned_redis("hitpath") as redis:
        for round_no in range(args.rounds):
            for case in cases:
                redis.flushall()
                redis_pid = redis.proc.pid if redis.proc else None
                result = uvloop.run(_measure(case, redis.url, redis_pid, args.seconds, args.concurrency,
                                             args.ids))
                results[case].append(result)
                print(f"round {round_no + 1} {case:11s} {result['app_us']:7.1f} µs app + {result['redis_us']:5.1f}"
                      f" µs redis per request, {result['rps']:8.0f} req/s", flush=True)
    lines = _report(args, results, " ".join([sys.executable.replace(str(HERE.parent) + "/", ""),
                                             "bench/hitpath.py", *(argv if argv is not None else sys.argv[1:])]))
    print("\n".join(lines))
    if not args.no_write:
        Path(args.output).write_text("\n".join(lines) + "\n")
    return 0


def _report(args: argparse.Namespace, results: dict[str, list[dict[str, float]]], command: str) -> list[str]:
    def med(case: str, field: str) -> float:
        return statistics.median(r[field] for r in results[case])

    def span(case: str, field: str) -> str:
        values = [r[field] for r in results[case]]
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    facts = common.machine_description(redis_binary=common.find_redis_server())
    lines = common.results_preamble(
        "cachemw request path, in process: CPU per request", facts, command,
        [f"{args.rounds} interleaved rounds x {args.seconds} s per case, {args.concurrency} concurrent clients "
         f"(asyncio tasks calling the ASGI app), {args.ids} ids for hits; no HTTP server, no load generator"])
    lines += [
        "| case | µs CPU/request (app) | µs CPU/request (redis-server) | req/s in process | app CPU vs without +otel |",
        "|---|---|---|---|---|",
    ]
    for case in results:
        base = case.removesuffix(OTEL)
        ratio = ""
        if case != base and base in results:  # per round: the two ran next to each other
            ratios = [on["app_us"] / off["app_us"] for on, off in zip(results[case], results[base], strict=True)]
            ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        lines.append(f"| {case} | {span(case, 'app_us')} | {span(case, 'redis_us')} | {med(case, 'rps'):.0f} "
                     f"| {ratio} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
