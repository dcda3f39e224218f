"""Durations, presets, field validation and the freshness decision: pure, no clock, no I/O."""

from __future__ import annotations

import math

import pytest

from cachemw.core.policy import (
    DEFAULT_STATUSES,
    PRESETS,
    ConfigError,
    Freshness,
    Policy,
    freshness,
    parse_duration,
    policy_from_fields,
)

WHERE = 'cachemw.toml: rule 2 (route "/products/{id}")'

# -- parse_duration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("6h", 21_600.0),
        ("2d", 172_800.0),
        ("250ms", 0.25),
        ("1.5h", 5_400.0),
        ("0s", 0.0),
        ("45", 45.0),
        (" 5m ", 300.0),
        (0, 0.0),
        (30, 30.0),
        (2.5, 2.5),
        (0.05, 0.05),
    ],
)
def test_parse_duration_accepts_units_and_plain_seconds(value: object, seconds: float) -> None:
    parsed = parse_duration(value)
    assert parsed == pytest.approx(seconds)
    assert type(parsed) is float


@pytest.mark.parametrize(
    "value",
    [
        "5x",
        "",
        "   ",
        "-1",
        "-5m",
        "5 m s",
        "5mm",
        "m",
        "five minutes",
        "1e3",
        "inf",
        "nan",
        pytest.param("9" * 400, id="400 nines"),  # would overflow to an infinite duration
        -1,
        -0.5,
        True,
        False,
        None,
        math.nan,
        math.inf,
        -math.inf,
        pytest.param(10**400, id="10**400"),  # too large for a float
        [5],
    ],
)
def test_parse_duration_rejects_what_is_not_a_duration(value: object) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(value)


def test_parse_duration_error_shows_the_value_and_the_expected_forms() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration("5x")
    message = str(info.value)
    assert "'5x'" in message
    assert '"5m"' in message


# -- presets ----------------------------------------------------------------------------------


def test_realtime_preset_is_never_served_from_cache() -> None:
    realtime = PRESETS["realtime"]
    assert not realtime.cacheable
    assert realtime.usable_for == 0
    assert freshness(1000.0, realtime, now=1000.0) is Freshness.EXPIRED


@pytest.mark.parametrize(
    ("name", "at_least", "below"),
    [("minutes", 60, 3600), ("hours", 3600, 86_400), ("days", 86_400, math.inf)],
)
def test_cacheable_presets_are_fresh_for_their_named_scale(name: str, at_least: float, below: float) -> None:
    policy = PRESETS[name]
    assert policy.cacheable
    assert at_least <= policy.ttl < below
    assert policy.preset == name
    # Every preset serves stale while refreshing, and survives an origin outage for a while.
    assert policy.stale_while_revalidate > 0
    assert policy.stale_if_error > 0
    assert not policy.private
    assert policy.statuses == DEFAULT_STATUSES


def test_presets_are_ordered_by_how_stale_they_may_be() -> None:
    assert PRESETS["minutes"].ttl < PRESETS["hours"].ttl < PRESETS["days"].ttl


def test_default_policy_caches_nothing_and_keys_on_every_query_param() -> None:
    policy = Policy()
    assert not policy.cacheable
    assert policy.query is None
    assert policy.vary == ()
    assert 200 in policy.statuses
    assert 500 not in policy.statuses


# -- policy_from_fields -----------------------------------------------------------------------

DURATION_FIELDS = ["ttl", "stale_while_revalidate", "stale_if_error", "sync", "origin_timeout"]


@pytest.mark.parametrize("name", DURATION_FIELDS)
@pytest.mark.parametrize(("raw", "seconds"), [("5m", 300.0), (90, 90.0), ("250ms", 0.25)])
def test_duration_fields_are_parsed(name: str, raw: object, seconds: float) -> None:
    policy = policy_from_fields({name: raw}, base=Policy(), where=WHERE)
    assert getattr(policy, name) == pytest.approx(seconds)


@pytest.mark.parametrize("name", DURATION_FIELDS)
@pytest.mark.parametrize("raw", ["5x", "-1", -1, True, "", None])
def test_bad_duration_fields_name_where_field_and_value(name: str, raw: object) -> None:
    with pytest.raises(ConfigError) as info:
        policy_from_fields({name: raw}, base=Policy(), where=WHERE)
    message = str(info.value)
    assert message.startswith(WHERE)
    assert repr(name) in message
    assert repr(raw) in message


