"""End to end: ``python -m sample_app`` in a subprocess, spoken to over real HTTP.

This is what a user does after reading the README, so it runs the real server
(uvicorn, lifespan, the real middleware and store), not an in-process client.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.budgets import Budgets
from tests.sample_checks import (
    cache_state,
    carts_are_per_session_and_never_cached,
    product_miss_then_hit,
    stats_cached_by_file_rule,
    unknown_product_is_404,
)
from tests.sample_server import REPO_ROOT, Server, answers_until_hit, run_sample_app, sample_env


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


def test_index_lists_routes(server: Server) -> None:
    with server.client() as client:
        response = client.get("/")
    assert response.status_code == 200
    for route in ("/products/", "/api/products/", "/stats", "/cart", "/debug/queries"):
        assert route in response.text
    assert f"curl -si {server.url}/products/1" in response.text


def test_product_miss_then_hit(store_server: Server, budgets: Budgets) -> None:
    product_miss_then_hit(store_server, budgets)


def test_unknown_product_is_404(server: Server) -> None:
    unknown_product_is_404(server)


def test_stats_cached_by_file_rule(server: Server, budgets: Budgets) -> None:
    stats_cached_by_file_rule(server, budgets)


def test_carts_are_per_session_and_never_cached(server: Server) -> None:
    carts_are_per_session_and_never_cached(server)


def test_fastapi_route(server: Server) -> None:
    with server.client() as client:
        first = client.get("/api/products/1")
        second = client.get("/api/products/1")
        invalid = client.get("/api/products/abc")
        missing = client.get("/api/products/999")
    assert first.status_code == second.status_code == 200
    assert (cache_state(first), cache_state(second)) == ("MISS", "HIT")
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


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_price_posted_to_the_shop_shows_on_the_next_request(store: str, tmp_path: Path,
                                                              request: pytest.FixtureRequest,
                                                              budgets: Budgets) -> None:
    """`POST /products/1/price` writes with SQLAlchemy; its commit hook, not the handler, purges product:1."""
    redis_url = request.getfixturevalue("redis_url") if store == "redis" else None
    with run_sample_app(tmp_path, redis_url=redis_url) as server, server.client() as client:
        assert answers_until_hit(client, "/products/2", budgets.condition)[-1].json()["price"] == 39.0
        changed = client.post("/products/2/price", json={"price": 35.5})
        assert (changed.status_code, changed.json()) == (200, {"id": 2, "price": 35.5})
        answer = client.get("/products/2")
        assert (answer.headers["x-cache"], answer.json()["price"]) == ("MISS", 35.5)
        assert client.post("/products/99/price", json={"price": 1}).status_code == 404
        assert client.post("/products/2/price", json={"price": -1}).status_code == 422
        assert client.post("/products/2/price", content=b"{").status_code == 400
        assert client.get("/products/2").json()["price"] == 35.5


def test_a_price_changed_by_the_reprice_script_shows_on_the_next_request(tmp_path: Path, redis_url: str,
                                                                        budgets: Budgets) -> None:
    """The tour: `python -m sample_app.reprice 1 9.90` (SQLAlchemy, another process); the shop calls no invalidate()."""
    with run_sample_app(tmp_path, redis_url=redis_url) as server, server.client() as client:
        assert answers_until_hit(client, "/products/1", budgets.condition)[-1].json()["price"] == 8.5
        done = subprocess.run([sys.executable, "-m", "sample_app.reprice", "1", "9.90"], cwd=REPO_ROOT,
                              env=sample_env(tmp_path, redis_url), capture_output=True, text=True,
                              timeout=budgets.process_start, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines() == ["product 1: 8.50 -> 9.90", f"purged product:1 at {redis_url}"]
        answer = client.get("/products/1")
        assert (answer.headers["x-cache"], answer.json()["price"]) == ("MISS", 9.9)
