"""The WSGI shell around a Flask app, driven in-process by Werkzeug's test client on a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from cachemw.runtime.context import current_cache
from cachemw.runtime.supervisor import current_supervisor
from tests.apps.flask_shop import make_app
from tests.budgets import Budgets
from tests.helpers import eventually_sync


@pytest.fixture
def shop(redis_url: str) -> Iterator[tuple[Flask, FlaskClient, redis.Redis]]:
    app = make_app(redis_url)
    counts = redis.Redis.from_url(redis_url)
    try:
        yield app, app.test_client(), counts
    finally:
        app.wsgi_app.close()  # type: ignore[attr-defined]


def _json(response: Any) -> dict[str, Any]:
    body: dict[str, Any] = response.get_json()
    return body


def _runs(counts: redis.Redis, view: str) -> int:
    return int(counts.get(f"calls:{view}") or 0)


def _cached(client: FlaskClient, path: str, **kwargs: Any) -> bool:
    return client.get(path, **kwargs).headers.get("X-Cache") == "HIT"


def test_a_miss_then_a_hit_with_one_view_run(shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    _, client, counts = shop
    first = client.get("/items/7")
    assert first.status_code == 200 and first.json == {"item": 7, "run": 1, "q": None}
    assert first.headers["X-Cache"] == "MISS"
    eventually_sync(lambda: _cached(client, "/items/7"), what="the entry stored after the response")
    hit = client.get("/items/7")
    assert hit.json == {"item": 7, "run": 1, "q": None} and hit.headers["X-Cache"] == "HIT"
    assert "Cache-Status" in hit.headers and "Age" in hit.headers
    assert _runs(counts, "item") == 1


def test_an_etag_revalidates_to_304(shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    _, client, _counts = shop
    client.get("/items/1")
    eventually_sync(lambda: _cached(client, "/items/1"), what="the entry stored")
    etag = client.get("/items/1").headers["ETag"]
    again = client.get("/items/1", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b""


def test_a_streamed_body_passes_through_whole_and_is_stored(shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    _, client, counts = shop
    first = client.get("/stream")
    assert first.data == b"part0;part1;part2;part3;part4;"
    eventually_sync(lambda: _cached(client, "/stream"), what="the streamed entry stored")
    assert client.get("/stream").data == b"part0;part1;part2;part3;part4;"
    assert _runs(counts, "stream") == 1


def test_a_set_cookie_response_is_never_stored(shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    _, client, counts = shop
    for _ in range(3):
        assert client.get("/login").headers.get("X-Cache") != "HIT"
    assert _runs(counts, "login") == 3


def test_credentials_are_never_shared_and_private_is_per_user(shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    _, client, counts = shop
    client.get("/feed")
    eventually_sync(lambda: _cached(client, "/feed"), what="the public entry stored")
    with_token = client.get("/feed", headers={"Authorization": "Bearer alice"})
    assert with_token.headers["X-Cache"] != "HIT" and _json(with_token)["auth"] == "Bearer alice"
    alice = client.get("/me", headers={"Authorization": "Bearer alice"})
    assert _json(alice)["user"] == "Bearer alice"
    eventually_sync(lambda: _cached(client, "/me", headers={"Authorization": "Bearer alice"}),
                    what="alice's private entry stored")
    bob = client.get("/me", headers={"Authorization": "Bearer bob"})
    assert _json(bob)["user"] == "Bearer bob" and bob.headers["X-Cache"] != "HIT"
    assert _json(client.get("/me", headers={"Authorization": "Bearer alice"}))["user"] == "Bearer alice"
    assert _runs(counts, "me") == 2


def test_a_sync_view_purges_by_tag(shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    _, client, counts = shop
    client.get("/items/3")
    eventually_sync(lambda: _cached(client, "/items/3"), what="the entry stored")
    assert client.post("/items/3").json == {"dropped": 1}
    after = client.get("/items/3")
    assert after.headers["X-Cache"] == "MISS" and _json(after)["run"] == 2
    assert _runs(counts, "item") == 2


def test_detach_from_a_sync_view_runs_after_the_response(shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    _, client, counts = shop
    assert client.post("/later").json == {"taken": True}
    eventually_sync(lambda: _runs(counts, "detached") == 1, what="the detached job running")


def test_the_callers_thread_forgets_the_cache_after_a_request(shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    """The test client calls the app in this thread: later code here must not find a cache it never had."""
    _, client, counts = shop
    assert client.post("/later").json == {"taken": True}  # the view reached the cache through detach()
    for path in ("/items/4", "/plain"):
        assert client.get(path).status_code == 200
    with pytest.raises(RuntimeError, match="no CacheMiddleware"):
        current_cache()
    with pytest.raises(RuntimeError):
        current_supervisor()
    eventually_sync(lambda: _runs(counts, "detached") == 1, what="the detached job running")


def test_a_class_based_view_is_cached(shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    _, client, counts = shop
    client.get("/report")
    eventually_sync(lambda: _cached(client, "/report"), what="the class-based view's entry stored")
    assert _runs(counts, "report") == 1


def test_a_route_without_a_policy_is_the_apps_alone(shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    _, client, counts = shop
    for _ in range(3):
        response = client.get("/plain")
        assert "X-Cache" not in response.headers
    assert _runs(counts, "plain") == 3


def test_a_view_that_raises_gives_a_500_and_nothing_is_stored(
        shop: tuple[Flask, FlaskClient, redis.Redis]) -> None:
    app, client, counts = shop
    app.config["PROPAGATE_EXCEPTIONS"] = False
    assert client.get("/boom").status_code == 500
    assert client.get("/boom").status_code == 500
    assert _runs(counts, "boom") == 2


def test_the_query_string_is_keyed(shop: tuple[Flask, FlaskClient, redis.Redis], budgets: Budgets) -> None:
    _, client, _counts = shop
    assert _json(client.get("/items/1?q=a"))["q"] == "a"
    eventually_sync(lambda: _cached(client, "/items/1?q=a"), what="the entry stored")
    assert _json(client.get("/items/1?q=b"))["q"] == "b"


def test_a_response_the_server_closes_unread_releases_its_fill_lock(redis_url: str, budgets: Budgets) -> None:
    """A client gone before the body: the server closes the iterable; the key must not stay locked."""
    from werkzeug.test import EnvironBuilder

    app = make_app(redis_url, lock_timeout=budgets.lock_timeout)
    counts = redis.Redis.from_url(redis_url)
    try:
        environ = EnvironBuilder(path="/stream").get_environ()
        unread = app.wsgi_app(environ, _ignore_start)
        unread.close()  # type: ignore[attr-defined]
        client = app.test_client()
        started = time.monotonic()
        assert client.get("/stream").data == b"part0;part1;part2;part3;part4;"
        assert time.monotonic() - started < budgets.condition  # not the minute-long lock of the first
    finally:
        app.wsgi_app.close()  # type: ignore[attr-defined]
    assert _runs(counts, "stream") == 1  # the closed one never ran the view; the next made the entry


def _ignore_start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
    return lambda data: None
