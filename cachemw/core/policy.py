"""Freshness policies: durations, presets, and the freshness decision.

Pure: no I/O, no clock. Callers pass ``now`` in, so every decision is testable
with plain numbers.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = [
    "DEFAULT_STATUSES",
    "INVALIDATING_FIELDS",
    "PRESETS",
    "ConfigError",
    "Freshness",
    "Policy",
    "field_expectations",
    "freshness",
    "parse_duration",
    "policy_from_fields",
]

DEFAULT_STATUSES = frozenset({200, 203, 204, 300, 301, 404, 410})
DEFAULT_MAX_BODY = 1024 * 1024

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class ConfigError(ValueError):
    """A policy, rule or settings value is wrong; the message says where and why."""


def parse_duration(value: object) -> float:
    """Seconds from ``"90s"``, ``"5m"``, ``"6h"``, ``"2d"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
        if not 0 <= seconds < math.inf:
            raise ValueError(f"{value!r} is not a duration: it must be a finite number >= 0")
        return seconds
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            if seconds < math.inf:  # hundreds of digits overflow to inf
                return seconds
    raise ValueError(
        f"{value!r} is not a duration; expected a number of seconds or a string like "
        '"90s", "5m", "6h", "2d"'
    )


@dataclass(frozen=True, slots=True)
class Policy:
    """How one route is cached. Durations are seconds.

    ``ttl == 0`` means the route is never answered from a shared cache (the
    ``realtime`` preset); such a policy still carries ``invalidates`` (and ``invalidates_soft``).
    """

    ttl: float = 0.0
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    sync: float = 0.0
    vary: tuple[str, ...] = ()
    query: tuple[str, ...] | None = None
    private: bool = False
    tags: tuple[str, ...] = ()
    invalidates: tuple[str, ...] = ()
    # As ``invalidates``, softly: those entries are marked stale (served STALE while one refresh replaces them).
    invalidates_soft: tuple[str, ...] = ()
    max_body: int = DEFAULT_MAX_BODY
    statuses: frozenset[int] = DEFAULT_STATUSES
    origin_timeout: float = 30.0
    origin_concurrency: int = 0  # origin calls of this route at once in a process; 0: only the global bound
    preset: str | None = field(default=None, compare=False)
    # Derived once, at construction: every request reads it (a property would be a call each time).
    cacheable: bool = field(init=False, repr=False, compare=False)
    invalidating: bool = field(init=False, repr=False, compare=False)  # an unsafe request invalidates something

    def __post_init__(self) -> None:
        object.__setattr__(self, "cacheable", self.ttl > 0)
        object.__setattr__(self, "invalidating", bool(self.invalidates or self.invalidates_soft))

    @property
    def usable_for(self) -> float:
        """How long after storing an entry can still be served in some way."""
        return self.ttl + max(self.stale_while_revalidate, self.stale_if_error)

    @property
    def vary_headers(self) -> tuple[str, ...]:
        return tuple(v for v in self.vary if not v.startswith("cookie:"))

    @property
    def vary_cookies(self) -> tuple[str, ...]:
        return tuple(v[len("cookie:") :] for v in self.vary if v.startswith("cookie:"))


PRESETS: Mapping[str, Policy] = {
    # Shopping carts: must read in real time, never from a shared entry.
    "realtime": Policy(preset="realtime"),
    # Inboxes, product pages: may lag a few minutes.
    "minutes": Policy(ttl=120.0, stale_while_revalidate=600.0, stale_if_error=3600.0, preset="minutes"),
    # Aggregates and reports.
    "hours": Policy(ttl=3600.0, stale_while_revalidate=6 * 3600.0, stale_if_error=86400.0, preset="hours"),
    # Nearly static content.
    "days": Policy(ttl=86400.0, stale_while_revalidate=7 * 86400.0, stale_if_error=7 * 86400.0, preset="days"),
}

INVALIDATING_FIELDS = frozenset({"invalidates", "invalidates_soft"})
"""What an unsafe route's policy may declare without a ttl: a rule of only these still does something."""

POLICY_FIELDS: frozenset[str] = frozenset(f.name for f in fields(Policy) if f.init) - {"preset"}


