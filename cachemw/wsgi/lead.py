"""A miss led by the request's own thread: its lookup took the fill lock, so it runs the app and streams it here.

The ASGI handler on the cache's loop carries a miss with four thread crossings (the
request, the app's turn, its response, the answer) and a lock round trip of its own.
For the usual miss (a route that has been missing, a key that holds nothing, a lock
that is free) the request thread's lookup takes the lock in the same round trip
(``get_or_lock``); the thread then calls the app itself, marks and copies its
response as the handler's ``FillResponder`` does, frees its origin slot itself, and
hands the copy to store and the log to the loop in its next batch
(``BackgroundLoop.later``, every 20 ms), where many requests' fills share one write
on the pipelined connection. It wakes the loop only when its lock must go back at
once (nothing to store) or a request there waits for an origin slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

from starlette.types import Message

from cachemw.asgi.responses import FillResponder, without_unkeyed_overrides
from cachemw.core import http
from cachemw.runtime.origin import Slot
from cachemw.runtime.plan import FillPlan
from cachemw.runtime.runtime import CacheRuntime
from cachemw.wsgi.environ import environ_for
from cachemw.wsgi.exchange import StartResponse, batches, capturing, emit, run_now
from cachemw.wsgi.loop import BackgroundLoop

__all__ = ["LedMiss"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class LedMiss:
    """What the WSGI server iterates and closes: the app's response on its way out, copied for the fill.

    ``close()`` (PEP 3333: called however the response ended, even unread) hands the
    outcome to the loop once: the entry to store, or the lock to give back.
    """

    __slots__ = ("_chunks", "_finished", "_loop", "_messages", "_origin_started", "_plan", "_responder",
                 "_runtime", "_slot", "_started")

    def __init__(self, app: WSGIApp, environ: dict[str, Any], scope: dict[str, Any], plan: FillPlan, slot: Slot,
                 runtime: CacheRuntime, loop: BackgroundLoop, started: float, start_response: StartResponse) -> None:
        self._plan = plan
        self._slot = slot
        self._runtime = runtime
        self._loop = loop
        self._started = started
        self._finished = False
        self._messages: list[Message] = []
        self._responder = FillResponder(self._collect, plan.policy, head=scope["method"] == "HEAD",
                                        cache_status=http.STATUS_MISS, hold_errors=False)
        for_app = without_unkeyed_overrides(scope, plan.policy)
        self._origin_started = time.perf_counter()
        self._chunks = self._stream(app, environ if for_app is scope else environ_for(for_app, environ),
                                    start_response)

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        try:
            self._chunks.close()
        finally:
            self._finish()

    async def _collect(self, message: Message) -> None:
        self._messages.append(message)

    def _stream(self, app: WSGIApp, environ: dict[str, Any], start_response: StartResponse
                ) -> Generator[bytes, None, None]:
        captured: list[Any] = []
        written: list[bytes] = []
        try:
            result = app(environ, capturing(captured, written))
            try:
                sent = False
                for batch in batches(result, captured, written):
                    for message in batch:
                        run_now(self._responder.send(message))
                    messages, self._messages = self._messages, []
                    sent = yield from emit(messages, start_response, sent)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        finally:
            self._finish()  # the app raised, or its whole response went out

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        responder, plan, runtime, loop, slot = self._responder, self._plan, self._runtime, self._loop, self._slot
        # The slot is free again before the next request of this thread can ask for one.
        if not slot.release_in_thread():
            loop.notify(slot.release)
        entry = responder.entry(tags=plan.tags)  # None unless complete and storable
        if entry is None:  # not storable, the app raised, or the client left: the lock goes now
            loop.notify(_given_up, runtime, plan, responder.uncacheable)
        else:
            loop.later(runtime.fills.submit, plan, entry)
        if responder.complete:
            loop.later(runtime.log, plan.match, plan.key, "MISS", responder.status,
                       time.perf_counter() - self._origin_started, self._started, responder.size)


def _given_up(runtime: CacheRuntime, plan: FillPlan, uncacheable: bool) -> None:
    """On the loop: a led miss that stores nothing gives its lock back at once (an uncacheable response
    through the pass marker, which releases it)."""
    if uncacheable:
        runtime.fills.pass_through(plan)
    else:
        runtime.locks.give_up(plan)
