"""The ASGI shell: ``CacheMiddleware``, configuration and lifespan only.

It builds the rule table from the app's routes and the runtime from the settings
once (at the lifespan's startup, or the first request), then hands each request
of a route with a policy to the request handler, which carries out the core's
decisions. Requests of other routes go straight to the app, with no frame of ours
in between. Everything that does not shape the response runs after it, in the
runtime's supervisor.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import anyio
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cachemw.asgi.handler import RequestHandler
from cachemw.asgi.lifespan import AnswersLifespan
from cachemw.asgi.routes import build_rule_table, routes_behind
from cachemw.core.metrics import Metrics
from cachemw.core.policy import ConfigError
from cachemw.core.rules import RuleTable
from cachemw.core.settings import Settings, load_settings
from cachemw.frameworks.django import DjangoRoutes, is_django_handler, settings_cachemw
from cachemw.observe import enable_fleet_metrics, enable_history
from cachemw.runtime.accesslog import AccessLog
from cachemw.runtime.context import current_cache, enter, invalidate, leave
from cachemw.runtime.flights import CoalescedFailure
from cachemw.runtime.looplag import LoopLag
from cachemw.runtime.runtime import CacheRuntime, Identity
from cachemw.runtime.shell import CacheShell
from cachemw.runtime.supervisor import Supervisor
from cachemw.store import Store, StoreError
from cachemw.store.base import unsupported_event_loop
from cachemw.writebehind import WriteBehind

__all__ = ["CacheMiddleware", "CoalescedFailure", "MiddlewareOptions", "current_cache", "invalidate"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class MiddlewareOptions:
    """What the middleware was given, for tools that rebuild its settings (``cachemw`` commands)."""

    config: str | os.PathLike[str] | None
    settings: Settings | None
    key_prefix: str | None
    redis_url: str | None
    identity: Callable[[HTTPConnection], str | None] | None

    def resolve(self, config: str | os.PathLike[str] | None = None) -> Settings:
        """The settings a middleware given these options runs with: ``settings``, else the ``config`` file
        (``CACHEMW_REDIS_URL`` over it), then ``redis_url`` and ``key_prefix`` over either. ``config``: read
        this file instead of what the middleware was given (``cachemw routes --config``)."""
        settings = load_settings(config) if config is not None else self.settings or load_settings(self.config)
        if self.redis_url is not None:
            settings = replace(settings, redis_url=self.redis_url)
        if self.key_prefix is not None:
            settings = replace(settings, key_prefix=self.key_prefix)
        return settings


class CacheMiddleware(CacheShell):
    """Answer requests from a cache by per-route freshness policies.

    ``config`` names a ``cachemw.toml`` or ``pyproject.toml``; ``redis_url`` and
    ``key_prefix`` override it; ``store`` replaces the store it would build.
    ``identity`` returns who a request is for (keys ``private`` entries, and
    keeps credentialed requests off shared ones); by default the session
    cookie, else the ``Authorization`` header. ``route_table(settings)`` builds the
    rule table for an app whose routes are not Starlette's (``cachemw.django``).

    Around Django's own handler (``get_asgi_application()``) it is what
    ``cachemw.django.asgi_application`` makes: the URLconf's routes, the lifespan
    answered for Django, and ``settings.CACHEMW`` for every keyword not passed.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: str | os.PathLike[str] | None = None,
        redis_url: str | None = None,
        store: Store | None = None,
        key_prefix: str | None = None,
        identity: Callable[[HTTPConnection], str | None] | None = None,
        settings: Settings | None = None,
        supervisor: Supervisor | None = None,
        access_log_json: bool | None = None,
        write_behind: Sequence[WriteBehind[Any]] | None = None,
        route_table: Callable[[Settings], RuleTable] | None = None,
    ) -> None:
        if route_table is None and is_django_handler(app, "asgi"):
            # get_asgi_application() wrapped by hand: what cachemw.django.asgi_application() makes of it.
            app, route_table = AnswersLifespan(app), DjangoRoutes()
        if isinstance(route_table, DjangoRoutes):
            # A Django project's cache: settings.CACHEMW gives every keyword not passed here (None: not passed).
            configured = settings_cachemw()
            config = configured.get("config") if config is None else config
            redis_url = configured.get("redis_url") if redis_url is None else redis_url
            store = configured.get("store") if store is None else store
            key_prefix = configured.get("key_prefix") if key_prefix is None else key_prefix
            identity = configured.get("identity") if identity is None else identity
            settings = configured.get("settings") if settings is None else settings
            supervisor = configured.get("supervisor") if supervisor is None else supervisor
            access_log_json = configured.get("access_log_json") if access_log_json is None else access_log_json
            write_behind = configured.get("write_behind") if write_behind is None else write_behind
        self.app = app
        self.route_table = route_table  # the app's routes when they are not Starlette's (Django, the WSGI shell)
        self.write_behinds = tuple(write_behind or ())
        self.options = MiddlewareOptions(config, settings, key_prefix, redis_url, identity)
        self._given_store = store
        self._given_supervisor = supervisor
        self._supervisor = supervisor or Supervisor()
        self.access_log = AccessLog(json_lines=bool(access_log_json))
        self.metrics = Metrics()
        self.loop_lag = LoopLag()
        self.runtime: CacheRuntime | None = None
        self._handler: RequestHandler | None = None
        self._table: RuleTable | None = None

    # -- startup ---------------------------------------------------------------------------------

    def prepare(self, routes_owner: Any) -> RuleTable:
        """Load settings and build the rule table and the runtime once; raises ConfigError for bad configuration."""
        if self._table is not None:
            return self._table
        options = self.options
        settings = options.resolve()
        if self.route_table is not None:
            table = self.route_table(settings)
        else:
            routes, why = routes_behind(self, routes_owner)
            if routes is None:
                logger.warning("cachemw: %s", why)
            table = build_rule_table(routes or (), settings)
        for warning in table.warnings:  # routes the table cannot model: what may reach them is never cached
            logger.warning("cachemw: %s", warning)
        if self._given_supervisor is None:
            self._supervisor = Supervisor(queue_size=settings.queue_size, queue_max_bytes=settings.queue_max_bytes,
                                          concurrency=settings.concurrency, grace_period=settings.grace_period,
                                          lanes={"refresh": settings.refresh_concurrency})
        runtime = CacheRuntime(settings, table, store=self._given_store, supervisor=self._supervisor,
                               metrics=self.metrics, access_log=self.access_log, loop_lag=self.loop_lag)
        enable_history(self)  # the dashboard's chart: a short ring buffer of per-route counts
        if settings.metrics_interval and settings.redis_url:
            enable_fleet_metrics(self, interval=settings.metrics_interval)
        for writes in self.write_behinds:
            try:
                writes.attach(self._supervisor, redis_url=settings.redis_url, key_prefix=settings.key_prefix)
            except ValueError as exc:  # another store or prefix than before, or an unsupported URL
                raise ConfigError(f"{settings.source or 'settings'}: write_behind {writes.name!r}: {exc}") from None
        custom = options.identity
        identity: Identity | None = None
        if custom is not None:
            identity = lambda headers, scope: custom(HTTPConnection(cast(Scope, scope)))  # noqa: E731
        self._handler = RequestHandler(self.app, runtime, identity)
        self.runtime = runtime
        self._table = table
        if settings.otel:
            _instrument(self, settings)
        return table

    # -- what tools and tests read -----------------------------------------------------------------

    @property
    def table(self) -> RuleTable | None:
        return self._table

    @property
    def store(self) -> Store | None:
        return self._given_store if self.runtime is None else self.runtime.store

    @property
    def supervisor(self) -> Supervisor:
        return self._supervisor

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            table = self._table or self.prepare(scope.get("app"))
            handler = self._handler
            assert handler is not None
            runtime = handler.runtime
            supervisor = runtime.supervisor
            bound = supervisor.bind()
            entered = enter(self)
            # A route without a policy goes straight to the app: no frame of ours in between.
            match = table.match_scope(scope)
            try:
                if supervisor.running:
                    await (self.app(scope, receive, send) if match is None
                           else handler.http(scope, receive, send, match))
                else:
                    async with supervisor.inline_after_response():
                        await (self.app(scope, receive, send) if match is None
                               else handler.http(scope, receive, send, match))
            finally:
                leave(entered)
                supervisor.unbind(bound)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] == "lifespan.startup" and not await self._prepare_startup(scope, send):
            return
        replayed = False

        async def receive_with_drain() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self._drain()
            return message

        shutdown_reply: Message | None = None

        async def send_to_server(message: Message) -> None:
            nonlocal shutdown_reply
            kind = message["type"]
            if kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                # Held until our own cleanup is done: a server that hears "complete" may tear
                # the loop down at once (uvicorn on Ctrl-C), cancelling whatever we still await.
                shutdown_reply = message
                return
            if kind == "lifespan.startup.complete":
                await self._started()
            await send(message)

        app_error: Exception | None = None
        try:
            async with self._supervisor.run():
                try:
                    await self.app(scope, receive_with_drain, send_to_server)
                except Exception as exc:
                    # The app's own exception, as it raised it: not wrapped in our task group's ExceptionGroup.
                    app_error = exc
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()
        if shutdown_reply is not None:
            await send(shutdown_reply)
        if app_error is not None:
            raise app_error

    async def _prepare_startup(self, scope: Scope, send: Send) -> bool:
        """Build the runtime for the app; False once a configuration error is reported to the server."""
        try:
            self.prepare(scope.get("app"))
            problem = unsupported_event_loop(self.store)  # the Redis store on trio
            if problem is not None:
                raise ConfigError(problem)
        except ConfigError as exc:
            # Reported as a failed startup: uvicorn would take an exception for
            # "lifespan unsupported" and serve with the bad configuration.
            await send({"type": "lifespan.startup.failed", "message": f"cachemw: {exc}"})
            return False
        return True

    async def _started(self) -> None:
        """The app has started: the store is probed, and what is alive now leaves the collector's view."""
        runtime = self.runtime
        if runtime is not None:
            await runtime.probe_store()
            if runtime.settings.gc_freeze and runtime.table.has_policies:
                _freeze_startup_objects()

    async def _drain(self) -> None:
        # Pending fills and the last write-behind flush finish before the app's own
        # shutdown closes what they use (its database).
        await self._supervisor.drain()
        for writes in self.write_behinds:
            await writes.stop()

    async def _close(self) -> None:
        """After the lifespan, however it ended (called shielded)."""
        for writes in self.write_behinds:
            await writes.aclose()
        runtime = self.runtime
        if runtime is not None and runtime.owns_store:
            await _quietly(runtime.store.aclose())
            # The next lifespan (a test client, a reloaded app) starts afresh, with a new store.
            self.runtime = self._handler = None
            self._table = None


_frozen = False


def _instrument(cache: CacheMiddleware, settings: Settings) -> None:
    """``otel = true``: the cache reports through OpenTelemetry's global providers (imported only then)."""
    try:
        from cachemw.observe.otel import instrument
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("opentelemetry"):
            raise
        raise ConfigError(f"{settings.source or 'settings'}: otel = true needs the OpenTelemetry API. "
                          "HINT: pip install 'cachemw[otel]'") from None
    instrument(cache)


def _freeze_startup_objects() -> None:
    """Collect startup's garbage, then move every object alive now out of the collector's view; once a process.

    What is alive once the app has started (modules, routes, the app's own state)
    mostly lives as long as the process; a full collection would walk all of it
    each time, pausing every request in flight. ``gc.freeze()`` leaves it out, so
    full collections only walk what requests made. Only the first startup: a
    process that starts apps many times (a test suite) would otherwise never free
    what was alive at each later one.
    """
    global _frozen
    if _frozen:
        return
    _frozen = True
    gc.collect()
    gc.freeze()


async def _quietly(closing: Any) -> None:
    with contextlib.suppress(StoreError):
        await closing
