"""Misses the request thread leads (a route that has been missing, a free lock): stored once, the lock never left.

The first miss of a route goes through the cache's loop; from then on a miss's lookup
also takes the fill lock, and the request's own thread runs the view and hands the fill
over. These tests run that second kind with a fill lock that would outlive every
budget (``lock_timeout`` = ``budgets.lock_timeout``), so a lock left behind shows up
as a request held far past the condition budget.
"""

from __future__ import annotations

import functools
import io
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from tests.apps.flask_shop import make_app
from tests.budgets import Budgets
from tests.helpers import eventually_sync


@pytest.fixture
def shop(redis_url: str, budgets: Budgets) -> Iterator[tuple[Flask, FlaskClient, redis.Redis]]:
    app = make_app(redis_url, lock_timeout=budgets.lock_timeout, origin_concurrency=1, origin_wait=0.05)
    counts = redis.Redis.from_url(redis_url)
    try:
        yield app, app.test_client(), counts
    finally:
        app.wsgi_app.close()  # type: ignore[attr-defined]


def _runs(counts: redis.Redis, view: str) -> int:
    return int(counts.get(f"calls:{view}") or 0)


def _cached(client: FlaskClient, path: str) -> bool:
    return client.get(path).headers.get("X-Cache") == "HIT"


def _within(budgets: Budgets, started: float) -> None:
    assert time.monotonic() - started < budgets.condition, "a request waited on a fill lock left behind"


def test_each_new_key_of_a_missing_route_runs_its_view_once_and_is_stored(
        shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    _, client, counts = shop
    for item in range(1, 6):
        first = client.get(f"/items/{item}")
        assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"
        assert first.json is not None and first.json["item"] == item
        path = f"/items/{item}"
        eventually_sync(functools.partial(_cached, client, path), what=f"{path} stored")
    assert _runs(counts, "item") == 5
    assert not list(counts.scan_iter("*:lock")), "a fill lock outlived its fill"


def test_a_led_miss_answered_500_gives_its_lock_back_at_once(
        shop: tuple[Flask, FlaskClient, redis.Redis], budgets: Budgets) -> None:
    _, client, counts = shop
    started = time.monotonic()
    for run in range(1, 4):
        response = client.get("/boom")
        response.close()  # as a WSGI server does once it has sent the response (PEP 3333)
        assert response.status_code == 500  # Flask's answer to the view's exception
        assert _runs(counts, "boom") == run
    _within(budgets, started)


def test_a_response_the_server_closes_unread_gives_its_lock_back(
        shop: tuple[Flask, FlaskClient, redis.Redis], budgets: Budgets) -> None:
    app, client, counts = shop
    client.get("/items/100")  # the route misses: the next miss is led by its thread
    unread = app.wsgi_app(_environ("/items/101"), _ignored)
    unread.close()  # type: ignore[attr-defined]  # the client left before the server read anything
    started = time.monotonic()
    after = client.get("/items/101")
    _within(budgets, started)
    assert after.headers["X-Cache"] == "MISS" and _runs(counts, "item") == 2


def test_led_misses_keep_the_origin_bound(shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    _, client, counts = shop
    counts.lpush("gate:0", "open")
    assert client.get("/gate/0").status_code == 200  # the route misses: the next misses are led
    answers: dict[str, Any] = {}

    def held() -> None:
        answers["held"] = client.get("/gate/1")

    holder = threading.Thread(target=held)
    holder.start()
    try:
        eventually_sync(lambda: _runs(counts, "gate") == 2, what="the first led miss inside its view")
        busy = client.get("/gate/2")  # origin_concurrency = 1: no slot for a second view
        assert busy.status_code == 503 and "Retry-After" in busy.headers
        assert _runs(counts, "gate") == 2
    finally:
        counts.lpush("gate:1", "open")
        holder.join()
    assert answers["held"].status_code == 200 and answers["held"].json["n"] == 1
    counts.lpush("gate:2", "open")
    assert client.get("/gate/2").status_code == 200  # the slot came back


def _ignored(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
    return lambda _: None


def _environ(path: str) -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "",
            "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "localhost",
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False}
