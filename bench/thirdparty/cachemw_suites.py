"""A pytest plugin that puts ``CacheMiddleware`` into every app another project's test suite builds.

Load it with ``-p cachemw_suites`` (this folder on ``PYTHONPATH``); the suite itself is not
edited. Chosen by environment variables:

``CACHEMW_SUITES_MODE``
    ``inject``: every Starlette (so FastAPI) app gets ``CacheMiddleware`` in its middleware
    stack, as ``app.add_middleware(CacheMiddleware, ...)`` would put it (the stack is built
    on the app's first call, so apps made before this plugin loaded are covered too);
    ``wrap``: every app that a ``TestClient`` or an httpx ``ASGITransport`` runs is
    ``CacheMiddleware(app)``. Unset or ``off``: the plugin does nothing.
``CACHEMW_SUITES_POLICY``
    ``none`` (default): no policies at all, the defaults of ``CacheMiddleware()`` (memory
    store, no config); ``catchall``: one file rule ``route = "/*"`` with a short ``ttl``
    (``CACHEMW_SUITES_TTL``, default ``2s``), shared, no stale-while-revalidate, on the memory
    store: every GET route of every app is cached.
``CACHEMW_SUITES_POSITION``
    ``outer`` (default): the outermost user middleware (``add_middleware`` called last);
    ``inner``: the innermost one (called first). Inject mode only.
``CACHEMW_SUITES_SERVER_TUPLE``
    ``1``: turn a list ``scope["server"]`` (what ``TestClient`` sends) into a tuple before cachemw
    sees it. A diagnostic workaround for #14 item 6 only, off by default: with it, the catch-all
    runs show what fails beyond that crash.
``CACHEMW_SUITES_EVENTS``
    A file to append JSON lines to: exceptions that left the middleware (and whether they
    began in cachemw), cachemw's log records at WARNING and above, ``X-Cache`` counts per
    test, and every hit whose request differs from the one that filled the entry in a
    credential-like header, cookie or the query (a possible response across users).

An app whose routes a catch-all rule cannot match (no HTTP route: a bare ASGI callable, an
app with only websocket routes or a mounted static folder) gets no policy instead of the
startup error a real config would give ("rule matches no route"): the harness's choice, so
that such apps are still exercised with the middleware in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import traceback
from pathlib import Path
from typing import Any

import cachemw
from cachemw import CacheMiddleware, ConfigError, Settings
from cachemw.core.settings import settings_from_table

MODE = os.environ.get("CACHEMW_SUITES_MODE", "off")
POLICY = os.environ.get("CACHEMW_SUITES_POLICY", "none")
POSITION = os.environ.get("CACHEMW_SUITES_POSITION", "outer")
TTL = os.environ.get("CACHEMW_SUITES_TTL", "2s")
EVENTS = os.environ.get("CACHEMW_SUITES_EVENTS")
SERVER_TUPLE = os.environ.get("CACHEMW_SUITES_SERVER_TUPLE") == "1"

_CACHEMW_DIR = str(Path(cachemw.__file__).resolve().parent)
_NO_RULES = Settings()
# Request headers that say who a request is for (or could): compared between a fill and its hits.
_BENIGN_HEADERS = frozenset({
    b"host", b"user-agent", b"accept", b"accept-encoding", b"connection", b"content-length",
    b"content-type", b"accept-language", b"if-none-match", b"if-modified-since", b"cache-control",
    b"pragma", b"origin", b"referer", b"upgrade", b"sec-websocket-key", b"sec-websocket-version",
})

_current_test = "<collection>"
_lock = threading.Lock()
_counts: dict[str, int] = {}


_pending: list[str] = []


def _emit(kind: str, **fields: Any) -> None:
    """Keep an event; written between tests (a file write in the event loop trips Starlette's blockbuster)."""
    if not EVENTS:
        return
    line = json.dumps({"kind": kind, "test": _current_test, **fields}, default=repr)
    with _lock:
        _pending.append(line)


def _flush() -> None:
    with _lock:
        lines = _pending[:]
        _pending.clear()
    if lines and EVENTS:
        with open(EVENTS, "a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))


_catchall: Settings | None = None


def _catchall_settings() -> Settings:
    """One rule over every route: shared (credentials keep a request off it), fresh for TTL, then gone."""
    global _catchall
    if _catchall is None:
        table = {"rules": [{"route": "/*", "ttl": TTL}]}
        _catchall = settings_from_table(table, source="cachemw_suites catch-all", where="cachemw_suites catch-all")
    return _catchall


def _exception_origin(exc: BaseException) -> str:
    """'cachemw' when the innermost frame of the traceback is in cachemw's package, else 'app'."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return "unknown"
    return "cachemw" if last.tb_frame.f_code.co_filename.startswith(_CACHEMW_DIR) else "app"


def _describe(exc: BaseException) -> dict[str, Any]:
    info: dict[str, Any] = {"type": type(exc).__qualname__, "message": str(exc)[:300],
                            "origin": _exception_origin(exc)}
    leaves = getattr(exc, "exceptions", None)  # an ExceptionGroup (Python 3.11+, or the backport)
    if isinstance(leaves, tuple):
        info["leaves"] = [_describe(inner) for inner in leaves]
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        info["where"] = [f"{f.filename}:{f.lineno} {f.name}" for f in frames[-3:]]
    return info


def _material(scope: dict[str, Any]) -> dict[str, Any]:
    """What in a request could say who it is for, beyond what the key covers for everyone."""
    headers = sorted((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())
                     if k not in _BENIGN_HEADERS)
    return {"headers": headers}


class SuiteCache(CacheMiddleware):
    """CacheMiddleware as configured by the environment, observed (never changed) on the way through."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        if POLICY == "catchall":
            kwargs.setdefault("settings", _catchall_settings())
        super().__init__(app, **kwargs)
        self._fills: dict[tuple[str, str, bytes], tuple[dict[str, Any], str]] = {}

    def prepare(self, routes_owner: Any) -> Any:
        try:
            return super().prepare(routes_owner)
        except ConfigError as exc:
            if POLICY != "catchall" or "matches no route" not in str(exc):
                raise
        # The catch-all rule matches no route of this app: run it with no policy instead.
        given = self._given_settings
        self._given_settings = _NO_RULES
        try:
            _emit("no-routes", app=type(routes_owner if routes_owner is not None else self.app).__qualname__)
            return super().prepare(routes_owner)
        finally:
            self._given_settings = given

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            try:
                await super().__call__(scope, receive, send)
            except BaseException as exc:
                if not _is_cancellation(exc):
                    _emit("exception", scope=scope["type"], **_describe(exc))
                raise
            return
        if SERVER_TUPLE and isinstance(scope.get("server"), list):
            scope["server"] = tuple(scope["server"])
        state: dict[str, Any] = {"x_cache": None, "status": None, "digest": hashlib.blake2b(digest_size=8)}

        async def observe(message: Any) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-cache":
                        state["x_cache"] = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                state["digest"].update(message.get("body", b""))
            await send(message)

        try:
            await super().__call__(scope, receive, observe)
        except BaseException as exc:
            if not _is_cancellation(exc):
                _emit("exception", scope="http", method=scope.get("method"), path=scope.get("path"),
                      **_describe(exc))
            raise
        x_cache = state["x_cache"] or "none"
        with _lock:
            _counts[x_cache] = _counts.get(x_cache, 0) + 1
        if scope.get("method") not in ("GET", "HEAD"):
            return
        where = (scope.get("method"), scope.get("path", ""), scope.get("query_string", b""))
        material = _material(scope)
        digest = state["digest"].hexdigest()
        if x_cache == "MISS":
            self._fills[where] = (material, digest)
        elif x_cache in ("HIT", "STALE"):
            filled = self._fills.get(where)
            if filled is not None and filled[0] != material:
                _emit("hit-across-requests", method=where[0], path=where[1], query=where[2], status=state["status"],
                      fill=filled[0], hit=material)


def _is_cancellation(exc: BaseException) -> bool:
    return type(exc).__name__ in ("CancelledError", "Cancelled", "GeneratorExit")


def _has_cache(app: Any) -> bool:
    seen = 0
    while app is not None and seen < 64:
        if isinstance(app, CacheMiddleware):
            return True
        app = getattr(app, "app", None)
        seen += 1
    return False


def _install_inject() -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    original_call = Starlette.__call__

    def build_with_cache(app: Starlette) -> Any:
        saved = app.user_middleware
        cache = Middleware(SuiteCache)
        app.user_middleware = [cache, *saved] if POSITION == "outer" else [*saved, cache]
        try:
            return app.build_middleware_stack()
        finally:
            app.user_middleware = saved

    async def __call__(self: Starlette, scope: Any, receive: Any, send: Any) -> None:
        if self.middleware_stack is None:
            self.middleware_stack = build_with_cache(self)
        elif not _has_cache(self.middleware_stack):
            # Built before this plugin was loaded, or by a test calling build_middleware_stack itself.
            _emit("rebuilt", app=type(self).__qualname__)
            self.middleware_stack = build_with_cache(self)
        await original_call(self, scope, receive, send)

    Starlette.__call__ = __call__  # type: ignore[method-assign]


def _wrap(app: Any) -> Any:
    return app if isinstance(app, CacheMiddleware) else SuiteCache(app)


def _install_wrap() -> None:
    from starlette import testclient

    original_init = testclient.TestClient.__init__

    def init(self: Any, app: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, app, *args, **kwargs)
        # After TestClient made an ASGI 2 app ASGI 3: the app it runs (lifespan and requests) is ours.
        self.app = _wrap(self.app)
        self._transport.app = self.app

    testclient.TestClient.__init__ = init  # type: ignore[method-assign]

    for module_name in ("httpx", "httpx2"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        transport = getattr(module, "ASGITransport", None)
        if transport is None:
            continue
        _patch_transport(transport)


def _patch_transport(transport: type) -> None:
    original = transport.__init__

    def init(self: Any, app: Any, *args: Any, **kwargs: Any) -> None:
        original(self, _wrap(app), *args, **kwargs)

    transport.__init__ = init  # type: ignore[method-assign]


class _LogToEvents(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        _emit("log", logger=record.name, level=record.levelname, message=record.getMessage()[:300],
              exception=_describe(exc) if exc is not None else None)


def pytest_configure(config: Any) -> None:
    if MODE == "off":
        return
    if MODE == "inject":
        _install_inject()
    elif MODE == "wrap":
        _install_wrap()
    else:
        raise ValueError(f"CACHEMW_SUITES_MODE={MODE!r}: expected inject, wrap or off")
    if POLICY not in ("none", "catchall"):
        raise ValueError(f"CACHEMW_SUITES_POLICY={POLICY!r}: expected none or catchall")
    if POLICY == "catchall":
        _catchall_settings()  # a bad TTL fails now, not in every test
    handler = _LogToEvents(level=logging.WARNING)
    logging.getLogger("cachemw").addHandler(handler)
    config.addinivalue_line("markers", "cachemw_suites: unused; keeps --strict-markers happy")


def pytest_report_header(config: Any) -> str:
    return (f"cachemw_suites: mode={MODE} policy={POLICY} position={POSITION} ttl={TTL}"
            + (" server-tuple workaround" if SERVER_TUPLE else ""))


def pytest_runtest_setup(item: Any) -> None:
    global _current_test
    _current_test = item.nodeid


def pytest_runtest_teardown(item: Any, nextitem: Any) -> None:
    global _current_test
    if _counts:
        with _lock:
            counts = dict(_counts)
            _counts.clear()
        _emit("x-cache", counts=counts)
    _flush()
    _current_test = "<between tests>"


def pytest_sessionfinish(session: Any) -> None:
    _flush()
