"""A write-behind process for the tests to kill or run in pairs: ``python tests/writebehind_worker.py MODE ...``.

- ``put``: put ``--count`` writes over ``--keys`` keys (write ``i`` stores ``{"n": i}``
  under ``k{i % keys}``) with a flusher whose ``flush`` never returns, so some writes
  are held by this process and the rest wait in the stream; print ``ready`` and block
  until killed.
- ``flush``: flush into the SQLite database ``--db`` (a version-guarded upsert) and log
  every write flushed under ``--worker``; print ``ready``; on SIGTERM stop gracefully.

The SQLite helpers are shared with the tests, so both sides agree on the schema.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from cachemw.writebehind import Write, WriteBehind

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS flushed (worker TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
                                    superseded INTEGER NOT NULL);
"""
# Idempotent and never backwards: what WriteBehind asks of every flush function.
UPSERT = ("INSERT INTO kv (key, value, version) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
          "value = excluded.value, version = excluded.version WHERE excluded.version > kv.version")


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def create_schema(path: Path) -> None:
    with closing(connect(path)) as conn:
        conn.executescript(SCHEMA)


def save(path: Path, batch: Sequence[Write[Any]], worker: str = "") -> None:
    """One transaction per batch (run it in a worker thread)."""
    with closing(connect(path)) as conn, conn:
        conn.executemany(UPSERT, [(w.key, json.dumps(w.value), w.version) for w in batch])
        if worker:
            conn.executemany("INSERT INTO flushed (worker, key, version, superseded) VALUES (?, ?, ?, ?)",
                             [(worker, w.key, w.version, w.superseded) for w in batch])


def rows(path: Path) -> dict[str, tuple[Any, int]]:
    """Every key's value and version in the database."""
    with closing(connect(path)) as conn:
        return {key: (json.loads(value), version) for key, value, version in conn.execute(
            "SELECT key, value, version FROM kv")}


async def _put(args: argparse.Namespace) -> None:
    async def never(batch: list[Write[Any]]) -> None:
        await anyio.sleep_forever()

    writes: WriteBehind[Any] = WriteBehind(args.name, flush=never, redis_url=args.redis_url, key_prefix=args.prefix,
                                           batch_size=args.batch_size, batch_delay=0)
    for i in range(args.count):
        await writes.put(f"k{i % args.keys}", {"n": i})
    async with anyio.create_task_group() as task_group:
        await task_group.start(writes.run_flusher)
        # One batch is held (delivered to this process, stuck in flush), the rest waits unread.
        with anyio.fail_after(10):
            while (await writes.status()).pending == 0:  # noqa: ASYNC110  (polls the stream in Redis)
                await anyio.sleep(0.01)
        print("ready", flush=True)
        await anyio.sleep_forever()


async def _flush(args: argparse.Namespace) -> None:
    db = Path(args.db)

    async def flush(batch: list[Write[Any]]) -> None:
        await anyio.to_thread.run_sync(save, db, batch, args.worker)
        await anyio.sleep(args.flush_delay)  # a database that takes its time: lets the other worker get work

    writes: WriteBehind[Any] = WriteBehind(args.name, flush=flush, redis_url=args.redis_url, key_prefix=args.prefix,
                                           batch_size=args.batch_size, batch_delay=0.005, claim_idle=2.0)
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with writes.running():
            print("ready", flush=True)
            async for _ in signals:
                break


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["put", "flush"])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--db")
    parser.add_argument("--worker", default="")
    parser.add_argument("--flush-delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    anyio.run(_put if args.mode == "put" else _flush, args)


if __name__ == "__main__":
    main()
