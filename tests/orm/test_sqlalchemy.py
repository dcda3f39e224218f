"""SQLAlchemy hooks: a committed change shows on the next request, whoever made it; nothing else does.

Every test runs on SQLite and on a private PostgreSQL, with a sync ``Session`` (its
commit in a worker thread, as a FastAPI sync endpoint's) and with an ``AsyncSession``
(its commit on the app's loop), against a real Redis. The pages are cached for an
hour: a page that changes changed because the hook purged it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import Engine, create_engine, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, load_only, sessionmaker

from cachemw import CacheMiddleware, ConfigError, Settings
from cachemw.sqlalchemy import CommitHook, Purger, invalidate_on_commit

try:  # tests/ is a package
    from tests.budgets import Budgets
    from tests.helpers import client, eventually, lifespan
    from tests.orm.conftest import Database
    from tests.orm.shop import (
        TAGS,
        Customer,
        Order,
        Pages,
        Pause,
        Product,
        SqlAlchemyReads,
        create,
        run_worker,
        shop_app,
        truthy,
    )
    from tests.redis_server import RedisServer
except ImportError:  # tests/ as a plain directory (see tests/conftest.py)
    from budgets import Budgets  # type: ignore[no-redef,import-not-found]
    from helpers import client, eventually, lifespan  # type: ignore[no-redef,import-not-found]
    from orm.conftest import Database  # type: ignore[no-redef,import-not-found]
    from orm.shop import (  # type: ignore[no-redef,import-not-found]
        TAGS,
        Customer,
        Order,
        Pages,
        Pause,
        Product,
        SqlAlchemyReads,
        create,
        run_worker,
        shop_app,
        truthy,
    )

pytestmark = pytest.mark.anyio

PREFIX = "orm-test"

Work = Callable[[Session], object]


@pytest.fixture(params=["sync", "asyncio"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Writer:
    """Commits as the app would: a sync session in a worker thread, or an AsyncSession on the app's loop."""

    def __init__(self, database: Database, mode: str, cache: CacheMiddleware | Purger) -> None:
        self.mode = mode
        self.engine: Engine | None = None
        self.async_engine: AsyncEngine | None = None
        if mode == "sync":
            self.engine = create_engine(database.sync_url)
            self.factory: Any = sessionmaker(self.engine)
        else:
            self.async_engine = create_async_engine(database.async_url)
            self.factory = async_sessionmaker(self.async_engine)
        self.hook: CommitHook = invalidate_on_commit(self.factory, tags=TAGS, cache=cache)

    async def write(self, work: Work, *, rollback: bool = False) -> None:
        if self.mode == "sync":
            await anyio.to_thread.run_sync(self._write_in_thread, work, rollback)
            return
        async with self.factory() as session:
            await session.run_sync(work)
            await (session.rollback() if rollback else session.commit())

    def _write_in_thread(self, work: Work, rollback: bool) -> None:
        with self.factory() as session:
            work(session)
            session.rollback() if rollback else session.commit()

    async def aclose(self) -> None:
        self.hook.remove()
        if self.engine is not None:
            self.engine.dispose()
        if self.async_engine is not None:
            await self.async_engine.dispose()


class Shop(Pages):
    def __init__(self, app: CacheMiddleware, http: httpx.AsyncClient, writer: Writer, pause: Pause) -> None:
        super().__init__(http)
        self.app, self.writer, self.pause = app, writer, pause


def settings_for(redis_url: str, budgets: Budgets) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=PREFIX, store_timeout=budgets.store_timeout)


@asynccontextmanager
async def shop(database: Database, mode: str, redis_url: str, budgets: Budgets, *, sync: str = "0s",
               writer_cache: Purger | None = None) -> AsyncIterator[Shop]:
    engine = create_engine(database.sync_url)
    create(engine)
    pause = Pause()
    app = shop_app(SqlAlchemyReads(engine), settings_for(redis_url, budgets), sync=sync, pause=pause)
    writer = Writer(database, mode, writer_cache or app)
    try:
        async with lifespan(app), client(app) as http:
            yield Shop(app, http, writer, pause)
    finally:
        pause.go.set()
        await writer.aclose()
        engine.dispose()


def set_price(product_id: int, price: str) -> Work:
    def work(session: Session) -> None:
        product = session.get(Product, product_id)
        assert product is not None
        product.price = Decimal(price)

    return work


