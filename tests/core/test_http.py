"""HTTP semantics: what may become a shared entry, what a hit replays, ETag/304, Age, Cache-Status."""

from __future__ import annotations

import re

import pytest

from cachemw.core.http import (
    CACHE_STATUS,
    X_CACHE,
    cache_status_hit,
    cache_status_stale_if_error,
    etag_matches,
    hit_headers,
    make_etag,
    not_modified_headers,
    not_storable_reason,
    stored_headers,
)
from cachemw.core.policy import Policy, policy_from_fields

POLICY = Policy(ttl=60.0)
JSON = [(b"content-type", b"application/json"), (b"content-length", b"2")]


def storable(headers: list[tuple[bytes, bytes]], policy: Policy = POLICY, status: int = 200) -> bool:
    return not_storable_reason(status, headers, policy) is None


# -- not_storable_reason ----------------------------------------------------------------------


def test_a_plain_response_is_storable() -> None:
    assert not_storable_reason(200, JSON, POLICY) is None
    assert not_storable_reason(200, [], POLICY) is None


@pytest.mark.parametrize("status", [200, 203, 204, 300, 301, 404, 410])
def test_default_statuses_are_storable(status: int) -> None:
    assert not_storable_reason(status, JSON, POLICY) is None


@pytest.mark.parametrize("status", [201, 206, 302, 304, 307, 400, 401, 403, 429, 500, 502, 503])
def test_a_status_outside_the_policy_is_not_storable(status: int) -> None:
    reason = not_storable_reason(status, JSON, POLICY)
    assert reason is not None
    assert str(status) in reason


def test_the_policy_names_its_statuses() -> None:
    only_ok = Policy(ttl=60.0, statuses=frozenset({200}))
    assert storable(JSON, only_ok)
    assert not storable(JSON, only_ok, status=404)
    assert storable(JSON, Policy(ttl=60.0, statuses=frozenset({500})), status=500)


@pytest.mark.parametrize("name", [b"set-cookie", b"Set-Cookie", b"SET-COOKIE", b"sEt-CoOkIe"])
def test_set_cookie_in_any_case_is_not_storable(name: bytes) -> None:
    assert not storable([*JSON, (name, b"session=abc; HttpOnly")])


@pytest.mark.parametrize(
    "value",
    [
        b"private",
        b"Private",
        b"PRIVATE",
        b"no-store",
        b"No-Store",
        b"no-cache",
        b"max-age=60, private",
        b"public,no-store",
        b" max-age=0 , no-cache ",
        b'private="set-cookie"',
        b'no-cache="set-cookie"',
    ],
)
def test_cache_control_private_no_store_no_cache_are_not_storable(value: bytes) -> None:
    assert not_storable_reason(200, [*JSON, (b"cache-control", value)], POLICY) == "cache-control"
    assert not storable([*JSON, (b"Cache-Control", value)])


def test_one_forbidding_cache_control_among_several_is_enough() -> None:
    assert not storable([(b"cache-control", b"public"), (b"cache-control", b"no-store")])


@pytest.mark.parametrize("value", [b"public, max-age=60", b"max-age=60", b"public", b"s-maxage=600", b"immutable",
                                   b"no-transform", b"must-revalidate", b"x-privately-owned"])
def test_other_cache_control_is_storable(value: bytes) -> None:
    assert storable([*JSON, (b"cache-control", value)])


@pytest.mark.parametrize("value", [b"*", b"accept-encoding, *", b" * "])
def test_vary_star_is_not_storable(value: bytes) -> None:
    keyed = policy_from_fields({"vary": ["accept-encoding"]}, base=POLICY, where="test")
    assert not_storable_reason(200, [*JSON, (b"vary", value)], keyed) == "vary"


def test_vary_on_a_keyed_header_is_storable() -> None:
    keyed = policy_from_fields({"vary": ["Accept-Language", "accept-encoding"]}, base=POLICY, where="test")
    assert storable([*JSON, (b"vary", b"Accept-Language")], keyed)
    assert storable([*JSON, (b"Vary", b"accept-language, Accept-Encoding")], keyed)
    assert storable([*JSON, (b"vary", b"accept-language"), (b"vary", b"accept-encoding")], keyed)


