"""gc.freeze() after startup: on by default, off by a setting, and what it does to the collector."""

from __future__ import annotations

import gc

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache
from cachemw.core.policy import ConfigError
from cachemw.core.settings import settings_from_table
from tests.conftest import FreezeCalls, real_gc_freeze
from tests.helpers import lifespan

pytestmark = pytest.mark.anyio


def _app(**settings: object) -> Starlette:
    @cache(ttl="1m")
    async def item(request: object) -> PlainTextResponse:
        return PlainTextResponse("x")

    app = Starlette(routes=[Route("/item", item)])
    app.add_middleware(CacheMiddleware, settings=Settings(**settings))  # type: ignore[arg-type]
    return app


async def test_frozen_once_the_app_has_started(gc_freezes: FreezeCalls) -> None:
    async with lifespan(_app()):
        assert gc_freezes.count == 1
    assert gc_freezes.count == 1


async def test_the_setting_turns_it_off(gc_freezes: FreezeCalls) -> None:
    async with lifespan(_app(gc_freeze=False)):
        pass
    assert gc_freezes.count == 0


def test_freezing_moves_startup_objects_out_of_the_collectors_view() -> None:
    startup_object = {"routes": ["/item"]}
    try:
        real_gc_freeze()
        assert gc.get_freeze_count() > 0
        assert not any(obj is startup_object for obj in gc.get_objects())  # full collections skip it now
    finally:
        gc.unfreeze()
    assert any(obj is startup_object for obj in gc.get_objects())


def test_gc_freeze_in_a_file_is_a_boolean() -> None:
    assert settings_from_table({"gc_freeze": False}, source="f", where="f").gc_freeze is False
    with pytest.raises(ConfigError, match=r"gc_freeze.*true or false"):
        settings_from_table({"gc_freeze": "no"}, source="f", where="f")
