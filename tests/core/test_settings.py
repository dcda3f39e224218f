"""Loading settings from cachemw.toml / pyproject.toml: values, precedence, and errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemw.core.policy import PRESETS, ConfigError, Policy
from cachemw.core.settings import FileRule, Settings, load_settings

NO_ENV: dict[str, str] = {}

FULL = """
[cachemw]
redis_url = "redis://cache.internal:6379/2"
key_prefix = "shop:v1"
store_timeout = "20ms"
memory_max_bytes = 1048576
session_cookie = "sid"

[cachemw.policies.inbox]
ttl = "5m"
stale_while_revalidate = "1h"
private = true
vary = ["Accept-Language"]

[[cachemw.rules]]
route = "/cart"
policy = "realtime"
invalidates = ["cart"]

[[cachemw.rules]]
route = "/inbox/{user}"
policy = "inbox"
tags = ["inbox:{user}"]

[[cachemw.rules]]
route = "/stats/*"
policy = "hours"
stale_if_error = "2d"

[[cachemw.rules]]
route = "/products/{id:int}"
ttl = 90
query = ["lang"]
statuses = [200]
"""


def write(directory: Path, text: str, name: str = "cachemw.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(directory: Path, text: str, name: str = "cachemw.toml") -> tuple[str, str]:
    """The ConfigError message for ``text``, and the file name it must mention."""
    path = write(directory, text, name)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=NO_ENV)
    return str(info.value), str(path)


# -- valid files ------------------------------------------------------------------------------


def test_full_cachemw_toml(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    settings = load_settings(path, environ=NO_ENV)

    assert settings.redis_url == "redis://cache.internal:6379/2"
    assert settings.key_prefix == "shop:v1"
    assert settings.store_timeout == pytest.approx(0.02)
    assert settings.memory_max_bytes == 1_048_576
    assert settings.session_cookie == "sid"
    assert settings.source == str(path)

    assert set(settings.presets) == set(PRESETS) | {"inbox"}
    inbox = settings.presets["inbox"]
    assert (inbox.ttl, inbox.stale_while_revalidate, inbox.private) == (300, 3600, True)
    assert inbox.vary == ("accept-language",)
    assert inbox.preset == "inbox"

    assert [(r.index, r.route) for r in settings.rules] == [
        (1, "/cart"),
        (2, "/inbox/{user}"),
        (3, "/stats/*"),
        (4, "/products/{id:int}"),
    ]
    cart, inbox_rule, stats, product = settings.rules
    assert not cart.policy.cacheable
    assert cart.policy.invalidates == ("cart",)

    assert inbox_rule.policy.ttl == 300
    assert inbox_rule.policy.private
    assert inbox_rule.policy.tags == ("inbox:{user}",)

    # Rule fields override the preset; the rest of the preset stays.
    assert stats.policy.stale_if_error == 2 * 86_400
    assert stats.policy.ttl == PRESETS["hours"].ttl
    assert stats.policy.stale_while_revalidate == PRESETS["hours"].stale_while_revalidate
    assert stats.is_glob
    assert not product.is_glob

    # No preset named: fields on top of "no caching".
    assert product.policy.ttl == 90
    assert product.policy.stale_while_revalidate == 0
    assert product.policy.query == ("lang",)
    assert product.policy.statuses == frozenset({200})
    assert product.policy.preset is None

    assert str(path) in product.source
    assert "rule 4" in product.source


def test_pyproject_tool_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[build-system]
requires = ["setuptools"]

[project]
name = "shop"
version = "1.0"

[tool.ruff]
line-length = 100

[tool.cachemw]
key_prefix = "shop"

[tool.cachemw.policies.catalogue]
ttl = "10m"

[[tool.cachemw.rules]]
route = "/products/{id}"
policy = "catalogue"

[[tool.cachemw.rules]]
route = "/reports/*"
policy = "days"
""",
        name="pyproject.toml",
    )
    settings = load_settings(path, environ=NO_ENV)
    assert settings.key_prefix == "shop"
    assert settings.redis_url is None
    assert settings.source == str(path)
    assert [r.route for r in settings.rules] == ["/products/{id}", "/reports/*"]
    assert settings.rules[0].policy.ttl == 600
    assert settings.rules[1].policy == PRESETS["days"]


