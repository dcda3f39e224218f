"""The stored entry codec: exact round trips, and any other bytes are a miss, never a crash."""

from __future__ import annotations

import math
import pickle
import random
import struct
from dataclasses import replace

import pytest

from cachemw.core.entry import MAX_HEADERS, Entry, EntryDecodeError, decode_entry, encode_entry, soften

MAGIC = b"CMW"
VERSION = 2
HEAD = "<3sBdHHHIdd"  # magic, version, stored_at, status, n_headers, n_tags, body length, ttl, swr

FULL = Entry(
    status=200,
    headers=(
        (b"content-type", b"application/octet-stream"),
        (b"x-\xff", b"\x00\xfe binary \r\n"),
        (b"cache-control", b"public, max-age=60"),
        (b"content-length", b"7"),
        (b"etag", b'"abc"'),
    ),
    body=b"\x00\x01\xffend",
    stored_at=1_700_000_000.123456,
    etag=b'"abc"',
    tags=("product:1", "catégorie:é", "日本", "\U0001f600", ""),
)


def test_a_full_entry_round_trips() -> None:
    assert decode_entry(encode_entry(FULL)) == FULL


@pytest.mark.parametrize(
    "entry",
    [
        Entry(204, (), b"", 0.0, b'"e"'),
        Entry(200, (), b"\x00", 1.5, b'W/"weak"'),
        Entry(404, ((b"x", b""),), b"not found", 2.0, b""),
        Entry(599, (), bytes(range(256)) * 100, -1.0, b'"x"', ("t",)),
        Entry(100, tuple((f"x-h{i}".encode(), b"v" * i) for i in range(MAX_HEADERS)), b"b", 3.0, b'"m"'),
        Entry(200, ((b"a" * 65_535, b"b" * 65_535),), b"", 4.0, b'"' + b"e" * 65_533 + b'"', ("t" * 65_535,)),
        Entry(200, (), b"", 5.0, b'"t"', tuple(f"tag:{i}" for i in range(1000))),
    ],
    ids=["empty-body", "nul-body", "blank-etag", "big-body", "max-headers", "max-lengths", "many-tags"],
)
def test_edge_entries_round_trip(entry: Entry) -> None:
    decoded = decode_entry(encode_entry(entry))
    assert decoded == entry
    assert type(decoded.body) is bytes
    assert all(type(name) is bytes and type(value) is bytes for name, value in decoded.headers)


def test_the_stored_at_float_is_exact() -> None:
    for stored_at in (0.1, 1e-300, 1_700_000_000.000001, 2.0**53 + 2):
        assert decode_entry(encode_entry(Entry(200, (), b"", stored_at, b'"e"'))).stored_at == stored_at


# -- encode refuses what the format cannot hold, with ValueError ----------------------------


@pytest.mark.parametrize(
    "entry",
    [
        Entry(200, ((b"x-big", b"v" * 65_536),), b"", 1.0, b'"e"'),
        Entry(200, ((b"n" * 65_536, b"v"),), b"", 1.0, b'"e"'),
        Entry(200, (), b"", 1.0, b'"e"', ("t" * 65_536,)),
        Entry(200, (), b"", 1.0, b'"' + b"e" * 65_535 + b'"'),
        Entry(200, tuple((b"x", b"y") for _ in range(MAX_HEADERS + 1)), b"", 1.0, b'"e"'),
        Entry(70_000, (), b"", 1.0, b'"e"'),
    ],
    ids=["long-value", "long-name", "long-tag", "long-etag", "too-many-headers", "status"],
)
def test_encode_refuses_what_does_not_fit_with_value_error(entry: Entry) -> None:
    with pytest.raises(ValueError) as info:
        encode_entry(entry)
    assert not isinstance(info.value, struct.error)


# -- decode: anything but a valid entry is EntryDecodeError ---------------------------------


