"""The sample shop: the three kinds of data from cachemw's design, on a slow SQLite database.

- ``/products/{id}`` may lag a few minutes: ``@cache("minutes")`` on the handler;
- ``/stats`` may be hours old: a rule in ``cachemw.toml`` (no decorator);
- ``/cart`` must be real time and per user: the ``realtime`` rule in ``cachemw.toml``
  keeps it out of the cache, and a ``WriteBehind`` keeps it in Redis: an added item is
  visible at once through every server, and reaches SQLite a moment later
  (``/cart/lag`` shows how far behind the database is);
- ``POST /products/{id}/price``: a price change through SQLAlchemy; its commit hook
  (``cachemw.sqlalchemy.invalidate_on_commit``) purges the product's tag, so the next
  ``GET /products/{id}`` answers the new price, with no ``invalidate()`` in the handler;
- ``/api/products/{product_id}``: the same product route written for FastAPI.

Every query sleeps ``SAMPLE_DB_DELAY`` seconds (default 0.3), so a cache hit is
plain to see, and ``/debug/queries`` counts the queries that really ran.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import TypedDict

import anyio.to_thread
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from cachemw import CacheMiddleware, StoreError, Write, WriteBehind, cache, load_settings
from cachemw.observe import find_cache, metrics_app
from cachemw.observe.dashboard import dashboard_app
from cachemw.sqlalchemy import invalidate_on_commit
from sample_app.api import fastapi_app
from sample_app.db import CartLines, Database, cart_json, create_and_seed, database
from sample_app.models import Product
from sample_app.shop import (
    CONFIG_PATH,
    SESSION_COOKIE,
    SESSION_MAX_AGE,
    SESSION_PATH,
    BadInput,
    cart_item,
    env_db_path,
    env_delay,
    index_text,
    new_price,
    queries_json,
    session_of,
    with_item,
)

__all__ = ["CONFIG_PATH", "SESSION_COOKIE", "create_app"]

ROUTES = (
    'GET  /products/{id}          a product; @cache("minutes") on the handler',
    'POST /products/{id}/price    a new price: {"price": 9.5}; SQLAlchemy, whose commit hook purges product:{id}',
    'GET  /api/products/{id}      the same, as a FastAPI route; @cache(ttl="5m")',
    'GET  /stats                  order statistics; cachemw.toml rule, policy "hours"',
    'GET  /cart                   your cart (session cookie); cachemw.toml rule, policy "realtime"',
    'POST /cart/items             add to your cart: {"product_id": 1, "qty": 2}; in Redis at once, SQLite later',
    "GET  /cart/lag               the carts not yet in SQLite (write-behind backlog and lag)",
    "GET  /debug/queries          how many slow queries really ran (never cached)",
    "GET  /_cachemw/              cachemw's dashboard: routes, hit ratios, queue, purge buttons (from this machine)",
    "GET  /metrics                cachemw's metrics for Prometheus",
)


class State(TypedDict):
    db: Database
    carts: WriteBehind[CartLines]
    sessions: async_sessionmaker[AsyncSession]


class _Carts:
    """Carts in Redis (or this process's memory without Redis), written behind to SQLite."""

    def __init__(self) -> None:
        self.db: Database | None = None
        # retain: a cart the database has is dropped from Redis after a day idle; then it is read from SQLite.
        self.writes: WriteBehind[CartLines] = WriteBehind("cart", flush=self.save, retain=24 * 3600)

    async def save(self, batch: list[Write[CartLines]]) -> None:
        if self.db is None:
            raise RuntimeError("the database is not open yet")  # retried: the lifespan opens it first
        await self.db.save_carts([(w.key, w.version, w.value) for w in batch])


def carts(request: Request) -> WriteBehind[CartLines]:
    """The app's cart store, from the lifespan state (like the database)."""
    writes = getattr(request.state, "carts", None)
    if not isinstance(writes, WriteBehind):
        raise RuntimeError("the sample app's lifespan has not run (is uvicorn started with --lifespan off?)")
    return writes


async def index(request: Request) -> Response:
    """What to try, with the server's own address, so the commands can be pasted as they are."""
    base = str(request.base_url).rstrip("/")
    tries = (f"curl -s {base}/products/1/price -H 'content-type: application/json' -d '{{\"price\": 9.5}}'",
             f"curl -si {base}/products/1 | grep -iE 'x-cache|price'        # a MISS with the new price")
    return PlainTextResponse(index_text("cachemw sample app", ROUTES, database(request).delay, base, tries))


@cache("minutes", tags=["product:{id}"])
async def product(request: Request) -> Response:
    """Public and slow-changing: every visitor may get the same cached copy."""
    product_id: int = request.path_params["id"]
    row = await database(request).product(product_id)
    if row is None:
        return JSONResponse({"error": f"no product {product_id}"}, status_code=404)
    return JSONResponse(row)


async def set_price(request: Request) -> Response:
    """A new price, written with SQLAlchemy: the commit hook purges ``product:{id}`` before the answer."""
    product_id: int = request.path_params["id"]
    try:
        cents = new_price(await request.json())
    except ValueError:
        return JSONResponse({"error": "the body must be JSON"}, status_code=400)
    except BadInput as exc:
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    sessions: async_sessionmaker[AsyncSession] = request.state.sessions
    async with sessions() as session:
        row = await session.get(Product, product_id)
        if row is None:
            return JSONResponse({"error": f"no product {product_id}"}, status_code=404)
        row.price_cents = cents
        await session.commit()  # returns once the product's entries are purged
    return JSONResponse({"id": product_id, "price": cents / 100})


async def stats(request: Request) -> Response:
    """Expensive aggregates; cached by the ``/stats`` rule of ``cachemw.toml``, not by code."""
    return JSONResponse(await database(request).stats())


def _session(request: Request) -> tuple[str, bool]:
    return session_of(request.cookies.get(SESSION_COOKIE))


def _with_session(request: Request, response: Response, sid: str, new: bool) -> Response:
    if new:
        response.set_cookie(
            SESSION_COOKIE,
            sid,
            max_age=SESSION_MAX_AGE,
            path=SESSION_PATH,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",  # plain http on localhost must still work
        )
    return response


async def cart_view(request: Request) -> Response:
    """The visitor's own cart, read live from Redis (every server sees the latest write at once).

    Absent from Redis (never written, or expired after ``retain``), the database has it.
    """
    sid, new = _session(request)
    try:
        lines = await carts(request).get(sid)
    except StoreError:
        lines = None  # Redis is down: the database's copy, possibly a moment behind, beats an error page
    if lines is None:
        lines = await database(request).cart_lines(sid)
    return _with_session(request, JSONResponse(cart_json(lines)), sid, new)


async def cart_add(request: Request) -> Response:
    """Add ``qty`` of ``product_id`` to the visitor's cart and answer the updated cart."""
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the body must be JSON"}, status_code=400)
    try:
        product_id, qty = cart_item(body)
    except BadInput as exc:
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    sid, new = _session(request)
    db = database(request)

    async def add(lines: CartLines | None) -> CartLines:
        if lines is None:
            lines = await db.cart_lines(sid)  # not in Redis: start from what the database has
        return with_item(lines, product_id, qty)

    try:
        # Read, add, write if nobody else wrote the cart meanwhile (another tab, another server), else again.
        lines = await carts(request).update(sid, add)
    except StoreError:
        return JSONResponse({"error": "the cart cannot be saved right now; try again"}, status_code=503)
    return _with_session(request, JSONResponse(cart_json(lines)), sid, new)


async def cart_lag(request: Request) -> Response:
    """How far SQLite is behind the carts in Redis: backlog, lag, flushes, retries, dead letters."""
    try:
        status = await carts(request).status()
    except StoreError as exc:
        return JSONResponse({"error": str(exc)}, status_code=503)
    return JSONResponse(status.as_dict())


async def debug_queries(request: Request) -> Response:
    """Queries run so far, per kind; no rule matches it, so it always shows the live count."""
    return JSONResponse(queries_json(await database(request).counts()))


def create_app(*, db_path: str | os.PathLike[str] | None = None, db_delay: float | None = None) -> Starlette:
    """Build the app; the database is created and seeded at startup (lifespan), not at import.

    ``db_path`` defaults to ``SAMPLE_DB_PATH`` (its sample tables are recreated on
    every start, so demos repeat), else a file in a temporary directory removed at
    shutdown; ``db_delay`` defaults to ``SAMPLE_DB_DELAY``.
    """
    path_setting = db_path if db_path is not None else env_db_path()
    delay = env_delay() if db_delay is None else db_delay
    cart_store = _Carts()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        with ExitStack() as stack:
            if path_setting is None:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="cachemw-sample-"))
                path = Path(tmp) / "sample.sqlite3"
            else:
                path = Path(path_setting)
            await anyio.to_thread.run_sync(create_and_seed, path)
            cart_store.db = Database(path, delay)
            # The Redis the middleware uses (config file, then CACHEMW_REDIS_URL). The flusher runs
            # inside the lifespan, so its last flush at shutdown comes before the database goes away.
            settings = load_settings(CONFIG_PATH)
            engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
            sessions = async_sessionmaker(engine, expire_on_commit=False)
            # Built by now (Starlette builds its middleware before the lifespan runs): the price changes'
            # purges go through it, to this process's L1 and memory store as well as Redis.
            hook = invalidate_on_commit(sessions, cache=find_cache(app))
            try:
                async with cart_store.writes.running(redis_url=settings.redis_url, key_prefix=settings.key_prefix):
                    yield {"db": cart_store.db, "carts": cart_store.writes, "sessions": sessions}
            finally:
                hook.remove()
                await engine.dispose()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/products/{id:int}", product),
            Route("/products/{id:int}/price", set_price, methods=["POST"]),
            Route("/stats", stats),
            Route("/cart", cart_view, methods=["GET"]),
            Route("/cart/items", cart_add, methods=["POST"]),
            Route("/cart/lag", cart_lag, methods=["GET"]),
            Route("/debug/queries", debug_queries),
            Mount("/api", app=fastapi_app),
            # cachemw's own views of this app, for loopback clients (the dashboard) or anyone (metrics:
            # keep such a route internal in a real app).
            Mount("/_cachemw", app=dashboard_app()),
            Route("/metrics", metrics_app()),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(CacheMiddleware, config=CONFIG_PATH)
    return app


app = create_app()
