"""The sample shop as a Flask app behind cachemw's WSGI middleware: ``python -m sample_app --flask``.

The same database, the same ``cachemw.toml`` and the same routes as the Starlette
shop (``app.py``), written as sync Flask views: the file's rules name Flask's routes
in brace form (``/products/<int:id>`` is ``/products/{id}``), so one file serves
both. It adds ``POST /products/<id>/price``, which purges the product's tag from
the view with ``cachemw.wsgi.invalidate``; it has no FastAPI mount, dashboard or
metrics route (they are ASGI apps).

The views run in the WSGI server's threads; the write-behind cart store is async,
so they reach it through the middleware's loop (``cache.call``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio.to_thread
from flask import Flask, Response, jsonify, request

from cachemw import StoreError, Write, WriteBehind, cache
from cachemw.wsgi import CacheMiddleware, invalidate
from sample_app.db import CartLines, Queries, cart_json, create_and_seed
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

__all__ = ["create_app", "temporary_database"]

ROUTES = (
    'GET  /products/{id}          a product; @cache("minutes") on the view',
    'POST /products/{id}/price    a new price: {"price": 9.5}; purges the tag product:{id} from the view',
    'GET  /stats                  order statistics; cachemw.toml rule, policy "hours"',
    'GET  /cart                   your cart (session cookie); cachemw.toml rule, policy "realtime"',
    'POST /cart/items             add to your cart: {"product_id": 1, "qty": 2}; in Redis at once, SQLite later',
    "GET  /cart/lag               the carts not yet in SQLite (write-behind backlog and lag)",
    "GET  /debug/queries          how many slow queries really ran (never cached)",
)


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify(error=message), status


class _Shop:
    """What the views share: the queries, the cart store and the middleware whose loop runs it."""

    def __init__(self, queries: Queries) -> None:
        self.queries = queries
        # retain: a cart the database has is dropped from Redis after a day idle; then it is read from SQLite.
        self.carts: WriteBehind[CartLines] = WriteBehind("cart", flush=self.save, retain=24 * 3600)
        self.cache: CacheMiddleware | None = None

    async def save(self, batch: list[Write[CartLines]]) -> None:
        await anyio.to_thread.run_sync(self.queries.save_carts, [(w.key, w.version, w.value) for w in batch])

    def middleware(self) -> CacheMiddleware:
        if self.cache is None:
            raise RuntimeError("the sample app's CacheMiddleware is not installed")
        return self.cache

    def cart(self, sid: str) -> CartLines:
        """The visitor's cart, from Redis (every server sees the latest write at once), else the database."""
        try:
            lines = self.middleware().call(self.carts.get, sid)
        except StoreError:
            lines = None  # Redis is down: the database's copy, possibly a moment behind, beats an error page
        return self.queries.cart_lines(sid) if lines is None else lines

    def add(self, sid: str, product_id: int, qty: int) -> CartLines:
        """Read, add, write if nobody else wrote the cart meanwhile (another tab, another worker), else again."""
        async def added(lines: CartLines | None) -> CartLines:
            if lines is None:  # not in Redis: start from what the database has
                lines = await anyio.to_thread.run_sync(self.queries.cart_lines, sid)
            return with_item(lines, product_id, qty)

        return self.middleware().call(self.carts.update, sid, added)


def _with_session(response: Response, sid: str, new: bool) -> Response:
    if new:
        response.set_cookie(SESSION_COOKIE, sid, max_age=SESSION_MAX_AGE, path=SESSION_PATH, httponly=True,
                            samesite="Lax", secure=request.scheme == "https")  # plain http on localhost works
    return response