def rejected(data: object) -> EntryDecodeError:
    """decode_entry's error for ``data``; any other exception type fails the test."""
    try:
        decode_entry(data)  # type: ignore[arg-type]
    except EntryDecodeError as exc:
        return exc
    raise AssertionError(f"decoded {data!r:.80}")


def test_empty_bytes_are_rejected() -> None:
    rejected(b"")


def test_wrong_magic_is_rejected() -> None:
    data = encode_entry(FULL)
    rejected(b"XYZ" + data[3:])
    rejected(b"cmw" + data[3:])


@pytest.mark.parametrize("version", [0, 3, 255])
def test_another_version_is_rejected(version: int) -> None:
    data = encode_entry(FULL)
    assert "version" in str(rejected(data[:3] + bytes([version]) + data[4:]))


def test_every_truncation_is_rejected() -> None:
    for entry in (FULL, Entry(200, ((b"a", b"bc"),), b"", 1.0, b'"x"', ("tag",)),
                  Entry(200, ((b"a", b"bc"),), b"", 1.0, b'"x"'), Entry(200, (), b"", 1.0, b'"x"', ("tag",)),
                  Entry(200, (), b"", 1.0, b'"x"')):
        data = encode_entry(entry)
        for length in range(len(data)):
            rejected(data[:length])


def test_trailing_bytes_are_rejected_not_taken_as_body() -> None:
    data = encode_entry(FULL)
    for extra in (b"\x00", b"garbage", b"\xff" * 1000):
        rejected(data + extra)


def test_a_body_length_that_disagrees_is_rejected() -> None:
    data = bytearray(encode_entry(FULL))
    # magic, version, stored_at, status, n_headers, n_tags, then the body length.
    offset = struct.calcsize("<3sBdHHH")
    for body_len in (0, len(FULL.body) - 1, len(FULL.body) + 1, 2**32 - 1):
        struct.pack_into("<I", data, offset, body_len)
        rejected(bytes(data))


@pytest.mark.parametrize("status", [0, 99, 600, 65_535])
def test_an_implausible_status_is_rejected(status: int) -> None:
    data = bytearray(encode_entry(FULL))
    struct.pack_into("<H", data, 12, status)
    rejected(bytes(data))


@pytest.mark.parametrize("stored_at", [math.nan, math.inf, -math.inf])
def test_a_non_finite_stored_at_is_rejected(stored_at: float) -> None:
    # +inf would look fresh forever and break the Age header.
    data = bytearray(encode_entry(FULL))
    struct.pack_into("<d", data, 4, stored_at)
    rejected(bytes(data))


def test_too_many_headers_is_rejected_before_reading_them() -> None:
    head = struct.pack(HEAD, MAGIC, VERSION, 1.0, 200, MAX_HEADERS + 1, 0, 0, 0.0, 0.0)
    rejected(head + b"\x00\x00" + b"\x00" * 4 * (MAX_HEADERS + 1))


def test_a_tag_that_is_not_utf8_is_rejected() -> None:
    head = struct.pack(HEAD, MAGIC, VERSION, 1.0, 200, 0, 1, 0, 0.0, 0.0)
    rejected(head + struct.pack("<H", 0) + struct.pack("<H", 2) + b"\xff\xfe")


def reencoded(entry: Entry, data: bytes) -> bytes:
    """``entry`` encoded with the windows ``data`` carries (the decoded Entry has none)."""
    ttl, swr = struct.unpack_from("<dd", data, struct.calcsize("<3sBdHHHI"))
    return encode_entry(entry, ttl=ttl, stale_while_revalidate=swr)


@pytest.mark.parametrize("windows", [(math.nan, 1.0), (1.0, math.inf), (-1.0, 1.0), (1.0, -0.5)])
def test_implausible_windows_are_rejected(windows: tuple[float, float]) -> None:
    data = bytearray(encode_entry(FULL, ttl=60, stale_while_revalidate=60))
    struct.pack_into("<dd", data, struct.calcsize("<3sBdHHHI"), *windows)
    rejected(bytes(data))


