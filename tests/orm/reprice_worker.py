"""A process that serves no HTTP changes a price.

``python -m tests.orm.reprice_worker (sync|asyncio) DB REDIS PREFIX ID PRICE``: with a sync
``Session``, or with an ``AsyncSession`` under ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import sys
from decimal import Decimal

from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from cachemw.sqlalchemy import Purger, invalidate_on_commit
from tests.orm.shop import TAGS, Product


def main(mode: str, database_url: str, redis_url: str, prefix: str, product_id: str, price: str) -> None:
    purger = Purger(redis_url=redis_url, key_prefix=prefix)
    if mode == "asyncio":
        asyncio.run(reprice_async(purger, database_url, int(product_id), Decimal(price)))
    else:
        factory = sessionmaker(create_engine(database_url))
        invalidate_on_commit(factory, tags=TAGS, cache=purger)
        with factory() as session:
            product = session.get(Product, int(product_id))
            assert product is not None
            product.price = Decimal(price)
            session.commit()
    print(f"purged {purger.purged}, retried {purger.retried}, lost {purger.lost}")
    purger.close()


async def reprice_async(purger: Purger, database_url: str, product_id: int, price: Decimal) -> None:
    engine = create_async_engine(database_url)
    factory = async_sessionmaker(engine)
    invalidate_on_commit(factory, tags=TAGS, cache=purger)
    async with factory() as session:
        product = await session.get(Product, product_id)
        assert product is not None
        product.price = price
        await session.commit()
    await engine.dispose()


if __name__ == "__main__":
    main(*sys.argv[1:])
