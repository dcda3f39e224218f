"""Settings: the ``[cachemw]`` table of a TOML file, validated once, at startup.

Every error names the file, the rule and the field, and nothing is guessed: an
unknown key is an error, not a silent default.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cachemw.core.keys import CREDENTIAL_KINDS, credential_parts
from cachemw.core.policy import INVALIDATING_FIELDS, PRESETS, ConfigError, Policy, parse_duration, policy_from_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]


__all__ = ["FileRule", "Settings", "check_redis_url", "load_settings", "masked_url", "setting_expectations"]

REDIS_URL_ENV = "CACHEMW_REDIS_URL"
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
POLICY_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a preset's name, in [cachemw.policies.NAME] and @cache(NAME)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header or cookie name (RFC 9110 token)


@dataclass(frozen=True, slots=True)
class FileRule:
    """One ``[[cachemw.rules]]`` entry; its policy is resolved and validated at load time."""

    index: int  # 1-based, as a person counts rules in the file
    route: str
    policy: Policy
    source: str  # e.g. 'cachemw.toml rule 2'

    @property
    def is_glob(self) -> bool:
        return any(c in self.route for c in "*?[")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable outside the code; ``Settings()`` is the embedded default."""

    redis_url: str | None = None
    key_prefix: str = "cachemw"
    store_timeout: float = 0.05
    # How much longer a request-path store call waits for its reply when our own event loop ran late while
    # it waited (its budget spent by us, not by the store); None: one more store_timeout; 0: no grace.
    store_grace: float | None = None
    # Store calls after the response (fills, lock releases, refreshes, purges): retried within this deadline.
    background_timeout: float = 2.0
    memory_max_bytes: int = 64 * 1024 * 1024
    l1_max_bytes: int = 32 * 1024 * 1024  # the per-process L1 in front of Redis (rules with sync > 0)
    session_cookie: str = "session"
    # Headers ("x-api-key"), cookies ("cookie:NAME") and query parameters ("query:NAME") that identify a
    # user, beside the session cookie and Authorization: they keep a request off shared entries, and key
    # private ones.
    credentials: tuple[str, ...] = ()
    lock_timeout: float = 5.0  # how long one fill may hold a key's lock, and others wait for it
    queue_size: int = 10_000  # background jobs waiting at most; more are shed and counted
    queue_max_bytes: int = 8 * 1024 * 1024  # what queued and running jobs hold (a fill: its entry); more are shed
    concurrency: int = 32  # background jobs running at once
    refresh_concurrency: int = 16  # refreshes running at once, in a lane of their own
    grace_period: float = 10.0  # on shutdown, how long queued jobs may take to finish
    # Origin calls of cached routes at once in a process (0: unbounded); past it a request with a stale entry
    # gets the entry, the others wait origin_wait for a slot, then get a 503 with Retry-After: retry_after.
    origin_concurrency: int = 1024
    origin_wait: float = 5.0
    # A key whose response could not be stored passes to the app for this long, without a lock; 0: never.
    pass_ttl: float = 30.0
    retry_after: int = 1
    metrics_interval: float = 5.0  # how often each process writes its counters to Redis (0: never)
    # After the app's startup, gc.freeze(): full collections then skip what startup made (modules, routes,
    # the app), which keeps their pauses, and so the tail latency, short. Process-wide; false to leave it.
    gc_freeze: bool = True
    # Redis 6+ tells every server of a change to an entry key (client-side caching, broadcast mode), so L1
    # copies are evicted at once, not up to ``sync`` later; false: no tracking link, the ``sync`` bound alone.
    tracking: bool = True
    # Report the cache's metrics and background-work spans through OpenTelemetry (the ``otel`` extra), to the
    # app's global meter and tracer providers; ``cachemw.otel.instrument`` for providers of one's own.
    otel: bool = False
    presets: Mapping[str, Policy] = field(default_factory=lambda: dict(PRESETS))
    rules: tuple[FileRule, ...] = ()
    source: str | None = None  # the file these came from


# Bounded durations and counts: (lowest, highest) allowed.
_DURATION_SETTINGS = {"store_timeout": (0.0, 10.0), "background_timeout": (0.0, 300.0), "lock_timeout": (0.0, 300.0),
                      "grace_period": (0.0, 3600.0), "origin_wait": (0.0, 300.0)}
