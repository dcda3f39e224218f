"""In-process CPU per request of the WSGI apps of ``bench/wsgi.py``: no gunicorn, no HTTP, no load generator.

    bench/.venv-peers/bin/python bench/wsgi_inprocess.py            # 3 interleaved rounds x every case
    bench/.venv-peers/bin/python bench/wsgi_inprocess.py --threads 4 --seconds 2

``--threads`` request threads call the Flask apps of ``bench/apps/wsgi_flask.py`` with a
minimal PEP 3333 environ, one request after another, as gunicorn's gthread worker does,
minus gunicorn (whose own cost ``bench/wsgi.py``'s ``raw`` case measures). The figure is
CPU time of this process (every thread: the request threads and cachemw's loop
thread) and of its private redis-server per request. Hits use 100 warmed ids; misses a
new id per request, with the view's 2 ms sleep kept (``--db-ms``), so the uncached case
is the baseline a miss is compared with.

Writes nothing; prints a table (Markdown) to paste where it is needed.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "apps"))
sys.path.insert(0, str(HERE))

import common  # noqa: E402

CASES = ("fast", "uncached-miss", "cachemw-hit", "flask-caching-hit", "cachemw-miss", "flask-caching-miss")


def environ(path: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000",
        "HTTP_HOST": "127.0.0.1:8000", "HTTP_USER_AGENT": "wrk", "HTTP_ACCEPT": "*/*", "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr,
        "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
    }  # fmt: skip


def call(app: Any, path: str) -> str:
    status: list[str] = []

    def start_response(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        status.append(line)
        return lambda _: None

    result = app(environ(path), start_response)
    try:
        for _ in result:
            pass
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return status[0]


def _loop_cpu() -> float:
    """CPU seconds of cachemw's loop thread (its fills, logs and lock releases) in this process."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name != "cachemw-loop" or thread.native_id is None:
            continue
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _redis_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(case: str, redis: common.RedisProcess, seconds: float, threads: int, ids: int) -> dict[str, float]:
    import wsgi_flask

    variant = ("cachemw" if case.startswith("cachemw") else "flask_caching" if case.startswith("flask-caching")
               else "uncached")
    app = wsgi_flask.create(variant)
    if case.endswith("miss"):
        counter = itertools.count(10_000_000 + int(time.time() * 1000) % 1_000_000 * 1000)
        paths: Callable[[], str] = lambda: f"/item/{next(counter)}"  # noqa: E731
    else:
        prefix = "/fast/" if case == "fast" else "/item/"
        ring = itertools.cycle([f"{prefix}{i}" for i in range(ids)])
        paths = ring.__next__
    if case.endswith("hit"):
        for i in range(ids):
            call(app, f"/item/{i}")
        time.sleep(0.5)  # the fills are stored in the background
    done = [0]
    lock = threading.Lock()

    def client(stop: float) -> None:
        n = 0
        while time.perf_counter() < stop:
            call(app, paths())
            n += 1
        with lock:
            done[0] += n

    def drive(duration: float) -> float:
        done[0] = 0
        stop = time.perf_counter() + duration
        workers = [threading.Thread(target=client, args=(stop,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return done[0]

    drive(0.5)
    redis_pid = redis.proc.pid if redis.proc else None
    cpu0, redis0, loop0, wall0 = time.process_time(), _redis_cpu(redis_pid), _loop_cpu(), time.perf_counter()
    requests = drive(seconds)
    cpu1, redis1, loop1, wall1 = time.process_time(), _redis_cpu(redis_pid), _loop_cpu(), time.perf_counter()
    close = getattr(app.wsgi_app, "close", None)
    if close is not None:
        close()
    return {"app_us": (cpu1 - cpu0) / requests * 1e6, "redis_us": (redis1 - redis0) / requests * 1e6,
            "loop_us": (loop1 - loop0) / requests * 1e6,
            "rps": requests / (wall1 - wall0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--ids", type=int, default=100)
    parser.add_argument("--db-ms", type=float, default=2.0)
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    cpu_app, _ = common.default_cpus()
    results: dict[str, list[dict[str, float]]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="cachemw-wsgi-inprocess-") as scratch, \
            common.RedisProcess(Path(scratch) / "redis", cpu=cpu_app) as redis:
        os.environ.update(BENCH_REDIS_URL=redis.url, BENCH_CALLS_DIR=scratch, BENCH_DB_SECONDS=f"{args.db_ms / 1000:g}")
        os.environ.pop("CACHEMW_REDIS_URL", None)
        if cpu_app is not None:
            os.sched_setaffinity(0, {int(cpu_app)})  # with redis-server, as gunicorn is in bench/wsgi.py
        import wsgi_common

        wsgi_common.DB_SECONDS = args.db_ms / 1000
        for round_no in range(1, args.rounds + 1):
            for case in cases:
                redis.flushall()
                result = measure(case, redis, args.seconds, args.threads, args.ids)
                results[case].append(result)
                print(f"round {round_no} {case:20} {result['app_us']:7.1f} µs app (of which "
                      f"{result['loop_us']:5.1f} on cachemw's loop) + {result['redis_us']:5.1f} µs "
                      f"redis per request, {result['rps']:7.0f} req/s", flush=True)
    print(f"\n{args.threads} request threads, {args.rounds} interleaved rounds x {args.seconds:g} s, "
          "median (min-max)\n")
    print("| case | µs CPU/request (process) | of which cachemw's loop thread | µs CPU/request (redis-server) "
          "| req/s |")
    print("|---|---|---|---|---|")
    for case, rs in results.items():
        def span(field: str, rs: list[dict[str, float]] = rs) -> str:
            values = [r[field] for r in rs]
            return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"
        print(f"| {case} | {span('app_us')} | {span('loop_us')} | {span('redis_us')} | {span('rps')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