async def test_an_updated_row_shows_on_the_next_request(database: Database, mode: str, redis_url: str,
                                                         budgets: Budgets) -> None:
    async with shop(database, mode, redis_url, budgets) as s:
        assert (await s.cached("/products/1"))["price"] == "8.50"
        assert (await s.cached("/products/2"))["price"] == "39.00"
        await s.writer.write(set_price(1, "9.90"))
        assert await s.page("/products/1") == ("MISS", {"id": 1, "price": "9.90"})
        assert (await s.page("/products/2"))[0] == "HIT"  # another row's page is left alone


async def test_inserted_rows_show_on_the_next_request(database: Database, mode: str, redis_url: str,
                                                      budgets: Budgets) -> None:
    async with shop(database, mode, redis_url, budgets) as s:
        assert await s.cached("/products") == [[1, "8.50"], [2, "39.00"]]
        assert (await s.cached("/customers/2"))["orders"] == []
        assert await s.cached("/stats") == {"orders": 1}
        assert (await s.cached("/customers/3")) == {"name": None, "orders": []}
        assert (await s.cached("/products/3")) == {"missing": True}  # a 404 is cached too

        def add(session: Session) -> None:
            grinder = Product(name="Grinder", price=Decimal("120.00"))  # its id comes from the database
            session.add_all([grinder, Customer(id=3, name="Edsger")])
            session.flush()
            session.add(Order(id=2, customer_id=2, product_id=grinder.id, qty=1))

        await s.writer.write(add)
        assert (await s.page("/products"))[1] == [[1, "8.50"], [2, "39.00"], [3, "120.00"]]
        assert (await s.page("/customers/2"))[1]["orders"] == [2]
        assert (await s.page("/stats"))[1] == {"orders": 2}
        assert (await s.page("/customers/3"))[1]["name"] == "Edsger"  # declared on the class
        assert (await s.page("/products/3"))[1] == {"id": 3, "price": "120.00"}


async def test_a_row_whose_foreign_key_moved_purges_both_sides(database: Database, mode: str, redis_url: str,
                                                               budgets: Budgets) -> None:
    async with shop(database, mode, redis_url, budgets) as s:
        assert (await s.cached("/customers/1"))["orders"] == [1]
        assert (await s.cached("/customers/2"))["orders"] == []

        def move(session: Session) -> None:
            order = session.get(Order, 1)
            assert order is not None
            session.expire(order)  # the old customer_id is not loaded when it is set: it must be read
            order.customer_id = 2

        await s.writer.write(move)
        assert (await s.page("/customers/1"))[1]["orders"] == []
        assert (await s.page("/customers/2"))[1]["orders"] == [1]


async def test_deleted_rows_show_on_the_next_request(database: Database, mode: str, redis_url: str,
                                                     budgets: Budgets) -> None:
    async with shop(database, mode, redis_url, budgets) as s:
        assert (await s.cached("/customers/1"))["orders"] == [1]
        assert await s.cached("/stats") == {"orders": 1}

        def remove(session: Session) -> None:
            # A deleted row's tags are read even when the columns they name were never loaded.
            order = session.scalars(select(Order).where(Order.id == 1).options(load_only(Order.qty))).one()
            session.delete(order)

        await s.writer.write(remove)
        assert (await s.page("/customers/1"))[1]["orders"] == []
        assert (await s.page("/stats"))[1] == {"orders": 0}


async def test_a_rollback_purges_nothing(database: Database, mode: str, redis_url: str, budgets: Budgets) -> None:
    async with shop(database, mode, redis_url, budgets) as s:
        assert (await s.cached("/products/1"))["price"] == "8.50"
        assert (await s.cached("/products/2"))["price"] == "39.00"
        await s.writer.write(set_price(1, "1.00"), rollback=True)

        def rolled_back_then_committed(session: Session) -> None:
            set_price(1, "2.00")(session)
            session.flush()
            session.rollback()  # the first transaction's rows are not the second's
            set_price(2, "40.00")(session)

        await s.writer.write(rolled_back_then_committed)
        assert await s.page("/products/1") == ("HIT", {"id": 1, "price": "8.50"})
        assert (await s.page("/products/2"))[1]["price"] == "40.00"


async def test_bulk_statements_purge_the_tables_coarse_tags(database: Database, mode: str, redis_url: str,
                                                            budgets: Budgets) -> None:
    async with shop(database, mode, redis_url, budgets) as s:
        assert await s.cached("/products") == [[1, "8.50"], [2, "39.00"]]
        assert await s.cached("/stats") == {"orders": 1}
        await s.writer.write(lambda session: session.execute(update(Product).values(price=Product.price * 2)))
        assert (await s.page("/products"))[1] == [[1, "17.00"], [2, "78.00"]]  # tagged table:products

        await s.writer.write(lambda session: session.execute(delete(Order).where(Order.customer_id == 1)))
        assert (await s.page("/stats"))[1] == {"orders": 0}  # "stats" names no column: coarse

        await s.writer.write(lambda session: session.execute(
            insert(Order), [{"id": 5, "customer_id": 2, "product_id": 2, "qty": 1}]))
        assert (await s.page("/stats"))[1] == {"orders": 1}


