"""Who a request is for: every credential it carries keys private entries and keeps it off shared ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import Cookie, Depends, FastAPI, Header
from fastapi.security import APIKeyCookie, APIKeyHeader
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, ConfigError, Settings, cache, load_settings
from tests.asgi import SpyStore, client

pytestmark = pytest.mark.anyio


def user_of(request: Request) -> str:
    """What the app authenticates with: the bearer token or the X-Token header, never the session cookie."""
    return request.headers.get("authorization") or request.headers.get("x-token") or "anonymous"


@cache(ttl="5m", private=True)
async def me(request: Request) -> Response:
    return JSONResponse({"user": user_of(request)})


@cache(ttl="5m")
async def catalogue(request: Request) -> Response:
    return JSONResponse({"for": user_of(request)})


def make_app(store: SpyStore, settings: Settings | None = None) -> Starlette:
    app = Starlette(routes=[Route("/users/me", me), Route("/catalogue", catalogue)])
    app.add_middleware(CacheMiddleware, store=store, settings=settings or Settings())
    return app


async def test_a_private_entry_is_keyed_on_every_credential_not_the_session_cookie_alone(store: SpyStore) -> None:
    # Two users whose browsers send the same session cookie (not their credential) and their own tokens.
    async with client(make_app(store)) as http:
        alice = await http.get("/users/me", headers={"cookie": "session=same", "authorization": "Bearer alice"})
        bob = await http.get("/users/me", headers={"cookie": "session=same", "authorization": "Bearer bob"})
        alice_again = await http.get("/users/me",
                                     headers={"cookie": "session=same", "authorization": "Bearer alice"})
    assert alice.json() == {"user": "Bearer alice"}
    assert bob.json() == {"user": "Bearer bob"}
    assert alice_again.json() == {"user": "Bearer alice"} and alice_again.headers["x-cache"] == "HIT"


async def test_a_configured_credential_header_keeps_requests_off_shared_entries(store: SpyStore) -> None:
    settings = Settings(credentials=("x-token",))
    async with client(make_app(store, settings)) as http:
        token = await http.get("/catalogue", headers={"x-token": "secret-a"})
        anonymous = await http.get("/catalogue")
        anonymous_again = await http.get("/catalogue")
        other_token = await http.get("/catalogue", headers={"x-token": "secret-b"})
    assert token.headers["x-cache"] == "BYPASS" and token.json() == {"for": "secret-a"}
    assert anonymous.json() == anonymous_again.json() == {"for": "anonymous"}
    assert anonymous_again.headers["x-cache"] == "HIT"
    assert other_token.headers["x-cache"] == "BYPASS" and other_token.json() == {"for": "secret-b"}


async def test_without_the_setting_an_unknown_credential_header_is_shared(store: SpyStore) -> None:
    """What the setting is for: cachemw cannot know X-Token authenticates until told."""
    async with client(make_app(store)) as http:
        await http.get("/catalogue", headers={"x-token": "secret-a"})
        replayed = await http.get("/catalogue")
    assert replayed.headers["x-cache"] == "HIT"


async def test_a_configured_credential_keys_private_entries(store: SpyStore) -> None:
    settings = Settings(credentials=("x-token", "cookie:remember", "query:api_key"))
    async with client(make_app(store, settings)) as http:
        a = await http.get("/users/me", headers={"x-token": "a"})
        b = await http.get("/users/me", headers={"x-token": "b"})
        a_again = await http.get("/users/me", headers={"x-token": "a"})
        by_cookie = await http.get("/users/me", headers={"cookie": "remember=r1"})
        by_query = await http.get("/users/me?api_key=q1")
        anonymous = await http.get("/users/me")
    assert (a.json(), b.json()) == ({"user": "a"}, {"user": "b"})
    assert a_again.headers["x-cache"] == "HIT" and a_again.json() == {"user": "a"}
    assert by_cookie.headers["x-cache"] == by_query.headers["x-cache"] == "MISS"
    assert anonymous.headers["x-cache"] == "BYPASS"


def test_credentials_in_a_config_file(tmp_path: Path) -> None:
    good = tmp_path / "cachemw.toml"
    good.write_text('[cachemw]\ncredentials = ["X-Api-Key", "cookie:remember", "query:api_key"]\n')
    assert load_settings(good).credentials == ("x-api-key", "cookie:remember", "query:api_key")
    bad = tmp_path / "bad.toml"
    bad.write_text('[cachemw]\ncredentials = ["path:x"]\n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*'credentials'.*cookie:NAME"):
        load_settings(bad)


def fastapi_app(store: SpyStore) -> FastAPI:
    api = FastAPI()
    api_key = APIKeyHeader(name="X-API-Key", auto_error=False)
    token_cookie = APIKeyCookie(name="token", auto_error=False)

    @api.get("/offers")
    @cache(ttl="5m")
    async def offers(key: str | None = Depends(api_key)) -> dict[str, str]:
        return {"offers": "for " + (key or "everyone")}

    @api.get("/account")
    @cache(ttl="5m", private=True)
    async def account(token: str | None = Depends(token_cookie)) -> dict[str, str]:
        return {"account": token or "none"}

    api.add_middleware(CacheMiddleware, store=store)
    return api


async def test_fastapi_security_schemes_are_credentials_of_their_routes(store: SpyStore) -> None:
    async with client(fastapi_app(store)) as http:
        keyed = await http.get("/offers", headers={"x-api-key": "partner-1"})
        anonymous = await http.get("/offers")
        anonymous_again = await http.get("/offers")
        other_key = await http.get("/offers", headers={"x-api-key": "partner-2"})
        alice = await http.get("/account", headers={"cookie": "token=alice"})
        bob = await http.get("/account", headers={"cookie": "token=bob"})
        alice_again = await http.get("/account", headers={"cookie": "token=alice"})
    assert keyed.headers["x-cache"] == "BYPASS" and keyed.json() == {"offers": "for partner-1"}
    assert anonymous_again.headers["x-cache"] == "HIT" and anonymous_again.json() == {"offers": "for everyone"}
    assert other_key.headers["x-cache"] == "BYPASS" and other_key.json() == {"offers": "for partner-2"}
    assert (alice.json(), bob.json()) == ({"account": "alice"}, {"account": "bob"})
    assert alice_again.headers["x-cache"] == "HIT" and alice_again.json() == {"account": "alice"}
    assert anonymous.status_code == 200


async def test_fastapi_header_and_cookie_parameters_are_part_of_the_key(store: SpyStore) -> None:
    """What the handler (or a dependency) reads from a Header() or Cookie() changes its answer."""
    api = FastAPI()

    async def token_of(x_token: str = Header("none")) -> str:
        return x_token

    @api.get("/items")
    @cache(ttl="5m")
    async def items(token: str = Depends(token_of), theme: str = Cookie("light")) -> dict[str, str]:
        return {"token": token, "theme": theme}

    api.add_middleware(CacheMiddleware, store=store)
    async with client(api) as http:
        good = await http.get("/items", headers={"x-token": "good"})
        bad = await http.get("/items", headers={"x-token": "bad"})
        good_again = await http.get("/items", headers={"x-token": "good"})
        dark = await http.get("/items", headers={"x-token": "good", "cookie": "theme=dark"})
    assert good.json() == {"token": "good", "theme": "light"}
    assert bad.json() == {"token": "bad", "theme": "light"}
    assert good_again.headers["x-cache"] == "HIT" and good_again.json() == good.json()
    assert dark.json() == {"token": "good", "theme": "dark"}