def test_vary_on_a_header_the_key_ignores_is_not_storable() -> None:
    keyed = policy_from_fields({"vary": ["accept-language"]}, base=POLICY, where="test")
    assert not_storable_reason(200, [*JSON, (b"vary", b"accept-encoding")], keyed) == "vary"
    assert not_storable_reason(200, [*JSON, (b"vary", b"accept-language, user-agent")], keyed) == "vary"
    assert not_storable_reason(200, [*JSON, (b"vary", b"accept-encoding")], POLICY) == "vary"
    # A varied cookie does not key the whole Cookie header.
    by_cookie = policy_from_fields({"vary": ["cookie:lang"]}, base=POLICY, where="test")
    assert not_storable_reason(200, [*JSON, (b"vary", b"cookie")], by_cookie) == "vary"


def test_vary_on_a_header_the_request_keyed_is_storable() -> None:
    assert not_storable_reason(200, [*JSON, (b"vary", b"accept-encoding")], POLICY, ["accept-encoding"]) is None


@pytest.mark.parametrize("value", [b"text/event-stream", b"text/event-stream; charset=utf-8", b"Text/Event-Stream"])
def test_a_server_sent_event_stream_is_not_storable(value: bytes) -> None:
    assert not_storable_reason(200, [(b"content-type", value)], POLICY) == "streaming"


def test_content_length_over_max_body_is_not_storable() -> None:
    small = Policy(ttl=60.0, max_body=100)
    assert storable([(b"content-length", b"100")], small)
    assert not_storable_reason(200, [(b"content-length", b"101")], small) == "size"
    assert not_storable_reason(200, [(b"content-length", b"9" * 30)], small) == "size"


@pytest.mark.parametrize("value", [b"abc", b"", b"1e3", b"\xff", b"9" * 5000])
def test_an_unreadable_content_length_is_not_storable(value: bytes) -> None:
    assert not_storable_reason(200, [(b"content-length", value)], POLICY) is not None


# -- stored_headers ---------------------------------------------------------------------------

