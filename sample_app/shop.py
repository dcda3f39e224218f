"""What the two sample shops share beside the database: config, session cookie, input checks, the index page.

The Starlette shop (``app.py``) and the Flask shop (``flask_app.py``) differ only in
how they read requests and write responses; what a request may contain, and what
the answers say, is decided here once.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeGuard

from sample_app.db import CATALOGUE, KINDS, MAX_LINE_QTY, CartLines, Kind

__all__ = ["CONFIG_PATH", "SESSION_COOKIE", "SESSION_MAX_AGE", "SESSION_PATH", "BadInput", "cart_item",
           "env_db_path", "env_delay", "index_text", "new_price", "queries_json", "session_of",
           "with_item"]

CONFIG_PATH = Path(__file__).with_name("cachemw.toml")
SESSION_COOKIE = "session"  # the cookie cachemw's default identity reads, too
# The cookie is only sent to the cart routes: cachemw never answers a request
# that carries credentials from a shared entry, so a site-wide cookie would turn
# every product page into a miss for anyone who has a cart.
SESSION_PATH = "/cart"
SESSION_MAX_AGE = 30 * 24 * 3600
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_MAX_PRICE_CENTS = 100_000_000


class BadInput(Exception):
    """A request body the shop refuses: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def session_of(cookie: str | None) -> tuple[str, bool]:
    """The visitor's session id, and whether it is new (then the response must set it)."""
    if cookie is not None and _SESSION_ID.fullmatch(cookie):
        return cookie, False
    return secrets.token_urlsafe(18), True


def cart_item(body: object) -> tuple[int, int]:
    """``(product_id, qty)`` of a ``POST /cart/items`` body; raises BadInput."""
    if not isinstance(body, dict):
        raise BadInput(422, 'expected {"product_id": n, "qty": n}')
    product_id, qty = body.get("product_id"), body.get("qty", 1)
    if not _is_int(product_id) or not _is_int(qty) or not 1 <= qty <= MAX_LINE_QTY:
        raise BadInput(422, f'expected {{"product_id": n, "qty": n}} with qty from 1 to {MAX_LINE_QTY}')
    if product_id not in CATALOGUE:
        raise BadInput(404, f"no product {product_id}")
    return product_id, qty


def with_item(lines: CartLines, product_id: int, qty: int) -> CartLines:
    """The cart with ``qty`` more of ``product_id`` (at most MAX_LINE_QTY of one product)."""
    return {**lines, str(product_id): min(lines.get(str(product_id), 0) + qty, MAX_LINE_QTY)}


def new_price(body: object) -> int:
    """The price in cents of a ``POST /products/{id}/price`` body (``{"price": 9.5}``); raises BadInput."""
    price = body.get("price") if isinstance(body, dict) else None
    if not isinstance(price, (int, float)) or isinstance(price, bool) or not 0 < price * 100 < _MAX_PRICE_CENTS:
        raise BadInput(422, f'expected {{"price": n}} with n above 0 and below {_MAX_PRICE_CENTS // 100}')
    return round(price * 100)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def queries_json(counts: Mapping[Kind, int]) -> dict[str, int]:
    """``/debug/queries``: the queries run so far, per kind, and their total."""
    return {**{kind: counts[kind] for kind in KINDS}, "total": sum(counts.values())}


def env_delay() -> float:
    """``SAMPLE_DB_DELAY``: seconds every query sleeps (default 0.3)."""
    raw = os.environ.get("SAMPLE_DB_DELAY", "0.3")
    try:
        delay = float(raw)
    except ValueError:
        delay = -1.0
    if not 0 <= delay < 60:
        raise ValueError(f"SAMPLE_DB_DELAY={raw!r}: expected a number of seconds from 0 to 60")
    return delay


def env_db_path() -> str | None:
    """``SAMPLE_DB_PATH``, or None for a database in a temporary directory."""
    return os.environ.get("SAMPLE_DB_PATH") or None


def index_text(title: str, routes: Sequence[str], delay: float, base: str, tries: Sequence[str] = ()) -> str:
    """What to try, with the server's own address, so the commands can be pasted as they are."""
    listing = "\n".join(routes)
    extra = "".join(f"  {line}\n" for line in tries)
    return f"""{title}

{listing}

Every query takes {delay:g} s. Try:

  curl -si {base}/products/1 | grep -iE 'x-cache|age|etag'     # twice: MISS, then HIT
  curl -s {base}/debug/queries                                  # the product query ran once
  time curl -s {base}/stats > /dev/null                         # twice: slow, then instant
  curl -s -c jar -b jar {base}/cart/items -H 'content-type: application/json' \\
       -d '{{"product_id": 2, "qty": 1}}'
  curl -si -c jar -b jar {base}/cart                            # never from the cache
{extra}"""
