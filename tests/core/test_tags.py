"""Tag templates filled from rows: what a change to a row purges, and what a bulk statement does."""

from __future__ import annotations

import pytest

from cachemw.core.policy import ConfigError
from cachemw.core.tags import TableTags, fill_template, template_fields

ORDERS = TableTags.for_table("tags for Order", "orders", ["stats", "order:{id}", "customer:{customer_id}"],
                             ["id", "customer_id", "qty"])


def test_a_rows_tags_are_its_tables_and_its_templates_filled() -> None:
    assert ORDERS.fields == ("id", "customer_id")
    assert ORDERS.row({"id": 7, "customer_id": 2}) == ["table:orders", "stats", "order:7", "customer:2"]


def test_a_template_whose_field_is_null_is_skipped() -> None:
    assert ORDERS.row({"id": 7, "customer_id": None}) == ["table:orders", "stats", "order:7"]


def test_a_bulk_statement_purges_the_coarse_tags_only() -> None:
    assert ORDERS.coarse() == ["table:orders", "stats"]


def test_a_template_naming_no_column_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError) as caught:
        TableTags.for_table("tags for Order", "orders", ["customer:{customer}"], ["id", "customer_id"])
    message = str(caught.value)
    assert "tags for Order" in message and "'customer:{customer}'" in message and "'customer'" in message
    assert "customer_id, id" in message


def test_a_string_instead_of_a_list_is_an_error_with_a_hint() -> None:
    with pytest.raises(ConfigError, match=r'HINT: write \["product:\{id\}"\]'):
        TableTags.for_table("tags for Product", "products", "product:{id}", ["id"])


def test_fields_as_routes_write_them() -> None:
    assert template_fields("product:{id:int}/{slug}") == ["id", "slug"]
    assert fill_template("product:{id:int}", {"id": "3"}) == "product:3"
