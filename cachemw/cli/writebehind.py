"""``cachemw writebehind status|dead|retry NAME``: what an operator asks of a write-behind queue.

- ``status``: backlog (writes not yet in the database), lag (age of the oldest), dead letters, counters;
- ``dead``: the dead letters, oldest first, with the error that parked each;
- ``retry``: move dead letters (all, or ``--id`` ones) back to the stream, to be flushed again.

The Redis is ``--redis-url``, else ``CACHEMW_REDIS_URL``, else the app's
``CacheMiddleware`` (``--app``) or the ``redis_url`` of ``--config``; the key prefix
``--prefix``, else the app's or the config's ``key_prefix``, else ``cachemw``. The
memory backend lives inside the app's process, out of reach. A queue of which
Redis holds no trace, and that the ``--app``'s middleware does not run, is an
error (the names Redis holds are listed). Exit status: 0 done, 1 no
such queue in this Redis, 2 a usage, configuration or store error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import anyio

from cachemw.cli.common import Subcommands, app_write_behinds, operator_settings
from cachemw.core.keyspace import writebehind_pattern
from cachemw.core.settings import REDIS_URL_ENV, check_redis_url, load_settings, masked_url
from cachemw.store import StoreError
from cachemw.writebehind import DeadLetter, WriteBehind, WriteBehindStatus

__all__ = ["add_command", "format_status"]


def add_command(subparsers: Subcommands) -> None:
    """Add ``writebehind status|dead|retry`` to the ``cachemw`` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="the WriteBehind's name, e.g. cart")
    common.add_argument("--redis-url", help=f"the Redis (default: ${REDIS_URL_ENV}, else the config's redis_url)")
    common.add_argument("--prefix", help="the key prefix (default: the config's key_prefix, else cachemw)")
    common.add_argument("--app", help="the app as MODULE:ATTRIBUTE: its CacheMiddleware's Redis, key_prefix and "
                        "write-behind queues")
    common.add_argument("--config", help="a cachemw.toml or pyproject.toml to take redis_url and key_prefix from")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = subparsers.add_parser("writebehind", help="inspect write-behind queues: backlog, lag, dead letters",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="writebehind_command", required=True)
    status = commands.add_parser("status", parents=[common], help="backlog, lag, dead letters and counters")
    status.set_defaults(run=_cmd_status)
    dead = commands.add_parser("dead", parents=[common], help="list dead letters, oldest first")
    dead.add_argument("--limit", type=int, default=50, help="show at most this many (default: %(default)s)")
    dead.set_defaults(run=_cmd_dead)
    retry = commands.add_parser("retry", parents=[common], help="move dead letters back to the stream")
    retry.add_argument("--id", action="append", dest="ids", metavar="ID",
                       help="only this dead letter (repeatable; default: all)")
    retry.set_defaults(run=_cmd_retry)


def _queue(args: argparse.Namespace) -> tuple[WriteBehind[Any], bool, str, str] | None:
    """The queue the arguments name, whether the app declares it (with ``--app``), its Redis URL and prefix."""
    declared = False
    if args.app:
        app, _, settings = operator_settings(args)
        # A queue the app's middleware runs exists by declaration, even before its first write.
        declared = args.name in app_write_behinds(app)
    else:
        settings = load_settings(args.config)
        if args.redis_url:
            settings = replace(settings, redis_url=args.redis_url)
    url = settings.redis_url
    if not url:
        print(f"cachemw: no Redis URL: pass --redis-url, set {REDIS_URL_ENV}, or --app / --config with a redis_url "
              "(a memory-backed write-behind lives inside the app's process)", file=sys.stderr)
        return None
    prefix = args.prefix or settings.key_prefix
    try:
        check_redis_url(url)
    except ValueError as exc:
        print(f"cachemw: redis_url {masked_url(url)}: {exc}", file=sys.stderr)
        return None
    try:
        queue: WriteBehind[Any] = WriteBehind(args.name, redis_url=url, key_prefix=prefix, timeout=5.0)
    except ValueError as exc:
        print(f"cachemw: {exc}", file=sys.stderr)
        return None
    return queue, declared, url, prefix


def _never_used(status: WriteBehindStatus) -> bool:
    """Nothing in Redis was ever written for this queue: no stream, no dead letters, no counters, no flusher."""
    return not any(value for key, value in status.as_dict().items() if key not in ("name", "backend"))