def test_origin_timeout_must_be_more_than_zero() -> None:
    with pytest.raises(ConfigError, match=r"'origin_timeout'.*more than 0"):
        policy_from_fields({"origin_timeout": 0}, base=Policy(), where=WHERE)


def test_zero_ttl_and_sync_are_allowed() -> None:
    policy = policy_from_fields({"ttl": 0, "sync": "0s"}, base=PRESETS["minutes"], where=WHERE)
    assert not policy.cacheable
    assert policy.sync == 0


def test_fields_override_the_base_and_keep_the_rest() -> None:
    base = PRESETS["minutes"]
    policy = policy_from_fields({"ttl": "30s", "tags": ["product:{id}"]}, base=base, where=WHERE)
    assert policy.ttl == 30
    assert policy.tags == ("product:{id}",)
    assert policy.stale_while_revalidate == base.stale_while_revalidate
    assert policy.stale_if_error == base.stale_if_error
    assert policy.preset == "minutes"
    assert base.ttl == 120  # the preset itself is untouched


def test_no_fields_gives_the_base() -> None:
    assert policy_from_fields({}, base=PRESETS["hours"], where=WHERE) == PRESETS["hours"]


def test_vary_lowercases_header_names_and_splits_cookies() -> None:
    policy = policy_from_fields(
        {"vary": ["Accept-Language", " X-Tenant ", "cookie:theme"]}, base=Policy(), where=WHERE
    )
    assert policy.vary == ("accept-language", "x-tenant", "cookie:theme")
    assert policy.vary_headers == ("accept-language", "x-tenant")
    assert policy.vary_cookies == ("theme",)


def test_vary_keeps_the_case_of_cookie_names() -> None:
    # Cookie names are case-sensitive: lowercasing "SessionId" would key on a cookie
    # the browser never sends, and every user would share one entry.
    policy = policy_from_fields({"vary": ["Cookie:SessionId"]}, base=Policy(), where=WHERE)
    assert policy.vary == ("cookie:SessionId",)
    assert policy.vary_cookies == ("SessionId",)
    assert policy.vary_headers == ()


@pytest.mark.parametrize(
    "raw",
    [
        "accept-language",  # a string, not a list
        ["accept language"],
        ["x:y"],
        ["cookie:"],
        ["cookie:a b"],
        [""],
        ["  "],
        [1],
        {"accept": True},
    ],
)
def test_bad_vary_is_rejected(raw: object) -> None:
    with pytest.raises(ConfigError) as info:
        policy_from_fields({"vary": raw}, base=Policy(), where=WHERE)
    message = str(info.value)
    assert message.startswith(WHERE)
    assert "'vary'" in message


@pytest.mark.parametrize("name", ["query", "tags", "invalidates"])
def test_string_list_fields_keep_order_and_case(name: str) -> None:
    policy = policy_from_fields({name: ["Page", "sort", "product:{id}"]}, base=Policy(), where=WHERE)
    assert getattr(policy, name) == ("Page", "sort", "product:{id}")


def test_empty_query_list_keys_on_no_query_param() -> None:
    assert policy_from_fields({"query": []}, base=Policy(), where=WHERE).query == ()


@pytest.mark.parametrize("name", ["query", "tags", "invalidates"])
@pytest.mark.parametrize("raw", ["product:{id}", [1], [""], ["ok", None], 3, None])
def test_bad_string_list_fields_are_rejected(name: str, raw: object) -> None:
    with pytest.raises(ConfigError) as info:
        policy_from_fields({name: raw}, base=Policy(), where=WHERE)
    message = str(info.value)
    assert message.startswith(WHERE)
    assert repr(name) in message
    assert repr(raw) in message


@pytest.mark.parametrize("raw", [True, False])
def test_private_is_a_bool(raw: bool) -> None:
    assert policy_from_fields({"private": raw}, base=Policy(), where=WHERE).private is raw


@pytest.mark.parametrize("raw", ["yes", "true", 1, 0, None])
def test_private_rejects_anything_but_a_bool(raw: object) -> None:
    with pytest.raises(ConfigError, match=r"'private': .* is not true or false") as info:
        policy_from_fields({"private": raw}, base=Policy(), where=WHERE)
    assert repr(raw) in str(info.value)


