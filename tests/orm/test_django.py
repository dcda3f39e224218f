"""Django hooks: a committed save or delete shows on the next request, whoever made it; nothing else does.

On SQLite and on the private PostgreSQL (two database aliases the fixture adds to
the test project), against a real Redis. The pages (cachemw's ASGI middleware in
front of a small app reading through Django's ORM) are cached for an hour.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import anyio
import django  # type: ignore[import-untyped]
import httpx
import pytest

from cachemw import CacheMiddleware, ConfigError, Settings
from cachemw.django import DjangoHook, Purger, invalidate_on_commit

try:  # tests/ is a package
    from tests.budgets import Budgets
    from tests.helpers import client, eventually, lifespan
    from tests.orm.shop import Pages, Pause, run_worker, shop_app, truthy
    from tests.postgres_server import PostgresServer
except ImportError:  # tests/ as a plain directory (see tests/conftest.py)
    from budgets import Budgets  # type: ignore[no-redef,import-not-found]
    from helpers import client, eventually, lifespan  # type: ignore[no-redef,import-not-found]
    from orm.shop import Pages, Pause, run_worker, shop_app, truthy  # type: ignore[no-redef,import-not-found]
    from postgres_server import PostgresServer  # type: ignore[no-redef,import-not-found]

pytestmark = pytest.mark.anyio

PREFIX = "orm-django-test"


@pytest.fixture(scope="session")
def django_databases(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Two database aliases of the test project, ``shop_sqlite`` and ``shop_postgresql``, with the shop's tables."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.apps.djangoproject.settings")
    django.setup()
    from django.conf import settings  # type: ignore[import-untyped]
    from django.db import connections  # type: ignore[import-untyped]

    from tests.apps.djangoshop.models import MODELS

    sqlite_file = tmp_path_factory.mktemp("django-shop") / "shop.db"
    added = {
        "shop_sqlite": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(sqlite_file), "HOST": "", "PORT": ""},
        "shop_postgresql": {"ENGINE": "django.db.backends.postgresql", "NAME": postgres.new_database(),
                            "HOST": "127.0.0.1", "PORT": str(postgres.port), "USER": "postgres"},
    }
    # The project's settings have no such databases: added to Django's connections as its tests add theirs.
    settings.DATABASES.update(added)
    connections.settings.update(connections.configure_settings({"default": connections.settings["default"],
                                                                 **added}))
    for alias in added:
        with connections[alias].schema_editor() as editor:
            for model in MODELS:
                editor.create_model(model)
        connections[alias].close()
    return added


@pytest.fixture(params=["shop_sqlite", "shop_postgresql"])
def alias(request: pytest.FixtureRequest, django_databases: dict[str, dict[str, str]]) -> str:
    return str(request.param)


def in_thread(work: Callable[[], object]) -> Callable[[], object]:
    """Django's connections are per thread: close this one when done, as Django does after a request."""

    def run() -> object:
        from django.db import connections

        try:
            return work()
        finally:
            connections.close_all()

    return run


def seed(alias: str) -> None:
    from tests.apps.djangoshop.models import Category, Customer, Order, Product

    for model in (Order, Product.categories.through, Product, Category, Customer):
        model.objects.using(alias).all().delete()
    Customer.objects.using(alias).bulk_create([Customer(pk=1, name="Ada"), Customer(pk=2, name="Grace")])
    Category.objects.using(alias).bulk_create([Category(pk=1, name="cups"), Category(pk=2, name="kettles")])
    Product.objects.using(alias).bulk_create([Product(pk=1, name="Espresso cup", price=Decimal("8.50")),
                                              Product(pk=2, name="Pour-over kettle", price=Decimal("39.00"))])
    Product.objects.using(alias).get(pk=1).categories.add(1)
    Order.objects.using(alias).create(pk=1, customer_id=1, product_id=1, qty=2)
    # The rows above were given their ids: the next id the database makes follows them (PostgreSQL's sequences).
    from django.core.management.color import no_style  # type: ignore[import-untyped]
    from django.db import connections

    connection = connections[alias]
    with connection.cursor() as cursor:
        for statement in connection.ops.sequence_reset_sql(no_style(), [Customer, Category, Product, Order]):
            cursor.execute(statement)


