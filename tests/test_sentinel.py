"""cachemw on the master a Redis Sentinel names: redis+sentinel://host:port/SERVICE."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, cache
from tests.asgi import eventually, lifespan
from tests.redis_server import RedisServer, find_redis_server, free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def sentinel_url(redis_server: RedisServer, redis_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                      f"sentinel monitor shop 127.0.0.1 {redis_server.port} 1\n"
                      "sentinel down-after-milliseconds shop 1000\n")
    process = subprocess.Popen([find_redis_server(), str(config), "--sentinel"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    if client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "shop"):
                        break
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "redis sentinel did not start"
            time.sleep(0.05)
        yield f"redis+sentinel://127.0.0.1:{port}/shop"
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_caching_through_sentinel(sentinel_url: str) -> None:
    calls = 0

    @cache(ttl="5m", tags=["greeting"])
    async def hello(request: Request) -> Response:
        nonlocal calls
        calls += 1
        return PlainTextResponse(f"hello {calls}")

    app = Starlette(routes=[Route("/hello", hello)])
    app.add_middleware(CacheMiddleware, redis_url=sentinel_url)

    async def hit() -> bool:
        return (await http.get("/hello")).headers["x-cache"] == "HIT"

    async with lifespan(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                base_url="http://testserver") as http:
        assert (await http.get("/hello")).headers["x-cache"] == "MISS"
        await eventually(hit, what="the entry being stored on the sentinel's master")
        layer = app.middleware_stack
        while not isinstance(layer, CacheMiddleware):
            layer = layer.app  # type: ignore[union-attr]
        assert layer.invalidator is not None and await layer.invalidator.tags("greeting") == 1
        assert (await http.get("/hello")).text == "hello 2"
