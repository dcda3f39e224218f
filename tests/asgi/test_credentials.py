"""Who a request is for: every credential it carries keys private entries and keeps it off shared ones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest
from fastapi import Cookie, Depends, FastAPI, Header
from fastapi.security import APIKeyCookie, APIKeyHeader, APIKeyQuery
from pydantic import AliasChoices, BaseModel, ConfigDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachemw import CacheMiddleware, ConfigError, Settings, cache, load_settings
from cachemw.asgi.routes import build_rule_table
from cachemw.core.keys import RequestHeaders, SessionIdentity
from tests.helpers import TRANSPORTS, SpyStore, client, credentials_stay_off_shared_entries, requests_to

pytestmark = pytest.mark.anyio


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """httpx's ASGITransport and Starlette's TestClient: their scopes differ (TestClient's server is a list)."""
    return str(request.param)


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


async def test_a_private_entry_is_keyed_on_every_credential_not_the_session_cookie_alone(
        store: SpyStore, transport: str) -> None:
    # Two users whose browsers send the same session cookie (not their credential) and their own tokens.
    async with requests_to(make_app(store), transport) as http:
        alice = await http.get("/users/me", headers={"cookie": "session=same", "authorization": "Bearer alice"})
        bob = await http.get("/users/me", headers={"cookie": "session=same", "authorization": "Bearer bob"})
        alice_again = await http.get("/users/me",
                                     headers={"cookie": "session=same", "authorization": "Bearer alice"})
    assert alice.json() == {"user": "Bearer alice"}
    assert bob.json() == {"user": "Bearer bob"}
    assert alice_again.json() == {"user": "Bearer alice"} and alice_again.headers["x-cache"] == "HIT"


async def test_a_configured_credential_header_keeps_requests_off_shared_entries(
        store: SpyStore, transport: str) -> None:
    settings = Settings(credentials=("x-token",))
    async with requests_to(make_app(store, settings), transport) as http:
        token, anonymous, _, other_token = await credentials_stay_off_shared_entries(
            http, "/catalogue", {"x-token": "secret-a"}, {"x-token": "secret-b"})
    assert token.json() == {"for": "secret-a"} and other_token.json() == {"for": "secret-b"}
    assert anonymous.json() == {"for": "anonymous"}


async def test_without_the_setting_an_unknown_credential_header_is_shared(store: SpyStore) -> None:
    """What the setting is for: cachemw cannot know X-Token authenticates until told."""
    async with client(make_app(store)) as http:
        await http.get("/catalogue", headers={"x-token": "secret-a"})
        replayed = await http.get("/catalogue")
    assert replayed.headers["x-cache"] == "HIT"


async def test_a_configured_credential_keys_private_entries(store: SpyStore, transport: str) -> None:
    settings = Settings(credentials=("x-token", "cookie:remember", "query:api_key"))
    async with requests_to(make_app(store, settings), transport) as http:
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


async def test_fastapi_security_schemes_are_credentials_of_their_routes(store: SpyStore, transport: str) -> None:
    async with requests_to(fastapi_app(store), transport) as http:
        keyed, anonymous, _, other_key = await credentials_stay_off_shared_entries(
            http, "/offers", {"x-api-key": "partner-1"}, {"x-api-key": "partner-2"})
        alice = await http.get("/account", headers={"cookie": "token=alice"})
        bob = await http.get("/account", headers={"cookie": "token=bob"})
        alice_again = await http.get("/account", headers={"cookie": "token=alice"})
    assert keyed.json() == {"offers": "for partner-1"} and other_key.json() == {"offers": "for partner-2"}
    assert anonymous.json() == {"offers": "for everyone"}
    assert (alice.json(), bob.json()) == ({"account": "alice"}, {"account": "bob"})
    assert alice_again.headers["x-cache"] == "HIT" and alice_again.json() == {"account": "alice"}


async def test_fastapi_header_and_cookie_parameters_are_part_of_the_key(store: SpyStore, transport: str) -> None:
    """What the handler (or a dependency) reads from a Header() or Cookie() changes its answer."""
    api = FastAPI()

    async def token_of(x_token: str = Header("none")) -> str:
        return x_token

    @api.get("/items")
    @cache(ttl="5m")
    async def items(token: str = Depends(token_of), theme: str = Cookie("light")) -> dict[str, str]:
        return {"token": token, "theme": theme}

    api.add_middleware(CacheMiddleware, store=store)
    async with requests_to(api, transport) as http:
        good = await http.get("/items", headers={"x-token": "good"})
        bad = await http.get("/items", headers={"x-token": "bad"})
        good_again = await http.get("/items", headers={"x-token": "good"})
        dark = await http.get("/items", headers={"x-token": "good", "cookie": "theme=dark"})
    assert good.json() == {"token": "good", "theme": "light"}
    assert bad.json() == {"token": "bad", "theme": "light"}
    assert good_again.headers["x-cache"] == "HIT" and good_again.json() == good.json()
    assert dark.json() == {"token": "good", "theme": "dark"}


class Tokens(BaseModel):
    """A header parameter model: FastAPI reads each field from its own header."""

    x_token: str = "none"
    x_tenant: str = "public"


class Prefs(BaseModel):
    theme: str = "light"


class AnyCookies(BaseModel):
    """A cookie model that takes extra fields: its handler reads every cookie."""

    model_config = ConfigDict(extra="allow")


class AnyHeaders(BaseModel):
    model_config = ConfigDict(extra="allow")


def what_it_reads_app(store: SpyStore) -> FastAPI:
    api = FastAPI()

    @api.get("/tokens")
    @cache(ttl="5m")
    async def tokens(given: Annotated[Tokens, Header()], prefs: Annotated[Prefs, Cookie()]) -> dict[str, str]:
        return {"token": given.x_token, "tenant": given.x_tenant, "theme": prefs.theme}

    @api.get("/either")
    @cache(ttl="5m")
    async def either(key: Annotated[str, Header(validation_alias=AliasChoices("x-key", "x_legacy_key"))] = "none",
                     ) -> dict[str, str]:
        return {"key": key}

    @api.get("/cookies")
    @cache(ttl="5m")
    async def cookies(jar: Annotated[AnyCookies, Cookie()]) -> dict[str, object]:
        return jar.model_dump()

    @api.get("/headers")
    @cache(ttl="5m")
    async def headers(everything: Annotated[AnyHeaders, Header()]) -> dict[str, object]:
        return {"token": everything.model_dump().get("x-token")}

    api.add_middleware(CacheMiddleware, store=store)
    return api


async def test_header_and_cookie_models_and_alias_choices_are_part_of_the_key(store: SpyStore, transport: str
                                                                               ) -> None:
    """Each field of a Header()/Cookie() model, and each of a parameter's AliasChoices, is read by the handler."""
    async with requests_to(what_it_reads_app(store), transport) as http:
        good = await http.get("/tokens", headers={"x-token": "good"})
        bad = await http.get("/tokens", headers={"x-token": "bad"})
        tenant = await http.get("/tokens", headers={"x-token": "good", "x-tenant": "acme"})
        dark = await http.get("/tokens", headers={"x-token": "good", "cookie": "theme=dark"})
        good_again = await http.get("/tokens", headers={"x-token": "good"})
        new = await http.get("/either", headers={"x-key": "k1"})
        legacy = await http.get("/either", headers={"x_legacy_key": "k2"})
        new_again = await http.get("/either", headers={"x-key": "k1"})
    assert good.json() == {"token": "good", "tenant": "public", "theme": "light"}
    assert bad.json()["token"] == "bad"
    assert tenant.json()["tenant"] == "acme"
    assert dark.json()["theme"] == "dark"
    assert good_again.headers["x-cache"] == "HIT" and good_again.json() == good.json()
    # Each name its own entry (FastAPI reads both since it supports AliasChoices: k1, then k2).
    assert new.headers["x-cache"] == legacy.headers["x-cache"] == "MISS"
    assert new_again.headers["x-cache"] == "HIT" and new_again.json() == new.json()


async def test_a_cookie_model_that_takes_extra_fields_is_keyed_on_every_cookie(store: SpyStore, transport: str
                                                                               ) -> None:
    async with requests_to(what_it_reads_app(store), transport) as http:
        alice = await http.get("/cookies", headers={"cookie": "cart=alice"})
        bob = await http.get("/cookies", headers={"cookie": "cart=bob"})
        alice_again = await http.get("/cookies", headers={"cookie": "cart=alice"})
    assert (alice.json(), bob.json()) == ({"cart": "alice"}, {"cart": "bob"})
    assert alice_again.headers["x-cache"] == "HIT" and alice_again.json() == {"cart": "alice"}


async def test_a_header_model_that_takes_extra_fields_is_never_answered_from_the_cache(
        store: SpyStore, transport: str) -> None:
    """It reads every header the request has: no key covers them all."""
    app = what_it_reads_app(store)
    async with requests_to(app, transport) as http:
        alice = await http.get("/headers", headers={"x-token": "alice"})
        bob = await http.get("/headers", headers={"x-token": "bob"})
    assert (alice.json(), bob.json()) == ({"token": "alice"}, {"token": "bob"})
    assert alice.headers["x-cache"] == bob.headers["x-cache"] == "BYPASS"
    [warning] = build_rule_table(app.routes, Settings()).warnings
    assert warning.startswith("/headers: a header model") and "never answered from the cache" in warning


async def test_a_percent_encoded_query_credential_is_still_a_credential(store: SpyStore, transport: str) -> None:
    """The app reads "api%5Fkey" as "api_key": so must the check for credentials."""
    api = FastAPI()
    scheme = APIKeyQuery(name="api_key", auto_error=False)

    @api.get("/offers")
    @cache(ttl="5m")
    async def offers(key: str | None = Depends(scheme)) -> dict[str, str | None]:
        return {"for": key}

    api.add_middleware(CacheMiddleware, store=store)
    async with requests_to(api, transport) as http:
        encoded = await http.get("/offers?api%5Fkey=alice")
        plus = await http.get("/offers?x=a+b&api_key=bob")
    assert encoded.json() == {"for": "alice"} and encoded.headers["x-cache"] == "BYPASS"
    assert plus.json() == {"for": "bob"} and plus.headers["x-cache"] == "BYPASS"
    assert store.keys_set == []


def identity(*cookies: bytes) -> str | None:
    scope = {"type": "http", "headers": [(b"cookie", cookie) for cookie in cookies]}
    return SessionIdentity()(RequestHeaders(scope))


def test_a_session_cookie_in_several_cookie_headers_is_keyed_on_every_value() -> None:
    """Starlette reads the last Cookie header's value (older versions the first): the identity
    of such a request is neither user's own."""
    both = identity(b"session=alice", b"session=bob")
    assert both is not None and both not in (identity(b"session=alice"), identity(b"session=bob"))
    assert identity(b"session=alice", b"session=bob") != identity(b"session=bob", b"session=alice")
    assert identity(b"theme=dark", b"session=bob") == identity(b"session=bob")
    assert identity(b"session=", b"session=") is None
