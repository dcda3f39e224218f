"""Test helpers: drive an ASGI app's lifespan, wait for conditions with a deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from starlette.types import ASGIApp, Message

from cachemw.store import Store


async def eventually(condition: Callable[[], Awaitable[bool]], *, timeout: float = 5.0,
                     what: str = "condition") -> None:
    """Poll ``condition`` until true; fail after ``timeout`` seconds."""
    with anyio.move_on_after(timeout):
        while True:
            if await condition():
                return
            await anyio.sleep(0.005)
    raise AssertionError(f"{what} did not hold within {timeout}s")


class Gate:
    """What a handler waits on until the test opens it; counts the calls, and how many wait at once.

    Opened from the app's loop or from another thread (a TestClient test's), so a plain flag
    polled briefly rather than an anyio Event, which belongs to one loop. As a context
    manager it opens on the way out: a failing test leaves no handler waiting.
    """

    def __init__(self) -> None:
        self._open = threading.Event()
        self.calls = 0
        self.running = 0
        self.most = 0

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    async def wait(self) -> None:
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            while not self._open.is_set():
                await anyio.sleep(0.005)
        finally:
            self.running -= 1

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.open()


class LifespanFailed(Exception):
    pass


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's lifespan around the block, as a server would."""
    to_app_send, to_app_receive = anyio.create_memory_object_stream[Message](4)
    from_app_send, from_app_receive = anyio.create_memory_object_stream[Message](4)
    scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}

    failure: str | None = None
    async with anyio.create_task_group() as tg, to_app_send, from_app_receive:
        async def run() -> None:
            async with to_app_receive, from_app_send:
                await app(scope, to_app_receive.receive, from_app_send.send)

        tg.start_soon(run)
        await to_app_send.send({"type": "lifespan.startup"})
        reply = await from_app_receive.receive()
        if reply["type"] != "lifespan.startup.complete":
            failure = reply.get("message", reply["type"])
        else:
            try:
                yield
            finally:
                await to_app_send.send({"type": "lifespan.shutdown"})
                with anyio.fail_after(15):
                    reply = await from_app_receive.receive()
                assert reply["type"] == "lifespan.shutdown.complete", reply
    if failure is not None:
        raise LifespanFailed(failure)


def client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


class SpyStore:
    """Wraps a store and remembers the keys written, so tests can reach an entry."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.keys_set: list[str] = []

    async def get(self, key: str) -> bytes | None:
        return await self.inner.get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self.keys_set.append(key)
        await self.inner.set(key, value, ttl)

    async def delete(self, *keys: str) -> int:
        return await self.inner.delete(*keys)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def fill(self, key: str, value: bytes, ttl: float, token: str | None, *args: Any) -> bool:
        self.keys_set.append(key)
        stored: bool = await self.inner.fill(key, value, ttl, token, *args)
        return stored

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # lock, unlock, waiter, listen


def find_middleware(app: Any) -> Any:
    """The CacheMiddleware inside a Starlette app's middleware stack (built by its first call)."""
    from cachemw import CacheMiddleware

    layer = app.middleware_stack
    while not isinstance(layer, CacheMiddleware):
        layer = layer.app
    return layer


def eventually_sync(condition: Callable[[], bool], *, timeout: float, what: str = "condition") -> None:
    """``eventually`` for a test thread (Starlette's TestClient runs the app's loop in another thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        time.sleep(0.005)
