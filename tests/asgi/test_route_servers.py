"""Route matching, credentials and invalidation on two real uvicorn servers sharing one Redis.

What in-process tests cannot show: uvicorn's own scopes (its header parsing, its paths, its
``--root-path``), and entries made by one process served by another. Every request names one
public Host, as behind a load balancer (the key covers the Host header).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio

from tests.budgets import Budgets
from tests.helpers import credentials_stay_off_shared_entries, eventually
from tests.redis_server import RedisServer
from tests.servers import uvicorns

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.routes_app:app"
HOST = {"host": "shop.example"}
WRITES = ["POST", "PUT", "PATCH", "DELETE"]
SAFE = ["GET", "HEAD", "OPTIONS", "TRACE", "PURGE"]
Stored = Callable[[str, int], Awaitable[None]]


@pytest.fixture(autouse=True)
def _empty_redis(redis_url: str) -> None:
    """Each test starts on an empty Redis (the servers are the module's: FastAPI takes seconds to import)."""


@pytest.fixture
async def stored(redis_url: str, budgets: Budgets) -> AsyncIterator[Stored]:
    """``await stored("/me", 2)``: until the route has that many entries in Redis. A server stores its fill
    after the response: the other server's HIT is certain only once it is there."""
    client = redis.asyncio.Redis.from_url(redis_url)

    async def wait(label: str, count: int) -> None:
        async def there() -> bool:
            return len([key async for key in client.scan_iter(match=f"cachemw:e:{label}:*}}")]) >= count

        await eventually(there, within=budgets.condition, what=f"{count} entries of {label} stored")

    yield wait
    await client.aclose()


@pytest.fixture(scope="module")
def servers(redis_server: RedisServer, budgets: Budgets) -> Iterator[list[str]]:
    with uvicorns(APP, redis_server.url, start_timeout=budgets.process_start) as bases:
        yield bases


@asynccontextmanager
async def clients(bases: list[str]) -> AsyncIterator[list[httpx.AsyncClient]]:
    a, b = (httpx.AsyncClient(base_url=base, headers=HOST, timeout=10) for base in bases)
    async with a, b:
        yield [a, b]


async def test_a_private_entry_made_on_one_server_answers_only_its_user_on_the_other(
        servers: list[str], stored: Stored) -> None:
    async with clients(servers) as (a, b):
        alice = await a.get("/me", headers={"x-api-key": "alice"})
        await stored("/me", 1)
        alice_on_b = await b.get("/me", headers={"x-api-key": "alice"})
        bob_on_b = await b.get("/me", headers={"x-api-key": "bob"})
        await stored("/me", 2)
        bob_on_a = await a.get("/me", headers={"x-api-key": "bob"})
        nobody = await b.get("/me")
    assert alice.json()["user"] == alice_on_b.json()["user"] == "alice"
    assert alice_on_b.headers["x-cache"] == "HIT" and alice_on_b.json()["pid"] == alice.json()["pid"]
    assert bob_on_b.headers["x-cache"] == "MISS" and bob_on_b.json()["user"] == "bob"
    assert bob_on_a.headers["x-cache"] == "HIT" and bob_on_a.json() == bob_on_b.json()
    assert nobody.headers["x-cache"] == "BYPASS" and nobody.json()["user"] is None


async def test_credentialed_requests_stay_off_the_shared_entry_on_both_servers(
        servers: list[str], stored: Stored) -> None:
    async with clients(servers) as (a, b):
        keyed, anonymous, _, other = await credentials_stay_off_shared_entries(
            a, "/offers", {"x-api-key": "partner-1"}, {"x-api-key": "partner-2"}, lambda: stored("/offers", 1))
        on_b = await b.get("/offers")
        keyed_on_b = await b.get("/offers", headers={"x-api-key": "partner-1"})
        bearer_on_b = await b.get("/offers", headers={"authorization": "Bearer x"})
        session_on_b = await b.get("/offers", headers={"cookie": "session=s1"})
    assert (keyed.json()["for"], other.json()["for"]) == ("partner-1", "partner-2")
    assert anonymous.json()["for"] == "everyone"
    assert on_b.headers["x-cache"] == "HIT" and on_b.json() == anonymous.json()
    assert keyed_on_b.headers["x-cache"] == "BYPASS" and keyed_on_b.json()["for"] == "partner-1"
    assert bearer_on_b.headers["x-cache"] == session_on_b.headers["x-cache"] == "BYPASS"


async def test_a_header_the_handler_reads_selects_the_entry_on_both_servers(
        servers: list[str], stored: Stored) -> None:
    async with clients(servers) as (a, b):
        dark = await a.get("/themed", headers={"x-theme": "dark"})
        light = await b.get("/themed")
        await stored("/themed", 2)
        dark_on_b = await b.get("/themed", headers={"x-theme": "dark"})
        light_on_a = await a.get("/themed")
    assert (dark.json()["theme"], light.json()["theme"]) == ("dark", "light")
    assert dark_on_b.headers["x-cache"] == light_on_a.headers["x-cache"] == "HIT"
    assert dark_on_b.json() == dark.json() and light_on_a.json() == light.json()


async def test_only_writes_on_one_server_invalidate_what_the_other_serves(
        servers: list[str], stored: Stored) -> None:
    async with clients(servers) as (a, b):
        first = await b.get("/things/1")
        assert first.json()["version"] == 0
        await stored("/things/<thing_id>", 1)
        for method in SAFE:
            assert (await a.request(method, "/things/1")).status_code == 200, method
            after = await b.get("/things/1")
            assert after.headers["x-cache"] == "HIT" and after.json() == first.json(), method
        for version, method in enumerate(WRITES, start=1):
            assert (await a.request(method, "/things/1")).json()["version"] == version, method
            after = await b.get("/things/1")  # right after the write's response: never the old entry
            assert after.headers["x-cache"] == "MISS" and after.json()["version"] == version, method


async def test_head_with_its_own_handler_is_answered_by_it_on_both_servers(
        servers: list[str], stored: Stored) -> None:
    async with clients(servers) as (a, b):
        first = await a.get("/doc")
        await stored("/doc", 1)
        got = [first, await b.get("/doc")]
        heads = [await b.head("/doc"), await a.head("/doc")]
    assert [response.text for response in got] == ["the document"] * 2 and got[1].headers["x-cache"] == "HIT"
    # Never GET's entry (its x-handler says "get"), nor an entry of its own: HEAD's handler runs each time.
    assert [(head.headers["x-handler"], head.headers["x-call"]) for head in heads] == [("head", "1"), ("head", "2")]
    assert all("x-cache" not in head.headers for head in heads)


async def test_requests_a_host_route_may_take_are_never_cached_on_either_server(servers: list[str]) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        secrets = [await http.get(base + "/h/secret", headers={"host": "api.test", "x-api-key": key})
                   for base, key in zip(servers, ["key-a", "key-b"], strict=True)]
        pages = [await http.get(base + "/h/secret", headers=HOST) for base in servers]
    assert [secret.text for secret in secrets] == ["secret of key-a", "secret of key-b"]
    assert all("x-cache" not in response.headers for response in [*secrets, *pages])
    assert pages[0].json()["page"] == "secret" and pages[0].json()["pid"] != pages[1].json()["pid"]


@pytest.fixture(scope="module")
def servers_under_a_root_path(redis_server: RedisServer, budgets: Budgets) -> Iterator[list[str]]:
    """Behind a proxy that serves the app under /shop and strips it: uvicorn --root-path /shop, whose scopes
    have "/shop" in both root_path and path."""
    with uvicorns(APP, redis_server.url, start_timeout=budgets.process_start,
                  env={"UVICORN_ROOT_PATH": "/shop"}) as bases:
        yield bases


async def test_under_a_root_path_routes_and_credentials_hold(servers_under_a_root_path: list[str],
                                                              stored: Stored) -> None:
    async with clients(servers_under_a_root_path) as (a, b):
        alice = await a.get("/me", headers={"x-api-key": "alice"})
        bob = await b.get("/me", headers={"x-api-key": "bob"})
        await stored("/me", 2)
        alice_on_b = await b.get("/me", headers={"x-api-key": "alice"})
        await credentials_stay_off_shared_entries(b, "/offers", {"x-api-key": "p1"}, {"authorization": "Bearer x"},
                                                  lambda: stored("/offers", 1))
    assert (alice.json()["user"], bob.json()["user"]) == ("alice", "bob")
    assert alice_on_b.headers["x-cache"] == "HIT" and alice_on_b.json() == alice.json()


async def test_under_a_root_path_a_write_invalidates_the_path_it_names(servers_under_a_root_path: list[str],
                                                                        stored: Stored) -> None:
    async with clients(servers_under_a_root_path) as (a, b):
        assert (await b.get("/things/2")).json()["version"] == 0
        await stored("/things/<thing_id>", 1)
        assert (await a.post("/things/2")).json()["version"] == 1
        after: Any = await b.get("/things/2")
    assert after.json()["version"] == 1
