"""The databases the fleet tests run against: SQLite always, PostgreSQL when it answers.

A PostgreSQL test gets a database of its own, named uniquely, dropped afterwards; the shared
`test` database is only the door in. KINHBAC_REQUIRE_POSTGRES=1 (CI) turns "not reachable"
from a skip into a failure.
"""

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

# Where the tests find PostgreSQL: the development and CI machines' server, trust auth.
POSTGRES_DSN = os.environ.get(
    "KINHBAC_TEST_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=test"
)
BACKENDS = ("sqlite", "postgresql")


def _require_postgres() -> bool:
    return os.environ.get("KINHBAC_REQUIRE_POSTGRES") == "1"


def postgres_or_skip() -> None:
    """Skip (or, under KINHBAC_REQUIRE_POSTGRES=1, fail) when PostgreSQL does not answer."""
    try:
        psycopg.connect(POSTGRES_DSN, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL not reachable at {POSTGRES_DSN!r}: {str(exc).strip()}"
        if _require_postgres():
            pytest.fail(reason + " (KINHBAC_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for the duration; its SQLAlchemy URL."""
    postgres_or_skip()
    name = f"kinhbac_fleet_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        info = admin.info
        url = f"postgresql+psycopg://{info.user}@{info.host}:{info.port}/{name}"
    try:
        yield url
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def empty_database(backend: str, folder: Path) -> Iterator[str]:
    """An empty database of `backend`; its SQLAlchemy URL."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / f'fleet-{uuid.uuid4().hex[:8]}.sqlite3'}"
    else:
        with postgres_database() as url:
            yield url
