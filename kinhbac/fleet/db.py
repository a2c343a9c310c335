"""The database: engine, start-up wait, and schema migrations (Alembic, shipped in the package)."""

import logging
import os
import time
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
_RETRY_DELAY_S = 1.0  # between attempts to reach the database at start-up
_SQLITE_BUSY_MS = 5000  # a writer waits this long for another before "database is locked"
# Instances starting together take turns to migrate (pg_advisory_lock key: "kbfleet" in ASCII).
_MIGRATION_LOCK = 0x6B62666C656574


class DatabaseUnavailable(Exception):
    """The database did not answer within the start-up wait."""


def make_engine(url: str) -> Engine:
    """An engine for `url`; for SQLite, the folder is created and foreign keys enforced."""
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            # Sealed secrets, token hashes and the audit: the service's user only (SQLite
            # gives its -wal and -shm files the database file's mode).
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
        engine = sa.create_engine(url, connect_args={"check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # No JIT compilation: it pays off for long analytic queries only, and on the console's
    # counts over a city-sized registry it took seconds before the query itself ran
    # (bench/console_bench.py, 1,000,000 devices). A URL that sets its own options keeps them.
    options = {} if "options" in sa.engine.make_url(url).query else {"options": "-c jit=off"}
    return sa.create_engine(url, pool_pre_ping=True, connect_args=options)


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")  # readers do not block the writer
    cursor.close()


def wait_for_database(engine: Engine, *, timeout_s: float) -> None:
    """Return once the database answers; DatabaseUnavailable after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        attempt += 1
        try:
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
            return
        except sa.exc.OperationalError as exc:
            reason = str(exc.orig or exc).strip().splitlines()[0]
            if time.monotonic() + _RETRY_DELAY_S > deadline:
                raise DatabaseUnavailable(
                    f"database {engine.url.render_as_string(hide_password=True)} did not "
                    f"answer after {attempt} attempt(s): {reason}"
                ) from exc
            log.warning("waiting for the database (attempt %d): %s", attempt, reason)
            time.sleep(_RETRY_DELAY_S)


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """Alembic's configuration for the migrations shipped in this package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (`alembic upgrade head`), one instance at a time."""
    with engine.connect() as connection:
        locked = connection.dialect.name == "postgresql"
        if locked:
            connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
            connection.commit()
        try:
            command.upgrade(alembic_config(connection), revision)
            connection.commit()
        finally:
            if locked:
                connection.execute(
                    sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK}
                )
                connection.commit()