def test_pyproject_without_tool_table_is_an_error(tmp_path: Path) -> None:
    message, file = load_error(tmp_path, '[project]\nname = "shop"\n', name="pyproject.toml")
    assert file in message
    assert "[tool.cachemw]" in message


def test_a_path_string_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, '[cachemw]\nkey_prefix = "x"\n')
    assert load_settings(str(path), environ=NO_ENV).key_prefix == "x"


def test_empty_cachemw_table_gives_defaults_with_source(tmp_path: Path) -> None:
    path = write(tmp_path, "[cachemw]\n")
    settings = load_settings(path, environ=NO_ENV)
    assert settings == Settings(source=str(path))


def test_no_file_gives_the_embedded_defaults() -> None:
    settings = load_settings(None, environ=NO_ENV)
    assert settings == Settings()
    assert settings.redis_url is None  # the in-process memory store
    assert settings.rules == ()
    assert dict(settings.presets) == dict(PRESETS)
    assert settings.source is None


# -- environment ------------------------------------------------------------------------------


def test_env_sets_redis_url_without_a_file() -> None:
    settings = load_settings(None, environ={"CACHEMW_REDIS_URL": "redis://env-host:6379/0"})
    assert settings.redis_url == "redis://env-host:6379/0"


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    settings = load_settings(path, environ={"CACHEMW_REDIS_URL": "rediss://prod:6380/1"})
    assert settings.redis_url == "rediss://prod:6380/1"
    assert settings.key_prefix == "shop:v1"  # everything else from the file


def test_empty_env_value_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    assert load_settings(path, environ={"CACHEMW_REDIS_URL": ""}).redis_url == "redis://cache.internal:6379/2"


def test_env_redis_url_is_validated_like_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={"CACHEMW_REDIS_URL": "localhost:6379"})
    message = str(info.value)
    assert "CACHEMW_REDIS_URL" in message
    assert "'localhost:6379'" in message


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEMW_REDIS_URL", "redis://from-os-environ:6379/0")
    assert load_settings(None).redis_url == "redis://from-os-environ:6379/0"
    monkeypatch.delenv("CACHEMW_REDIS_URL")
    assert load_settings(None).redis_url is None


# -- custom policies --------------------------------------------------------------------------


