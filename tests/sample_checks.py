"""What both sample shops (Starlette and Flask) must do for a user, checked over real HTTP on a running server.

Each check is one scenario of the README's tour; ``tests/test_sample_app.py`` and
``tests/test_sample_flask.py`` run them on their shop's server, so the two shops are
held to the same behaviour.
"""

from __future__ import annotations

from typing import Any

import httpx
import redis

from tests.budgets import Budgets
from tests.sample_server import KEY_PREFIX, Server, answers_until_hit

__all__ = ["cache_state", "carts_are_per_session_and_never_cached", "items", "product_miss_then_hit",
           "stats_cached_by_file_rule", "unknown_product_is_404"]


def cache_state(response: httpx.Response) -> str | None:
    value: str | None = response.headers.get("x-cache")
    return value


def product_miss_then_hit(server: Server, budgets: Budgets, product_id: int = 1) -> None:
    """A MISS, then (once the copy is stored, in the background) HITs of the same body; the query ran once."""
    before = server.queries()["product"]
    with server.client() as client:
        first = client.get(f"/products/{product_id}")
        # Until the copy is stored a request shares the fill in flight (a collapsed MISS), never
        # running the query again.
        later = answers_until_hit(client, f"/products/{product_id}", budgets.condition)
    second = later[-1]
    assert first.status_code == second.status_code == 200
    assert cache_state(first) == "MISS"
    assert all(answer.content == first.content and answer.status_code == 200 for answer in later)
    assert first.json()["id"] == product_id
    assert second.headers["etag"] == first.headers["etag"]
    assert "age" in second.headers
    assert server.queries()["product"] - before == 1, "the slow query must run once"

    if server.redis_url is None:
        assert "store in-process memory" in server.log()
    else:
        assert f"store Redis at {server.redis_url}" in server.log()
        with redis.Redis.from_url(server.redis_url) as direct:
            assert list(direct.scan_iter(match=f"{KEY_PREFIX}*")), "the entry must be in Redis"


def unknown_product_is_404(server: Server) -> None:
    with server.client() as client:
        response = client.get("/products/999")
    assert response.status_code == 404
    assert response.json() == {"error": "no product 999"}


def stats_cached_by_file_rule(server: Server, budgets: Budgets) -> None:
    """``/stats`` has no decorator: the file's rule caches it; a hit runs none of its queries."""
    before = server.queries()["stats"]
    with server.client() as client:
        first = client.get("/stats")
        after_miss = server.queries()["stats"]
        later = answers_until_hit(client, "/stats", budgets.condition)
    second = later[-1]
    assert first.status_code == second.status_code == 200
    assert cache_state(first) == "MISS"
    assert all(answer.content == first.content for answer in later)
    assert after_miss - before >= 2, "stats should take several queries"
    assert server.queries()["stats"] == after_miss, "a hit must not query"


def items(response: httpx.Response) -> list[tuple[int, int]]:
    """A cart answer's lines as ``(product_id, qty)``."""
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return [(item["product_id"], item["qty"]) for item in body["items"]]


def carts_are_per_session_and_never_cached(server: Server) -> dict[str, list[tuple[int, int]]]:
    """Two visitors' carts, each its own and read live; returns each session's final lines."""
    responses: list[httpx.Response] = []
    with server.client() as alice, server.client() as bob:
        for client in (alice, bob):
            first = client.get("/cart")
            responses.append(first)
            assert items(first) == []
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
            assert items(responses[-1]) == [(1, 2)]
            responses.append(bob.get("/cart"))
            assert items(responses[-1]) == [(2, 1)]

        # Real time: a change is visible on the very next read.
        responses.append(alice.post("/cart/items", json={"product_id": 1, "qty": 1}))
        responses.append(alice.get("/cart"))
        assert items(responses[-1]) == [(1, 3)]

        assert alice.post("/cart/items", json={"product_id": 999, "qty": 1}).status_code == 404
        assert alice.post("/cart/items", json={"product_id": 1, "qty": 0}).status_code == 422
        sessions = {alice.cookies["session"]: [(1, 3)], bob.cookies["session"]: [(2, 1)]}

    for response in responses:
        assert response.status_code == 200, response.text
        assert cache_state(response) not in ("HIT", "STALE"), f"{response.request.url}: {response.headers}"
    return sessions
