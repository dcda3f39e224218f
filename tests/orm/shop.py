"""A small shop on SQLAlchemy behind cachemw, for the ORM hook tests: models, the app, a writer.

Every route is cached for an hour and tagged, so a page changes only when a purge
drops it: a test that sees the new value on the next GET saw the hook work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anyio
from sqlalchemy import Engine, ForeignKey, Numeric, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cachemw import CacheMiddleware, Settings, cache


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
    session.add_all([Customer(id=1, name="Ada"), Customer(id=2, name="Grace"),
                     Product(id=1, name="Espresso cup", price=Decimal("8.50")),
                     Product(id=2, name="Pour-over kettle", price=Decimal("39.00"))])
    session.flush()  # without relationships the flush does not order rows by their foreign keys
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


def shop_app(engine: Engine, settings: Settings, *, sync: str = "0s", pause: Pause | None = None) -> CacheMiddleware:
    """The shop's pages, each read in a worker thread with a sync session (the reads are not under test)."""

    async def read(work: Callable[[Session], Any]) -> Any:
        def run() -> Any:
            with Session(engine) as session:
                return work(session)

        return await anyio.to_thread.run_sync(run)

    @cache(ttl="1h", sync=sync, tags=["product:{id}"])
    async def product(request: Request) -> JSONResponse:
        found = await read(lambda s: s.get(Product, request.path_params["id"]))
        if pause is not None:
            await anyio.to_thread.run_sync(pause.after_read)
        if found is None:
            return JSONResponse({"missing": True}, status_code=404)
        return JSONResponse({"id": found.id, "price": str(found.price)})

    @cache(ttl="1h", sync=sync, tags=["table:products"])
    async def products(request: Request) -> JSONResponse:
        rows = await read(lambda s: s.execute(select(Product.id, Product.price).order_by(Product.id)).all())
        return JSONResponse([[row.id, str(row.price)] for row in rows])

    @cache(ttl="1h", sync=sync, tags=["customer:{id}"])
    async def customer(request: Request) -> JSONResponse:
        def orders(session: Session) -> Any:
            name = session.scalar(select(Customer.name).where(Customer.id == request.path_params["id"]))
            ids = session.scalars(select(Order.id).where(Order.customer_id == request.path_params["id"])
                                  .order_by(Order.id)).all()
            return {"name": name, "orders": list(ids)}

        return JSONResponse(await read(orders))

    @cache(ttl="1h", sync=sync, tags=["stats"])
    async def stats(request: Request) -> JSONResponse:
        count = await read(lambda s: s.scalar(select(func.count()).select_from(Order)))
        return JSONResponse({"orders": count})

    app = Starlette(routes=[
        Route("/products", products), Route("/products/{id:int}", product),
        Route("/customers/{id:int}", customer), Route("/stats", stats)])
    return CacheMiddleware(app, settings=settings)