async def _queues_under(url: str, prefix: str) -> list[str]:
    """The names of the write-behind queues Redis holds a trace of under ``prefix`` (best effort)."""
    from cachemw.store import store_from_url

    store = store_from_url(url, timeout=5.0, memory_max_bytes=1024, prefix=prefix)
    found: set[str] = set()
    try:
        async for key in store.client.scan_iter(match=writebehind_pattern(prefix), count=1000):  # type: ignore[attr-defined]
            text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            found.add(text[len(prefix) + len(":wb:{"):].partition("}")[0])
            if len(found) >= 50:
                break
    except Exception:  # only a hint: the error the command reports is that the queue is unknown
        pass
    finally:
        with contextlib.suppress(Exception):
            await store.aclose()
    return sorted(found)


def _run(args: argparse.Namespace, action: Callable[[WriteBehind[Any], argparse.Namespace], Awaitable[int]]) -> int:
    made = _queue(args)
    if made is None:
        return 2
    queue, declared, url, prefix = made

    async def go() -> int:
        try:
            others = await _queues_under(url, prefix) if not declared and _never_used(await queue.status()) else None
            # A stream or group of its own (a flusher started, nothing written yet) is a trace too.
            if others is not None and queue.name not in others:
                print(f"cachemw: no write-behind queue {queue.name!r} under the key prefix {prefix!r} at "
                      f"{masked_url(url)}: Redis holds no trace of it (no writes, dead letters, counters or "
                      f"flusher). Queues there: {', '.join(others) or '(none)'}. HINT: check the name, and pass "
                      "--app (or --prefix) for the app's key_prefix", file=sys.stderr)
                return 1
            return await action(queue, args)
        except StoreError as exc:
            print(f"cachemw: {exc}", file=sys.stderr)
            return 2
        finally:
            await queue.aclose()

    return anyio.run(go)


def _cmd_status(args: argparse.Namespace) -> int:
    return _run(args, _status)


def _cmd_dead(args: argparse.Namespace) -> int:
    return _run(args, _dead)


def _cmd_retry(args: argparse.Namespace) -> int:
    return _run(args, _retry)


async def _status(queue: WriteBehind[Any], args: argparse.Namespace) -> int:
    status = await queue.status()
    if args.json:
        print(json.dumps(status.as_dict(), indent=2))
    else:
        print(format_status(status))
    return 0


def format_status(status: WriteBehindStatus) -> str:
    rows = [
        ("backlog", f"{status.backlog} writes not yet in the database ({status.pending} held by flushers)"),
        ("lag", f"{status.lag:.1f}s (age of the oldest)"),
        ("dead letters", str(status.dead)),
        ("flushers", str(status.flushers)),
        ("flushed", str(status.flushed)),
        ("failed flushes", str(status.failed_flushes)),
        ("retried", str(status.retried)),
        ("dead-lettered", str(status.dead_lettered)),
        ("claimed", str(status.claimed)),
        ("requeued", str(status.requeued)),
    ]
    return f"write-behind {status.name} ({status.backend})\n" + "\n".join(f"{k:<15} {v}" for k, v in rows)


def _letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {"id": letter.id, "key": letter.key, "version": letter.version,
            "value": letter.data.decode("utf-8", "replace"), "error": letter.error, "attempts": letter.attempts,
            "dead_at": _iso(letter.dead_at)}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


async def _dead(queue: WriteBehind[Any], args: argparse.Namespace) -> int:
    letters = await queue.dead_letters(max(1, args.limit))
    if args.json:
        print(json.dumps([_letter_json(letter) for letter in letters], indent=2))
        return 0
    if not letters:
        print(f"no dead letters in write-behind {queue.name}")
        return 0
    for letter in letters:
        value = letter.data.decode("utf-8", "replace")
        print(f"{letter.id}  key={letter.key}  version={letter.version}  attempts={letter.attempts}  "
              f"{_iso(letter.dead_at)}\n  error: {letter.error}\n  value: {value[:200]}"
              f"{'...' if len(value) > 200 else ''}")
    return 0


async def _retry(queue: WriteBehind[Any], args: argparse.Namespace) -> int:
    moved = await queue.retry_dead_letters(args.ids)
    if args.json:
        print(json.dumps({"moved": moved}))
    else:
        print(f"moved {moved} dead letter{'' if moved == 1 else 's'} back to write-behind {queue.name}")
    return 0