def _catalogue_views(app: Flask, shop: _Shop) -> None:
    queries = shop.queries

    @app.get("/")
    def index() -> Any:
        base = request.host_url.rstrip("/")
        tries = (f"curl -s {base}/products/1/price -H 'content-type: application/json' -d '{{\"price\": 9.5}}'",
                 f"curl -si {base}/products/1 | grep -iE 'x-cache|price'        # a MISS with the new price")
        return app.response_class(index_text("cachemw sample app (Flask)", ROUTES, queries.delay, base, tries),
                                  mimetype="text/plain")

    @app.get("/products/<int:id>")
    @cache("minutes", tags=["product:{id}"])
    def product(id: int) -> Any:  # `id`: the route's parameter and tag, named as in the Starlette shop
        """Public and slow-changing: every visitor may get the same cached copy."""
        row = queries.product(id)
        return _error(404, f"no product {id}") if row is None else jsonify(row)

    @app.post("/products/<int:id>/price")
    def set_price(id: int) -> Any:
        """A new price, then the product's entries dropped before the answer: the next GET makes them anew."""
        try:
            cents = new_price(request.get_json(silent=True))
        except BadInput as exc:
            return _error(exc.status, exc.message)
        if not queries.set_price(id, cents):
            return _error(404, f"no product {id}")
        return jsonify(id=id, price=cents / 100, dropped=invalidate(tags=[f"product:{id}"]))

    @app.get("/stats")
    def stats() -> Any:
        """Expensive aggregates; cached by the ``/stats`` rule of ``cachemw.toml``, not by code."""
        return jsonify(queries.stats())

    @app.get("/debug/queries")
    def debug_queries() -> Any:
        """Queries run so far, per kind, by every worker; no rule matches it, so it is always live."""
        return jsonify(queries_json(queries.counts()))


def _cart_views(app: Flask, shop: _Shop) -> None:
    @app.get("/cart")
    def cart_view() -> Any:
        """The visitor's own cart, read live: the ``/cart*`` rule (``realtime``) keeps it out of the cache."""
        sid, new = session_of(request.cookies.get(SESSION_COOKIE))
        return _with_session(jsonify(cart_json(shop.cart(sid))), sid, new)

    @app.post("/cart/items")
    def cart_add() -> Any:
        """Add ``qty`` of ``product_id`` to the visitor's cart and answer the updated cart."""
        body = request.get_json(silent=True)
        if body is None:
            return _error(400, "the body must be JSON")
        try:
            product_id, qty = cart_item(body)
        except BadInput as exc:
            return _error(exc.status, exc.message)
        sid, new = session_of(request.cookies.get(SESSION_COOKIE))
        try:
            lines = shop.add(sid, product_id, qty)
        except StoreError:
            return _error(503, "the cart cannot be saved right now; try again")
        return _with_session(jsonify(cart_json(lines)), sid, new)

    @app.get("/cart/lag")
    def cart_lag() -> Any:
        """How far SQLite is behind the carts in Redis: backlog, lag, flushes, retries, dead letters."""
        try:
            status = shop.middleware().call(shop.carts.status)
        except StoreError as exc:
            return _error(503, str(exc))
        return jsonify(status.as_dict())


def temporary_database() -> Path:
    """A file in a directory removed when this process exits (only this one: forked workers inherit atexit)."""
    directory = tempfile.mkdtemp(prefix="cachemw-sample-")
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:
            shutil.rmtree(directory, ignore_errors=True)

    atexit.register(remove)
    return Path(directory) / "sample.sqlite3"


def create_app(*, db_path: str | os.PathLike[str] | None = None, db_delay: float | None = None,
               seed: bool = True) -> Flask:
    """Build the Flask shop behind the WSGI CacheMiddleware (its store as the config file and env say).

    ``db_path`` defaults to ``SAMPLE_DB_PATH``, else a file in a temporary directory;
    ``db_delay`` to ``SAMPLE_DB_DELAY``. ``seed`` recreates the sample tables now, so
    demos repeat; worker processes sharing a database their master seeded pass False.
    """
    setting = db_path if db_path is not None else env_db_path()
    path = temporary_database() if setting is None else Path(setting)
    if seed or setting is None:
        create_and_seed(path)
    shop = _Shop(Queries(path, env_delay() if db_delay is None else db_delay))
    app = Flask(__name__)
    _catalogue_views(app, shop)
    _cart_views(app, shop)
    # The store: CACHEMW_REDIS_URL (or the file's redis_url), else this process's memory.
    shop.cache = CacheMiddleware(app.wsgi_app, config=CONFIG_PATH, write_behind=[shop.carts])
    app.wsgi_app = shop.cache  # type: ignore[method-assign]
    return app
