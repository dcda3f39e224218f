"""The credentials of each route, from its FastAPI security dependencies (#14 item 8, the route table's part)."""

# No `from __future__ import annotations`: FastAPI must resolve the dependencies of endpoints
# defined inside the tests, whose names are local.

import subprocess
import sys
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Cookie, Depends, FastAPI, Header, Security
from fastapi.security import (
    APIKeyCookie,
    APIKeyHeader,
    APIKeyQuery,
    HTTPBasic,
    HTTPBearer,
    OAuth2PasswordBearer,
)
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from cachemw import cache
from cachemw.asgi.routes import build_rule_table
from cachemw.core.rules import RuleTable
from cachemw.core.settings import Settings


def credentials_of(table: RuleTable, template: str) -> tuple[tuple[str, str], ...]:
    [rule] = [rule for rule in table.rules if rule.template == template]
    return rule.credentials


def test_api_key_schemes_give_their_location_and_name() -> None:
    app = FastAPI()
    header = APIKeyHeader(name="X-API-Key")
    cookie = APIKeyCookie(name="Session_Id")
    query = APIKeyQuery(name="Token")

    @app.get("/header")
    @cache(ttl="5m")
    async def by_header(key: Annotated[str, Depends(header)]) -> str:
        return key

    @app.get("/cookie")
    async def by_cookie(key: Annotated[str, Security(cookie)]) -> str:
        return key

    @app.get("/query")
    async def by_query(key: Annotated[str, Depends(query)]) -> str:
        return key

    table = build_rule_table(app.routes, Settings())
    assert credentials_of(table, "/header") == (("header", "x-api-key"),)  # header names lowercased
    assert credentials_of(table, "/cookie") == (("cookie", "Session_Id"),)  # cookie names as sent
    assert credentials_of(table, "/query") == (("query", "Token"),)


def test_authorization_schemes_read_the_authorization_header() -> None:
    app = FastAPI()
    schemes: dict[str, Callable[..., Any]] = {
        "/bearer": HTTPBearer(), "/basic": HTTPBasic(), "/oauth2": OAuth2PasswordBearer(tokenUrl="token"),
    }
    for path, scheme in schemes.items():
        app.add_api_route(path, lambda scheme=Depends(scheme): "ok")  # noqa: B008
    table = build_rule_table(app.routes, Settings())
    for path in schemes:
        assert credentials_of(table, path) == (("header", "authorization"),), path


def test_schemes_in_sub_dependencies_and_router_and_app_dependencies_count() -> None:
    app_key = APIKeyHeader(name="X-App-Key")
    router_key = APIKeyCookie(name="tenant")
    include_key = APIKeyQuery(name="include_token")
    oauth2 = OAuth2PasswordBearer(tokenUrl="token")

    async def current_user(token: Annotated[str, Depends(oauth2)]) -> str:
        return token

    async def admin(user: Annotated[str, Depends(current_user)]) -> str:
        return user

    app = FastAPI(dependencies=[Depends(app_key)])
    router = APIRouter(dependencies=[Depends(router_key)])

    @router.get("/me")
    async def me(user: Annotated[str, Depends(admin)]) -> str:
        return user

    app.include_router(router, prefix="/users", dependencies=[Depends(include_key)])

    @app.get("/direct")
    async def direct() -> str:
        return "ok"

    table = build_rule_table(app.routes, Settings())
    assert set(credentials_of(table, "/users/me")) == {
        ("header", "x-app-key"), ("cookie", "tenant"), ("query", "include_token"), ("header", "authorization"),
    }
    assert credentials_of(table, "/direct") == (("header", "x-app-key"),)


def test_plain_header_and_cookie_params_are_not_credentials() -> None:
    app = FastAPI()

    @app.get("/items")
    async def items(x_token: Annotated[str, Header()], session: Annotated[str | None, Cookie()] = None) -> str:
        return x_token

    async def page(request: Request) -> Response:
        return PlainTextResponse("")

    table = build_rule_table([*app.routes, Route("/page", page)], Settings())
    assert credentials_of(table, "/items") == ()
    assert credentials_of(table, "/page") == ()


def test_the_rule_table_works_without_fastapi_installed() -> None:
    program = """
import sys
sys.modules["fastapi"] = None  # as if not installed: every import of it fails
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Mount, Route, Router
from cachemw.core.settings import Settings
from cachemw.core.rules import cache
from cachemw.asgi.routes import build_rule_table

@cache(ttl="1m")
async def page(request: Request) -> PlainTextResponse:
    return PlainTextResponse("")

table = build_rule_table([Route("/p", page), Mount("/m", routes=[Host("a.test", app=Router([]))])], Settings())
assert table.match("/p", "GET").rule.credentials == ()
assert table.match("/m/x", "GET") is None and len(table.warnings) == 1
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "ok", result.stderr
