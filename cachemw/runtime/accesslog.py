"""One structured event per cached-route request, written off the request path.

The request only appends a tuple to a bounded stream (and only when the
``cachemw.access`` logger is enabled for INFO); a service of the supervisor
writes the lines. When it falls behind, events are shed and counted.
"""

from __future__ import annotations

import json
import logging

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

__all__ = ["AccessEvent", "AccessLog", "access_logger"]

access_logger = logging.getLogger("cachemw.access")

# route template, key hash, X-Cache state, status, origin seconds (or None), total seconds, body bytes
AccessEvent = tuple[str, str, str, int, "float | None", float, int]

_FIELDS = ("route", "key", "cache", "status", "origin_ms", "total_ms", "bytes")


class AccessLog:
    def __init__(self, *, capacity: int = 10_000, json_lines: bool = False) -> None:
        self.capacity = capacity
        self.json_lines = json_lines
        self.shed = 0
        self.written = 0
        self._send: MemoryObjectSendStream[AccessEvent] | None = None

    @property
    def enabled(self) -> bool:
        # isEnabledFor is cached by the logging module: a dict lookup per request.
        return self._send is not None and access_logger.isEnabledFor(logging.INFO)

    def emit(self, event: AccessEvent) -> None:
        send = self._send
        if send is None:
            return
        try:
            send.send_nowait(event)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.shed += 1

    async def consume(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        send, receive = anyio.create_memory_object_stream[AccessEvent](self.capacity)
        self._send = send
        task_status.started()
        try:
            async with receive:
                async for event in receive:
                    access_logger.info("%s", self.format(event))
                    self.written += 1
        finally:
            self._send = None
            send.close()

    def format(self, event: AccessEvent) -> str:
        route, key, cache, status, origin, total, size = event
        origin_ms = None if origin is None else round(origin * 1000, 2)
        total_ms = round(total * 1000, 2)
        if self.json_lines:
            return json.dumps(dict(zip(_FIELDS, (route, key, cache, status, origin_ms, total_ms, size), strict=True)))
        return (f"route={route} key={key} cache={cache} status={status} "
                f"origin_ms={'-' if origin_ms is None else origin_ms} total_ms={total_ms} bytes={size}")