def test_a_version_1_entry_still_decodes() -> None:
    """Written by a cachemw before soft purges, during an upgrade: read as before, not a fleet of misses."""
    data = encode_entry(FULL)
    v1 = data[:3] + b"\x01" + data[4:struct.calcsize("<3sBdHHHI")] + data[struct.calcsize(HEAD):]
    assert decode_entry(v1) == FULL


def test_the_windows_round_trip_and_soften_uses_them() -> None:
    data = encode_entry(FULL, ttl=60.0, stale_while_revalidate=30.0)
    assert decode_entry(data) == FULL
    purged_at = FULL.stored_at + 10  # fresh when purged: stale as of then, for its 30 s window
    softened = soften(data, purged_at)
    assert softened is not None and len(softened) == len(data)
    assert decode_entry(softened) == replace(FULL, stored_at=purged_at - 60.0)
    assert soften(softened, purged_at + 5) == softened  # already stale then: not made any younger
    assert soften(data, FULL.stored_at + 1000) == data  # stale already: left as it is


@pytest.mark.parametrize("data", [encode_entry(FULL, ttl=60.0), encode_entry(FULL)[:3] + b"\x01",
                                  b"CMP\x01", b"", b"garbage" * 10],
                         ids=["no-stale-window", "version-1", "pass-marker", "empty", "foreign"])
def test_what_cannot_be_served_stale_is_not_softened(data: bytes) -> None:
    assert soften(data, 2e9) is None


def test_a_pickle_is_rejected_and_never_run() -> None:
    ran: list[str] = []

    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (ran.append, ("ran",))

    for payload in (pickle.dumps(Boom()), pickle.dumps(FULL), pickle.dumps({"status": 200}, protocol=0)):
        rejected(payload)
    assert ran == []


@pytest.mark.parametrize("data", ["CMW\x01", None, 42, [1, 2, 3]], ids=["str", "none", "int", "list"])
def test_a_value_that_is_not_bytes_is_rejected(data: object) -> None:
    rejected(data)


def test_random_bytes_are_rejected() -> None:
    rng = random.Random(20_241_125)
    valid = encode_entry(FULL)
    prefix = MAGIC + bytes([VERSION])
    for i in range(4000):
        size = rng.randrange(0, 200)
        blob = rng.randbytes(size)
        if i % 2:
            blob = prefix + blob  # past the magic and version checks, into the parser
        try:
            entry = decode_entry(blob)
        except EntryDecodeError:
            continue
        # A random blob may happen to be well formed: then it must decode to itself.
        assert reencoded(entry, blob) == blob
    for _ in range(2000):
        # Mutations of a real entry: flipped bytes anywhere, mostly in the lengths up front.
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            position = rng.randrange(0, min(len(data), 40) if rng.random() < 0.7 else len(data))
            data[position] = rng.randrange(256)
        try:
            entry = decode_entry(bytes(data))
        except EntryDecodeError:
            continue
        assert reencoded(entry, bytes(data)) == bytes(data)


def test_every_accepted_blob_is_exactly_one_entry() -> None:
    # A decoded entry re-encodes to the same bytes: no slack for smuggled trailing data.
    rng = random.Random(7)
    for _ in range(500):
        entry = Entry(
            status=rng.randrange(100, 600),
            headers=tuple((rng.randbytes(rng.randrange(0, 8)), rng.randbytes(rng.randrange(0, 8)))
                          for _ in range(rng.randrange(0, 5))),
            body=rng.randbytes(rng.randrange(0, 20)),
            stored_at=rng.uniform(0, 2e9),
            etag=rng.randbytes(rng.randrange(0, 5)),
            tags=tuple(str(rng.random()) for _ in range(rng.randrange(0, 3))),
        )
        data = encode_entry(entry)
        assert decode_entry(data) == entry
        for cut in range(len(data)):
            rejected(data[:cut])