def _string_list(value: object, *, lower: bool = False) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{value!r} is not a list of strings")
    items: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{value!r} is not a list of non-empty strings")
        items.append(item.strip().lower() if lower else item.strip())
    return tuple(items)


def _vary(value: object) -> tuple[str, ...]:
    items: list[str] = []
    for item in _string_list(value):
        # Header names are case-insensitive (ASGI gives them lowercased); cookie
        # names are not, and are looked up exactly as written.
        if item[: len("cookie:")].lower() == "cookie:":
            name = item[len("cookie:") :]
            item = "cookie:" + name
        else:
            item = name = item.lower()
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ValueError(f"{item!r} is not a header name (or 'cookie:NAME')")
        items.append(item)
    return tuple(items)


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a whole number >= 0")
    return value


def _statuses(value: object) -> frozenset[int]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{value!r} is not a list of HTTP status codes")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 599:
            raise ValueError(f"{item!r} is not an HTTP status code (100-599)")
    return frozenset(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


_PARSERS: dict[str, Any] = {
    "ttl": parse_duration,
    "stale_while_revalidate": parse_duration,
    "stale_if_error": parse_duration,
    "sync": parse_duration,
    "origin_timeout": parse_duration,
    "vary": _vary,
    "query": _string_list,
    "private": _bool,
    "tags": _string_list,
    "invalidates": _string_list,
    "invalidates_soft": _string_list,
    "max_body": _positive_int,
    "statuses": _statuses,
    "origin_concurrency": _positive_int,
}


# What each parser accepts, for the reference documentation (docs/_hooks/), which lists the fields from
# ``_PARSERS`` itself: a field added to the parsers shows up there, a documented one not parsed cannot.
_ACCEPTS: dict[Any, str] = {
    parse_duration: 'a duration ("90s", "5m", or seconds)',
    _vary: 'a list of header names and "cookie:NAME"',
    _string_list: "a list of strings",
    _bool: "true or false",
    _positive_int: "a whole number >= 0",
    _statuses: "a list of HTTP status codes (100-599)",
}


def field_expectations() -> dict[str, str]:
    """What each policy field accepts, in the order the parsers are declared."""
    accepts = {name: _ACCEPTS[parser] for name, parser in _PARSERS.items()}
    accepts["origin_timeout"] += ", more than 0"  # checked after parsing, in policy_from_fields
    return accepts


def policy_from_fields(values: Mapping[str, object], *, base: Policy, where: str) -> Policy:
    """Validate raw field values (from TOML or a decorator) on top of ``base``.

    ``where`` names the place for error messages, e.g. ``'cachemw.toml: rule 2 (route "/x")'``.
    """
    changes: dict[str, Any] = {}
    for name, raw in values.items():
        parser = _PARSERS.get(name)
        if parser is None:
            known = ", ".join(sorted(_PARSERS))
            raise ConfigError(f"{where}: unknown field {name!r}; known fields: {known}")
        try:
            changes[name] = parser(raw)
        except ValueError as exc:
            raise ConfigError(f"{where}: field {name!r}: {exc}") from None
    if "origin_timeout" in changes and changes["origin_timeout"] <= 0:
        raise ConfigError(f"{where}: field 'origin_timeout': must be more than 0 seconds")
    policy = replace(base, **changes)
    both = sorted(set(policy.invalidates) & set(policy.invalidates_soft))
    if both:
        raise ConfigError(f"{where}: field 'invalidates_soft': {', '.join(map(repr, both))} is in 'invalidates' "
                          "too; a target is purged either hard (invalidates) or soft (invalidates_soft), not both")
    return policy


class Freshness(enum.Enum):
    """Where an entry stands at ``now`` under a policy."""

    FRESH = "fresh"
    STALE = "stale"  # past ttl, inside stale_while_revalidate: serve and refresh
    STALE_IF_ERROR = "stale-if-error"  # only usable if the origin fails
    EXPIRED = "expired"


def freshness(stored_at: float, policy: Policy, now: float) -> Freshness:
    age = now - stored_at
    if age < policy.ttl:
        return Freshness.FRESH
    if age < policy.ttl + policy.stale_while_revalidate:
        return Freshness.STALE
    if age < policy.ttl + policy.stale_if_error:
        return Freshness.STALE_IF_ERROR
    return Freshness.EXPIRED