async def test_one_purge_per_transaction(database: Database, mode: str, redis_url: str, budgets: Budgets) -> None:
    async with shop(database, mode, redis_url, budgets) as s:
        for path in ("/products/1", "/products/2", "/stats", "/customers/2"):
            await s.cached(path)
        purger = s.writer.hook.purger

        def several(session: Session) -> None:
            set_price(1, "1.00")(session)
            session.flush()  # two flushes, one transaction
            set_price(2, "2.00")(session)
            session.add(Order(id=2, customer_id=2, product_id=2, qty=3))

        await s.writer.write(several)
        assert purger.purged == 1
        assert (await s.page("/products/1"))[1]["price"] == "1.00"
        assert (await s.page("/products/2"))[1]["price"] == "2.00"
        assert (await s.page("/stats"))[1] == {"orders": 2}
        assert (await s.page("/customers/2"))[1]["orders"] == [2]


@pytest.mark.parametrize("writer", ["this app", "another cache"])
async def test_a_fill_that_read_before_the_commit_is_not_stored_after_the_purge(
        database: Database, mode: str, redis_url: str, budgets: Budgets, writer: str) -> None:
    """A slow read of the old price, the commit and its purge, then the read's fill: the fill is refused."""
    other = Purger(settings=settings_for(redis_url, budgets)) if writer == "another cache" else None
    try:
        async with shop(database, mode, redis_url, budgets, writer_cache=other) as s:
            fills = s.app.supervisor.counters_for("fill")
            s.pause.armed = True
            async with anyio.create_task_group() as tg:
                answers: list[tuple[str, Any]] = []

                async def slow_read() -> None:
                    answers.append(await s.page("/products/1"))

                tg.start_soon(slow_read)
                await eventually(lambda: truthy(s.pause.read.is_set()), what="the slow read read the old price")
                await s.writer.write(set_price(1, "9.90"))
                s.pause.go.set()
            assert answers == [("MISS", {"id": 1, "price": "8.50"})]  # it answered what it read
            # Its fill was queued when the answer ended (or dropped at once, when this process heard the purge).
            await eventually(lambda: truthy(fills.queued == 0 and fills.running == 0),
                             what="the slow read's fill settled")
            s.pause.armed = False
            assert await s.page("/products/1") == ("MISS", {"id": 1, "price": "9.90"})
    finally:
        if other is not None:
            other.close()


async def test_a_write_from_another_process_reaches_every_servers_l1(database: Database, mode: str, redis_url: str,
                                                                    budgets: Budgets) -> None:
    """A process that serves no HTTP commits (sync or asyncio); the app's L1 copy goes too."""
    async with shop(database, "sync", redis_url, budgets, sync="10m") as s:
        assert (await s.cached("/products/1"))["price"] == "8.50"
        assert len(s.app.l1) == 1, "the page is in this server's L1"
        url = database.sync_url if mode == "sync" else database.async_url
        said = await run_worker("tests.orm.reprice_worker", [mode, url, redis_url, PREFIX, "1", "9.90"], budgets)
        assert "purged 1" in said, said
        await s.changes_to("/products/1", {"id": 1, "price": "9.90"})


async def test_a_purge_the_store_missed_at_commit_is_retried_in_the_background(
        database: Database, mode: str, killable: RedisServer, budgets: Budgets) -> None:
    """Redis frozen at commit time: the commit succeeds, the purge is retried, and lands once Redis is back."""
    async with shop(database, mode, killable.url, budgets) as s:
        assert (await s.cached("/products/1"))["price"] == "8.50"
        purger = s.writer.hook.purger
        purges = s.app.supervisor.counters_for("purge")
        killable.pause()
        try:
            await s.writer.write(set_price(1, "9.90"))  # returns: the cache never fails a commit
            assert (purger.purged, purger.retried) == (0, 1)
        finally:
            killable.resume()
        await eventually(lambda: truthy(purges.done == 1), what="the retried purge landed")
        assert await s.page("/products/1") == ("MISS", {"id": 1, "price": "9.90"})


def test_a_template_naming_no_column_fails_at_the_call() -> None:
    factory = sessionmaker()
    with pytest.raises(ConfigError, match=r"tags for Product: tag 'product:\{sku\}' names 'sku'"):
        invalidate_on_commit(factory, tags={Product: ["product:{sku}"]}, cache=Purger(redis_url="redis://unused"))
