"""A Flask app behind the WSGI shell, a sync SQLAlchemy session: commits in a view or in any thread purge.

The purge runs on the WSGI shell's own loop (its thread); the view's commit waits for it, so
the next request already answers the new row. On SQLite and PostgreSQL, against a real Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask, jsonify, request
from flask.testing import FlaskClient
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from cachemw import Settings, cache
from cachemw.sqlalchemy import invalidate_on_commit
from cachemw.wsgi import CacheMiddleware

try:  # tests/ is a package
    from tests.budgets import Budgets
    from tests.helpers import eventually_sync
    from tests.orm.conftest import Database
    from tests.orm.shop import TAGS, Product, SqlAlchemyReads, create
except ImportError:  # tests/ as a plain directory (see tests/conftest.py)
    from budgets import Budgets  # type: ignore[no-redef,import-not-found]
    from helpers import eventually_sync  # type: ignore[no-redef,import-not-found]
    from orm.conftest import Database  # type: ignore[no-redef,import-not-found]
    from orm.shop import TAGS, Product, SqlAlchemyReads, create  # type: ignore[no-redef,import-not-found]


Shop = tuple[FlaskClient, "sessionmaker[Session]"]


@pytest.fixture
def flask_shop(database: Database, redis_url: str, budgets: Budgets) -> Iterator[Shop]:
    engine = create_engine(database.sync_url)
    create(engine)
    factory = sessionmaker(engine)
    reads = SqlAlchemyReads(engine)
    app = Flask(__name__)

    @app.get("/products/<int:id>")
    @cache(ttl="1h", tags=["product:{id}"])
    def product(id: int) -> Any:
        return jsonify(reads.product(id))

    @app.post("/products/<int:id>/price")
    def set_price(id: int) -> Any:  # a plain write: no invalidate() anywhere
        with factory() as session:
            found = session.get(Product, id)
            assert found is not None
            found.price = Decimal(request.get_json()["price"])
            session.commit()
        return jsonify(ok=True)

    middleware = CacheMiddleware(app.wsgi_app, settings=Settings(
        redis_url=redis_url, key_prefix="orm-wsgi-test", store_timeout=budgets.store_timeout))
    app.wsgi_app = middleware  # type: ignore[method-assign]
    hook = invalidate_on_commit(factory, tags=TAGS, cache=middleware)
    try:
        yield app.test_client(), factory
    finally:
        hook.remove()
        middleware.close()
        engine.dispose()


def _cached(client: FlaskClient, path: str) -> dict[str, Any]:
    eventually_sync(lambda: client.get(path).headers.get("X-Cache") == "HIT", what=f"{path} answered from the cache")
    body: dict[str, Any] = client.get(path).get_json()
    return body


def test_a_commit_in_a_view_shows_on_the_next_request(flask_shop: Shop) -> None:
    client, _ = flask_shop
    assert _cached(client, "/products/1")["price"] == "8.50"
    assert client.post("/products/1/price", json={"price": "9.90"}).status_code == 200
    answer = client.get("/products/1")
    assert (answer.headers["X-Cache"], answer.get_json()) == ("MISS", {"id": 1, "price": "9.90"})


def test_a_commit_in_another_thread_shows_on_the_next_request(flask_shop: Shop) -> None:
    client, factory = flask_shop
    assert _cached(client, "/products/2")["price"] == "39.00"
    with factory() as session:  # the test's own thread: neither a request's nor the cache's loop
        found = session.get(Product, 2)
        assert found is not None
        found.price = Decimal("40.00")
        session.commit()
    answer = client.get("/products/2")
    assert (answer.headers["X-Cache"], answer.get_json()) == ("MISS", {"id": 2, "price": "40.00"})
