"""``cachemw.wsgi.CacheMiddleware``: the same cache for any PEP 3333 app (Flask, Django), on one core.

The decisions, headers, keys and store layout are the ASGI shell's, so an entry a
Flask server stores is a hit for a FastAPI server of the same site. A fresh hit, and
the usual miss of a route that has been missing, are answered in the request's own
thread (``ThreadPath``, ``LedMiss``), which hands what follows the response to this
process's cache loop (``BackgroundLoop``) without waiting on it. Everything else is
decided by the ASGI handler on that loop, the request's thread waiting for its word
and running the app itself when told (``Exchange``). Routes without a policy go
straight to the app.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar, cast

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.requests import HTTPConnection
from starlette.types import Message, Scope

from cachemw.asgi.middleware import CacheMiddleware as AsgiCacheMiddleware
from cachemw.core.metrics import Metrics
from cachemw.core.policy import ConfigError
from cachemw.core.rules import RuleTable
from cachemw.core.settings import Settings
from cachemw.frameworks.django import DjangoRoutes, is_django_handler
from cachemw.frameworks.flask import find_flask_app
from cachemw.runtime.accesslog import AccessLog
from cachemw.runtime.context import enter, leave
from cachemw.runtime.looplag import LoopLag
from cachemw.runtime.runtime import CacheRuntime, Identity
from cachemw.runtime.shell import CacheShell
from cachemw.runtime.supervisor import Supervisor
from cachemw.store.base import Store
from cachemw.writebehind import WriteBehind
from cachemw.wsgi.environ import route_of, scope_of
from cachemw.wsgi.exchange import DONE, RAISED, Exchange, ThreadedApp, current_exchange, respond
from cachemw.wsgi.loop import BackgroundLoop
from cachemw.wsgi.threadpath import ThreadPath, blocking_client

__all__ = ["CacheMiddleware"]

T = TypeVar("T")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_STARTUP_TIMEOUT = 30.0  # seconds for the cache's startup (the store probe takes at most 2)
_REQUEST = {"type": "http.request", "body": b"", "more_body": False}


class CacheMiddleware(CacheShell):
    """Answer a WSGI app's requests from a cache by per-route freshness policies.

    ``app.wsgi_app = CacheMiddleware(app.wsgi_app, redis_url=...)`` for Flask;
    ``application = CacheMiddleware(get_wsgi_application(), ...)`` for Django, which
    is ``cachemw.django.wsgi_application``: ``settings.CACHEMW`` gives every keyword
    not passed. The options are the ASGI middleware's; ``identity(environ)`` returns
    who a request is for (an identity from ``settings.CACHEMW`` takes an
    ``HTTPConnection``, as under ASGI), and ``route_table(settings)`` builds the rule
    table for an app that is neither Flask nor Django.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        config: str | os.PathLike[str] | None = None,
        redis_url: str | None = None,
        store: Store | None = None,
        key_prefix: str | None = None,
        identity: Callable[[dict[str, Any]], str | None] | None = None,
        settings: Settings | None = None,
        supervisor: Supervisor | None = None,
        access_log_json: bool | None = None,
        write_behind: Sequence[WriteBehind[Any]] | None = None,
        route_table: Callable[[Settings], RuleTable] | None = None,
    ) -> None:
        self.app = app
        self._threaded = ThreadedApp(app, limit=1)
        by_environ = identity
        asgi_identity = None if by_environ is None else (
            lambda connection: by_environ(_environ_of(connection)))
        self._thread_path: ThreadPath | None = None
        # The ASGI shell takes settings.CACHEMW for what is not passed here when the routes are Django's.
        self.cache = AsgiCacheMiddleware(
            self._threaded, config=config, redis_url=redis_url, store=store, key_prefix=key_prefix,
            identity=asgi_identity, settings=settings, supervisor=supervisor, access_log_json=access_log_json,
            write_behind=write_behind, route_table=route_table or _route_table_for(app))
        self.options = self.cache.options
        self._thread_identity: Identity | None = None
        if by_environ is not None:
            self._thread_identity = lambda headers, scope: by_environ(scope["cachemw.environ"])
        elif self.options.identity is not None:  # settings.CACHEMW's: a function of an HTTPConnection, as for ASGI
            of_connection = self.options.identity
            self._thread_identity = lambda headers, scope: of_connection(HTTPConnection(cast(Scope, scope)))
        self.metrics: Metrics = self.cache.metrics
        self.access_log: AccessLog = self.cache.access_log
        self.loop_lag: LoopLag = self.cache.loop_lag
        self._loop: BackgroundLoop | None = None
        self._starting = threading.Lock()
        self._lifespan: MemoryObjectSendStream[Message] | None = None
        self._lifespan_ended: anyio.Event | None = None
        self._lifespan_replies: MemoryObjectReceiveStream[Message] | None = None

    # -- what tools, tests and views read ---------------------------------------------------------

    @property
    def runtime(self) -> CacheRuntime | None:
        return self.cache.runtime

    @runtime.setter
    def runtime(self, runtime: CacheRuntime | None) -> None:
        raise AttributeError("the WSGI CacheMiddleware's runtime is its ASGI shell's, built at startup")

    @property
    def supervisor(self) -> Supervisor:
        return self.cache.supervisor

    @property
    def store(self) -> Store | None:
        return self.cache.store

    def prepare(self, routes_owner: Any = None) -> RuleTable:
        return self.cache.prepare(routes_owner)

    def call(self, function: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run a coroutine function on the cache's loop from a view and return its result.

        For the async parts of the API in a sync view: ``cache.call(orders.put, key, value)``
        for write-behind; ``cachemw.wsgi.invalidate(...)`` is this around ``invalidate``.
        """
        async def in_this_cache() -> T:
            enter(self)  # the loop's task does not share the view's context
            return await function(*args, **kwargs)

        return self._started_loop().call(in_this_cache)

    def start(self) -> None:
        """Start the cache's loop in this process now, rather than on the first request."""
        self._started_loop()

    def close(self) -> None:
        """Drain the background work and stop the cache's loop (also done at interpreter exit)."""
        loop, thread_path = self._loop, self._thread_path
        if loop is not None:
            loop.stop()
        if thread_path is not None and thread_path.client is not None:
            thread_path.client.close()

    # -- WSGI --------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        loop = self._started_loop()
        table = self.cache.table
        route = route_of(environ)
        match = None if table is None else table.match_scope(route)
        if match is None:
            return self._view(environ, start_response)
        scope = scope_of(environ, route)
        scope["cachemw.environ"] = environ
        thread_path = self._thread_path
        if thread_path is not None:
            answered = thread_path.answer(environ, scope, match, start_response)
            if answered is not None:
                return answered
        exchange = Exchange(environ, scope, loop)
        loop.spawn(self._carry, exchange)
        reply = _first_reply(exchange, loop)
        if reply is None:  # the cache's loop stopped: the app answers
            return self._view(environ, start_response)
        kind, value = reply
        if kind == DONE:
            return respond(value, start_response)
        if kind == RAISED:
            raise value
        return exchange.run_app(self._view, value, start_response)

    def _view(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The app, called so that current_cache(), invalidate() and detach() in its view reach this cache.

        Only while the app is called (where Flask and Django run the view): the thread's context
        forgets it after, as a test calling the app in its own thread expects.
        """
        supervisor = self.cache.supervisor
        entered, bound = enter(self), supervisor.bind()
        try:
            return self.app(environ, start_response)
        finally:
            leave(entered)
            supervisor.unbind(bound)

    async def _carry(self, exchange: Exchange) -> None:
        """On the loop: the ASGI handler's decision for one request, told to the request's thread."""
        token = current_exchange.set(exchange)
        try:
            await self.cache(exchange.scope, _receive, exchange.collect)
        except Exception as exc:
            exchange.replies.put((RAISED, exc))
        except BaseException:
            exchange.replies.put((RAISED, RuntimeError("cachemw: the cache's loop is shutting down")))
            raise
        else:
            exchange.replies.put((DONE, exchange.take()))
        finally:
            current_exchange.reset(token)

    # -- the cache's loop, once per process ---------------------------------------------------------

    def _started_loop(self) -> BackgroundLoop:
        loop = self._loop
        if loop is not None and loop.pid == os.getpid() and loop.alive:
            return loop
        with self._starting:
            loop = self._loop
            if loop is None or loop.pid != os.getpid() or not loop.alive:
                loop = BackgroundLoop(self._startup, self._shutdown)
                loop.start(_STARTUP_TIMEOUT)
                self._loop = loop
                supervisor = self.cache.supervisor
                supervisor.hop = loop.call_sync
                supervisor.home_thread = loop.thread_id
                runtime = self.cache.runtime
                if runtime is not None:
                    self._thread_path = ThreadPath(self._view, runtime, blocking_client(runtime), loop,
                                                   self._thread_identity)
        return loop

    async def _startup(self, task_group: TaskGroup) -> None:
        """Run the ASGI shell's lifespan startup (settings, routes, runtime, store probe) on the loop."""
        to_lifespan, lifespan_messages = anyio.create_memory_object_stream[Message](4)
        replies, from_lifespan = anyio.create_memory_object_stream[Message](4)
        self._lifespan = to_lifespan
        ended = self._lifespan_ended = anyio.Event()

        async def run_lifespan() -> None:
            try:
                with lifespan_messages, replies:
                    await self.cache({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                     lifespan_messages.receive, replies.send)
            finally:
                ended.set()

        task_group.start_soon(run_lifespan)
        await to_lifespan.send({"type": "lifespan.startup"})
        self._lifespan_replies = from_lifespan
        reply = await from_lifespan.receive()
        if reply["type"] != "lifespan.startup.complete":
            raise ConfigError(str(reply.get("message", "cachemw: startup failed")).removeprefix("cachemw: "))
        runtime = self.cache.runtime
        if runtime is not None:
            self._threaded.limit = runtime.settings.refresh_concurrency

    async def _shutdown(self) -> None:
        """Run the lifespan shutdown: pending fills, refreshes and write-behind flushes drain first."""
        lifespan, replies, ended = self._lifespan, self._lifespan_replies, self._lifespan_ended
        if lifespan is not None and replies is not None and ended is not None:
            with replies, lifespan, anyio.move_on_after(self.cache.supervisor.grace_period + 5):
                await lifespan.send({"type": "lifespan.shutdown"})
                await replies.receive()  # lifespan.shutdown.complete, once the work is drained
                await ended.wait()


async def _receive() -> Message:
    return _REQUEST


def _environ_of(connection: HTTPConnection) -> dict[str, Any]:
    environ: dict[str, Any] = connection.scope["cachemw.environ"]
    return environ


def _first_reply(exchange: Exchange, loop: BackgroundLoop) -> tuple[str, Any] | None:
    """The handler's first word on a request; None if the loop stopped without giving one."""
    while True:
        try:
            return exchange.replies.get(timeout=1.0)
        except queue.Empty:
            if not loop.alive:
                return None


def _route_table_for(app: object) -> Callable[[Settings], RuleTable]:
    """Flask's routes for a Flask app (or its ``wsgi_app``); Django's for Django's WSGI handler."""
    flask_app = find_flask_app(app)
    if flask_app is not None:
        from cachemw.frameworks.flask import route_table as flask_routes

        return functools.partial(flask_routes, flask_app)
    if is_django_handler(app, "wsgi"):
        return DjangoRoutes(wsgi=True)  # PATH_INFO is resolved; settings.CACHEMW applies
    raise TypeError(f"cachemw: cannot find the routes of {app!r}: it is neither a Flask app nor Django's "
                    "WSGI handler. HINT: pass route_table=, a function of the settings that returns a RuleTable")

