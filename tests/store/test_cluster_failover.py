"""A master of a real Redis Cluster dies during traffic: every request still answers, and after the
failover the cache works again without a restart."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, RedisStore, Settings, cache
from tests.helpers import eventually, lifespan, raw_redis
from tests.redis_cluster import LocalCluster
from tests.redis_server import started
from tests.runtime.test_invalidation import servers, version, warm

pytestmark = pytest.mark.anyio

IDS = range(1, 31)  # spread over the three masters' slots


@pytest.fixture(scope="module")
def cluster_with_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with started(lambda: LocalCluster(tmp_path_factory.mktemp("failover"), masters=3, replicas=1,
                                      node_timeout_ms=1000)) as cluster:
        yield cluster


def make_app(url: str, calls: list[int]) -> Starlette:
    @cache(ttl="5m")
    async def product(request: Request) -> Response:
        calls.append(request.path_params["id"])
        return JSONResponse({"id": request.path_params["id"]})

    app = Starlette(routes=[Route("/products/{id:int}", product)])
    app.add_middleware(CacheMiddleware, redis_url=url, settings=Settings(store_timeout=0.2))
    return app


async def test_killing_a_master_during_traffic(cluster_with_replicas: LocalCluster) -> None:
    cluster = cluster_with_replicas
    calls: list[int] = []
    app = make_app(cluster.url, calls)
    async with lifespan(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                base_url="http://testserver") as http:

        async def sweep() -> dict[str, int]:
            states: dict[str, int] = {}
            for product_id in IDS:
                with anyio.fail_after(5):
                    response = await http.get(f"/products/{product_id}")
                assert response.status_code == 200 and response.json() == {"id": product_id}
                states[response.headers["x-cache"]] = states.get(response.headers["x-cache"], 0) + 1
            return states

        await sweep()
        deadline = anyio.current_time() + 10
        while (await sweep()).get("HIT", 0) < len(IDS):
            assert anyio.current_time() < deadline, "entries were never all cached"
        victim = cluster.primaries()[0]
        victim.stop()  # a master dies; its replica takes over after the node timeout
        try:
            deadline = anyio.current_time() + 30
            recovered = False
            while not recovered:
                assert anyio.current_time() < deadline, "the cache did not work again after the failover"
                states: Any = await sweep()  # every request answers 200 meanwhile
                recovered = states.get("HIT", 0) == len(IDS)
                await anyio.sleep(0.05)
        finally:
            victim.start()



async def test_after_a_failover_the_new_master_tracks_our_keys(cluster_with_replicas: LocalCluster) -> None:
    """Each master tracks its own keys: when one dies, its promoted replica must get a tracking link too."""
    cluster = cluster_with_replicas
    cluster.wait_ok()
    cluster.flushall()
    async with servers(cluster.url, sync=30.0) as (db, _apps, (_a, b), (_, store_b)):
        store = store_b.inner
        assert isinstance(store, RedisStore)
        await eventually(lambda: _true(store.listening and store.tracking), what="tracking on every master")
        await warm(b, store_b)
        key = store_b.keys_set[-1]
        async with raw_redis(cluster.url) as raw:
            owner_port = int(raw.get_node_from_key(key).port)
        owner = next(node for node in cluster.nodes if node.port == owner_port)
        owner.stop()  # the entry's master dies; its replica takes over after the node timeout
        try:
            await eventually(lambda: _true(not store.tracking), what="B noticing a tracking link is gone")
            await eventually(lambda: _true(store.listening and store.tracking), within=30,
                             what="tracking on every master again, the promoted replica included")
            await eventually(lambda: _hit(b), within=30, what="B answering from its L1 again")
            # Behind cachemw's back, on the new master: only its tracking can tell B within sync.
            db.versions[1] = 9
            async with raw_redis(cluster.url) as raw:
                assert await raw.delete(key) == 1
            await eventually(lambda: _sees(b, 9), what="B evicting its copy on the new master's word")
        finally:
            owner.start()  # it rejoins as a replica
            cluster.wait_ok()


async def _true(value: bool) -> bool:
    return value


async def _hit(b: httpx.AsyncClient) -> bool:
    return (await version(b))[0] == "HIT"


async def _sees(b: httpx.AsyncClient, expected: int) -> bool:
    return (await version(b))[1] == expected
