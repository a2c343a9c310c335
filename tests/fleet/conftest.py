"""Fleet fixtures: an app per database backend (SQLite, and PostgreSQL when it answers),
migrated once per session, its tables emptied after each test."""

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session, SQLModel

from kinhbac.fleet.app import create_app
from kinhbac.fleet.rate_limits import ClaimLimiter
from kinhbac.fleet.crypto import SecretBox
from kinhbac.fleet.db import upgrade
from kinhbac.fleet.settings import Settings

from .backends import BACKENDS, empty_database
from .utils import SECRET_KEY, quick_argon2


@pytest.fixture(scope="session", autouse=True)
def _quick_argon2() -> Iterator[None]:
    with quick_argon2():
        yield


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def app(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    """The service on a freshly migrated database of `backend`, in production mode."""
    folder = tmp_path_factory.mktemp("fleet")
    with empty_database(backend, folder) as url:
        # The data folder (release files, the release signing key) is the test run's too.
        settings = Settings(env="production", secret_key=SECRET_KEY, database_url=url,
                            data_dir=folder / "data")
        app = create_app(settings, prepare=False)
        upgrade(app.state.engine)
        yield app
        app.state.engine.dispose()


@pytest.fixture
def session(app: FastAPI) -> Iterator[Session]:
    with Session(app.state.engine) as session:
        yield session
    app.state.login_limiter.clear()  # failed logins of one test do not count against the next
    app.state.site_counts.clear()  # the overview's counts of one test's city are not the next's
    # Nor its claim reports (a test may also have put in a limiter of its own).
    app.state.claim_limiter = ClaimLimiter(
        per_gateway=app.state.settings.claims_per_gateway_per_minute,
        per_site=app.state.settings.claims_per_site_per_minute)
    with app.state.engine.begin() as connection:
        for table in reversed(SQLModel.metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.fixture(scope="session")
def _client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:  # one event loop for the session: much faster requests
        yield client


@pytest.fixture
def client(_client: TestClient, session: Session) -> TestClient:
    """A client of the app; depends on `session` so that the tables are emptied after."""
    return _client


@pytest.fixture
def box(app: FastAPI) -> SecretBox:
    return app.state.secret_box
