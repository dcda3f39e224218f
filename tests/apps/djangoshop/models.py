"""The ORM hook tests' shop as Django models (tables made by the tests' schema editor, no migrations)."""

from __future__ import annotations

from typing import Any

from django.db import models  # type: ignore[import-untyped]

from cachemw.django import PurgingQuerySet


class Customer(models.Model):  # type: ignore[misc]
    __cachemw_tags__ = ("customer:{id}",)  # the declarative form

    name = models.CharField(max_length=80)

    class Meta:
        app_label = "djangoshop"
        db_table = "customers"  # the tables the pages are tagged with (table:products)


class Category(models.Model):  # type: ignore[misc]
    name = models.CharField(max_length=80)

    class Meta:
        app_label = "djangoshop"
        db_table = "categories"  # the tables the pages are tagged with (table:products)


class Product(models.Model):  # type: ignore[misc]
    name = models.CharField(max_length=80)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    categories = models.ManyToManyField(Category, related_name="products")

    objects = PurgingQuerySet.as_manager()  # update() and the bulk methods purge table:products

    class Meta:
        app_label = "djangoshop"
        db_table = "products"  # the tables the pages are tagged with (table:products)


class Order(models.Model):  # type: ignore[misc]
    customer = models.ForeignKey(Customer, on_delete=models.CASCADE)
    product = models.ForeignKey(Product, on_delete=models.CASCADE)
    qty = models.IntegerField()

    objects = PurgingQuerySet.as_manager()

    class Meta:
        app_label = "djangoshop"
        db_table = "orders"  # the tables the pages are tagged with (table:products)


TAGS: dict[Any, list[str]] = {
    Product: ["product:{id}"],
    Order: ["stats", "order:{id}", "customer:{customer_id}"],
    "djangoshop.Category": ["category:{id}"],
}
MODELS = (Customer, Category, Product, Order)
