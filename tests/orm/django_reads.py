"""The shop's pages read through Django's ORM, on one database alias."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import connections  # type: ignore[import-untyped]

from tests.apps.djangoshop.models import Category, Customer, Order, Product

T = TypeVar("T")


def _closing(read: Callable[..., T]) -> Callable[..., T]:
    """Django's connections are per thread: close this one when done, as Django does after a request."""

    @functools.wraps(read)
    def run(*args: Any) -> T:
        try:
            return read(*args)
        finally:
            connections.close_all()

    return run


class DjangoReads:
    def __init__(self, alias: str) -> None:
        self.alias = alias

    @_closing
    def product(self, product_id: int) -> dict[str, Any] | None:
        found = Product.objects.using(self.alias).filter(pk=product_id).first()
        if found is None:
            return None
        names = sorted(found.categories.values_list("name", flat=True))
        return {"id": found.pk, "price": str(found.price), "categories": names}

    @_closing
    def products(self) -> list[list[Any]]:
        rows = Product.objects.using(self.alias).order_by("pk").values_list("pk", "price")
        return [[pk, str(price)] for pk, price in rows]

    @_closing
    def customer(self, customer_id: int) -> dict[str, Any]:
        found = Customer.objects.using(self.alias).filter(pk=customer_id).first()
        ids = Order.objects.using(self.alias).filter(customer_id=customer_id).order_by("pk").values_list("pk",
                                                                                                       flat=True)
        return {"name": None if found is None else found.name, "orders": list(ids)}

    @_closing
    def stats(self) -> dict[str, Any]:
        return {"orders": Order.objects.using(self.alias).count()}

    @_closing
    def category(self, category_id: int) -> dict[str, Any]:
        ids = Category.objects.using(self.alias).get(pk=category_id).products.order_by("pk").values_list("pk",
                                                                                                       flat=True)
        return {"products": list(ids)}