# 0 switches these off.
_OPTIONAL_DURATION_SETTINGS = {"metrics_interval": (0.0, 3600.0), "pass_ttl": (0.0, 3600.0), "store_grace": (0.0, 10.0)}
_COUNT_SETTINGS = {
    "memory_max_bytes": (1024, 2**40),
    "l1_max_bytes": (1024, 2**40),
    "queue_size": (1, 10_000_000),
    "queue_max_bytes": (1024, 2**40),
    "concurrency": (1, 10_000),
    "refresh_concurrency": (1, 10_000),
    "origin_concurrency": (0, 1_000_000),
    "retry_after": (0, 86400),
}
_BOOL_SETTINGS = {"gc_freeze", "tracking", "otel"}
_URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://", "redis+sentinel://",
                "rediss+sentinel://")
_SETTING_KEYS = {"redis_url", "key_prefix", "session_cookie", "credentials", *_DURATION_SETTINGS,
                 *_OPTIONAL_DURATION_SETTINGS, *_COUNT_SETTINGS, *_BOOL_SETTINGS}
_TOP_KEYS = _SETTING_KEYS | {"policies", "rules"}


def load_settings(path: str | os.PathLike[str] | None, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Read a ``cachemw.toml`` (``[cachemw]``) or ``pyproject.toml`` (``[tool.cachemw]``).

    ``None`` gives the defaults. ``CACHEMW_REDIS_URL`` overrides ``redis_url``.
    """
    env = os.environ if environ is None else environ
    settings = Settings() if path is None else _parse_file(Path(path))
    url = env.get(REDIS_URL_ENV)
    if url:
        _setting("redis_url", url, f"environment variable {REDIS_URL_ENV}")  # same checks as the file
        settings = replace(settings, redis_url=url)
    return settings


def _parse_file(path: Path) -> Settings:
    name = str(path)
    try:
        with path.open("rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib lets the decoding error through
        raise ConfigError(f"{name}: not valid TOML: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot be read: {exc}") from None

    if path.name == "pyproject.toml":
        table = document.get("tool", {}).get("cachemw")
        if table is None:
            raise ConfigError(f"{name}: has no [tool.cachemw] table")
        where = f"{name}: [tool.cachemw]"
    else:
        extra = sorted(set(document) - {"cachemw"})
        if extra:
            raise ConfigError(f"{name}: unexpected top-level key(s) {extra}; everything goes under [cachemw]")
        table = document.get("cachemw")
        if table is None:
            raise ConfigError(f"{name}: has no [cachemw] table")
        where = f"{name}: [cachemw]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    return settings_from_table(table, source=name, where=where)


def settings_from_table(table: Mapping[str, Any], *, source: str, where: str) -> Settings:
    unknown = sorted(set(table) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(_TOP_KEYS)}")
    values: dict[str, Any] = {"source": source}
    for key in _SETTING_KEYS & set(table):
        values[key] = _setting(key, table[key], where)
    presets = _presets(table.get("policies", {}), source)
    values["presets"] = presets
    values["rules"] = _rules(table.get("rules", []), presets, source)
    return Settings(**values)


_CREDENTIALS_EXPECTED = 'a list of header names ("x-api-key" or "header:x-api-key"), "cookie:NAME" and "query:NAME"'
_PREFIX_EXPECTED = "1-64 characters from A-Z a-z 0-9 _ . : -"
_COOKIE_EXPECTED = "a cookie name"
_URL_EXPECTED = "a URL starting with " + ", ".join(_URL_SCHEMES)


def setting_expectations() -> dict[str, str]:
    """What each top-level setting accepts, in the words of its validation error.

    The reference documentation is generated from this (``docs/_hooks/``), so the page and the checks
    cannot disagree: both read the same bounds.
    """
    expected: dict[str, str] = {"redis_url": _URL_EXPECTED, "key_prefix": _PREFIX_EXPECTED,
                                "session_cookie": _COOKIE_EXPECTED, "credentials": _CREDENTIALS_EXPECTED}
    expected.update(dict.fromkeys(_BOOL_SETTINGS, "true or false"))
    for key, bounds in _DURATION_SETTINGS.items():
        expected[key] = _duration_range(bounds, zero_is_never=False)
    for key, bounds in _OPTIONAL_DURATION_SETTINGS.items():
        expected[key] = _duration_range(bounds, zero_is_never=True)
    for key, counts in _COUNT_SETTINGS.items():
        expected[key] = _count_range(counts)
    return expected


def _setting(key: str, raw: object, where: str) -> object:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: field {key!r}: {raw!r} is not valid; expected {expected}")

    if key == "redis_url":
        return _redis_url(raw, key, where)
    if key in _BOOL_SETTINGS:
        if not isinstance(raw, bool):
            raise bad("true or false")
        return raw
    if key == "key_prefix":
        return _matching(raw, _PREFIX, bad, _PREFIX_EXPECTED)
    if key == "session_cookie":
        return _matching(raw, _TOKEN, bad, _COOKIE_EXPECTED)
    if key in _DURATION_SETTINGS:
        return _duration(raw, _DURATION_SETTINGS[key], bad)
    if key in _OPTIONAL_DURATION_SETTINGS:
        return _duration(raw, _OPTIONAL_DURATION_SETTINGS[key], bad, zero_is_never=True)
    if key in _COUNT_SETTINGS:
        return _count(raw, _COUNT_SETTINGS[key], bad)
    if key == "credentials":
        return _credentials(raw, bad)
    raise AssertionError(key)  # pragma: no cover


def _redis_url(raw: object, key: str, where: str) -> str:
    """Not ``bad``: the message shows the URL masked, as a mistyped scheme still carries a password."""
    if not isinstance(raw, str) or not raw.startswith(_URL_SCHEMES):
        shown = masked_url(raw) if isinstance(raw, str) else raw
        raise ConfigError(f"{where}: field {key!r}: {shown!r} is not valid; expected {_URL_EXPECTED}")
    return raw


def _matching(raw: object, pattern: re.Pattern[str], bad: Callable[[str], ConfigError], expected: str) -> str:
    if not isinstance(raw, str) or not pattern.fullmatch(raw):
        raise bad(expected)
    return raw


def _duration(raw: object, bounds: tuple[float, float], bad: Callable[[str], ConfigError], *,
              zero_is_never: bool = False) -> float:
    """Above the low bound and at most the high one; the low bound itself too where it means never (0: off)."""
    low, high = bounds
    try:
        seconds = parse_duration(raw)
    except ValueError:
        raise bad('a duration such as "5s", or 0 for never' if zero_is_never
                  else 'a duration such as "50ms", "5s" or a number of seconds') from None
    if not (low <= seconds <= high if zero_is_never else low < seconds <= high):
        raise bad(_duration_range(bounds, zero_is_never=zero_is_never))
    return seconds


def _duration_range(bounds: tuple[float, float], *, zero_is_never: bool) -> str:
    low, high = bounds
    if zero_is_never:
        return f"a duration from {low:g} to {high:g} seconds"
    return f"a duration above {low:g} and at most {high:g} seconds"


def _count_range(bounds: tuple[int, int]) -> str:
    return f"a whole number from {bounds[0]} to {bounds[1]}"


def _count(raw: object, bounds: tuple[int, int], bad: Callable[[str], ConfigError]) -> int:
    low, high = bounds
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:  # True is an int too
        raise bad(_count_range(bounds))
    return raw


def _credentials(raw: object, bad: Callable[[str], ConfigError]) -> tuple[str, ...]:
    expected = _CREDENTIALS_EXPECTED
    if not isinstance(raw, list):
        raise bad(expected)
    items: list[str] = []
    for item in raw:
        if not isinstance(item, str):
            raise bad(expected)
        kind, name = credential_parts(item)
        if kind not in CREDENTIAL_KINDS or not _TOKEN.fullmatch(name):
            raise bad(expected)
        items.append(name.lower() if kind == "header" else item)
    return tuple(items)


def _presets(raw: object, source: str) -> dict[str, Policy]:
    where = f"{source}: [cachemw.policies]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table of policy tables")
    presets = dict(PRESETS)
    for name, fields_ in raw.items():
        here = f"{source}: policy {name!r}"
        if not POLICY_NAME.fullmatch(name):
            raise ConfigError(f"{here}: a policy name is 1-64 characters from A-Z a-z 0-9 _ -")
        if not isinstance(fields_, dict):
            raise ConfigError(f"{here}: must be a table of fields")
        # A policy table defines the preset completely: fields it does not name
        # take their defaults, whatever a built-in of the same name said.
        presets[name] = policy_from_fields(fields_, base=Policy(preset=name), where=here)
    return presets


def _rules(raw: object, presets: Mapping[str, Policy], source: str) -> tuple[FileRule, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: 'rules' must be an array of tables ([[cachemw.rules]])")
    rules: list[FileRule] = []
    for index, item in enumerate(raw, start=1):
        here = f"{source}: rule {index}"
        if not isinstance(item, dict):
            raise ConfigError(f"{here}: must be a table")
        fields_ = dict(item)
        route = fields_.pop("route", None)
        if not isinstance(route, str) or not route.startswith("/"):
            raise ConfigError(f"{here}: field 'route': {route!r} is not valid; expected a path template "
                              'such as "/products/{id}" or a glob such as "/stats/*"')
        here = f"{source}: rule {index} (route {route!r})"
        named = "policy" in fields_
        base = resolve_preset(fields_.pop("policy", None), presets, here)
        policy = policy_from_fields(fields_, base=base, where=here)
        if not named and "ttl" not in fields_ and not INVALIDATING_FIELDS & fields_.keys():
            # As for @cache(): a rule that could never cache is a mistake, not a silent no-op.
            raise ConfigError(f"{here}: neither a 'policy' nor a 'ttl': this rule would never cache. HINT: "
                              'ttl = "5m", or policy = "minutes" (a preset); policy = "realtime" if the route '
                              "must never be cached")
        rules.append(FileRule(index=index, route=route, policy=policy, source=f"{source} rule {index}"))
    return tuple(rules)


def masked_url(url: str) -> str:
    """The URL with its password replaced by ``***``: safe to log and print, whatever the URL is.

    The user-info's password (``redis://user:***@host``) and any query parameter
    named ``...password`` (redis-py takes ``?password=``, ``?ssl_password=``) are
    masked. In a URL without a parsable password that still has an ``@`` before
    its query (``redis:/:pw@host``, ``redis://pw@host``, ``redis://:p/w@host``),
    everything between the scheme and the last such ``@`` is masked. Never raises.
    """
    masked = url
    try:
        split = urlsplit(url)
        password, username = split.password, split.username
    except ValueError:  # e.g. "Invalid IPv6 URL"
        password = username = None
    head = re.split(r"[?#]", url, maxsplit=1)[0]
    if password is not None and "@" not in head[len(split.scheme) + 3 + len(split.netloc):]:
        user_info = split.netloc.rpartition("@")[0]
        masked = url.replace(user_info + "@", f"{username or ''}:***@", 1)
    elif "@" in head:
        scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/*", head)
        begin = scheme.end() if scheme else 0
        masked = url[:begin] + "***" + url[head.rindex("@"):]
    return re.sub(r"(?i)([?&][^=&#]*password=)[^&#]*", r"\1***", masked)


def check_redis_url(url: str) -> None:
    """Refuse what redis-py would silently misread: ``redis://host:6379/O`` (not a database number) is db 0 there.

    Raises ValueError with what is wrong; nothing is connected.
    """
    split = urlsplit(url)  # ValueError for a URL that cannot be parsed
    if split.scheme.lower() in ("redis", "rediss"):
        database = split.path.strip("/")
        if database and not database.isdigit():
            raise ValueError(f"the path names the database, a number (redis://host:6379/0), not {database!r}")
        _ = split.port  # ValueError: "Port out of range 0-65535", "Port could not be cast to integer value"


def resolve_preset(name: object, presets: Mapping[str, Policy], where: str) -> Policy:
    """The named preset, or no caching when ``name`` is None."""
    if name is None:
        return Policy()
    if not isinstance(name, str) or name not in presets:
        hint = ""
        if isinstance(name, str):
            close = difflib.get_close_matches(name, list(presets), n=1)
            hint = (f". HINT: {'did you mean ' + repr(close[0]) + '? ' if close else ''}a preset of your own is a "
                    f"[cachemw.policies.{name}] table in the config file")
        raise ConfigError(f"{where}: field 'policy': unknown policy {name!r}; known: {sorted(presets)}{hint}")
    return presets[name]
