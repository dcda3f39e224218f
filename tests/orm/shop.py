"""A small shop on SQLAlchemy behind cachemw, for the ORM hook tests: models, the app, a writer.

Every route is cached for an hour and tagged, so a page changes only when a purge
drops it: a test that sees the new value on the next GET saw the hook work.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import anyio
import httpx
from sqlalchemy import Engine, ForeignKey, Numeric, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache

try:  # tests/ is a package
    from tests.budgets import Budgets
    from tests.helpers import eventually
except ImportError:  # tests/ as a plain directory (see tests/conftest.py)
    from budgets import Budgets  # type: ignore[no-redef,import-not-found]
    from helpers import eventually  # type: ignore[no-redef,import-not-found]


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    __cachemw_tags__ = ("customer:{id}",)  # the declarative form

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    qty: Mapped[int]


TAGS: dict[Any, list[str]] = {
    Product: ["product:{id}"],
    Order: ["stats", "order:{id}", "customer:{customer_id}"],
}


def seed(session: Session) -> None:
    session.add_all([Customer(id=1, name="Ada"), Customer(id=2, name="Grace")])
    # The products' ids come from the database (1 and 2 in a new table), so a new one's is 3 on PostgreSQL too.
    session.add(Product(name="Espresso cup", price=Decimal("8.50")))
    session.flush()  # one at a time, in order; and before the order that refers to them
    session.add(Product(name="Pour-over kettle", price=Decimal("39.00")))
    session.flush()
    session.add(Order(id=1, customer_id=1, product_id=1, qty=2))


def create(engine: Engine) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        seed(session)


class Pause:
    """Holds the product handler after its read until the test opens it (the slow read)."""

    def __init__(self) -> None:
        self.armed = False
        self.read = threading.Event()
        self.go = threading.Event()

    def after_read(self) -> None:
        if self.armed:
            self.read.set()
            if not self.go.wait(60):
                raise TimeoutError("the test never let the slow read go on")


class Reads(Protocol):
    """What the shop's pages show, read by one ORM (each call runs in a worker thread)."""

    def product(self, product_id: int) -> dict[str, Any] | None: ...
    def products(self) -> list[list[Any]]: ...
    def customer(self, customer_id: int) -> dict[str, Any]: ...
    def stats(self) -> dict[str, Any]: ...
    def category(self, category_id: int) -> dict[str, Any]: ...


class SqlAlchemyReads:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def product(self, product_id: int) -> dict[str, Any] | None:
        with Session(self.engine) as session:
            found = session.get(Product, product_id)
            return None if found is None else {"id": found.id, "price": str(found.price)}

    def products(self) -> list[list[Any]]:
        with Session(self.engine) as session:
            rows = session.execute(select(Product.id, Product.price).order_by(Product.id)).all()
            return [[row.id, str(row.price)] for row in rows]

    def customer(self, customer_id: int) -> dict[str, Any]:
        with Session(self.engine) as session:
            name = session.scalar(select(Customer.name).where(Customer.id == customer_id))
            ids = session.scalars(select(Order.id).where(Order.customer_id == customer_id).order_by(Order.id)).all()
            return {"name": name, "orders": list(ids)}

    def stats(self) -> dict[str, Any]:
        with Session(self.engine) as session:
            return {"orders": session.scalar(select(func.count()).select_from(Order))}

    def category(self, category_id: int) -> dict[str, Any]:
        raise NotImplementedError("the SQLAlchemy shop has no categories")


def shop_app(reads: Reads, settings: Settings, *, sync: str = "0s", pause: Pause | None = None) -> CacheMiddleware:
    """The shop's pages, each cached for an hour and tagged, read in a worker thread."""

    async def read(work: Callable[[], Any]) -> Any:
        return await anyio.to_thread.run_sync(work)

    @cache(ttl="1h", sync=sync, tags=["product:{id}"])
    async def product(request: Request) -> JSONResponse:
        found = await read(lambda: reads.product(request.path_params["id"]))
        if pause is not None:
            await anyio.to_thread.run_sync(pause.after_read)
        return JSONResponse({"missing": True} if found is None else found, status_code=404 if found is None else 200)

    @cache(ttl="1h", sync=sync, tags=["table:products"])
    async def products(request: Request) -> JSONResponse:
        return JSONResponse(await read(reads.products))

    @cache(ttl="1h", sync=sync, tags=["customer:{id}"])
    async def customer(request: Request) -> JSONResponse:
        return JSONResponse(await read(lambda: reads.customer(request.path_params["id"])))

    @cache(ttl="1h", sync=sync, tags=["stats"])
    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(await read(reads.stats))

    @cache(ttl="1h", sync=sync, tags=["category:{id}"])
    async def category(request: Request) -> JSONResponse:
        return JSONResponse(await read(lambda: reads.category(request.path_params["id"])))

    app = Starlette(routes=[
        Route("/products", products), Route("/products/{id:int}", product),
        Route("/customers/{id:int}", customer), Route("/stats", stats), Route("/categories/{id:int}", category)])
    return CacheMiddleware(app, settings=settings)


class Pages:
    """A client's view of the shop: a page and how it was answered."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def page(self, path: str) -> tuple[str, Any]:
        response = await self.http.get(path)
        return response.headers.get("x-cache", ""), response.json()

    async def cached(self, path: str) -> Any:
        """The page, once it is answered from the cache (its fill runs after the first answer)."""
        seen: list[Any] = []

        async def hit() -> bool:
            state, body = await self.page(path)
            seen[:] = [body]
            return state == "HIT"

        await eventually(hit, what=f"{path} answered from the cache")
        return seen[0]

    async def changes_to(self, path: str, body: Any) -> None:
        """Until ``path`` answers ``body``: a purge from another process reaches this server by broadcast."""

        async def changed() -> bool:
            return bool((await self.page(path))[1] == body)

        await eventually(changed, what=f"{path} answering {body}")


ROOT = Path(__file__).resolve().parents[2]


async def run_worker(module: str, args: list[str], budgets: Budgets) -> str:
    """``python -m module args`` from the checkout's root, in a worker thread; returns what it printed."""
    done = await anyio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
        timeout=budgets.process_start, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


async def truthy(value: bool) -> bool:
    """For ``eventually`` over a plain condition."""
    return value