@pytest.mark.parametrize("raw", [0, 1, 10 * 1024 * 1024])
def test_max_body_is_a_whole_number_of_bytes(raw: int) -> None:
    assert policy_from_fields({"max_body": raw}, base=Policy(), where=WHERE).max_body == raw


@pytest.mark.parametrize("raw", [-1, 1.5, "1MB", "1024", True, None])
def test_bad_max_body_is_rejected(raw: object) -> None:
    with pytest.raises(ConfigError) as info:
        policy_from_fields({"max_body": raw}, base=Policy(), where=WHERE)
    message = str(info.value)
    assert message.startswith(WHERE)
    assert "'max_body'" in message
    assert repr(raw) in message


def test_statuses_become_a_set() -> None:
    policy = policy_from_fields({"statuses": [200, 404, 200, 100, 599]}, base=Policy(), where=WHERE)
    assert policy.statuses == frozenset({100, 200, 404, 599})


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ([99], "99"),
        ([600], "600"),
        ([200, "404"], "'404'"),
        ([True], "True"),
        ([200.0], "200.0"),
        (200, "200"),
        ("200", "'200'"),
    ],
)
def test_bad_statuses_are_rejected(raw: object, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy_from_fields({"statuses": raw}, base=Policy(), where=WHERE)
    message = str(info.value)
    assert message.startswith(WHERE)
    assert "'statuses'" in message
    assert shown in message


@pytest.mark.parametrize("name", ["tll", "preset", "policy", "Vary"])
def test_unknown_field_is_rejected_and_known_fields_listed(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy_from_fields({"ttl": "5m", name: "x"}, base=Policy(), where=WHERE)
    message = str(info.value)
    assert message.startswith(WHERE)
    assert f"unknown field {name!r}" in message
    assert "stale_while_revalidate" in message


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# -- freshness --------------------------------------------------------------------------------

STORED = 1_000.0
POLICY = Policy(ttl=60.0, stale_while_revalidate=30.0, stale_if_error=300.0)


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (0.0, Freshness.FRESH),
        (59.999, Freshness.FRESH),
        (60.0, Freshness.STALE),  # ttl is exclusive: at 60 s a 60 s entry is no longer fresh
        (89.999, Freshness.STALE),
        (90.0, Freshness.STALE_IF_ERROR),
        (359.999, Freshness.STALE_IF_ERROR),
        (360.0, Freshness.EXPIRED),  # stale_if_error counts from the end of ttl
        (10_000.0, Freshness.EXPIRED),
    ],
)
def test_freshness_boundaries(age: float, expected: Freshness) -> None:
    assert freshness(STORED, POLICY, now=STORED + age) is expected


@pytest.mark.parametrize(
    ("age", "expected"),
    [(59.0, Freshness.FRESH), (60.0, Freshness.STALE), (359.0, Freshness.STALE), (360.0, Freshness.EXPIRED)],
)
def test_stale_if_error_shorter_than_revalidate_window_adds_nothing(age: float, expected: Freshness) -> None:
    policy = Policy(ttl=60.0, stale_while_revalidate=300.0, stale_if_error=30.0)
    assert freshness(STORED, policy, now=STORED + age) is expected


@pytest.mark.parametrize(("age", "expected"), [(59.0, Freshness.FRESH), (60.0, Freshness.EXPIRED)])
def test_no_stale_windows_means_expired_right_after_ttl(age: float, expected: Freshness) -> None:
    assert freshness(STORED, Policy(ttl=60.0), now=STORED + age) is expected


@pytest.mark.parametrize("name", ["minutes", "hours", "days"])
def test_freshness_agrees_with_usable_for(name: str) -> None:
    policy = PRESETS[name]
    assert freshness(STORED, policy, now=STORED + policy.usable_for - 1) is not Freshness.EXPIRED
    assert freshness(STORED, policy, now=STORED + policy.usable_for) is Freshness.EXPIRED


def test_freshness_uses_the_given_now_only() -> None:
    # Same inputs, same answer, whatever the wall clock says.
    long_ago = 10.0
    assert freshness(long_ago, POLICY, now=long_ago + 1) is Freshness.FRESH
    assert freshness(long_ago, POLICY, now=long_ago + 1) is Freshness.FRESH
