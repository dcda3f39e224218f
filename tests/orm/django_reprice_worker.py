"""A Django process that serves no HTTP changes a price (a management command, a worker).

``python -m tests.orm.django_reprice_worker ENGINE NAME HOST PORT REDIS PREFIX ID PRICE``: the
project's settings, the database given, ``invalidate_on_commit`` with ``settings.CACHEMW``'s Redis.
"""

from __future__ import annotations

import os
import sys
from decimal import Decimal


def main(engine: str, name: str, host: str, port: str, redis_url: str, prefix: str, product_id: str,
         price: str) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.apps.djangoproject.settings"
    from django.conf import settings  # type: ignore[import-untyped]

    settings.DATABASES = {"default": {"ENGINE": engine, "NAME": name, "HOST": host, "PORT": port,
                                      "USER": "postgres" if host else ""}}
    settings.CACHEMW = {"redis_url": redis_url, "key_prefix": prefix}
    import django  # type: ignore[import-untyped]
    from django.db import transaction  # type: ignore[import-untyped]

    django.setup()
    from cachemw.django import invalidate_on_commit
    from tests.apps.djangoshop.models import TAGS, Product

    hook = invalidate_on_commit(TAGS)  # no cache=: a Purger of its own, from settings.CACHEMW
    with transaction.atomic():
        product = Product.objects.get(pk=int(product_id))
        product.price = Decimal(price)
        product.save()
    purger = hook.purger
    print(f"purged {purger.purged}, retried {purger.retried}, lost {purger.lost}")
    purger.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
