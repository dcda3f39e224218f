"""End to end: ``python -m sample_app --flask``, the Flask shop under real gunicorn, spoken to over real HTTP.

On the private test Redis with 2 gthread workers (what a deploy runs: entries, purges
and carts shared by both), and on the embedded memory store with one worker (the
README's no-Redis sample). The scenarios the Starlette shop passes
(``tests/sample_checks.py``), then what only this shop has: a price change purging
its product's tag from a sync view.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.budgets import Budgets
from tests.helpers import eventually_sync
from tests.sample_checks import (
    cache_state,
    carts_are_per_session_and_never_cached,
    product_miss_then_hit,
    stats_cached_by_file_rule,
    unknown_product_is_404,
)
from tests.sample_server import REPO_ROOT, Server, answers_until_hit, run_sample_app, sample_env

FLASK = ("--flask",)
GUNICORN_STOPPED = "Shutting down: Master"  # gunicorn's last line once its workers have exited


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One memory-store server (one gunicorn worker) for this module's tests; each test uses its own URLs."""
    with run_sample_app(tmp_path_factory.mktemp("flask-shop"), args=FLASK, stopped=GUNICORN_STOPPED) as running:
        assert "gunicorn, 1 gthread worker of 4 threads" in running.log()
        yield running


@pytest.fixture(params=["memory", "redis"])
def store_server(request: pytest.FixtureRequest, server: Server, tmp_path: Path) -> Iterator[Server]:
    """The shared memory-store server, or a fresh one on the private test Redis with 2 gthread workers."""
    if request.param == "memory":
        yield server
        return
    redis_url = request.getfixturevalue("redis_url")
    with run_sample_app(tmp_path, redis_url=redis_url, args=FLASK, stopped=GUNICORN_STOPPED) as running:
        assert "gunicorn, 2 gthread workers of 4 threads" in running.log()
        assert running.log().count("Booting worker") == 2, running.log()
        yield running


def _database(server: Server) -> Path:
    return server.log_path.with_name("sample.sqlite3")  # SAMPLE_DB_PATH, beside the log (tests/sample_server.py)


def test_index_lists_routes(server: Server) -> None:
    with server.client() as client:
        response = client.get("/")
    assert response.status_code == 200
    for route in ("/products/{id}", "/products/{id}/price", "/stats", "/cart", "/cart/lag", "/debug/queries"):
        assert route in response.text
    assert f"curl -si {server.url}/products/1" in response.text
    assert cache_state(response) is None  # no policy: untouched


def test_product_miss_then_hit(store_server: Server, budgets: Budgets) -> None:
    product_miss_then_hit(store_server, budgets)


def test_unknown_product_is_404(server: Server) -> None:
    unknown_product_is_404(server)


def test_stats_cached_by_file_rule(store_server: Server, budgets: Budgets) -> None:
    stats_cached_by_file_rule(store_server, budgets)


def test_carts_are_real_time_and_written_behind_to_sqlite(store_server: Server, budgets: Budgets) -> None:
    sessions = carts_are_per_session_and_never_cached(store_server)

    def in_sqlite() -> bool:
        with closing(sqlite3.connect(_database(store_server), timeout=10)) as conn:
            found = {session: conn.execute("SELECT product_id, qty FROM cart_items WHERE session = ?"
                                           " ORDER BY product_id", (session,)).fetchall()
                     for session in sessions}
        return found == sessions

    eventually_sync(in_sqlite, within=budgets.condition, what="the carts written behind to SQLite")
    with store_server.client() as client:
        lag = client.get("/cart/lag")
    assert lag.status_code == 200 and cache_state(lag) == "BYPASS", lag.text
    assert lag.json()["backend"] == ("memory" if store_server.redis_url is None else "redis")


def test_a_price_change_is_on_the_next_request(store_server: Server, budgets: Budgets) -> None:
    with store_server.client() as client:
        before = answers_until_hit(client, "/products/4", budgets.condition)[-1]
        changed = client.post("/products/4/price", json={"price": 7.25})
        after = client.get("/products/4")  # read-your-writes: the entry was dropped before the POST answered
        again = answers_until_hit(client, "/products/4", budgets.condition)[-1]
        bad: list[object] = [{"price": 0}, {"price": "free"}, []]
        refused = [client.post("/products/4/price", json=body) for body in bad]
        unknown = client.post("/products/999/price", json={"price": 1})
    assert before.json()["price"] == 6.25
    assert changed.status_code == 200, changed.text
    assert changed.json() == {"id": 4, "price": 7.25, "dropped": 1}
    assert cache_state(after) == "MISS" and after.json()["price"] == 7.25
    assert again.json() == after.json()
    assert {answer.status_code for answer in refused} == {422}
    assert unknown.status_code == 404


def test_werkzeug_serves_it_without_gunicorn(tmp_path: Path, budgets: Budgets) -> None:
    """The fallback when gunicorn is not installed: one process, a thread per request, the same cache."""
    with run_sample_app(tmp_path, args=(*FLASK, "--server", "werkzeug"), stopped=None) as running:
        assert "Werkzeug's threaded server" in running.log()
        product_miss_then_hit(running, budgets, product_id=3)


def test_the_memory_store_refuses_several_workers(tmp_path: Path) -> None:
    """Each worker would keep its own entries, and a price change would purge one worker's copy only."""
    done = subprocess.run([sys.executable, "-m", "sample_app", *FLASK, "--workers", "2"], cwd=REPO_ROOT,
                          env=sample_env(tmp_path, None), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "the in-process memory store is per process" in done.stderr
    assert "CACHEMW_REDIS_URL" in done.stderr


def test_the_flask_shop_names_the_routes_of_the_shared_config() -> None:
    """The one cachemw.toml serves both shops: its rules name Flask's routes in brace form."""
    from cachemw import load_settings
    from cachemw.frameworks.flask import route_table
    from sample_app.flask_app import create_app
    from sample_app.shop import CONFIG_PATH

    flask_app = create_app(db_path="unused.sqlite3", db_delay=0, seed=False)  # no query runs
    table = route_table(flask_app, load_settings(CONFIG_PATH))
    policies = {rule.template: (rule.policy.preset if rule.policy else None, rule.source) for rule in table.rules}
    assert policies["/products/{id}"] == ("minutes", "decorator")
    assert policies["/stats"][0] == "hours" and policies["/stats"][1].endswith("cachemw.toml rule 1")
    for cart_route in ("/cart", "/cart/items", "/cart/lag"):
        assert policies[cart_route][0] == "realtime"
    assert policies["/products/{id}/price"] == (None, "default")