ORIGIN = [
    (b"Content-Type", b"application/json"),
    (b"content-length", b"999"),
    (b"ETag", b'"old"'),
    (b"Connection", b"keep-alive"),
    (b"keep-alive", b"timeout=5"),
    (b"Transfer-Encoding", b"chunked"),
    (b"te", b"trailers"),
    (b"trailer", b"x-checksum"),
    (b"upgrade", b"h2c"),
    (b"proxy-authenticate", b"Basic"),
    (b"proxy-authorization", b"Basic eA=="),
    (b"proxy-connection", b"close"),
    (b"set-cookie", b"a=1"),
    (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
    (b"age", b"30"),
    (b"x-cache", b"MISS"),
    (b"cache-status", b"cachemw; fwd=uri-miss"),
    (b"Cache-Control", b"public, max-age=60"),
    (b"vary", b"accept-language"),
    (b"x-custom", b"kept"),
    (b"x-custom", b"twice"),
]


def test_stored_headers_keep_what_a_hit_must_replay() -> None:
    stored = stored_headers(ORIGIN, b'"new"', 42)
    assert stored == (
        (b"content-type", b"application/json"),
        (b"cache-control", b"public, max-age=60"),
        (b"vary", b"accept-language"),
        (b"x-custom", b"kept"),
        (b"x-custom", b"twice"),
        (b"content-length", b"42"),
        (b"etag", b'"new"'),
    )


def test_stored_headers_have_one_exact_length_and_one_etag() -> None:
    stored = stored_headers([(b"Content-Length", b"5"), (b"content-length", b"6"), (b"etag", b'"a"')], b'"b"', 0)
    assert [v for k, v in stored if k == b"content-length"] == [b"0"]
    assert [v for k, v in stored if k == b"etag"] == [b'"b"']
    assert all(k == k.lower() for k, _ in stored)


# -- ETag -------------------------------------------------------------------------------------


def test_make_etag_is_deterministic_quoted_and_per_body() -> None:
    etag = make_etag(b"hello")
    assert etag == make_etag(b"hello")
    assert re.fullmatch(rb'"[0-9a-f]{32}"', etag)
    assert make_etag(b"hello") != make_etag(b"hello!")
    assert make_etag(b"") != make_etag(b"\x00")
    assert re.fullmatch(rb'"[0-9a-f]{32}"', make_etag(b""))


@pytest.mark.parametrize(
    ("if_none_match", "etag"),
    [
        (b'"abc"', b'"abc"'),
        (b'W/"abc"', b'"abc"'),
        (b'"abc"', b'W/"abc"'),
        (b'W/"abc"', b'W/"abc"'),
        (b'"x", "abc"', b'"abc"'),
        (b'"x",W/"abc" , "y"', b'"abc"'),
        (b' "abc" ', b'"abc"'),
        (b"*", b'"abc"'),
        (b" * ", b'"abc"'),
    ],
)
def test_if_none_match_uses_weak_comparison(if_none_match: bytes, etag: bytes) -> None:
    assert etag_matches(if_none_match, etag)


@pytest.mark.parametrize(
    ("if_none_match", "etag"),
    [
        (b'"abd"', b'"abc"'),
        (b'"ab"', b'"abc"'),  # a prefix of the tag
        (b'"abc"', b'"ab"'),
        (b'"abcd"', b'"abc"'),
        (b"abc", b'"abc"'),  # unquoted is another tag
        (b'"ABC"', b'"abc"'),  # opaque tags are case-sensitive
        (b'W/"x", "y"', b'"abc"'),
        (b"", b'"abc"'),
        (b'"', b'"abc"'),
        (b'W/', b'"abc"'),
        (b'"abc"x', b'"abc"'),
    ],
)
def test_if_none_match_does_not_match_another_tag(if_none_match: bytes, etag: bytes) -> None:
    assert not etag_matches(if_none_match, etag)


def test_a_made_etag_matches_itself_only() -> None:
    etag = make_etag(b"body")
    assert etag_matches(etag, etag)
    assert etag_matches(b"W/" + etag, etag)
    assert not etag_matches(make_etag(b"other"), etag)
    assert not etag_matches(etag[:-2] + b'"', etag)


# -- hit and 304 headers ----------------------------------------------------------------------

STORED = stored_headers([(b"content-type", b"text/html"), (b"content-encoding", b"gzip"),
                         (b"cache-control", b"max-age=60"), (b"vary", b"accept-encoding"),
                         (b"content-location", b"/x")], b'"e"', 3)


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


def test_hit_headers_add_age_and_the_cache_headers() -> None:
    headers = hit_headers(STORED, 12.7, b"HIT", b"cachemw; hit; ttl=47")
    assert headers[: len(STORED)] == list(STORED)
    assert header(headers, b"age") == [b"12"]
    assert header(headers, X_CACHE) == [b"HIT"]
    assert header(headers, CACHE_STATUS) == [b"cachemw; hit; ttl=47"]
    assert X_CACHE == b"x-cache"
    assert CACHE_STATUS == b"cache-status"


@pytest.mark.parametrize(("age", "shown"), [(0.0, b"0"), (0.999, b"0"), (-0.5, b"0"), (-30.0, b"0"),
                                             (1.0, b"1"), (86_400 * 365.5, b"31579200")])
def test_age_is_a_whole_number_never_negative(age: float, shown: bytes) -> None:
    # A clock behind the server that stored the entry must not give "Age: -30".
    assert header(hit_headers(STORED, age, b"HIT", b"x"), b"age") == [shown]


def test_hit_headers_do_not_change_the_stored_headers() -> None:
    before = tuple(STORED)
    hit_headers(STORED, 1.0, b"HIT", b"x")
    assert before == STORED


def test_cache_status_hit_reports_whole_seconds_left() -> None:
    assert cache_status_hit(47.9) == b"cachemw; hit; ttl=47"


def test_not_modified_headers_drop_content_headers_and_keep_validators() -> None:
    headers = not_modified_headers(STORED)
    names = [key for key, _ in headers]
    assert b"content-length" not in names
    assert b"content-type" not in names
    assert b"content-encoding" not in names
    assert header(headers, b"etag") == [b'"e"']
    assert header(headers, b"cache-control") == [b"max-age=60"]
    assert header(headers, b"vary") == [b"accept-encoding"]
    assert header(headers, b"content-location") == [b"/x"]


def test_stale_if_error_cache_status_names_the_origin_failure() -> None:
    assert cache_status_stale_if_error(503) == b"cachemw; fwd=stale; fwd-status=503; detail=stale-if-error"
    assert cache_status_stale_if_error(None) == b"cachemw; fwd=stale; detail=stale-if-error"


def test_a_stored_204_gets_no_content_length() -> None:
    stored = dict(stored_headers([(b"content-length", b"0"), (b"x-done", b"1")], b'"e"', 0, 204))
    assert b"content-length" not in stored and stored[b"x-done"] == b"1"
    assert dict(stored_headers([], b'"e"', 0, 200))[b"content-length"] == b"0"
