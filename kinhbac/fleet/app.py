"""The FastAPI application and its start-up order: settings, wait for the database, migrate.

    uvicorn --factory kinhbac.fleet.app:create_app     (or: kinhbac fleet serve)

Nothing is seeded: the first admin comes from `kinhbac fleet create-admin`.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError
from starlette.concurrency import run_in_threadpool

from kinhbac.fleet import ingest, rollouts
from kinhbac.fleet.artifacts import ArtifactStore
from kinhbac.fleet.console import pages as console
from kinhbac.fleet.console.overview import kept_counts
from kinhbac.fleet.crypto import SecretBox
from kinhbac.fleet.db import make_engine, upgrade, wait_for_database
from kinhbac.fleet.errors import FleetError, Invalid
from kinhbac.fleet.http_hygiene import HttpHygiene
from kinhbac.fleet.login_limits import LoginLimiter
from kinhbac.fleet.metrics import FleetMetrics, RequestMetrics, RouteTemplates
from kinhbac.fleet.rate_limits import ClaimLimiter
from kinhbac.fleet.routes import (
    audit,
    auth,
    devices,
    gateway_api,
    gateways,
    health,
    metrics,
    readings,
    releases,
    sites,
    tokens,
    users,
)
from kinhbac.fleet.routes import rollouts as rollout_routes
from kinhbac.fleet.settings import Settings, load_settings, secret_key_problem
from kinhbac.fleet.signing import KEY_FILE, ReleaseSigner

log = logging.getLogger(__name__)

ROUTERS = (auth, users, tokens, sites, gateways, devices, readings, releases, rollout_routes,
           gateway_api, audit, health, metrics)
RELEASES_FOLDER = "releases"  # in the data folder: the release files (kinhbac/fleet/artifacts.py)


def prepare_database(settings: Settings, engine: Engine) -> None:
    """Start-up, in order: wait until the database answers, then `alembic upgrade head`."""
    problem = secret_key_problem(settings.secret_key)
    if problem:
        log.warning("KINHBAC_SECRET_KEY %s: fine for development, refused in production",
                    problem)
    wait_for_database(engine, timeout_s=settings.db_wait_s)
    upgrade(engine)


def create_app(settings: Settings | None = None, *, prepare: bool = True) -> FastAPI:
    """The service for `settings` (default: from the environment).

    With `prepare`, start-up runs prepare_database(); a caller that did it already passes False.
    """
    settings = settings or load_settings()
    engine = make_engine(settings.database)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if prepare:
            await run_in_threadpool(prepare_database, settings, engine)
        # The rollouts' periodic check (deadlines, waves), and the ingest when enabled.
        async with rollouts.running(app), ingest.running(app):
            yield
        engine.dispose()

    # The interactive API pages load their scripts from a CDN: not in production, where the
    # schema stays at /openapi.json for tools.
    pages = settings.env == "development"
    app = FastAPI(
        docs_url="/docs" if pages else None,
        redoc_url="/redoc" if pages else None,
        title="Kinhbac fleet",
        summary="Device registry, provisioning and roles for a city's sensor network.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.ingest = None  # the worker, while the lifespan runs one (kinhbac/fleet/ingest.py)
    app.state.metrics = FleetMetrics(engine, lambda: app.state.ingest,
                                     with_ingest=settings.ingest_enabled)
    app.state.secret_box = SecretBox(settings.secret_key)
    # Both make their files on first use, so an app that never takes a release writes nothing.
    app.state.artifacts = ArtifactStore(settings.data_folder / RELEASES_FOLDER)
    app.state.release_signer = ReleaseSigner(settings.data_folder / KEY_FILE)
    app.state.login_limiter = LoginLimiter(
        per_address=settings.login_failures_per_address,
        per_account=settings.login_failures_per_account,
        window_s=settings.login_failure_window_s,
        concurrent_hashes=settings.login_concurrent_hashes,
    )
    app.state.claim_limiter = ClaimLimiter(
        per_gateway=settings.claims_per_gateway_per_minute,
        per_site=settings.claims_per_site_per_minute,
    )
    # The overview's counts of every site, kept a few seconds (console/site_counts.py).
    app.state.site_counts = kept_counts(settings.console_counts_max_age_s)
    for module in ROUTERS:
        app.include_router(module.router)
    app.include_router(console.router)
    app.mount(console.STATIC_PATH, console.static_files(), name="console-static")
    app.add_exception_handler(FleetError, _refused)
    app.add_exception_handler(DataError, _unstorable)
    app.middleware("http")(_refuse_nul_in_query)
    # Its headers go on every answer, errors too. A release upload has its own
    # body limit, through the API or the console: it is streamed to disk, not held.
    app.add_middleware(HttpHygiene, body_limits={
        releases.PATH: settings.release_max_upload_bytes,
        console.RELEASE_UPLOAD: settings.release_max_upload_bytes},
        pages=frozenset({console.RELEASE_UPLOAD}))
    # Outside that: it counts HttpHygiene's 413s too.
    app.add_middleware(RequestMetrics, metrics=app.state.metrics,
                       templates=RouteTemplates(app.routes))
    return app


NUL_MESSAGE = "text must not contain NUL characters (\\u0000)"


async def _refuse_nul_in_query(request: Request, call_next):  # type: ignore[no-untyped-def]
    """A NUL in a query parameter is refused up front, the same on every database."""
    for name, value in request.query_params.multi_items():
        if "\x00" in name or "\x00" in value:
            if request.url.path == console.PREFIX or request.url.path.startswith(
                    console.PREFIX + "/"):
                return console.refuse_nul_address(request)
            return JSONResponse(status_code=422, content={"detail": [
                {"loc": ["query", name.replace("\x00", "")], "msg": NUL_MESSAGE,
                 "type": "value_error"}]})
    return await call_next(request)


async def _unstorable(request: Request, exc: DataError) -> JSONResponse:
    """A value the database refuses to store (PostgreSQL: a NUL in text) is the caller's
    mistake, not a server error."""
    log.info("refused a value the database cannot store: %s", exc.orig)
    return JSONResponse(status_code=422, content={"detail": "a value cannot be stored: " +
                                                  NUL_MESSAGE})


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FleetError)
    if isinstance(exc, Invalid):
        # The shape FastAPI gives its own 422s, so clients read one format.
        detail: object = [{"loc": ["body", exc.field], "msg": str(exc), "type": "value_error"}]
    else:
        detail = str(exc)
    return JSONResponse(status_code=exc.status, content={"detail": detail})