class Shop(Pages):
    def __init__(self, app: CacheMiddleware, http: httpx.AsyncClient, hook: DjangoHook, alias: str,
                 pause: Pause) -> None:
        super().__init__(http)
        self.app, self.hook, self.alias, self.pause = app, hook, alias, pause

    async def write(self, work: Callable[[str], object]) -> None:
        """``work(alias)`` in a worker thread, as a sync Django view runs."""
        await anyio.to_thread.run_sync(in_thread(lambda: work(self.alias)))


@asynccontextmanager
async def shop(alias: str, redis_url: str, budgets: Budgets, *, cache: Purger | None = None) -> AsyncIterator[Shop]:
    from tests.apps.djangoshop.models import TAGS
    from tests.orm.django_reads import DjangoReads

    await anyio.to_thread.run_sync(in_thread(lambda: seed(alias)))
    pause = Pause()
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, store_timeout=budgets.store_timeout)
    app = shop_app(DjangoReads(alias), settings, pause=pause)
    hook = invalidate_on_commit(TAGS, cache=cache or app)
    try:
        async with lifespan(app), client(app) as http:
            yield Shop(app, http, hook, alias, pause)
    finally:
        pause.go.set()
        hook.disconnect()


def set_price(product_id: int, price: str) -> Callable[[str], None]:
    def work(alias: str) -> None:
        from django.db import transaction

        from tests.apps.djangoshop.models import Product

        with transaction.atomic(using=alias):
            product = Product.objects.using(alias).get(pk=product_id)
            product.price = Decimal(price)
            product.save()

    return work


async def test_a_saved_row_shows_on_the_next_request(alias: str, redis_url: str, budgets: Budgets) -> None:
    async with shop(alias, redis_url, budgets) as s:
        assert (await s.cached("/products/1"))["price"] == "8.50"
        assert (await s.cached("/products/2"))["price"] == "39.00"
        await s.write(set_price(1, "9.90"))
        assert await s.page("/products/1") == ("MISS", {"id": 1, "price": "9.90", "categories": ["cups"]})
        assert (await s.page("/products/2"))[0] == "HIT"


async def test_created_rows_and_m2m_changes_show(alias: str, redis_url: str, budgets: Budgets) -> None:
    async with shop(alias, redis_url, budgets) as s:
        assert await s.cached("/products") == [[1, "8.50"], [2, "39.00"]]
        assert await s.cached("/stats") == {"orders": 1}
        assert (await s.cached("/customers/2"))["orders"] == []
        assert await s.cached("/categories/2") == {"products": []}
        assert (await s.cached("/products/2"))["categories"] == []
        assert (await s.cached("/products/3")) == {"missing": True}  # a 404 is cached too

        def add(alias: str) -> None:
            from django.db import transaction

            from tests.apps.djangoshop.models import Order, Product

            with transaction.atomic(using=alias):
                grinder = Product.objects.using(alias).create(name="Grinder", price=Decimal("120.00"))  # its pk: 3
                Order.objects.using(alias).create(pk=2, customer_id=2, product_id=grinder.pk, qty=1)
                Product.objects.using(alias).get(pk=2).categories.add(2)  # m2m_changed

        await s.write(add)
        assert (await s.page("/products"))[1] == [[1, "8.50"], [2, "39.00"], [3, "120.00"]]
        assert (await s.page("/stats"))[1] == {"orders": 2}
        assert (await s.page("/customers/2"))[1]["orders"] == [2]
        assert (await s.page("/categories/2"))[1] == {"products": [2]}
        assert (await s.page("/products/2"))[1]["categories"] == ["kettles"]
        assert (await s.page("/products/3"))[1] == {"id": 3, "price": "120.00", "categories": []}


