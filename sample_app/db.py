"""A deliberately slow SQLite database, so a cache hit is visibly faster than a miss.

Every query opens its own connection (``sqlite3`` objects must not cross threads)
and sleeps ``delay`` seconds first, standing in for a busy database server.
``Queries`` runs them in the caller's thread (the Flask shop's request threads),
``Database`` in worker threads (the async shop). Queries are counted per kind in
the database itself, so a user can see at ``/debug/queries`` that a cached route
ran its query once, whichever worker process answered.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Sequence
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread
from starlette.requests import HTTPConnection

__all__ = ["CATALOGUE", "KINDS", "MAX_LINE_QTY", "CartLines", "Database", "Kind", "Queries", "cart_json",
           "create_and_seed", "database", "product_json"]

Kind = Literal["product", "stats", "cart"]
KINDS: tuple[Kind, ...] = ("product", "stats", "cart")

Row = dict[str, Any]

PRODUCTS: tuple[tuple[int, str, int], ...] = (
    # id, name, price in cents (money is never a float in the database)
    (1, "Espresso cup", 850),
    (2, "Pour-over kettle", 3900),
    (3, "Burr grinder", 12900),
    (4, "Paper filters (100)", 625),
    (5, "Coffee beans, 1 kg", 2490),
)

_SCHEMA = """
DROP TABLE IF EXISTS cart_items;
DROP TABLE IF EXISTS carts;
DROP TABLE IF EXISTS orders;
DROP TABLE IF EXISTS products;
DROP TABLE IF EXISTS query_counts;
CREATE TABLE products (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    price_cents INTEGER NOT NULL
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    product_id INTEGER NOT NULL REFERENCES products(id),
    qty INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
-- A cart's version is the write-behind version of its latest write: a write
-- flushed late (or twice) never replaces a newer cart.
CREATE TABLE carts (
    session TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE cart_items (
    session TEXT NOT NULL REFERENCES carts(session),
    product_id INTEGER NOT NULL REFERENCES products(id),
    qty INTEGER NOT NULL,
    PRIMARY KEY (session, product_id)
);
CREATE TABLE query_counts (
    kind TEXT PRIMARY KEY,
    n INTEGER NOT NULL
);
"""


def create_and_seed(path: Path, *, orders: int = 500, seed: int = 2007) -> None:
    """(Re)create the schema and fill it; the same data on every start, so demos repeat."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    order_rows = [
        (
            rng.choice(PRODUCTS)[0],
            rng.randint(1, 4),
            (now - timedelta(minutes=rng.randint(0, 30 * 24 * 60))).isoformat(),
        )
        for _ in range(orders)
    ]
    with closing(sqlite3.connect(path)) as conn:
        # WAL lets readers in other threads go on while a cart write commits.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        with conn:
            conn.executemany("INSERT INTO products (id, name, price_cents) VALUES (?, ?, ?)", PRODUCTS)
            conn.executemany("INSERT INTO orders (product_id, qty, created_at) VALUES (?, ?, ?)", order_rows)
            conn.executemany("INSERT INTO query_counts (kind, n) VALUES (?, 0)", [(kind,) for kind in KINDS])


class Queries:
    """The shop's queries, blocking: each on a fresh connection, after an artificial delay.

    A sync app (the Flask shop) calls these in its request threads; ``Database`` runs
    them in worker threads for the async one. Each counts itself in the database, so
    every worker process of a server (and every server on one file) shares one count.
    """

    def __init__(self, path: Path, delay: float) -> None:
        self.path = path
        self.delay = delay

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def fetch(self, kind: Kind, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """Rows as plain dicts, so no sqlite3 object leaves the thread that ran the query."""
        time.sleep(self.delay)
        with closing(self._connect()) as conn:
            with conn:  # the count commits on its own: a read is not held up by the cart writes
                _count(conn, kind)
            return [dict(row) for row in conn.execute(sql, tuple(params))]

    def execute(self, kind: Kind, sql: str, params: Sequence[object] = ()) -> int:
        """Run one write in its own transaction; returns the number of rows changed."""
        time.sleep(self.delay)
        with closing(self._connect()) as conn, conn:  # the inner `conn` commits or rolls back
            _count(conn, kind)
            return conn.execute(sql, tuple(params)).rowcount

    def counts(self) -> dict[Kind, int]:
        """Queries run so far, per kind (not delayed, not counted: it is the app's debug view)."""
        with closing(self._connect()) as conn:
            found = {row["kind"]: row["n"] for row in conn.execute("SELECT kind, n FROM query_counts")}
        return {kind: int(found.get(kind, 0)) for kind in KINDS}

    # The app's queries. SQL lives here so the HTTP modules only shape responses.

    def product(self, product_id: int) -> Row | None:
        """One product, or None; a single slow query."""
        rows = self.fetch("product", "SELECT id, name, price_cents FROM products WHERE id = ?", (product_id,))
        return product_json(rows[0]) if rows else None

    def set_price(self, product_id: int, price_cents: int) -> bool:
        """A new price; False if there is no such product."""
        return self.execute("product", "UPDATE products SET price_cents = ? WHERE id = ?",
                            (price_cents, product_id)) > 0

    def stats(self) -> Row:
        """Aggregates over every order: several slow queries, the kind of page worth caching for hours."""
        totals = self.fetch(
            "stats",
            "SELECT COUNT(*) AS orders, COALESCE(SUM(o.qty), 0) AS items,"
            " COALESCE(SUM(o.qty * p.price_cents), 0) AS revenue_cents"
            " FROM orders o JOIN products p ON p.id = o.product_id",
        )[0]
        top = self.fetch(
            "stats",
            "SELECT p.id, p.name, SUM(o.qty) AS sold FROM orders o JOIN products p ON p.id = o.product_id"
            " GROUP BY p.id ORDER BY sold DESC, p.id LIMIT 3",
        )
        since = (datetime.now(timezone.utc) - timedelta(days=6)).date().isoformat()
        days = self.fetch(
            "stats",
            "SELECT substr(created_at, 1, 10) AS day, COUNT(*) AS orders FROM orders"
            " WHERE created_at >= ? GROUP BY day ORDER BY day",
            (since,),
        )
        orders = totals["orders"]
        return {
            "orders": orders,
            "items": totals["items"],
            "revenue": totals["revenue_cents"] / 100,
            "average_order": round(totals["revenue_cents"] / orders / 100, 2) if orders else 0.0,
            "top_products": top,
            "orders_per_day": {row["day"]: row["orders"] for row in days},
            "generated_at": _now(),
        }

    def cart_lines(self, session: str) -> CartLines:
        """A cart as the database has it (``{product_id: qty}``): read when Redis has no copy."""
        rows = self.fetch(
            "cart", "SELECT product_id, qty FROM cart_items WHERE session = ? ORDER BY product_id", (session,)
        )
        return {str(row["product_id"]): row["qty"] for row in rows}

    def save_carts(self, carts: Sequence[tuple[str, int, CartLines]]) -> None:
        """Write-behind flush: each ``(session, version, lines)`` in one transaction, newer versions only.

        Idempotent and never backwards, as write-behind requires: the carts row is
        updated only by a higher version, and the lines are replaced only then.
        """
        time.sleep(self.delay)
        now = _now()
        with closing(self._connect()) as conn, conn:
            _count(conn, "cart")
            for session, version, lines in carts:
                changed = conn.execute(
                    "INSERT INTO carts (session, version, updated_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (session) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at"
                    " WHERE excluded.version > carts.version",
                    (session, version, now),
                ).rowcount
                if changed:
                    conn.execute("DELETE FROM cart_items WHERE session = ?", (session,))
                    conn.executemany(
                        "INSERT INTO cart_items (session, product_id, qty) VALUES (?, ?, ?)",
                        [(session, int(product_id), qty) for product_id, qty in lines.items()],
                    )


def _count(conn: sqlite3.Connection, kind: Kind) -> None:
    conn.execute("UPDATE query_counts SET n = n + 1 WHERE kind = ?", (kind,))


class Database:
    """``Queries`` for an async app: each runs in a worker thread (``sqlite3`` objects must not cross threads)."""

    def __init__(self, path: Path, delay: float) -> None:
        self.queries = Queries(path, delay)
        self.path = path
        self.delay = delay

    async def counts(self) -> dict[Kind, int]:
        return await anyio.to_thread.run_sync(self.queries.counts)

    async def product(self, product_id: int) -> Row | None:
        return await anyio.to_thread.run_sync(self.queries.product, product_id)

    async def stats(self) -> Row:
        return await anyio.to_thread.run_sync(self.queries.stats)

    async def cart_lines(self, session: str) -> CartLines:
        return await anyio.to_thread.run_sync(self.queries.cart_lines, session)

    async def save_carts(self, carts: Sequence[tuple[str, int, CartLines]]) -> None:
        await anyio.to_thread.run_sync(self.queries.save_carts, list(carts))


MAX_LINE_QTY = 999
CartLines = dict[str, int]  # product id (a string: JSON object keys are) -> quantity
CATALOGUE: dict[int, tuple[str, int]] = {pid: (name, cents) for pid, name, cents in PRODUCTS}


def cart_json(lines: CartLines) -> Row:
    """The public shape of a cart; names and prices come from the (static) catalogue, not a query."""
    items = []
    total_cents = 0
    for product_id, qty in sorted((int(pid), qty) for pid, qty in lines.items()):
        name, cents = CATALOGUE[product_id]
        items.append({"product_id": product_id, "name": name, "price": cents / 100, "qty": qty})
        total_cents += cents * qty
    return {"items": items, "total": total_cents / 100, "generated_at": _now()}


def product_json(row: Row) -> Row:
    """The public shape of a product; ``generated_at`` shows when a cached copy was made."""
    return {"id": row["id"], "name": row["name"], "price": row["price_cents"] / 100, "generated_at": _now()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def database(request: HTTPConnection) -> Database:
    """The app's database, from the lifespan state (shared by the Starlette app and the FastAPI mount)."""
    db = getattr(request.state, "db", None)
    if not isinstance(db, Database):
        raise RuntimeError("the sample app's lifespan has not run (is uvicorn started with --lifespan off?)")
    return db
