"""The access log: events handed off by requests, written by a service, shed when it falls behind."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from cachemw.runtime.accesslog import AccessEvent, AccessLog
from cachemw.runtime.supervisor import Supervisor
from tests.helpers import eventually

LOGGER = "cachemw.access"

HIT: AccessEvent = ("/products/{id}", "3f2a9c01b7de", "HIT", 200, None, 0.0015, 12)
MISS: AccessEvent = ("/products/{id}", "77aa01", "MISS", 200, 0.25, 0.2612, 345)


async def until(predicate: Callable[[], bool], what: str = "condition") -> None:
    async def check() -> bool:
        return predicate()

    await eventually(check, what=what)


@asynccontextmanager
async def consuming(log: AccessLog) -> AsyncIterator[None]:
    """Run the consumer service for the block, as the supervisor would."""
    async with anyio.create_task_group() as tg:
        await tg.start(log.consume)
        yield
        tg.cancel_scope.cancel()


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


@pytest.mark.anyio
async def test_events_are_written_to_the_access_logger_at_info(caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with consuming(log):
            assert log.enabled
            log.emit(HIT)
            log.emit(MISS)
            await until(lambda: log.written == 2, "two lines written")
    records = access_lines(caplog)
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO]
    assert records[0].getMessage() == (
        "route=/products/{id} key=3f2a9c01b7de cache=HIT status=200 origin_ms=- total_ms=1.5 bytes=12")
    assert records[1].getMessage() == (
        "route=/products/{id} key=77aa01 cache=MISS status=200 origin_ms=250.0 total_ms=261.2 bytes=345")
    assert log.shed == 0


@pytest.mark.anyio
async def test_json_lines_parse(caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog(json_lines=True)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with consuming(log):
            log.emit(HIT)
            log.emit(MISS)
            await until(lambda: log.written == 2, "two lines written")
    parsed = [json.loads(r.getMessage()) for r in access_lines(caplog)]
    assert parsed == [
        {"route": "/products/{id}", "key": "3f2a9c01b7de", "cache": "HIT", "status": 200, "origin_ms": None,
         "total_ms": 1.5, "bytes": 12},
        {"route": "/products/{id}", "key": "77aa01", "cache": "MISS", "status": 200, "origin_ms": 250.0,
         "total_ms": 261.2, "bytes": 345},
    ]


@pytest.mark.anyio
async def test_disabled_unless_the_logger_takes_info_and_the_consumer_runs(caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert not log.enabled  # nobody consumes yet
        log.emit(HIT)  # dropped quietly, never raises
        async with consuming(log):
            assert log.enabled
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                assert not log.enabled  # requests skip building the event
            assert log.enabled
        assert not log.enabled  # the consumer stopped
        log.emit(HIT)
    assert log.written == 0
    assert access_lines(caplog) == []


@pytest.mark.anyio
async def test_a_full_stream_sheds_and_counts_without_blocking(caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog(capacity=2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with consuming(log):
            # emit never awaits: the consumer cannot run between these, so the stream fills up.
            for _ in range(10):
                log.emit(HIT)
            assert log.shed >= 10 - 2 - 1  # at most the buffer plus one waiting consumer took events
            await until(lambda: log.written + log.shed == 10, "every event written or shed")
            shed = log.shed
            # Once it has caught up, nothing more is shed.
            log.emit(MISS)
            await until(lambda: log.written + log.shed == 11, "the next event written")
            assert log.shed == shed
    assert len(access_lines(caplog)) == log.written


@pytest.mark.anyio
async def test_consume_as_a_supervisor_service(caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog()
    supervisor = Supervisor()
    supervisor.add_service("access-log", log.consume)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with supervisor.run():
            assert log.enabled
            log.emit(HIT)
            await until(lambda: log.written == 1, "line written")
    assert not log.enabled
    assert len(access_lines(caplog)) == 1
