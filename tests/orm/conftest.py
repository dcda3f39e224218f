"""The databases the ORM hooks are tested on: SQLite, and a private PostgreSQL server the session starts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

try:  # tests/ is a package
    from tests.budgets import Budgets
    from tests.postgres_server import PostgresServer, PostgresServerNotFound, running_postgres
except ImportError:  # tests/ as a plain directory (see tests/conftest.py)
    from budgets import Budgets  # type: ignore[no-redef,import-not-found]
    from postgres_server import (  # type: ignore[no-redef,import-not-found]
        PostgresServer,
        PostgresServerNotFound,
        running_postgres,
    )


@pytest.fixture(scope="session")
def postgres(budgets: Budgets) -> Iterator[PostgresServer]:
    """A private PostgreSQL for the whole session; fails (never skips) without the binaries."""
    try:
        with running_postgres(budgets.process_start) as server:
            yield server
    except PostgresServerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)


@dataclass(frozen=True)
class Database:
    kind: str
    sync_url: str
    async_url: str


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """An empty database of each kind: a SQLite file, or a new database on the private PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "shop.db"
        return Database("sqlite", f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}")
    server: PostgresServer = request.getfixturevalue("postgres")
    url = f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/{server.new_database()}"
    return Database("postgresql", url, url)  # psycopg 3 is both drivers: create_async_engine picks its async one
