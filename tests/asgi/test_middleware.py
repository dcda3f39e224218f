"""The middleware end to end over ASGI, on the memory store and on a real Redis."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import Message

from cachemw import CacheMiddleware, MemoryStore, cache
from tests.helpers import LifespanFailed, SpyStore, client, credentials_stay_off_shared_entries, eventually, lifespan

pytestmark = pytest.mark.anyio

calls: collections.Counter[str] = collections.Counter()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


@cache(ttl="5m", tags=["product:{id}"])
async def product(request: Request) -> Response:
    calls["product"] += 1
    product_id = request.path_params["id"]
    return JSONResponse({"id": product_id, "name": f"product {product_id}", "n": calls["product"]})


@cache(ttl="5m")
async def with_cookie(request: Request) -> Response:
    calls["cookie"] += 1
    response = PlainTextResponse(f"hello {calls['cookie']}")
    response.set_cookie("session", f"secret-{calls['cookie']}")
    return response


@cache(ttl="5m")
async def private_cc(request: Request) -> Response:
    calls["private_cc"] += 1
    return PlainTextResponse(f"yours {calls['private_cc']}", headers={"cache-control": "private"})


@cache(ttl="5m")
async def whoami(request: Request) -> Response:
    calls["whoami"] += 1
    return PlainTextResponse(f"user={request.headers.get('authorization')} n={calls['whoami']}")


@cache(ttl="5m", private=True)
async def inbox(request: Request) -> Response:
    calls["inbox"] += 1
    return PlainTextResponse(f"inbox of {request.cookies.get('session')}")


@cache("realtime")
async def cart(request: Request) -> Response:
    calls["cart"] += 1
    return PlainTextResponse(f"cart of {request.cookies.get('session')}")


@cache(ttl="5m", query=["page"])
async def listing(request: Request) -> Response:
    calls["listing"] += 1
    return JSONResponse({"params": sorted(request.query_params.multi_items())})


@cache(ttl="5m")
async def search(request: Request) -> Response:
    calls["search"] += 1
    return JSONResponse({"params": request.query_params.multi_items()})


@cache(ttl="5m")
async def varies(request: Request) -> Response:
    calls["varies"] += 1
    return PlainTextResponse(request.headers.get("accept-language", "?"), headers={"vary": "Accept-Language"})


@cache(ttl="5m", max_body=100)
async def big(request: Request) -> Response:
    calls["big"] += 1
    return PlainTextResponse("x" * 1000)


@cache(ttl="5m")
async def teapot(request: Request) -> Response:
    calls["teapot"] += 1
    return PlainTextResponse("nope", status_code=500)


async def plain(request: Request) -> Response:
    calls["plain"] += 1
    return PlainTextResponse("plain")


def make_app(store: Any, **options: Any) -> Starlette:
    app = Starlette(routes=[
        Route("/products/{id:int}", product),
        Route("/cookie", with_cookie),
        Route("/private-cc", private_cc),
        Route("/whoami", whoami),
        Route("/inbox", inbox),
        Route("/cart", cart),
        Route("/listing", listing),
        Route("/search", search),
        Route("/varies", varies),
        Route("/big", big),
        Route("/teapot", teapot),
        Route("/plain", plain),
    ])
    app.add_middleware(CacheMiddleware, store=store, **options)
    return app


async def test_miss_then_hit_replays_the_response(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        first = await http.get("/products/1")
        second = await http.get("/products/1")
    assert first.status_code == second.status_code == 200
    assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"] == "HIT"
    assert second.content == first.content and second.json()["n"] == 1
    assert calls["product"] == 1
    assert second.headers["content-type"] == "application/json"
    assert second.headers["etag"] == first.headers["etag"]
    assert int(second.headers["age"]) >= 0
    assert second.headers["cache-status"].startswith("cachemw; hit; ttl=")
    assert first.headers["cache-status"] == "cachemw; fwd=uri-miss"


async def test_different_paths_are_different_entries(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        one = await http.get("/products/1")
        two = await http.get("/products/2")
        again = await http.get("/products/2")
    assert one.json()["id"] == 1 and two.json()["id"] == 2 and again.json()["id"] == 2
    assert again.headers["x-cache"] == "HIT"


async def test_with_lifespan_the_fill_is_stored_in_the_background(store: SpyStore) -> None:
    app = make_app(store)
    async with lifespan(app), client(app) as http:
        assert (await http.get("/products/3")).headers["x-cache"] == "MISS"
        await eventually(lambda: _has_keys(store), what="the fill being stored")
        assert (await http.get("/products/3")).headers["x-cache"] == "HIT"
    assert calls["product"] == 1


async def _has_keys(store: SpyStore) -> bool:
    return bool(store.keys_set)


async def test_route_without_policy_passes_through_untouched(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        response = await http.get("/plain")
        await http.get("/plain")
    assert "x-cache" not in response.headers and "cache-status" not in response.headers
    assert calls["plain"] == 2 and store.keys_set == []


async def test_set_cookie_response_is_never_stored_nor_leaked(store: SpyStore) -> None:
    async with client(make_app(store)) as alice, client(make_app(store)) as bob:
        first = await alice.get("/cookie")
        second = await bob.get("/cookie")
    assert first.cookies["session"] == "secret-1"
    assert second.headers["x-cache"] == "MISS"
    assert second.cookies["session"] == "secret-2"
    assert "secret-1" not in second.headers.get("set-cookie", "")
    assert store.keys_set == []


async def test_cache_control_private_response_is_not_stored(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        await http.get("/private-cc")
        second = await http.get("/private-cc")
    assert second.text == "yours 2" and second.headers["x-cache"] == "MISS"
    assert store.keys_set == []


async def test_authorization_never_gets_or_makes_a_shared_entry(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        _, anonymous, _, auth_after = await credentials_stay_off_shared_entries(
            http, "/whoami", {"authorization": "Bearer alice"}, {"authorization": "Bearer bob"})
    assert anonymous.headers["x-cache"] == "MISS" and "alice" not in anonymous.text
    assert auth_after.text.startswith("user=Bearer bob")
    assert calls["whoami"] == 3


async def test_private_entries_are_per_user(store: SpyStore) -> None:
    app = make_app(store)
    async with client(app) as http:
        alice = await http.get("/inbox", headers={"cookie": "session=alice"})
        bob = await http.get("/inbox", headers={"cookie": "session=bob"})
        alice_again = await http.get("/inbox", headers={"cookie": "session=alice"})
        bob_again = await http.get("/inbox", headers={"cookie": "session=bob"})
        nobody = await http.get("/inbox")
    assert alice.text == alice_again.text == "inbox of alice"
    assert bob.text == bob_again.text == "inbox of bob"
    assert alice_again.headers["x-cache"] == "HIT" and bob_again.headers["x-cache"] == "HIT"
    assert nobody.headers["x-cache"] == "BYPASS" and nobody.text == "inbox of None"
    assert len(set(store.keys_set)) == 2


async def test_shared_route_bypasses_requests_with_a_session(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        await http.get("/products/1")
        logged_in = await http.get("/products/1", headers={"cookie": "session=alice"})
    assert logged_in.headers["x-cache"] == "BYPASS" and calls["product"] == 2


async def test_realtime_route_is_never_answered_from_cache(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        alice = await http.get("/cart", headers={"cookie": "session=alice"})
        bob = await http.get("/cart", headers={"cookie": "session=bob"})
    assert alice.text == "cart of alice" and bob.text == "cart of bob"
    assert alice.headers["x-cache"] == bob.headers["x-cache"] == "BYPASS"
    assert store.keys_set == []


async def test_corrupt_value_is_a_miss_and_is_overwritten(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        await http.get("/products/7")
        (key,) = store.keys_set
        for garbage in (b"", b"garbage", b"CMW\x09" + b"\x00" * 40, b"\x80\x04\x95pickle"):
            await store.inner.set(key, garbage, 60)
            response = await http.get("/products/7")
            assert response.status_code == 200 and response.headers["x-cache"] == "MISS"
            assert response.json()["id"] == 7
            assert (await http.get("/products/7")).headers["x-cache"] == "HIT"


async def test_304_only_for_this_keys_etag(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        one = await http.get("/products/1")
        await http.get("/products/2")
        await http.get("/products/1")
        etag = one.headers["etag"]
        not_modified = await http.get("/products/1", headers={"if-none-match": etag})
        other = await http.get("/products/2", headers={"if-none-match": etag})
        weak = await http.get("/products/1", headers={"if-none-match": f'"x", W/{etag}'})
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == etag
    assert other.status_code == 200 and other.json()["id"] == 2
    assert weak.status_code == 304


async def test_head_is_served_from_the_get_entry_without_body(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        get = await http.get("/products/1")
        head = await http.head("/products/1")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["x-cache"] == "HIT"
    assert head.headers["content-length"] == str(len(get.content))


async def test_query_is_normalised_and_unkeyed_params_are_removed(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        first = await http.get("/search?b=2&a=1&a=0")
        reordered = await http.get("/search?a=1&a=0&b=2")
        repeated_other_order = await http.get("/search?a=0&a=1&b=2")
        listing = await http.get("/listing?page=2&utm_source=x")
        busted = await http.get("/listing?page=2&utm_source=y")
    assert reordered.headers["x-cache"] == "HIT" and reordered.content == first.content
    assert repeated_other_order.headers["x-cache"] == "MISS"  # Starlette reads the last value
    assert listing.json() == {"params": [["page", "2"]]}  # the app never saw utm_source
    assert busted.headers["x-cache"] == "HIT"


async def test_response_vary_not_covered_by_the_key_is_not_stored(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        english = await http.get("/varies", headers={"accept-language": "en"})
        french = await http.get("/varies", headers={"accept-language": "fr"})
    assert english.text == "en" and french.text == "fr" and store.keys_set == []


async def test_oversized_body_and_uncacheable_status_are_not_stored(store: SpyStore) -> None:
    async with client(make_app(store)) as http:
        await http.get("/big")
        big = await http.get("/big")
        await http.get("/teapot")
        error = await http.get("/teapot")
    assert big.headers["x-cache"] == "MISS" and len(big.content) == 1000
    assert error.status_code == 500 and error.headers["x-cache"] == "MISS"
    assert store.keys_set == []


async def test_fastapi_route_with_decorator_keeps_validation(store: SpyStore) -> None:
    api = FastAPI()

    @api.get("/items/{item_id}")
    @cache(ttl="1m")
    async def item(item_id: int) -> dict[str, int]:
        calls["item"] += 1
        return {"item_id": item_id}

    api.add_middleware(CacheMiddleware, store=store)
    async with client(api) as http:
        first = await http.get("/items/5")
        second = await http.get("/items/5")
        invalid = await http.get("/items/abc")
    assert first.json() == second.json() == {"item_id": 5}
    assert second.headers["x-cache"] == "HIT" and calls["item"] == 1
    assert invalid.status_code == 422


async def test_routes_under_mounts_are_cached(store: SpyStore) -> None:
    inner = Starlette(routes=[Route("/products/{id:int}", product)])
    app = Starlette(routes=[Mount("/shop", routes=[Mount("/v1", app=inner)])])
    app.add_middleware(CacheMiddleware, store=store)
    async with client(app) as http:
        await http.get("/shop/v1/products/4")
        hit = await http.get("/shop/v1/products/4")
    assert hit.headers["x-cache"] == "HIT" and hit.json()["id"] == 4


async def test_bad_config_fails_startup_naming_file_rule_and_field(tmp_path: Path) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/products/{id}"\nttl = "5 parsecs"\n')
    app = make_app(None, config=config)
    with pytest.raises(LifespanFailed) as failure:
        async with lifespan(app):
            pass
    message = str(failure.value)
    assert str(config) in message and "rule 1" in message and "'ttl'" in message


async def test_rule_matching_no_route_fails_startup(tmp_path: Path) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/nowhere/*"\npolicy = "minutes"\n')
    with pytest.raises(LifespanFailed, match=r"rule 1 .*'/nowhere/\*'.*matches no route"):
        async with lifespan(make_app(None, config=config)):
            pass


async def test_config_file_rule_caches_a_route(tmp_path: Path, store: SpyStore) -> None:
    config = tmp_path / "cachemw.toml"
    config.write_text('[cachemw]\nkey_prefix = "t1"\n[[cachemw.rules]]\nroute = "/pl*"\npolicy = "minutes"\n')
    async with client(make_app(store, config=config)) as http:
        await http.get("/plain")
        hit = await http.get("/plain")
    assert hit.headers["x-cache"] == "HIT" and calls["plain"] == 1
    assert store.keys_set[0].startswith("t1:e:/plain:{")


async def _drive(app: Any, path: str, on_message: Any) -> None:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"testserver")], "server": ("testserver", 80),
             "client": ("127.0.0.1", 1234)}

    requested = False
    never = anyio.Event()

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await never.wait()  # the client stays connected
        raise AssertionError("unreachable")

    await app(scope, receive, on_message)


@pytest.mark.parametrize("path", ["/stream-plain", "/stream-cached"])
async def test_streaming_response_passes_through_unbuffered(path: str) -> None:
    """The second chunk is produced only after the client has received the first."""
    first_chunk_seen = anyio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        await first_chunk_seen.wait()
        yield b"data: two\n\n"

    async def stream(request: Request) -> Response:
        return StreamingResponse(chunks(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/stream-plain", stream), Route("/stream-cached", cache(ttl="5m")(stream))])
    app.add_middleware(CacheMiddleware, store=MemoryStore())
    received: list[Message] = []

    async def on_message(message: Message) -> None:
        received.append(message)
        if message["type"] == "http.response.body" and b"one" in message.get("body", b""):
            first_chunk_seen.set()

    with anyio.fail_after(5):
        await _drive(app, path, on_message)
    bodies = [m.get("body", b"") for m in received if m["type"] == "http.response.body"]
    assert b"".join(bodies) == b"data: one\n\ndata: two\n\n"


async def test_multi_chunk_response_is_streamed_and_then_stored() -> None:
    first_chunk_seen = anyio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"part one,"
        await first_chunk_seen.wait()
        yield b"part two"

    @cache(ttl="5m")
    async def report(request: Request) -> Response:
        calls["report"] += 1
        return StreamingResponse(chunks(), media_type="text/plain")

    app = Starlette(routes=[Route("/report", report)])
    app.add_middleware(CacheMiddleware, store=MemoryStore())

    async def on_message(message: Message) -> None:
        if message["type"] == "http.response.body" and b"one" in message.get("body", b""):
            first_chunk_seen.set()

    with anyio.fail_after(5):
        await _drive(app, "/report", on_message)
    async with client(app) as http:
        hit = await http.get("/report")
    assert hit.headers["x-cache"] == "HIT" and hit.text == "part one,part two" and calls["report"] == 1
