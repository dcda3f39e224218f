"""Apps tested with Starlette's TestClient, as most FastAPI users test theirs (its scope differs from httpx's)."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.testclient import TestClient

from cachemw import CacheMiddleware, MemoryStore, cache


def make_app() -> FastAPI:
    app = FastAPI()
    calls = {"n": 0}

    @app.get("/items/{item_id}")
    @cache(ttl="5m")
    async def item(item_id: int) -> dict[str, int]:
        calls["n"] += 1
        return {"id": item_id, "n": calls["n"]}

    app.add_middleware(CacheMiddleware, store=MemoryStore())
    return app


def test_cached_routes_work_under_testclient_with_and_without_lifespan() -> None:
    app = make_app()
    # TestClient sends scope["server"] as a list, where httpx's ASGITransport sends a tuple.
    plain = TestClient(app)
    first, second = plain.get("/items/1"), plain.get("/items/1")
    assert first.status_code == second.status_code == 200
    assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"] == "HIT"
    assert second.json() == {"id": 1, "n": 1}
    with TestClient(app) as within:
        other = within.get("/items/2")
        assert other.status_code == 200 and other.json()["id"] == 2


def test_private_and_credentialed_requests_under_testclient() -> None:
    """The per-user promises through TestClient, as FastAPI users test them."""
    from fastapi import Depends
    from fastapi.security import APIKeyHeader

    app = FastAPI()
    api_key = APIKeyHeader(name="X-API-Key", auto_error=False)

    @app.get("/me")
    @cache(ttl="5m", private=True)
    async def me(key: str | None = Depends(api_key)) -> dict[str, str | None]:
        return {"user": key}

    @app.get("/offers")
    @cache(ttl="5m")
    async def offers(key: str | None = Depends(api_key)) -> dict[str, str | None]:
        return {"for": key}

    app.add_middleware(CacheMiddleware, store=MemoryStore())
    with TestClient(app) as http:
        assert http.get("/me", headers={"x-api-key": "alice"}).json() == {"user": "alice"}
        assert http.get("/me", headers={"x-api-key": "bob"}).json() == {"user": "bob"}
        again = http.get("/me", headers={"x-api-key": "alice"})
        assert again.json() == {"user": "alice"} and again.headers["x-cache"] == "HIT"
        assert http.get("/offers", headers={"x-api-key": "alice"}).headers["x-cache"] == "BYPASS"
        assert http.get("/offers").json() == {"for": None}
        assert http.get("/offers").headers["x-cache"] == "HIT"
        assert http.get("/offers", headers={"x-api-key": "bob"}).json() == {"for": "bob"}