async def test_a_moved_foreign_key_purges_both_sides(alias: str, redis_url: str, budgets: Budgets) -> None:
    async with shop(alias, redis_url, budgets) as s:
        assert (await s.cached("/customers/1"))["orders"] == [1]
        assert (await s.cached("/customers/2"))["orders"] == []

        def move(alias: str) -> None:
            from django.db import transaction

            from tests.apps.djangoshop.models import Order

            with transaction.atomic(using=alias):
                order = Order.objects.using(alias).get(pk=1)
                order.customer_id = 2
                order.save()

        await s.write(move)
        assert (await s.page("/customers/1"))[1]["orders"] == []
        assert (await s.page("/customers/2"))[1]["orders"] == [1]


async def test_deleted_rows_show(alias: str, redis_url: str, budgets: Budgets) -> None:
    async with shop(alias, redis_url, budgets) as s:
        assert (await s.cached("/customers/1"))["orders"] == [1]
        assert await s.cached("/stats") == {"orders": 1}
        assert (await s.cached("/categories/1")) == {"products": [1]}

        def remove(alias: str) -> None:
            from tests.apps.djangoshop.models import Order, Product

            Order.objects.using(alias).filter(customer_id=1).delete()  # a queryset's delete: post_delete per row
            Product.objects.using(alias).get(pk=1).categories.clear()  # autocommit, m2m clear()

        await s.write(remove)
        assert (await s.page("/customers/1"))[1]["orders"] == []
        assert (await s.page("/stats"))[1] == {"orders": 0}
        assert (await s.page("/categories/1"))[1] == {"products": []}


async def test_a_rollback_purges_nothing_and_a_savepoints_rollback_loses_nothing(
        alias: str, redis_url: str, budgets: Budgets) -> None:
    async with shop(alias, redis_url, budgets) as s:
        assert (await s.cached("/products/1"))["price"] == "8.50"
        assert (await s.cached("/products/2"))["price"] == "39.00"

        def rolled_back(alias: str) -> None:
            from django.db import transaction

            class Undo(Exception):
                pass

            try:
                with transaction.atomic(using=alias):
                    set_price(1, "1.00")(alias)
                    raise Undo
            except Undo:
                pass
            with transaction.atomic(using=alias):
                try:
                    with transaction.atomic(using=alias):  # a savepoint: the batch's callback is made in it
                        set_price(1, "2.00")(alias)
                        raise Undo
                except Undo:
                    pass
                set_price(2, "40.00")(alias)  # after the savepoint's rollback: must still be purged

        await s.write(rolled_back)
        assert await s.page("/products/1") == ("HIT", {"id": 1, "price": "8.50", "categories": ["cups"]})
        assert (await s.page("/products/2"))[1]["price"] == "40.00"
        assert s.hook.purger.purged == 1


async def test_one_purge_per_transaction(alias: str, redis_url: str, budgets: Budgets) -> None:
    async with shop(alias, redis_url, budgets) as s:
        for path in ("/products/1", "/products/2", "/stats"):
            await s.cached(path)

        def several(alias: str) -> None:
            from django.db import transaction

            from tests.apps.djangoshop.models import Order

            with transaction.atomic(using=alias):
                set_price(1, "1.00")(alias)
                set_price(2, "2.00")(alias)
                Order.objects.using(alias).create(pk=2, customer_id=2, product_id=2, qty=3)

        await s.write(several)
        assert s.hook.purger.purged == 1
        assert (await s.page("/products/1"))[1]["price"] == "1.00"
        assert (await s.page("/products/2"))[1]["price"] == "2.00"
        assert (await s.page("/stats"))[1] == {"orders": 2}


