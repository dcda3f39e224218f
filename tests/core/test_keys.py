"""Cache keys from hand-built ASGI scopes: what the app reads selects the entry, nothing else does."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette._utils import get_route_path
from starlette.requests import Request

from cachemw.core.keys import KeyedRequest, RequestHeaders, SessionIdentity, make_key, route_path
from cachemw.core.policy import Policy, policy_from_fields

PREFIX = "cachemw"
LABEL = "/products/<id>"
POLICY = Policy(ttl=60.0)
KEY_SHAPE = re.compile(r"^cachemw:e:/products/<id>:\{[0-9a-f]{32}\}$")


def scope(
    path: str = "/products/1",
    query: bytes = b"",
    *,
    method: str = "GET",
    host: bytes | None = b"shop.example",
    scheme: str = "http",
    root_path: str = "",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> dict[str, Any]:
    raw = [(b"host", host)] if host is not None else []
    return {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode("utf-8", "surrogatepass"),
        "root_path": root_path,
        "query_string": query,
        "headers": raw + (headers or []),
        "server": ("10.0.0.1", 8000),
    }


def keyed(
    s: dict[str, Any], policy: Policy = POLICY, identity: str | None = None, label: str = LABEL
) -> KeyedRequest:
    return make_key(s, RequestHeaders(s), policy, label, PREFIX, identity)


def key(s: dict[str, Any], policy: Policy = POLICY, identity: str | None = None) -> str:
    return keyed(s, policy, identity).key


def vary(*names: str) -> Policy:
    return policy_from_fields({"vary": list(names)}, base=POLICY, where="test")


# -- what makes two requests one entry ------------------------------------------------------


def test_the_same_url_gives_the_same_key() -> None:
    assert key(scope(query=b"a=1")) == key(scope(query=b"a=1"))


def test_get_and_head_share_a_key() -> None:
    assert key(scope(method="GET")) == key(scope(method="HEAD"))
    assert "GET" not in key(scope(method="GET"))


def test_the_key_has_a_readable_route_and_a_hash_tag() -> None:
    assert KEY_SHAPE.match(key(scope()))
    assert key(scope()).startswith(f"{PREFIX}:e:{LABEL}:")


def test_the_prefix_and_the_label_are_part_of_the_key() -> None:
    s = scope()
    assert make_key(s, RequestHeaders(s), POLICY, LABEL, "other", None).key.startswith("other:e:")
    assert keyed(s, label="/stats").key.startswith(f"{PREFIX}:e:/stats:")


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (scope(host=b"shop.example"), scope(host=b"evil.example")),
        (scope(host=b"shop.example"), scope(host=b"shop.example:8080")),
        (scope(scheme="http"), scope(scheme="https")),
        (scope(path="/products/1"), scope(path="/products/2")),
        (scope(path="/products/1"), scope(path="/products/1/")),
        (scope(path="/api/products/1", root_path=""), scope(path="/api/products/1", root_path="/api")),
        (scope(query=b"a=1"), scope(query=b"a=2")),
        (scope(query=b"a=1"), scope(query=b"b=1")),
        (scope(query=b""), scope(query=b"a=1")),
        # Starlette's QueryParams reads the last of a repeated name: order matters.
        (scope(query=b"a=1&a=2"), scope(query=b"a=2&a=1")),
        (scope(query=b"a=1&a=2"), scope(query=b"a=1")),
        # A blank value is a value the app sees ("" is not None).
        (scope(query=b"a="), scope(query=b"")),
        (scope(query=b"a=&b=1"), scope(query=b"b=1")),
        (scope(host=b"shop.example"), scope(host=None)),
    ],
)
def test_what_the_app_reads_changes_the_key(one: dict[str, Any], other: dict[str, Any]) -> None:
    assert key(one) != key(other)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (scope(query=b"b=2&a=1"), scope(query=b"a=1&b=2")),
        (scope(query=b"b=2&a=1&a=3"), scope(query=b"a=1&a=3&b=2")),
        (scope(query=b"a=1&b=2&a=3"), scope(query=b"a=1&a=3&b=2")),
        # Parsed as Starlette parses it: the app cannot tell these apart.
        (scope(query=b"q=a+b"), scope(query=b"q=a%20b")),
        (scope(query=b"a"), scope(query=b"a=")),
        (scope(host=b"Shop.Example"), scope(host=b"shop.example")),
    ],
)
def test_what_the_app_cannot_tell_apart_shares_a_key(one: dict[str, Any], other: dict[str, Any]) -> None:
    assert key(one) == key(other)


def test_query_normalisation_matches_what_starlette_reads() -> None:
    for one, other in [(b"b=2&a=1", b"a=1&b=2"), (b"a=1&b=2&a=3", b"a=1&a=3&b=2")]:
        assert Request(scope(query=one)).query_params == Request(scope(query=other)).query_params
    assert Request(scope(query=b"a=1&a=2")).query_params["a"] != Request(scope(query=b"a=2&a=1")).query_params["a"]


def test_without_a_host_header_the_server_address_is_keyed() -> None:
    one, other = scope(host=None), scope(host=None)
    other["server"] = ("10.0.0.2", 8000)
    assert key(one) != key(other)
    one["server"] = None
    assert KEY_SHAPE.match(key(one))


def test_repeated_host_headers_are_not_joined() -> None:
    # Starlette builds request.url from the first Host header.
    two = scope(host=b"evil.example", headers=[(b"host", b"shop.example")])
    assert key(two) != key(scope(host=b"evil.example, shop.example"))
    assert key(two) != key(scope(host=b"shop.example"))


# -- policy.query: only the named params select the entry -----------------------------------

PAGED = Policy(ttl=60.0, query=("page",))


def test_unnamed_query_params_do_not_change_the_key() -> None:
    assert key(scope(query=b"page=2"), PAGED) == key(scope(query=b"page=2&utm_source=x"), PAGED)
    assert key(scope(query=b"page=2"), PAGED) == key(scope(query=b"utm_source=y&page=2&fbclid=z"), PAGED)
    assert key(scope(query=b""), PAGED) == key(scope(query=b"utm_source=x"), PAGED)
    assert key(scope(query=b"page=2"), PAGED) != key(scope(query=b"page=3"), PAGED)


def test_the_app_sees_only_the_named_params() -> None:
    result = keyed(scope(query=b"utm_source=x&page=2&fbclid=z"), PAGED)
    assert result.query_string is not None
    assert Request(scope(query=result.query_string)).query_params.multi_items() == [("page", "2")]


def test_the_filtered_query_keeps_repeats_blanks_and_escapes() -> None:
    result = keyed(scope(query=b"page=1&x=1&page=a%26b+c&page="), PAGED)
    assert result.query_string is not None
    seen = Request(scope(query=result.query_string)).query_params
    assert seen.getlist("page") == ["1", "a&b c", ""]
    assert "x" not in seen


def test_nothing_removed_leaves_the_request_alone() -> None:
    assert keyed(scope(query=b"page=2"), PAGED).query_string is None
    assert keyed(scope(query=b""), PAGED).query_string is None
    assert keyed(scope(query=b"utm=1&page=2"), POLICY).query_string is None  # no list: all params keyed


def test_everything_removed_gives_an_empty_query() -> None:
    assert keyed(scope(query=b"utm_source=x"), PAGED).query_string == b""


def test_an_empty_query_list_keys_no_params() -> None:
    none = Policy(ttl=60.0, query=())
    assert key(scope(query=b""), none) == key(scope(query=b"a=1&b=2"), none)
    assert keyed(scope(query=b"a=1"), none).query_string == b""


# -- vary: headers and cookies ----------------------------------------------------------------


def test_a_varied_header_changes_the_key() -> None:
    policy = vary("Accept-Language")
    fr = scope(headers=[(b"accept-language", b"fr")])
    de = scope(headers=[(b"accept-language", b"de")])
    assert key(fr, policy) != key(de, policy)
    assert key(fr, policy) != key(scope(), policy)
    assert key(fr, policy) == key(scope(headers=[(b"accept-language", b"fr")]), policy)


def test_headers_not_named_in_vary_do_not_change_the_key() -> None:
    policy = vary("accept-language")
    plain = scope(headers=[(b"accept-language", b"fr")])
    noisy = scope(headers=[(b"accept-language", b"fr"), (b"user-agent", b"curl"), (b"x-request-id", b"42"),
                           (b"cookie", b"tracking=1")])
    assert key(plain, policy) == key(noisy, policy)
    assert key(scope(headers=[(b"user-agent", b"a")])) == key(scope(headers=[(b"user-agent", b"b")]))


def test_a_repeated_varied_header_is_not_confused_with_one_joined_value() -> None:
    # Starlette's request.headers[...] is the first value; "fr" then "de" is not "fr, de".
    policy = vary("x-variant")
    two = scope(headers=[(b"x-variant", b"fr"), (b"x-variant", b"de")])
    joined = scope(headers=[(b"x-variant", b"fr, de")])
    assert key(two, policy) != key(joined, policy)


def test_a_varied_cookie_changes_the_key_other_cookies_do_not() -> None:
    policy = vary("cookie:lang")
    fr = scope(headers=[(b"cookie", b"lang=fr; tracking=1")])
    assert key(fr, policy) == key(scope(headers=[(b"cookie", b"tracking=2; lang=fr")]), policy)
    assert key(fr, policy) != key(scope(headers=[(b"cookie", b"lang=de; tracking=1")]), policy)
    assert key(fr, policy) != key(scope(headers=[(b"cookie", b"tracking=1")]), policy)
    # The cookie name is exact: LANG is another cookie.
    assert key(scope(headers=[(b"cookie", b"LANG=fr")]), policy) == key(scope(headers=[(b"cookie", b"x=1")]), policy)


def test_a_varied_cookie_in_a_second_cookie_header_is_not_keyed_as_if_the_app_saw_it() -> None:
    # Starlette before Kludex/starlette#3029 (which cachemw's starlette>=0.40 allows) parses
    # only the first Cookie header: with lang=fr in a second one the app renders the default
    # language, which must not land under the key of lang=fr. Newer Starlette merges them;
    # keying each header apart is right for both (at worst one more entry).
    policy = vary("cookie:lang")
    second = scope(headers=[(b"cookie", b"x=1"), (b"cookie", b"lang=fr")])
    assert key(second, policy) != key(scope(headers=[(b"cookie", b"lang=fr")]), policy)
    assert key(second, policy) != key(scope(headers=[(b"cookie", b"x=1; lang=fr")]), policy)


def test_cookies_do_not_change_the_key_without_a_cookie_in_vary() -> None:
    assert key(scope(headers=[(b"cookie", b"lang=fr")])) == key(scope(headers=[(b"cookie", b"lang=de")]))


def test_identity_changes_the_key() -> None:
    s = scope()
    assert key(s, identity="c:alice") != key(s, identity="c:bob")
    assert key(s, identity="c:alice") != key(s)
    assert key(s, identity="c:alice") == key(scope(), identity="c:alice")
    assert "alice" not in key(s, identity="c:alice")


# -- bounded and robust ---------------------------------------------------------------------


def test_a_huge_path_and_query_give_a_short_key() -> None:
    huge = scope(path="/products/" + "x" * 10_000, query=b"q=" + b"y" * 10_000)
    k = key(huge)
    assert KEY_SHAPE.match(k)
    assert len(k) == len(key(scope()))
    assert len(k) < 100
    assert k != key(scope(path="/products/" + "x" * 10_000, query=b"q=" + b"y" * 9_999))


@pytest.mark.parametrize(
    "path",
    [
        "/products/\udcff",  # a surrogate escape, as from raw bytes decoded with surrogateescape
        "/products/\ud800x",  # a lone high surrogate
        "/products/\x00\x1b[31m\u202e",
        "/products/\U0001f600/é/日本",
        "/products/'\"\\",
    ],
)
def test_odd_paths_give_a_key(path: str) -> None:
    k = key(scope(path=path, query="q=\udcff&é=\x00".encode("utf-8", "surrogatepass")))
    assert KEY_SHAPE.match(k)
    assert k != key(scope(path="/products/"))


def test_surrogates_do_not_collide_with_their_escaped_spelling() -> None:
    assert key(scope(path="/products/\udcff")) != key(scope(path="/products/\\udcff"))


def test_non_utf8_query_bytes_and_header_bytes_give_a_key() -> None:
    s = scope(query=b"q=%ff%fe&\xff=\xfe", headers=[(b"accept-language", b"\xff\x00"), (b"cookie", b"lang=\xe9")])
    assert KEY_SHAPE.match(key(s, vary("accept-language", "cookie:lang")))


# -- SessionIdentity --------------------------------------------------------------------------


def identity_of(headers: list[tuple[bytes, bytes]], cookie_name: str = "session") -> str | None:
    return SessionIdentity(cookie_name)(RequestHeaders(scope(headers=headers)))


def test_the_session_cookie_is_the_identity() -> None:
    assert identity_of([(b"cookie", b"session=abc")]) == "c:abc"


@pytest.mark.parametrize(
    "cookie",
    [
        b"a=1; session=abc; b=2",
        b"theme=dark;session=abc",
        b"xsession=1; session=abc",
        b"session_id=9; session=abc",
        b" session = abc ",  # Starlette strips the spaces: the app reads this session
        b'session="abc"',
    ],
)
def test_the_session_cookie_is_found_among_others(cookie: bytes) -> None:
    assert identity_of([(b"cookie", cookie)]) == "c:abc"
    assert Request(scope(headers=[(b"cookie", cookie)])).cookies["session"] == "abc"


def test_a_session_cookie_in_a_second_cookie_header_is_found() -> None:
    assert identity_of([(b"cookie", b"a=1"), (b"cookie", b"session=abc")]) == "c:abc"


@pytest.mark.parametrize(
    "cookie", [b"xsession=1", b"session_id=1", b"mysession=1; sessions=2", b"Session=1", b"session="]
)
def test_a_cookie_that_merely_contains_session_is_not_the_session(cookie: bytes) -> None:
    assert identity_of([(b"cookie", cookie)]) is None


def test_authorization_is_the_fallback() -> None:
    assert identity_of([(b"authorization", b"Bearer t0ken")]) == "a:Bearer t0ken"
    assert identity_of([(b"cookie", b"xsession=1"), (b"authorization", b"Bearer t0ken")]) == "a:Bearer t0ken"
    # Both present: keyed on both, since cachemw cannot know which one the app authenticates with.
    assert identity_of([(b"cookie", b"session=abc"), (b"authorization", b"Bearer t0ken")]) == "c:abc\na:Bearer t0ken"


def test_no_session_cookie_and_no_authorization_is_no_identity() -> None:
    assert identity_of([]) is None
    assert identity_of([(b"cookie", b"theme=dark")]) is None
    assert identity_of([(b"authorization", b"")]) is None


def test_the_session_cookie_name_is_configurable() -> None:
    assert identity_of([(b"cookie", b"session=a; sid=b")], cookie_name="sid") == "c:b"
    assert identity_of([(b"cookie", b"session=a")], cookie_name="sid") is None


def test_different_sessions_are_different_identities() -> None:
    alice = identity_of([(b"cookie", b"session=alice")])
    bob = identity_of([(b"cookie", b"session=bob")])
    assert alice != bob
    assert key(scope(), identity=alice) != key(scope(), identity=bob)


# -- RequestHeaders ---------------------------------------------------------------------------


def test_request_headers_join_repeats_and_parse_cookies_once() -> None:
    headers = RequestHeaders(scope(headers=[(b"accept", b"a"), (b"accept", b"b"),
                                            (b"cookie", b"x=1"), (b"cookie", b"y=2")]))
    assert headers.get(b"accept") == b"a, b"
    assert headers.get(b"cookie") == b"x=1; y=2"
    assert headers.cookie("y") == "2"
    assert headers.cookie("z") is None
    assert headers.get(b"missing") is None
    assert RequestHeaders(scope()).cookie("x") is None


# -- route_path mirrors Starlette -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "root_path"),
    [
        ("/", ""),
        ("/items", ""),
        ("/api/items", "/api"),
        ("/api", "/api"),
        ("/api/", "/api"),
        ("/apix/items", "/api"),  # a prefix that is not a path segment
        ("/items", "/api"),  # a root_path the path does not start with (old servers strip it)
        ("/api/api/items", "/api"),
        ("/api/v1/items", "/api/v1"),
        ("", ""),
        ("/", "/"),
        ("//items", "/"),
        ("/a", "/a/"),
        ("/a/", "/a/"),
        ("/é/items", "/é"),
    ],
)
def test_route_path_mirrors_starlette(path: str, root_path: str) -> None:
    s = {"type": "http", "path": path, "root_path": root_path}
    assert route_path(s) == get_route_path(s)


def test_route_path_without_root_path_in_the_scope() -> None:
    s = {"type": "http", "path": "/items"}
    assert route_path(s) == get_route_path(s) == "/items"


_VARYING = policy_from_fields({"ttl": 60, "vary": ["accept-language", "cookie:lang"], "query": ["page"]},
                              base=Policy(), where="test")


@pytest.mark.parametrize("variant", [
    scope(),
    scope(query=b"page=2"),
    scope(query=b"page=2&utm=x"),
    scope(host=b"other.example"),
    scope(scheme="https"),
    scope(root_path="/app"),
    scope(headers=[(b"accept-language", b"fr")]),
    scope(headers=[(b"accept-language", b"de")]),
    scope(headers=[(b"cookie", b"lang=fr")]),
    scope(headers=[(b"cookie", b"lang=de; other=1")]),
    scope(host=None),
])
def test_the_key_memo_always_answers_what_make_key_would(variant: dict[str, Any]) -> None:
    from cachemw.core.keys import KeyCache

    memo = KeyCache(size=4)
    for policy in (Policy(ttl=60), _VARYING):
        for identity in (None, "c:alice"):
            expected = make_key(variant, RequestHeaders(variant), policy, "/products/<id>", "p", identity)
            for _ in range(2):  # the second answer comes from the memo
                assert memo.key(variant, RequestHeaders(variant), policy, "/products/<id>", "p", identity) == expected


@given(st.lists(st.sampled_from([*'ab=;" \\\t,', "\\042", "é"]), max_size=20).map("".join))
def test_the_cores_cookie_parser_reads_a_cookie_header_as_starlette_does(header: str) -> None:
    from starlette.requests import cookie_parser as starlettes

    from cachemw.core.keys import cookie_parser

    assert cookie_parser(header) == starlettes(header)
