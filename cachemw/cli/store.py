"""The shared Redis store as the operator commands reach it: opened as startup opens it, closed after one job.

Only a Redis store is reachable from here: the memory store lives inside the app's process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from cachemw.cli.common import CommandFailed, one_line
from cachemw.core.keyspace import everything_pattern
from cachemw.core.settings import Settings, masked_url
from cachemw.store import Store, StoreError
from cachemw.store.opening import open_store
from cachemw.store.redis import DRIVER_ERRORS

__all__ = ["OPERATOR_TIMEOUT", "prefix_in_use", "unused_prefix", "with_store"]

OPERATOR_TIMEOUT = 2.0  # seconds per store call: longer than the request path's budget, an operator waits
T = TypeVar("T")


def _open_store(settings: Settings, doing: str) -> Store:
    if settings.redis_url is None:
        raise CommandFailed("no redis_url configured: the memory store lives inside the app process; "
                            f"nothing to {doing} from here")
    return open_store(settings, timeout=OPERATOR_TIMEOUT)  # as startup makes it; a bad URL is a ConfigError


def with_store(settings: Settings, doing: str, work: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``await work(store)`` on the configured Redis and close it; a store failure is one line."""
    store = _open_store(settings, doing)

    async def go() -> T:
        try:
            return await work(store)
        finally:
            # A failure to close says less than the command's own failure, if any.
            with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
                await store.aclose()

    try:
        return anyio.run(go)
    except StoreError as exc:
        assert settings.redis_url is not None
        detail = one_line(exc.__cause__ or exc)  # the driver's own words say more than the wrapper's
        raise CommandFailed(f"{doing} failed: the redis store at {masked_url(settings.redis_url)} did not answer "
                            f"({detail})") from None


async def prefix_in_use(store: Store, prefix: str) -> bool:
    """Whether the store holds any key under ``prefix:`` (entries, tag indexes, fleet reports, queues)."""
    client = getattr(store, "client", None)
    if client is None:
        return True  # not a Redis store: nothing to look at, so nothing to say
    try:
        async for _ in client.scan_iter(match=everything_pattern(prefix), count=1000):
            return True
    except DRIVER_ERRORS as exc:
        raise StoreError(one_line(exc) or "timed out") from exc
    return False


def unused_prefix(settings: Settings) -> CommandFailed:
    """The failure of a command that found nothing under the prefix: most likely the app's prefix is another."""
    assert settings.redis_url is not None
    return CommandFailed(
        f"nothing is stored under the key prefix {settings.key_prefix!r} at {masked_url(settings.redis_url)}: no "
        "app caches there under that prefix. HINT: pass --app (or --config) so the command uses the app's "
        "key_prefix", 1)
