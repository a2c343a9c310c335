"""`kinhbac fleet ...`: the functions behind the sub-commands (kinhbac/cli.py wires them).

Every expected failure is a FleetCliError with a one-line message; the command prints it and
exits with status 2.
"""

from pathlib import Path

from pydantic import ValidationError

from kinhbac.fleet.settings import Settings, SettingsError, load_settings


class FleetCliError(Exception):
    """A sub-command could not do its job; the message says why, in one line."""


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except SettingsError as exc:
        raise FleetCliError(str(exc)) from exc


def _prepared(settings: Settings):  # -> Engine; sqlalchemy is imported lazily
    from kinhbac.fleet.app import prepare_database
    from kinhbac.fleet.db import DatabaseUnavailable, make_engine

    engine = make_engine(settings.database)
    try:
        prepare_database(settings, engine)
    except DatabaseUnavailable as exc:
        engine.dispose()
        raise FleetCliError(str(exc)) from exc
    return engine


def serve(
    *, host: str = "127.0.0.1", port: int = 8000, config: Path | None = None,
    log_level: str = "info",
) -> None:
    """Wait for the database, migrate it, then serve the API until Ctrl-C or SIGTERM."""
    import uvicorn

    from kinhbac.fleet.app import create_app

    settings = _settings(config)
    _prepared(settings).dispose()
    app = create_app(settings, prepare=False)
    uvicorn.run(app, host=host, port=port, log_level=log_level, proxy_headers=True)


def create_admin(email: str, password: str, *, config: Path | None = None) -> str:
    """Create an admin user (migrating the database first if needed); returns its id."""
    from sqlmodel import Session

    from kinhbac.fleet import accounts, audit
    from kinhbac.fleet.errors import FleetError
    from kinhbac.fleet.models import Role, UserCreate

    try:
        data = UserCreate(email=email, password=password, role=Role.admin)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise FleetCliError(f"{field}: {first['msg'].removeprefix('Value error, ')}") from exc
    engine = _prepared(_settings(config))
    try:
        with Session(engine) as session:
            user = accounts.create_user(session, audit.CLI, data)
            return str(user.id)
    except FleetError as exc:
        raise FleetCliError(str(exc)) from exc
    finally:
        engine.dispose()
