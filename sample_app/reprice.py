"""``python -m sample_app.reprice PRODUCT_ID PRICE``: change a price from a process that serves no HTTP.

The change is made with SQLAlchemy, on the database the running shop was started
with (``SAMPLE_DB_PATH``). ``cachemw.sqlalchemy``'s hook purges the row's tag,
``product:{id}`` (the tag the shop's product route declares), once the commit is
done, through the Redis the shop uses (``CACHEMW_REDIS_URL``): its next
``GET /products/ID`` answers the new price. The shop itself calls no ``invalidate()``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from cachemw.core.settings import load_settings, masked_url
from cachemw.sqlalchemy import Purger, invalidate_on_commit
from sample_app.models import Product
from sample_app.shop import CONFIG_PATH, env_db_path


def _price(text: str) -> int:
    try:
        price = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a price: {text!r}") from None
    if price < 0 or price != price.quantize(Decimal("0.01")):
        raise argparse.ArgumentTypeError(f"not a price in cents: {text!r}")
    return int(price * 100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sample_app.reprice", description=__doc__.split("\n\n")[0])
    parser.add_argument("product_id", type=int)
    parser.add_argument("price", type=_price, help="the new price, e.g. 9.90")
    parser.add_argument("--db", default=env_db_path(), help="the shop's SQLite file (default: $SAMPLE_DB_PATH)")
    args = parser.parse_args(argv)
    if not args.db or not Path(args.db).is_file():
        parser.error("which database? start the shop with SAMPLE_DB_PATH=FILE and give this script the same "
                     "SAMPLE_DB_PATH (or --db FILE)")
    redis_url = load_settings(CONFIG_PATH).redis_url
    factory = sessionmaker(create_engine(f"sqlite:///{args.db}"))
    purger = None
    if redis_url is not None:
        purger = Purger(config=CONFIG_PATH)  # the shop's settings: its key prefix, and CACHEMW_REDIS_URL
        invalidate_on_commit(factory, cache=purger)
    with factory() as session:
        product = session.get(Product, args.product_id)
        if product is None:
            print(f"no product {args.product_id}", file=sys.stderr)
            return 1
        old, product.price_cents = product.price_cents, args.price
        session.commit()
    print(f"product {args.product_id}: {old / 100:.2f} -> {args.price / 100:.2f}")
    if purger is None:
        print("no CACHEMW_REDIS_URL: the shop's cache lives in its own process, out of this script's reach; "
              "its copy lives out its ttl", file=sys.stderr)
        return 0
    purger.close()  # after the retries of a purge Redis missed, if any
    assert redis_url is not None
    if not purger.purged:
        print(f"Redis at {masked_url(redis_url)} did not answer at once: the purge of product:{args.product_id} "
              "was retried in the background (see the log above)", file=sys.stderr)
        return 1
    print(f"purged product:{args.product_id} at {masked_url(redis_url)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
