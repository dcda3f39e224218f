"""What the ASGI shell promises holds for WSGI apps too: one key layout, stale-while-revalidate, stale-if-error."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from flask import Flask, jsonify

from cachemw import CacheMiddleware as AsgiCacheMiddleware
from cachemw import Settings, cache
from cachemw.wsgi import CacheMiddleware
from tests.helpers import eventually_sync, lifespan

SETTINGS = Settings(store_timeout=0.5)


def _flask_app(redis_url: str, runs: dict[str, int], failing: dict[str, bool]) -> Flask:
    app = Flask(__name__)
    counter = itertools.count(1)

    @app.get("/items/<int:item_id>")
    @cache(ttl="5m", tags=["item:{item_id}"])
    def item(item_id: int) -> Any:
        runs["item"] = runs.get("item", 0) + 1
        return jsonify(item=item_id, made_by="flask")

    @app.get("/news")
    @cache(ttl="1s", stale_while_revalidate="5m", stale_if_error="5m")
    def news() -> Any:
        if failing.get("news"):
            raise RuntimeError("the database is down")
        return jsonify(edition=next(counter))

    app.config["PROPAGATE_EXCEPTIONS"] = False
    app.wsgi_app = CacheMiddleware(app.wsgi_app, redis_url=redis_url, settings=SETTINGS)  # type: ignore[method-assign]
    return app


@pytest.fixture
def flask_app(redis_url: str) -> Iterator[tuple[Flask, dict[str, int], dict[str, bool]]]:
    runs: dict[str, int] = {}
    failing: dict[str, bool] = {}
    app = _flask_app(redis_url, runs, failing)
    try:
        yield app, runs, failing
    finally:
        app.wsgi_app.close()  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_an_entry_a_flask_server_stored_is_a_hit_for_a_fastapi_server(
        flask_app: tuple[Flask, dict[str, int], dict[str, bool]], redis_url: str) -> None:
    app, runs, _failing = flask_app
    client = app.test_client()
    client.get("/items/5", headers={"Host": "shop.example"})
    eventually_sync(lambda: client.get("/items/5", headers={"Host": "shop.example"}).headers["X-Cache"] == "HIT",
                    what="the Flask server's entry stored")

    api = FastAPI()

    @api.get("/items/{item_id}")
    @cache(ttl="5m", tags=["item:{item_id}"])
    async def item(item_id: int) -> dict[str, Any]:
        return {"item": item_id, "made_by": "fastapi"}

    asgi = AsgiCacheMiddleware(api, redis_url=redis_url, settings=SETTINGS)
    async with lifespan(asgi), httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi),
                                                 base_url="http://shop.example") as http:
        answer = await http.get("/items/5")
    assert answer.headers["x-cache"] == "HIT"
    assert answer.json() == {"item": 5, "made_by": "flask"}
    assert runs["item"] == 1


def test_a_stale_entry_is_served_and_refreshed_in_a_worker_thread(
        flask_app: tuple[Flask, dict[str, int], dict[str, bool]]) -> None:
    app, _runs, _failing = flask_app
    client = app.test_client()
    assert client.get("/news").get_json() == {"edition": 1}
    eventually_sync(lambda: client.get("/news").headers["X-Cache"] == "STALE", what="the entry going stale")
    # The stale answer went out at once; the refresh ran the view without a client and stored edition 2.
    eventually_sync(lambda: client.get("/news").get_json() == {"edition": 2}, what="the refreshed entry")


def test_a_failing_view_is_answered_by_the_stale_entry(
        flask_app: tuple[Flask, dict[str, int], dict[str, bool]]) -> None:
    app, _runs, failing = flask_app
    client = app.test_client()
    assert client.get("/news").get_json() == {"edition": 1}
    eventually_sync(lambda: client.get("/news").headers["X-Cache"] == "STALE", what="the entry going stale")
    failing["news"] = True
    for _ in range(5):
        answer = client.get("/news")
        assert answer.status_code == 200 and answer.get_json()["edition"] >= 1


def test_head_is_answered_from_the_get_entry_without_a_body(
        flask_app: tuple[Flask, dict[str, int], dict[str, bool]]) -> None:
    app, runs, _failing = flask_app
    client = app.test_client()
    client.get("/items/9")
    eventually_sync(lambda: client.get("/items/9").headers["X-Cache"] == "HIT", what="the entry stored")
    head = client.head("/items/9")
    assert head.status_code == 200 and head.headers["X-Cache"] == "HIT" and head.data == b""
    assert runs["item"] == 1
