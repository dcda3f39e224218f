"""End to end: ``python -m sample_app`` in a subprocess, spoken to over real HTTP.

This is what a user does after reading the README, so it runs the real server
(uvicorn, lifespan, the real middleware and store), not an in-process client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.budgets import Budgets
from tests.helpers import eventually_sync
from tests.sample_server import KEY_PREFIX, Server, run_sample_app


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One memory-store server for this module's tests; each test uses its own URLs."""
    with run_sample_app(tmp_path_factory.mktemp("sample-app")) as running:
        yield running


@pytest.fixture(params=["memory", "redis"])
def store_server(request: pytest.FixtureRequest, server: Server, tmp_path: Path) -> Iterator[Server]:
    """The shared memory-store server, or a fresh one on the private test Redis."""
    if request.param == "memory":
        yield server
        return
    with run_sample_app(tmp_path, redis_url=request.getfixturevalue("redis_url")) as running:
        yield running


def _cache(response: httpx.Response) -> str | None:
    value: str | None = response.headers.get("x-cache")
    return value


def test_index_lists_routes(server: Server) -> None:
    with server.client() as client:
        response = client.get("/")
    assert response.status_code == 200
    for route in ("/products/", "/api/products/", "/stats", "/cart", "/debug/queries"):
        assert route in response.text
    assert f"curl -si {server.url}/products/1" in response.text


def test_product_miss_then_hit(store_server: Server, budgets: Budgets) -> None:
    before = store_server.queries()["product"]
    with store_server.client() as client:
        first = client.get("/products/1")
        # The copy is stored after the response, in the background: until it is, a request
        # shares the fill in flight (a collapsed MISS), never running the query again.
        later: list[httpx.Response] = []

        def answered_from_the_cache() -> bool:
            later.append(client.get("/products/1"))
            return _cache(later[-1]) == "HIT"

        eventually_sync(answered_from_the_cache, within=budgets.condition, what="a HIT for /products/1")
    second = later[-1]
    assert first.status_code == second.status_code == 200
    assert _cache(first) == "MISS"
    assert all(answer.content == first.content and answer.status_code == 200 for answer in later)
    assert first.json()["id"] == 1
    assert second.headers["etag"] == first.headers["etag"]
    assert "age" in second.headers
    assert store_server.queries()["product"] - before == 1, "the slow query must run once"

    if store_server.redis_url is None:
        assert "store in-process memory" in store_server.log()
    else:
        assert f"store Redis at {store_server.redis_url}" in store_server.log()
        with redis.Redis.from_url(store_server.redis_url) as direct:
            assert list(direct.scan_iter(match=f"{KEY_PREFIX}*")), "the entry must be in Redis"


def test_unknown_product_is_404(server: Server) -> None:
    with server.client() as client:
        response = client.get("/products/999")
    assert response.status_code == 404
    assert response.json() == {"error": "no product 999"}


def test_stats_cached_by_file_rule(server: Server, budgets: Budgets) -> None:
    before = server.queries()["stats"]
    with server.client() as client:
        first = client.get("/stats")
        after_miss = server.queries()["stats"]
        later: list[httpx.Response] = []

        def answered_from_the_cache() -> bool:  # the copy is stored after the response
            later.append(client.get("/stats"))
            return _cache(later[-1]) == "HIT"

        eventually_sync(answered_from_the_cache, within=budgets.condition, what="a HIT for /stats")
    second = later[-1]
    assert first.status_code == second.status_code == 200
    assert _cache(first) == "MISS"
    assert all(answer.content == first.content for answer in later)
    assert after_miss - before >= 2, "stats should take several queries"
    assert server.queries()["stats"] == after_miss, "a hit must not query"


def _items(response: httpx.Response) -> list[tuple[int, int]]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return [(item["product_id"], item["qty"]) for item in body["items"]]


def test_carts_are_per_session_and_never_cached(server: Server) -> None:
    responses: list[httpx.Response] = []
    with server.client() as alice, server.client() as bob:
        for client in (alice, bob):
            first = client.get("/cart")
            responses.append(first)
            assert _items(first) == []
            cookie = first.headers["set-cookie"].lower()
            assert cookie.startswith("session=")
            assert "httponly" in cookie
            assert "samesite=lax" in cookie
            assert "path=/cart" in cookie  # so product pages stay cacheable for shoppers
        assert alice.cookies["session"] != bob.cookies["session"]

        responses.append(alice.post("/cart/items", json={"product_id": 1, "qty": 2}))
        responses.append(bob.post("/cart/items", json={"product_id": 2, "qty": 1}))
        for _ in range(2):
            responses.append(alice.get("/cart"))
            assert _items(responses[-1]) == [(1, 2)]
            responses.append(bob.get("/cart"))
            assert _items(responses[-1]) == [(2, 1)]

        # Real time: a change is visible on the very next read.
        responses.append(alice.post("/cart/items", json={"product_id": 1, "qty": 1}))
        responses.append(alice.get("/cart"))
        assert _items(responses[-1]) == [(1, 3)]

        assert alice.post("/cart/items", json={"product_id": 999, "qty": 1}).status_code == 404
        assert alice.post("/cart/items", json={"product_id": 1, "qty": 0}).status_code == 422

    for response in responses:
        assert response.status_code == 200, response.text
        assert _cache(response) not in ("HIT", "STALE"), f"{response.request.url}: {response.headers}"


def test_fastapi_route(server: Server) -> None:
    with server.client() as client:
        first = client.get("/api/products/1")
        second = client.get("/api/products/1")
        invalid = client.get("/api/products/abc")
        missing = client.get("/api/products/999")
    assert first.status_code == second.status_code == 200
    assert (_cache(first), _cache(second)) == ("MISS", "HIT")
    assert second.content == first.content
    assert first.json()["name"] == "Espresso cup"
    assert invalid.status_code == 422
    assert missing.status_code == 404


def test_dashboard_and_metrics_are_served_where_the_log_says(server: Server) -> None:
    assert f"dashboard {server.url}/_cachemw/, metrics {server.url}/metrics" in server.log()
    with httpx.Client(base_url=server.url, timeout=10.0, follow_redirects=False) as client:
        client.get("/products/3")
        metrics = client.get("/metrics")  # answered itself: no redirect to /metrics/
        page = client.get("/_cachemw/")
        state = client.get("/_cachemw/api/state")
        index = client.get("/")
    assert metrics.status_code == 200, metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'cachemw_requests_total{policy="minutes",route="/products/{id:int}",state="miss"}' in metrics.text
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert state.status_code == 200
    assert any(rule["route"] == "/products/{id:int}" for rule in state.json()["snapshot"]["routes"])
    assert "/_cachemw/" in index.text and "/metrics" in index.text
