"""Soft purge: purged entries answer STALE while one refresh per key replaces them, on every server at once.

Origins block on events the test sets, and count their calls: the refresh is
held while the stale answers are checked, so nothing here waits on the clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, RedisStore, Settings, cache, invalidate
from cachemw.core.policy import ConfigError
from cachemw.core.settings import load_settings
from cachemw.runtime.invalidation import Invalidator
from tests.budgets import Budgets
from tests.helpers import SpyStore, client, eventually, find_middleware, lifespan, serving

pytestmark = pytest.mark.anyio


class Catalogue:
    """The products' versions, and a handler's calls of each route; ``hold()`` blocks the reads."""

    def __init__(self) -> None:
        self.versions: dict[int, int] = {}
        self.calls: dict[str, int] = {"product": 0, "plain": 0}
        self.release = anyio.Event()
        self.release.set()
        self.failing = False

    def hold(self) -> None:
        self.release = anyio.Event()

    async def read(self, route: str, product_id: int) -> Response:
        self.calls[route] += 1
        version = self.versions.get(product_id, 1)
        await self.release.wait()
        if self.failing:
            return JSONResponse({"error": "the database is down"}, status_code=503)
        return JSONResponse({"id": product_id, "version": version})


def make_app(catalogue: Catalogue, store: Any, *, sync: float = 0.0, lock_timeout: float = 5.0) -> Starlette:
    @cache(ttl="5m", stale_while_revalidate="1h", sync=sync, tags=["product:{id}"])
    async def product(request: Request) -> Response:
        return await catalogue.read("product", request.path_params["id"])

    @cache(ttl="5m", stale_if_error="1h", sync=sync, tags=["product:{id}"])  # no stale_while_revalidate
    async def plain(request: Request) -> Response:
        return await catalogue.read("plain", request.path_params["id"])

    @cache("realtime", invalidates_soft=["product:{id}"])
    async def reprice(request: Request) -> Response:
        product_id = request.path_params["id"]
        catalogue.versions[product_id] = catalogue.versions.get(product_id, 1) + 1
        return JSONResponse({"id": product_id})

    async def soft_reset(request: Request) -> Response:  # a handler that writes, then purges itself
        catalogue.versions[1] = catalogue.versions.get(1, 1) + 1
        return JSONResponse({"touched": await invalidate(tags=["product:1"], soft=True)})

    app = Starlette(routes=[
        Route("/products/{id:int}", product, methods=["GET"]),
        Route("/products/{id:int}", reprice, methods=["POST"]),
        Route("/plain/{id:int}", plain),
        Route("/soft-reset", soft_reset, methods=["POST"]),
    ])
    app.add_middleware(CacheMiddleware, store=store, settings=Settings(lock_timeout=lock_timeout, store_timeout=2.0))
    return app


def invalidator_of(app: Starlette) -> Invalidator:
    invalidator = find_middleware(app).invalidator
    assert invalidator is not None
    return invalidator


async def _true(value: bool) -> bool:
    return value


async def answer(http: httpx.AsyncClient, path: str = "/products/1") -> tuple[str, int]:
    response = await http.get(path)
    return response.headers["x-cache"], response.json()["version"]


async def stored(store: SpyStore, count: int) -> bool:
    return len(store.keys_set) >= count


async def refreshed_through(http: httpx.AsyncClient, catalogue: Catalogue, store: SpyStore, stores_before: int,
                            within: float, path: str = "/products/1") -> None:
    """Held, the one refresh keeps the old body answering STALE; released, it is stored and answers HIT."""
    with anyio.fail_after(within):  # the origin is held: only a stale answer can come back
        assert await answer(http, path) == ("STALE", 1)
    await eventually(lambda: _true(catalogue.calls["product"] == 2), what="the refresh calling the origin")
    assert await answer(http, path) == ("STALE", 1)  # the refresh runs: no second one
    catalogue.release.set()
    await eventually(lambda: stored(store, stores_before + 1), what="the refresh being stored")
    assert await answer(http, path) == ("HIT", 2)
    assert catalogue.calls["product"] == 2


async def test_a_soft_purge_answers_stale_with_one_origin_call_then_the_new_body(store: SpyStore, budgets: Budgets
                                                                                ) -> None:
    catalogue = Catalogue()
    app = make_app(catalogue, store)
    async with lifespan(app), client(app) as http:
        assert await answer(http) == ("MISS", 1)
        await eventually(lambda: stored(store, 1), what="the first fill")
        assert await answer(http) == ("HIT", 1)
        catalogue.versions[1] = 2
        catalogue.hold()
        assert await invalidator_of(app).tags("product:1", soft=True) == 1
        with anyio.fail_after(budgets.condition):  # the origin is held: only a stale answer can come back
            response = await http.get("/products/1")
        assert response.headers["cache-status"].startswith("cachemw; hit; ttl=-")  # as any stale entry
        assert int(response.headers["age"]) >= 300  # past its ttl: downstream caches see it stale too
        await refreshed_through(http, catalogue, store, 1, budgets.condition)


@pytest.mark.parametrize("write", ["/products/1", "/soft-reset"], ids=["invalidates_soft", "invalidate"])
async def test_a_write_that_purges_softly_makes_its_entries_stale(store: SpyStore, write: str, budgets: Budgets
                                                                  ) -> None:
    """Declared (``invalidates_soft`` on the unsafe route) or called (``invalidate(..., soft=True)``)."""
    catalogue = Catalogue()
    app = make_app(catalogue, store)
    async with lifespan(app), client(app) as http:
        await http.get("/products/1")
        await eventually(lambda: stored(store, 1), what="the first fill")
        catalogue.hold()
        assert (await http.post(write)).status_code == 200
        await refreshed_through(http, catalogue, store, 1, budgets.condition)


async def test_a_route_without_a_stale_window_loses_its_entries_as_in_a_hard_purge(store: SpyStore) -> None:
    catalogue = Catalogue()
    app = make_app(catalogue, store)
    async with lifespan(app), client(app) as http:
        assert await answer(http, "/plain/1") == ("MISS", 1)
        await eventually(lambda: stored(store, 1), what="the first fill")
        catalogue.versions[1] = 2
        catalogue.failing = True
        assert await invalidator_of(app).tags("product:1", soft=True) == 1
        # Gone, as a hard purge leaves it: not even kept for stale_if_error, so the origin's failure shows.
        failed = await http.get("/plain/1")
        assert failed.status_code == 503 and failed.headers["x-cache"] == "MISS"
        catalogue.failing = False
        assert await answer(http, "/plain/1") == ("MISS", 2)
        assert catalogue.calls["plain"] == 3


async def test_a_soft_purge_of_everything(store: SpyStore, budgets: Budgets) -> None:
    catalogue = Catalogue()
    app = make_app(catalogue, store)
    async with lifespan(app), client(app) as http:
        await http.get("/products/1")
        await http.get("/plain/1")
        await eventually(lambda: stored(store, 2), what="the first fills")
        catalogue.versions[1] = 2
        catalogue.hold()
        assert await invalidator_of(app).everything(soft=True) == 2
        await refreshed_through(http, catalogue, store, 2, budgets.condition)
        catalogue.release.set()
        assert await answer(http, "/plain/1") == ("MISS", 2)


async def test_a_fill_that_began_before_a_soft_purge_is_not_stored_after_it(store: SpyStore, budgets: Budgets
                                                                            ) -> None:
    catalogue = Catalogue()
    app = make_app(catalogue, store)
    async with lifespan(app), client(app) as http:
        catalogue.hold()
        responses: list[httpx.Response] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(responses, http.get("/products/1")))
            await eventually(lambda: _true(catalogue.calls["product"] == 1), within=budgets.condition,
                             what="the handler reading the old row")
            catalogue.versions[1] = 2
            await invalidator_of(app).tags("product:1", soft=True)
            catalogue.release.set()  # the handler answers with what it read before the purge
        assert responses[0].json()["version"] == 1
        unlocks = find_middleware(app).supervisor.counters_for("unlock")
        await eventually(lambda: _true(unlocks.done == 1), within=budgets.condition,
                         what="the detached fill's lock being released")
        assert await answer(http) == ("MISS", 2)


async def _append(responses: list[httpx.Response], request: Any) -> None:
    responses.append(await request)


@asynccontextmanager
async def servers(url: str, catalogue: Catalogue, count: int = 2, *, sync: float
                  ) -> AsyncIterator[tuple[list[Starlette], list[httpx.AsyncClient], list[SpyStore]]]:
    """``count`` app instances with their own Redis connections and lifespans, like separate servers."""
    stores = [SpyStore(RedisStore.from_url(url, timeout=2.0)) for _ in range(count)]
    apps = [make_app(catalogue, store, sync=sync) for store in stores]
    async with serving(apps, stores) as clients:
        yield apps, clients, stores


async def test_two_servers_soft_purged_together_make_one_origin_call_per_key(shared_url: str, budgets: Budgets
                                                                            ) -> None:
    catalogue = Catalogue()
    keys = (1, 2, 3)
    # sync 60 s: each server holds an L1 copy, which only the purge's announcement drops this fast.
    async with servers(shared_url, catalogue, sync=60) as (apps, (a, b), (store_a, store_b)):
        for key in keys:
            assert await answer(a, f"/products/{key}") == ("MISS", 1)
        await eventually(lambda: stored(store_a, len(keys)), what="the first fills")
        for http in (a, b):
            for key in keys:
                assert await answer(http, f"/products/{key}") == ("HIT", 1)  # B's first read puts it in its L1
        catalogue.versions.update({key: 2 for key in keys})
        catalogue.hold()
        assert await invalidator_of(apps[0]).tags(*(f"product:{key}" for key in keys), soft=True) == len(keys)

        async def b_sees_stale() -> bool:
            return (await answer(b, "/products/1"))[0] == "STALE"

        with anyio.fail_after(budgets.condition):  # held origin: a miss on either server would block here
            await eventually(b_sees_stale, what="server B dropping its L1 copy and finding the stale entry")
            for _ in range(3):  # both servers, every key, over and over: all stale, all at once
                for http in (a, b):
                    for key in keys:
                        assert await answer(http, f"/products/{key}") == ("STALE", 1)
        await eventually(lambda: _true(catalogue.calls["product"] == 2 * len(keys)),
                         what="one refresh of each key")
        catalogue.release.set()
        refills = len(store_a.keys_set) + len(store_b.keys_set) + len(keys)

        async def refreshed() -> bool:
            return len(store_a.keys_set) + len(store_b.keys_set) >= refills

        await eventually(refreshed, what="the refreshes being stored")
        for http in (a, b):
            for key in keys:
                assert await answer(http, f"/products/{key}") == ("HIT", 2)
    assert catalogue.calls["product"] == 2 * len(keys)  # the fill and one refresh per key, across both servers


# -- declaring it ------------------------------------------------------------------------------


async def endpoint(request: Request) -> Response:
    return JSONResponse({})


def test_invalidates_soft_is_checked_when_declared() -> None:
    with pytest.raises(ConfigError, match=r"field 'invalidates_soft': .*not a list of strings"):
        cache("realtime", invalidates_soft="product:{id}")(endpoint)
    with pytest.raises(ConfigError, match=r"field 'invalidates_soft': .*non-empty strings"):
        cache("realtime", invalidates_soft=["product:{id}", " "])(endpoint)
    with pytest.raises(ConfigError, match=r"'product:\{id\}' is in 'invalidates' too"):
        cache("realtime", invalidates=["product:{id}"], invalidates_soft=["product:{id}", "list"])(endpoint)
    cache(invalidates_soft=["product:{id}"])(endpoint)  # alone, without a ttl or preset: an unsafe route's rule


def test_invalidates_soft_alone_makes_a_rule(tmp_path: Any) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_text('[[cachemw.rules]]\nroute = "/products/{id}"\ninvalidates_soft = ["product:{id}"]\n')
    (rule,) = load_settings(config).rules
    assert rule.policy.invalidates_soft == ("product:{id}",) and not rule.policy.cacheable
    config.write_text('[[cachemw.rules]]\nroute = "/products/{id}"\ninvalidates_soft = "product:{id}"\n')
    with pytest.raises(ConfigError, match=r"rule 1 \(route '/products/\{id\}'\): field 'invalidates_soft'"):
        load_settings(config)
