"""The shop's ``products`` table as SQLAlchemy sees it, for the writes made through the ORM.

The shop reads with plain ``sqlite3`` (``db.py``); its price changes, from the
shop's ``POST /products/{id}/price`` and from ``python -m sample_app.reprice``, go
through SQLAlchemy, so ``cachemw.sqlalchemy``'s commit hook purges the product's
tag: neither calls ``invalidate()``.
"""

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "Product"]


class Base(DeclarativeBase):
    pass


class Product(Base):
    """A row of ``products`` (``db.py`` makes the table)."""

    __tablename__ = "products"
    __cachemw_tags__ = ("product:{id}",)  # what a change to a row purges: the tag the product route declares

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String)
    price_cents: Mapped[int]
