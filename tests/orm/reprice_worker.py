"""A process that serves no HTTP changes a price: ``python -m tests.orm.reprice_worker DB REDIS PREFIX ID PRICE``."""

from __future__ import annotations

import sys
from decimal import Decimal

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from cachemw.sqlalchemy import Purger, invalidate_on_commit
from tests.orm.shop import TAGS, Product


def main(database_url: str, redis_url: str, prefix: str, product_id: str, price: str) -> None:
    purger = Purger(redis_url=redis_url, key_prefix=prefix)
    factory = sessionmaker(create_engine(database_url))
    invalidate_on_commit(factory, tags=TAGS, cache=purger)
    with factory() as session:
        product = session.get(Product, int(product_id))
        assert product is not None
        product.price = Decimal(price)
        session.commit()
    print(f"purged {purger.purged}, retried {purger.retried}, lost {purger.lost}")
    purger.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