async def test_bulk_statements_purge_the_coarse_tags(alias: str, redis_url: str, budgets: Budgets) -> None:
    async with shop(alias, redis_url, budgets) as s:
        assert await s.cached("/products") == [[1, "8.50"], [2, "39.00"]]
        assert await s.cached("/stats") == {"orders": 1}

        def reprice_all(alias: str) -> None:
            from django.db.models import F  # type: ignore[import-untyped]

            from tests.apps.djangoshop.models import Product

            Product.objects.using(alias).update(price=F("price") * 2)  # no signal: PurgingQuerySet's update()

        await s.write(reprice_all)
        assert (await s.page("/products"))[1] == [[1, "17.00"], [2, "78.00"]]

        def many_orders(alias: str) -> None:
            from django.db import transaction

            from tests.apps.djangoshop.models import Order

            with transaction.atomic(using=alias):
                Order.objects.using(alias).bulk_create([Order(pk=n, customer_id=2, product_id=2, qty=1)
                                                        for n in (2, 3)])

        await s.write(many_orders)
        assert (await s.page("/stats"))[1] == {"orders": 3}  # "stats" names no column: coarse


@pytest.mark.parametrize("writer", ["this app", "another cache"])
async def test_a_fill_that_read_before_the_commit_is_not_stored_after_the_purge(
        alias: str, redis_url: str, budgets: Budgets, writer: str) -> None:
    other = Purger(redis_url=redis_url, key_prefix=PREFIX) if writer == "another cache" else None
    try:
        async with shop(alias, redis_url, budgets, cache=other) as s:
            fills = s.app.supervisor.counters_for("fill")
            s.pause.armed = True
            answers: list[tuple[str, Any]] = []
            async with anyio.create_task_group() as tg:
                async def slow_read() -> None:
                    answers.append(await s.page("/products/1"))

                tg.start_soon(slow_read)
                await eventually(lambda: truthy(s.pause.read.is_set()), what="the slow read read the old price")
                await s.write(set_price(1, "9.90"))
                s.pause.go.set()
            assert answers == [("MISS", {"id": 1, "price": "8.50", "categories": ["cups"]})]
            await eventually(lambda: truthy(fills.queued == 0 and fills.running == 0),
                             what="the slow read's fill settled")
            s.pause.armed = False
            assert await s.page("/products/1") == ("MISS", {"id": 1, "price": "9.90", "categories": ["cups"]})
    finally:
        if other is not None:
            other.close()


async def test_a_save_from_another_process_shows(alias: str, redis_url: str, budgets: Budgets,
                                                 django_databases: dict[str, dict[str, str]]) -> None:
    async with shop(alias, redis_url, budgets) as s:
        assert (await s.cached("/products/1"))["price"] == "8.50"
        database = django_databases[alias]
        said = await run_worker("tests.orm.django_reprice_worker", [
            database["ENGINE"], database["NAME"], database["HOST"], database["PORT"], redis_url, PREFIX, "1",
            "9.90"], budgets)
        assert "purged 1" in said, said
        await s.changes_to("/products/1", {"id": 1, "price": "9.90", "categories": ["cups"]})


async def test_tags_from_settings_and_the_projects_middleware(alias: str, redis_url: str, budgets: Budgets) -> None:
    """``settings.CACHEMW_MODEL_TAGS`` and no ``cache=``: the hook purges through ``wsgi_application``'s middleware."""
    from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]
    from django.test import override_settings  # type: ignore[import-untyped]

    from cachemw.django import wsgi_application

    with override_settings(CACHEMW_MODEL_TAGS={"djangoshop.Product": ["product:{id}"]}):
        hook = invalidate_on_commit()
    try:
        application = wsgi_application(get_wsgi_application(), redis_url=redis_url)
        assert hook.purger.cache is application
        with override_settings(CACHEMW_MODEL_TAGS={"djangoshop.Nothing": ["x"]}), \
                pytest.raises(ConfigError, match=r"CACHEMW_MODEL_TAGS: 'djangoshop.Nothing' names no model"):
            invalidate_on_commit()
        async with shop(alias, redis_url, budgets, cache=Purger(application)) as s:
            assert (await s.cached("/products/1"))["price"] == "8.50"
            before = hook.purger.purged
            await s.write(set_price(1, "9.90"))
            assert hook.purger.purged == before + 1  # the settings' hook purged too, through the project's cache
    finally:
        hook.disconnect()
        application.close()
