"""Alembic environment: the connection comes from the caller (kinhbac.fleet.db.upgrade) or,
for `alembic -c kinhbac/fleet/alembic.ini ...` by hand, from the fleet settings."""

from alembic import context
from sqlalchemy import Connection
from sqlmodel import SQLModel

from kinhbac.fleet import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from kinhbac.fleet.db import make_engine
from kinhbac.fleet.settings import load_settings


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is not None:
    run(given)
else:
    with make_engine(load_settings().database).connect() as connection:
        run(connection)
        connection.commit()
