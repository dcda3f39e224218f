"""``@cache(...)`` mistakes: those the decorator can know fail at import; a preset name only startup can know."""

from __future__ import annotations

import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from cachemw import ConfigError, Settings, build_rule_table, cache


async def page(request: Request) -> PlainTextResponse:
    return PlainTextResponse("page")


@pytest.mark.parametrize("fields", [{}, {"tags": ["page"]}, {"vary": ["accept"], "private": True}],
                         ids=["empty", "tags", "vary"])
def test_neither_ttl_nor_preset_fails_at_decoration(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        cache(**fields)(page)
    message = str(info.value)
    assert message.startswith("@cache on ") and "page: neither a ttl nor a preset" in message
    assert "HINT" in message and 'ttl="5m"' in message
    for preset in ("realtime", "minutes", "hours", "days"):
        assert repr(preset) in message


def test_what_may_omit_the_ttl() -> None:
    cache("minutes")(page)
    cache(ttl=0)(page)  # said explicitly: never cached
    cache(invalidates=["page"])(page)  # an unsafe route that only invalidates


@pytest.mark.parametrize("name", ["", "no such", "x" * 65, "a/b", 300])
def test_a_preset_no_config_could_define_fails_at_decoration(name: object) -> None:
    with pytest.raises(ConfigError) as info:
        cache(name)(page)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("@cache on ") and f"preset {name!r} is not a preset name" in message
    assert "'minutes'" in message and "[cachemw.policies]" in message


def test_a_preset_the_config_may_define_is_looked_up_at_startup() -> None:
    endpoint = cache("nope")(page)  # a config file may define [cachemw.policies.nope]: not known yet
    with pytest.raises(ConfigError) as info:
        build_rule_table([Route("/p", endpoint)], Settings())
    message = str(info.value)
    assert message.startswith("@cache on ") and "field 'policy': unknown policy 'nope'" in message
    assert "'minutes'" in message and "[cachemw.policies.nope]" in message


def test_a_misspelt_preset_gets_a_suggestion_at_startup() -> None:
    endpoint = cache("minuets")(page)
    with pytest.raises(ConfigError, match=r"did you mean 'minutes'\?"):
        build_rule_table([Route("/p", endpoint)], Settings())