def test_custom_policy_replaces_a_builtin_completely(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[cachemw.policies.minutes]
ttl = "30s"

[[cachemw.rules]]
route = "/inbox"
policy = "minutes"
""",
    )
    settings = load_settings(path, environ=NO_ENV)
    minutes = settings.presets["minutes"]
    # Nothing inherited from the built-in "minutes" (which serves stale for 10 minutes).
    assert minutes == Policy(ttl=30.0)
    assert minutes.stale_while_revalidate == 0
    assert minutes.stale_if_error == 0
    assert minutes.preset == "minutes"
    assert settings.rules[0].policy == minutes
    # Other built-ins are still there, and the module-level presets are untouched.
    assert settings.presets["hours"] == PRESETS["hours"]
    assert PRESETS["minutes"].ttl == 120


def test_custom_policy_does_not_leak_into_other_settings(tmp_path: Path) -> None:
    write(tmp_path, '[cachemw.policies.minutes]\nttl = "30s"\n')
    assert load_settings(None, environ=NO_ENV).presets["minutes"] == PRESETS["minutes"]


# -- errors: every message names the file, and the rule and field when there is one -----------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such file") as info:
        load_settings(path, environ=NO_ENV)
    assert str(path) in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read") as info:
        load_settings(tmp_path, environ=NO_ENV)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "[cachemw\nredis_url = 'x'\n",
        "[cachemw]\nttl = 5m\n",
        "[cachemw]\nkey_prefix = 'a'\nkey_prefix = 'b'\n",
    ],
)
def test_malformed_toml(tmp_path: Path, text: str) -> None:
    message, file = load_error(tmp_path, text)
    assert file in message
    assert "not valid TOML" in message
    assert "line" in message  # tomllib's position, so the user can find it


@pytest.mark.parametrize("data", [b"\xff\xfe[\x00c\x00", "[cachemw]\nkey_prefix = 'caf\u00e9'\n".encode("latin-1")])
def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path, data: bytes) -> None:
    # A UTF-16 or latin-1 file: tomllib lets the UnicodeDecodeError through.
    path = tmp_path / "cachemw.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=r"cachemw\.toml: not valid TOML: not UTF-8 text"):
        load_settings(path, environ=NO_ENV)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_missing_cachemw_table(tmp_path: Path, text: str) -> None:
    message, file = load_error(tmp_path, text)
    assert file in message
    assert "[cachemw]" in message


def test_cachemw_must_be_a_table(tmp_path: Path) -> None:
    message, file = load_error(tmp_path, 'cachemw = "on"\n')
    assert file in message
    assert "must be a table" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message, file = load_error(tmp_path, "[server]\nport = 80\n\n[cachemw]\n")
    assert file in message
    assert "'server'" in message


def test_unknown_setting_in_cachemw_table(tmp_path: Path) -> None:
    message, file = load_error(tmp_path, '[cachemw]\nredis_uri = "redis://x"\n')
    assert file in message
    assert "'redis_uri'" in message
    assert "redis_url" in message  # the known fields are listed


@pytest.mark.parametrize(
    ("field", "toml_value", "shown"),
    [
        ("redis_url", '"http://cache:6379"', "'http://cache:6379'"),
        ("redis_url", '"localhost:6379"', "'localhost:6379'"),
        ("redis_url", "6379", "6379"),
        ("key_prefix", '"has space"', "'has space'"),
        ("key_prefix", '"{tag}"', "'{tag}'"),  # braces would turn the prefix into a Cluster hash tag
        ("key_prefix", '""', "''"),
        ("key_prefix", '"' + "p" * 65 + '"', "p" * 65),
        ("store_timeout", '"0s"', "'0s'"),
        ("store_timeout", '"11s"', "'11s'"),
        ("store_timeout", '"fast"', "'fast'"),
        ("memory_max_bytes", "100", "100"),
        ("memory_max_bytes", '"64MB"', "'64MB'"),
        ("memory_max_bytes", "true", "True"),
        ("session_cookie", '"my session"', "'my session'"),
        ("session_cookie", "1", "1"),
        ("metrics_interval", '"-1s"', "'-1s'"),
        ("metrics_interval", '"2h"', "'2h'"),
        ("metrics_interval", '"often"', "'often'"),
        ("store_grace", '"-50ms"', "'-50ms'"),
        ("store_grace", '"11s"', "'11s'"),
    ],
)
def test_bad_setting_names_file_field_and_value(
    tmp_path: Path, field: str, toml_value: str, shown: str
) -> None:
    message, file = load_error(tmp_path, f"[cachemw]\n{field} = {toml_value}\n")
    assert file in message
    assert repr(field) in message
    assert shown in message
    assert "expected" in message


@pytest.mark.parametrize(("toml_value", "seconds"), [("0", 0.0), ('"5s"', 5.0), ('"1h"', 3600.0)])
def test_metrics_interval_takes_zero_for_off_and_durations(tmp_path: Path, toml_value: str, seconds: float) -> None:
    path = write(tmp_path, f"[cachemw]\nmetrics_interval = {toml_value}\n")
    assert load_settings(path, environ=NO_ENV).metrics_interval == seconds


@pytest.mark.parametrize(("toml_value", "seconds"), [(None, None), ("0", 0.0), ('"100ms"', 0.1)])
def test_store_grace_is_one_more_budget_unless_set(tmp_path: Path, toml_value: str | None,
                                                   seconds: float | None) -> None:
    path = write(tmp_path, "[cachemw]\n" + ("" if toml_value is None else f"store_grace = {toml_value}\n"))
    assert load_settings(path, environ=NO_ENV).store_grace == seconds  # None: the store's default, one budget


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h:6380", "unix:///run/redis.sock"])
def test_good_redis_urls(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f'[cachemw]\nredis_url = "{url}"\n')
    assert load_settings(path, environ=NO_ENV).redis_url == url


RULES_BEFORE = """
[cachemw]

[[cachemw.rules]]
route = "/fine"
policy = "minutes"

"""


def test_unknown_field_in_a_rule(tmp_path: Path) -> None:
    message, file = load_error(tmp_path, RULES_BEFORE + '[[cachemw.rules]]\nroute = "/b"\ntll = "5m"\n')
    assert file in message
    assert "rule 2" in message
    assert "'/b'" in message
    assert "'tll'" in message


def test_bad_duration_in_a_rule(tmp_path: Path) -> None:
    message, file = load_error(
        tmp_path, RULES_BEFORE + '[[cachemw.rules]]\nroute = "/items/{id}"\nttl = "5 mins"\n'
    )
    assert file in message
    assert "rule 2" in message
    assert "'/items/{id}'" in message
    assert "'ttl'" in message
    assert "'5 mins'" in message


def test_unknown_preset_in_a_rule(tmp_path: Path) -> None:
    message, file = load_error(
        tmp_path, RULES_BEFORE + '[[cachemw.rules]]\nroute = "/c"\npolicy = "minute"\n'
    )
    assert file in message
    assert "rule 2" in message
    assert "'/c'" in message
    assert "'policy'" in message
    assert "'minute'" in message
    assert "'minutes'" in message  # the known names are listed


def test_preset_defined_later_in_the_file_is_known(tmp_path: Path) -> None:
    # TOML tables are not order-sensitive: a policy may be defined after the rule using it.
    path = write(
        tmp_path, '[[cachemw.rules]]\nroute = "/a"\npolicy = "mine"\n\n[cachemw.policies.mine]\nttl = 7\n'
    )
    assert load_settings(path, environ=NO_ENV).rules[0].policy.ttl == 7


@pytest.mark.parametrize(
    ("line", "shown"), [("", "None"), ('route = "items"', "'items'"), ("route = 5", "5")]
)
def test_rule_route_must_be_a_path(tmp_path: Path, line: str, shown: str) -> None:
    message, file = load_error(tmp_path, RULES_BEFORE + f"[[cachemw.rules]]\n{line}\nttl = 5\n")
    assert file in message
    assert "rule 2" in message
    assert "'route'" in message
    assert shown in message


def test_rules_must_be_an_array_of_tables(tmp_path: Path) -> None:
    message, file = load_error(tmp_path, '[cachemw.rules]\nroute = "/x"\n')
    assert file in message
    assert "'rules'" in message
    assert "array" in message


def test_a_rule_must_be_a_table(tmp_path: Path) -> None:
    message, file = load_error(tmp_path, '[cachemw]\nrules = ["/x"]\n')
    assert file in message
    assert "rule 1" in message


def test_bad_field_in_a_custom_policy(tmp_path: Path) -> None:
    message, file = load_error(tmp_path, '[cachemw.policies.slow]\nttl = "forever"\n')
    assert file in message
    assert "'slow'" in message
    assert "'ttl'" in message
    assert "'forever'" in message


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('[cachemw.policies."two words"]\nttl = 5\n', "'two words'"),
        ("[cachemw]\npolicies = 3\n", "policies"),
        ('[cachemw.policies]\nslow = "1h"\n', "'slow'"),
    ],
)
def test_bad_policies_table(tmp_path: Path, text: str, shown: str) -> None:
    message, file = load_error(tmp_path, text)
    assert file in message
    assert shown in message


@pytest.mark.parametrize(
    ("route", "is_glob"),
    [("/x", False), ("/items/{id:int}", False), ("/x/*", True), ("/v?/items", True), ("/[ab]/x", True)],
)
def test_file_rule_knows_a_glob(route: str, is_glob: bool) -> None:
    assert FileRule(index=1, route=route, policy=Policy(), source="cachemw.toml rule 1").is_glob is is_glob


def test_masked_url_hides_passwords_only() -> None:
    from cachemw.core.settings import masked_url

    assert masked_url("redis://user:sekret@h:1/0") == "redis://user:***@h:1/0"
    assert masked_url("rediss+sentinel://:pw@h:1,h2:2/svc") == "rediss+sentinel://:***@h:1,h2:2/svc"
    assert masked_url("unix:///tmp/r.sock?db=1&password=zz") == "unix:///tmp/r.sock?db=1&password=***"
    assert masked_url("rediss://h/0?ssl_password=zz&db=1") == "rediss://h/0?ssl_password=***&db=1"
    assert masked_url("redis://h:6379/0") == "redis://h:6379/0"
    assert masked_url("unix:///run/redis.sock") == "unix:///run/redis.sock"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis:/:sekret@h:6379", "redis:/***@h:6379"),  # one slash: urlsplit sees no user-info at all
        ("redis://:sek/ret@h/0", "redis://***@h/0"),  # an unescaped "/" in the password
        ("redis://:sekret@[::1:6379/0", "redis://***@[::1:6379/0"),  # urlsplit raises on it
        ("redis://sekret@h/0", "redis://***@h/0"),  # a password written where the user name goes
        ("redis://:sek@ret@h/0", "redis://:***@h/0"),
        ("http://u:sekret@h/", "http://u:***@h/"),
    ],
)
def test_masked_url_never_shows_a_password_of_a_broken_url(url: str, masked: str) -> None:
    from cachemw.core.settings import masked_url

    assert masked_url(url) == masked
    assert "sek" not in masked_url(url)


@pytest.mark.parametrize("where", ["file", "env"])
def test_a_url_with_a_wrong_scheme_is_refused_without_its_password(tmp_path: Path, where: str) -> None:
    url = "redis:/:sekret@cache.internal:6379/0"  # a slash short
    with pytest.raises(ConfigError) as info:
        if where == "file":
            load_settings(write(tmp_path, f'[cachemw]\nredis_url = "{url}"\n'), environ=NO_ENV)
        else:
            load_settings(None, environ={"CACHEMW_REDIS_URL": url})
    message = str(info.value)
    assert "'redis:/***@cache.internal:6379/0' is not valid; expected a URL starting with redis://" in message
    assert "sekret" not in message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://:sekret@h:6379/O", "the path names the database, a number (redis://host:6379/0), not 'O'"),
        ("rediss://h:6379/cache", "not 'cache'"),
        ("redis://:sekret@h:6379:0", "Port could not be cast to integer value"),
        ("redis://h:65536/0", "Port out of range"),
        ("redis://:sekret@[::1:6379/0", "Invalid IPv6 URL"),
    ],
)
def test_open_store_refuses_a_url_redis_py_would_misread(url: str, problem: str) -> None:
    # redis-py takes redis://h:6379/O as database 0 without a word; startup and `cachemw check` refuse it.
    from cachemw.store.opening import open_store

    with pytest.raises(ConfigError) as info:
        open_store(Settings(redis_url=url, source="shop.toml"))
    message = str(info.value)
    assert message.startswith("shop.toml: field 'redis_url' '")
    assert problem in message
    assert "sekret" not in message


@pytest.mark.parametrize("url", ["redis://h:6379/0", "redis://h:6379/", "redis://h", "rediss://h:6380/15",
                                 "unix:///run/redis.sock?db=3", "redis+cluster://h:1,h:2",
                                 "redis+sentinel://h:26379/mymaster/2"])
def test_open_store_takes_the_urls_it_documents(url: str) -> None:
    import anyio

    from cachemw.store.opening import open_store

    store = open_store(Settings(redis_url=url))
    anyio.run(store.aclose)


def test_open_store_is_startups_store_validation() -> None:
    from cachemw.store import MemoryStore
    from cachemw.store.opening import open_store

    assert isinstance(open_store(Settings()), MemoryStore)
    with pytest.raises(ConfigError) as info:
        open_store(Settings(redis_url="redis://:pw@host:6391:0", source="shop.toml"))
    message = str(info.value)
    assert message.startswith("shop.toml: field 'redis_url' 'redis://:***@host:6391:0': ")
    assert "pw@" not in message


def test_a_rule_that_could_never_cache_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "cachemw.toml"
    path.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/runs"\n')
    with pytest.raises(ConfigError, match=r"cachemw\.toml: rule 1 \(route '/runs'\): neither a 'policy' nor a 'ttl'"):
        load_settings(path)
    path.write_text('[cachemw]\n[[cachemw.rules]]\nroute = "/runs"\npolicy = "realtime"\n'
                    '[[cachemw.rules]]\nroute = "/orders"\ninvalidates = ["orders"]\n')
    assert [rule.route for rule in load_settings(path).rules] == ["/runs", "/orders"]
