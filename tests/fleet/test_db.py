"""Start-up against the database: migrations build the schema the models describe, on both
backends, and an unreachable database is reported after a bounded wait."""

import time

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlmodel import SQLModel

from kinhbac.fleet.app import create_app
from kinhbac.fleet.db import (
    DatabaseUnavailable,
    alembic_config,
    make_engine,
    upgrade,
    wait_for_database,
)
from kinhbac.fleet.settings import Settings

from .backends import BACKENDS, empty_database
from .utils import SECRET_KEY

TABLES = {"fleet_user", "api_token", "site", "gateway", "device", "device_tag", "audit_entry",
          "device_status", "gateway_status", "recent_reading", "user_site", "api_token_site",
          "release", "release_file", "rollout", "rollout_device", "rollout_event",
          "console_session"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_upgrade_head_on_an_empty_database_creates_the_models_schema(backend, tmp_path):
    with empty_database(backend, tmp_path) as url:
        engine = make_engine(url)
        try:
            assert set(sa.inspect(engine).get_table_names()) == set()
            upgrade(engine)
            assert set(sa.inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
            with engine.connect() as connection:
                version = connection.execute(sa.text("SELECT version_num FROM alembic_version"))
                assert version.scalar_one() == ScriptDirectory.from_config(
                    alembic_config()).get_current_head()
                # The migrations and the models agree: autogenerate would find nothing to do.
                context = MigrationContext.configure(connection, opts={"compare_type": True})
                assert compare_metadata(context, SQLModel.metadata) == []
            upgrade(engine)  # a second start-up migrates nothing and fails nothing
        finally:
            engine.dispose()


def test_app_start_up_migrates_a_fresh_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path}/data/fleet.sqlite3"
    app = create_app(Settings(secret_key=SECRET_KEY, database_url=url))
    with TestClient(app) as client:
        assert client.get("/api/health").json() == {"status": "ok"}
    engine = make_engine(url)
    assert TABLES <= set(sa.inspect(engine).get_table_names())
    engine.dispose()


def test_unreachable_database_is_reported_after_the_wait():
    engine = make_engine("postgresql+psycopg://kinhbac@127.0.0.1:1/fleet")
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as failed:
        wait_for_database(engine, timeout_s=0)
    assert time.monotonic() - started < 5
    message = str(failed.value)
    assert "127.0.0.1:1/fleet did not answer after 1 attempt(s)" in message
    assert "\n" not in message


def test_start_up_retries_until_the_database_answers(monkeypatch, tmp_path):
    monkeypatch.setattr("kinhbac.fleet.db._RETRY_DELAY_S", 0.01)
    engine = make_engine(f"sqlite:///{tmp_path}/fleet.sqlite3")
    real_connect = engine.connect
    attempts = []

    def connect_third_time_lucky():
        attempts.append(1)
        if len(attempts) < 3:
            raise sa.exc.OperationalError("SELECT 1", {}, Exception("the server is starting up"))
        return real_connect()

    monkeypatch.setattr(engine, "connect", connect_third_time_lucky)
    wait_for_database(engine, timeout_s=5)
    assert len(attempts) == 3
    engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_device_search_has_a_trigram_index_on_postgresql_only(backend, tmp_path):
    """Migration 0012: on PostgreSQL the console's search (any part of an id, wire id or MAC)
    is answered from pg_trgm's index instead of reading every device; SQLite gets none."""
    from sqlmodel import select

    from kinhbac.fleet.console.devices import search_clause
    from kinhbac.fleet.models import Device

    with empty_database(backend, tmp_path) as url:
        engine = make_engine(url)
        try:
            upgrade(engine)
            indexes = {index["name"] for index in sa.inspect(engine).get_indexes("device")}
            if backend == "sqlite":
                assert "ix_device_search_text" not in indexes
                return
            assert "ix_device_search_text" in indexes
            query = select(Device.id).where(search_clause("24:0A:C4:1F"))
            with engine.connect() as connection:
                sql_text = str(query.compile(dialect=connection.dialect,
                                             compile_kwargs={"literal_binds": True}))
                connection.execute(sa.text("SET enable_seqscan = off"))  # an empty table
                plan = "\n".join(row[0] for row in connection.execute(
                    sa.text("EXPLAIN " + sql_text)))
            assert "ix_device_search_text" in plan, plan
        finally:
            engine.dispose()
