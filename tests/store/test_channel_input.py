"""The pub/sub channels are untrusted input (#14 item 4): garbage is dropped and counted, the listener survives."""

from __future__ import annotations

import json
import random

import anyio
import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from cachemw import RedisStore
from cachemw.store.base import (
    MAX_FILL_MESSAGE,
    MAX_INVALIDATION_MESSAGE,
    Notifications,
    decode_fill,
    decode_invalidation,
)
from tests.helpers import eventually, find_middleware, store_of
from tests.runtime.test_invalidation import _true, servers, version, warm

pytestmark = pytest.mark.anyio

GARBAGE: list[bytes] = [
    b"[" * 100_000 + b"]" * 100_000,  # json.loads: RecursionError (killed the listener)
    b'["a", ' + b"[" * 50_000,
    b"\xff\xfe\x00not utf-8",
    b'["\xc3\x28"]',  # invalid UTF-8 inside a string
    b'["' + b"x" * (MAX_INVALIDATION_MESSAGE + 1) + b'"]',  # too long to read
    b'{"tags": ["product:1"]}',
    b'[1, 2, 3]',
    b'["ok", null]',
    b'"product:1"',
    b"null",
    b"",
    b'["\\ud800"]',  # a lone surrogate
    b"NaN",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@pytest.mark.parametrize("data", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_decodes_to_nothing(data: bytes) -> None:
    assert decode_invalidation(data) is None


def test_valid_messages_decode_to_their_tags() -> None:
    tags = ["product:1", "route:/a/{id}", "ünïcode", ""]
    assert decode_invalidation(json.dumps(tags).encode()) == tags
    assert decode_invalidation(json.dumps(tags, ensure_ascii=False).encode()) == tags
    assert decode_invalidation(b"[]") == []
    assert decode_fill(b"cachemw:e:abc") == "cachemw:e:abc"
    assert decode_fill(b"\xff") is None
    assert decode_fill(b"k" * (MAX_FILL_MESSAGE + 1)) is None
    assert decode_fill(None) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_raise(data: bytes) -> None:
    result = decode_invalidation(data)
    assert result is None or (isinstance(result, list) and all(type(tag) is str for tag in result))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_is_a_list_of_strings_or_nothing(value: object) -> None:
    data = json.dumps(value).encode()
    result = decode_invalidation(data)
    if isinstance(value, list) and all(type(v) is str for v in value):
        assert result == value
    else:
        assert result is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(), max_size=20))
def test_every_list_of_tags_round_trips(tags: list[str]) -> None:
    data = json.dumps(tags).encode("utf-8", "surrogatepass")
    result = decode_invalidation(data)
    try:
        "".join(tags).encode("utf-8")
    except UnicodeEncodeError:
        assert result is None  # lone surrogates: no tag of ours has them
    else:
        assert result == tags


def test_random_mutations_of_a_valid_message_never_raise() -> None:
    rng = random.Random(14)
    valid = bytearray(json.dumps(["product:1", "route:/products/{id}", "path:/x"]).encode())
    for _ in range(5_000):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(len(data) + 1)
            operation = rng.randrange(3)
            if operation == 0:
                data.insert(position, rng.randrange(256))
            elif operation == 1 and position < len(data):
                del data[position]
            elif position < len(data):
                data[position] = rng.randrange(256)
        result = decode_invalidation(bytes(data))
        assert result is None or all(type(tag) is str for tag in result)


def test_notifications_drop_and_count_garbage_and_failing_handlers() -> None:
    notifications = Notifications()
    heard: list[list[str]] = []
    notifications.on_invalidate.append(lambda tags: heard.append(list(tags)))
    for data in GARBAGE:
        notifications.invalidation_message(data)
    notifications.fill_message(b"\xff")
    assert notifications.rejected == len(GARBAGE) + 1
    assert heard == []

    def broken(tags: object) -> None:
        raise TypeError("a handler that fails")

    notifications.on_invalidate.insert(0, broken)
    notifications.invalidation_message(b'["a"]')  # does not raise
    assert notifications.rejected == len(GARBAGE) + 2
    assert heard == [["a"]]  # the handlers after a failing one still hear it (the L1 drops its copies)


async def test_the_listener_survives_garbage_and_a_real_purge_still_arrives(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url, timeout=1.0)
    heard: list[list[str]] = []
    store.notifications.on_invalidate.append(lambda tags: heard.append(list(tags)))
    publisher = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(store.listen)
            await eventually(lambda: _true(store.listening), what="subscribed")
            for data in GARBAGE:
                await publisher.publish(store.invalidation_channel, data)
                await publisher.publish(store.channel, data if data else b"\xff")
            await store.publish_invalidation(json.dumps(["product:1"]))
            await eventually(lambda: _true(heard == [["product:1"]]), what="the purge after the garbage")
            expected = len(GARBAGE) + sum(1 for d in GARBAGE if decode_fill(d or b"\xff") is None)
            assert store.notifications.rejected == expected
            assert store.listening
            tg.cancel_scope.cancel()
    finally:
        await publisher.aclose()
        await store.aclose()


async def test_a_purge_after_garbage_reaches_the_other_servers_l1(redis_url: str) -> None:
    async with servers(redis_url, sync=60) as (db, apps, (a, b), (_, store_b)):
        await warm(b, store_b)
        publisher = redis.asyncio.Redis.from_url(redis_url)
        try:
            for data in GARBAGE:
                await publisher.publish("cachemw:invalidations", data)
        finally:
            await publisher.aclose()
        db.versions[1] = 2
        assert (await a.post("/products/1")).status_code == 200  # invalidates product:1 everywhere

        async def b_sees_new() -> bool:
            return (await version(b)) == ("MISS", 3)

        # sync is 60 s: only the broadcast, heard after the garbage, makes B drop its L1 copy.
        await eventually(b_sees_new, what="server B dropping its L1 copy")
        middleware = find_middleware(apps[1])
        assert store_of(apps[1]).notifications.rejected >= len(GARBAGE)
        assert middleware.supervisor.service_restarts == {}
