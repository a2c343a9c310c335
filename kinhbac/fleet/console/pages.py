"""The console's pages and forms, under /console: log in and out, the language switch, the
overview, the device list and a device's page (with its CONFIG form), the pending devices with
their approval and rejection, the audit log, the sites (a site's gateways, the Reveal of its
secrets and the rotation of its claim key), the releases with their upload, and the rollouts
(list, live view, pause/resume/cancel, start one).

Every route here goes through ConsoleRoute, which turns "not logged in" into a redirect to the
login page and a refused CSRF check or role into a 403 page; and through the router's CSRF
dependency, which checks every unsafe request before its route runs, so a new form cannot
forget it. What a user may see is decided as the API decides it: the same Principal, the same
roles (`require`), the same site limits (kinhbac/fleet/deps.py).
"""

import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from kinhbac import release_manifest
from kinhbac.fleet import accounts, audit, releases, uploads
from kinhbac.fleet import provisioning
from kinhbac.fleet import sites as fleet_sites
from kinhbac.fleet import rollouts as rollout_rules
from kinhbac.fleet.console import (
    audit_log,
    csrf,
    device_config,
    devices,
    i18n,
    overview,
    pending,
    rollouts,
    sessions,
)
from kinhbac.fleet.console import releases as release_pages
from kinhbac.fleet.console import sites as site_pages
from kinhbac.fleet.console.sessions import ConsoleUser
from kinhbac.fleet.deps import (
    ArtifactsDep,
    ReleaseSignerDep,
    SecretBoxDep,
    SessionDep,
    SettingsDep,
    get_session,
    visible_or_404,
)
from kinhbac.fleet.errors import Conflict, FleetError, Invalid, NotFound
from kinhbac.fleet.login_limits import TooManyAttempts
from kinhbac.fleet.models import Device, DeviceState, LoginResult, Role, Site, utcnow
from kinhbac.fleet.routes.auth import attempt_login
from kinhbac.fleet.settings import Settings

PREFIX = "/console"
STATIC_PATH = PREFIX + "/static"
HOME = PREFIX + "/"
LOGIN = PREFIX + "/login"
RELEASE_UPLOAD = PREFIX + "/releases/new"
# Forms whose route streams the body to disk itself (uploads.receive): parsing them in _protect
# would buffer the files, so their token is checked by the route, from the stream, before the
# first byte of a file is stored (_received_upload).
STREAMED_FORMS = frozenset({RELEASE_UPLOAD})
# The pages load only the console's own stylesheet and scripts (the rollout view's poller, the
# upload's progress); nothing from elsewhere, no inline script; the scripts send and fetch only
# to the console itself.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "script-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    # Not the API's no-referrer: under it a browser posts forms with `Origin: null` (csrf.py).
    "referrer-policy": "same-origin",
}


class LoginRequired(Exception):
    """No console session, or one that ended."""


class NotAllowed(Exception):
    """A logged-in user whose role the page or action does not allow."""


def reads_rollouts(user: ConsoleUser | None) -> bool:
    """Who may read rollouts: as routes/rollouts.py's city_wide_reader, admins and viewers not
    limited to sites. A rollout's devices and events span sites, so the API shows none of them
    to a technician or a caller limited to sites, and neither does the console."""
    return user is not None and user.user.role in (Role.admin, Role.viewer) \
        and user.principal.site_ids is None


def static_files() -> StaticFiles:
    return StaticFiles(directory=i18n.HERE / "static")


def render(request: Request, template: str, locale: str, *, status_code: int = 200,
           **context: Any) -> HTMLResponse:
    settings: Settings = request.app.state.settings
    env = i18n.environment(locale, settings.console_timezone)
    page = env.get_template(template).render(
        static=STATIC_PATH, reads_rollouts=reads_rollouts(context.get("user")), **context)
    return HTMLResponse(page, status_code=status_code, headers=PAGE_HEADERS)


def _locale(request: Request, user: ConsoleUser | None) -> str:
    return i18n.pick(user.user.locale if user else request.query_params.get("lang"),
                     request.headers.get("accept-language"))


def _session_user(request: Request, session: Session) -> ConsoleUser | None:
    """The request's console user, looked up once per request."""
    if not hasattr(request.state, "console_user"):
        request.state.console_user = sessions.resolve(session,
                                                      request.cookies.get(sessions.COOKIE))
    return request.state.console_user


def refuse_nul_address(request: Request) -> HTMLResponse:
    """A console address with a NUL in its query (the app refuses those before any route): a
    page in the browser's language, as the console's other refusals, not the API's JSON."""
    return render(request, "refused.html", _locale(request, None), status_code=422, user=None,
                  reason="nul")


class ConsoleRoute(APIRoute):
    """Answers the console's refusals as pages: a redirect to log in, or a 403 page."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired:
                return RedirectResponse(LOGIN, status_code=303)
            except csrf.CsrfRefused as exc:
                user = getattr(request.state, "console_user", None)
                return render(request, "refused.html", _locale(request, user), status_code=403,
                              user=user, reason=exc.reason)
            except NotAllowed:
                user = getattr(request.state, "console_user", None)
                return render(request, "refused.html", _locale(request, user), status_code=403,
                              user=user, reason="role")

        return guarded


async def _protect(request: Request, session: Annotated[Session, Depends(get_session)]) -> None:
    """Every unsafe request: its origin, and its form's token (the session's, or before login
    the login cookie's)."""
    if request.method not in csrf.UNSAFE:
        return
    csrf.check_origin(request)
    if request.url.path in STREAMED_FORMS:
        return  # its token: checked by its route, from the stream (above)
    form = await request.form()  # kept by Starlette: the route's Form fields read it again
    given = form.get(csrf.FIELD)
    if request.url.path == LOGIN:
        expected = request.cookies.get(csrf.LOGIN_COOKIE)
    else:
        # A database query: on a worker thread, never on the event loop.
        user = await run_in_threadpool(_session_user, request, session)
        if user is None:
            raise LoginRequired
        expected = user.csrf_token
    csrf.check_token(expected, given if isinstance(given, str) else None)


def console_router(prefix: str = "") -> APIRouter:
    """A router for console pages under /console{prefix}: its routes answer refusals as pages
    and its unsafe requests are checked for CSRF, without a route having to ask."""
    return APIRouter(prefix=PREFIX + prefix, route_class=ConsoleRoute, include_in_schema=False,
                     dependencies=[Depends(_protect)])


router = console_router()


def current_user(request: Request, session: SessionDep) -> ConsoleUser:
    user = _session_user(request, session)
    if user is None:
        raise LoginRequired
    return user


def require(*roles: Role) -> Callable[[ConsoleUser], ConsoleUser]:
    """A page's or action's roles, as deps.require gives the API's routes theirs."""
    allowed = frozenset(roles)

    def check(user: Annotated[ConsoleUser, Depends(current_user)]) -> ConsoleUser:
        if user.user.role not in allowed:
            raise NotAllowed
        return user

    return check


AnyUser = Annotated[ConsoleUser, Depends(require(Role.admin, Role.technician, Role.viewer))]
# The roles of the API's routes these pages act as (kinhbac/fleet/routes/devices.py approve and
# reject, routes/audit.py): the console allows no one the API would refuse.
AdminUser = Annotated[ConsoleUser, Depends(require(Role.admin))]
# The API's Staff (deps.Staff): who may reveal a site's secrets (routes/sites.py's profile)
# and change a device's CONFIG (routes/devices.py).
STAFF_ROLES = (Role.admin, Role.technician)
StaffUser = Annotated[ConsoleUser, Depends(require(*STAFF_ROLES))]


async def _form_fields(request: Request) -> dict[str, Any]:
    """The request's form as a dict (read once by _protect already; Starlette keeps it)."""
    return dict(await request.form())


@router.get("/")
def overview_page(request: Request, session: SessionDep, user: AnyUser) -> HTMLResponse:
    rows = overview.sites(session, user.principal, kept=request.app.state.site_counts)
    return render(request, "overview.html", _locale(request, user), user=user, sites=rows,
                  counted_at=rows[0].counted_at if rows else None,
                  counts_max_age_s=request.app.state.site_counts.max_age_s,
                  queue_attention_minutes=int(overview.QUEUE_ATTENTION_AGE.total_seconds() // 60),
                  totals={state: sum(r.counts[state] for r in rows)
                          for state in overview.STATES})


@router.get("/devices")
def devices_page(request: Request, session: SessionDep, user: AnyUser) -> HTMLResponse:
    """The caller's devices, searched and filtered by the query string (a link to share). A
    bad filter gets the page with the form and what is wrong (400), not an error document."""
    filters = devices.parse_filters(request.query_params)
    listing = devices.list_devices(session, user.principal, filters)
    return render(request, "devices.html", _locale(request, user),
                  status_code=400 if filters.errors else 200, user=user, filters=filters,
                  listing=listing, states=devices.LIST_STATES, now=utcnow(),
                  search_max=devices.SEARCH_MAX, text_max=devices.TEXT_MAX)


DEVICE_DONE = frozenset({"config"})  # the messages a device page shows after an action


@router.get("/devices/{device_id}")
def device_page(device_id: str, request: Request, session: SessionDep,
                user: AnyUser) -> HTMLResponse:
    """One device; another site's answers exactly as a device that does not exist (404)."""
    done = request.query_params.get("done")
    return _device_page(request, session, user, device_id,
                        done=done if done in DEVICE_DONE else None)


def _device_page(request: Request, session: Session, user: ConsoleUser, device_id: str, *,
                 status_code: int = 200, config_form: device_config.ConfigForm | None = None,
                 done: str | None = None) -> HTMLResponse:
    settings: Settings = request.app.state.settings
    locale = _locale(request, user)
    try:
        detail = devices.device_detail(session, user.principal, device_id,
                                       settings.ingest_readings_per_device)
    except NotFound:
        return render(request, "missing.html", locale, status_code=404, user=user)
    may_edit = user.user.role in STAFF_ROLES
    if may_edit and config_form is None:
        config_form = device_config.current(detail.device.node_config)
    return render(request, "device.html", locale, status_code=status_code, user=user,
                  detail=detail, now=utcnow(), chart_width=devices.CHART_WIDTH,
                  chart_height=devices.CHART_HEIGHT,
                  config_form=config_form if may_edit else None, done=done,
                  number_settings=device_config.NUMBER_SETTINGS,
                  sensors_field=device_config.SENSORS, sensors_max=device_config.SENSORS_MAX)


@router.post("/devices/{device_id}/config")
def edit_device_config(device_id: str, request: Request, session: SessionDep, user: StaffUser,
                       form: Annotated[dict[str, Any], Depends(_form_fields)]) -> Response:
    """PUT /api/devices/{id}/config, from the device page: the same site check (another site's
    device is not found), the same model and set_node_config, so the same refusals and audit
    entry. A refusal: the page again with what was typed and the field's problem (422)."""
    device = _visible_device(session, user, device_id)
    if device is None:
        return render(request, "missing.html", _locale(request, user), status_code=404,
                      user=user)
    edited = device_config.parse_form(form)
    if edited.update is None:
        return _device_page(request, session, user, device_id, status_code=422,
                            config_form=edited)
    try:
        provisioning.set_node_config(session, user.principal.actor, device.id, edited.update)
    except Conflict:
        # Changed by someone else in the same instant: the page as it is now, and try again.
        session.rollback()
        edited.errors.append(("", "conflict", ""))
        return _device_page(request, session, user, device_id, status_code=409,
                            config_form=edited)
    return RedirectResponse(f"{PREFIX}/devices/{device.id}?done=config#config",
                            status_code=303)


@router.get("/login")
def login_page(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    if _session_user(request, session) is not None:
        return RedirectResponse(HOME, status_code=303)
    return _login_form(request, settings)


def _login_form(request: Request, settings: Settings, *, error: str | None = None,
                status_code: int = 200, email: str = "",
                headers: dict[str, str] | None = None) -> Response:
    token = csrf.login_token(request)
    response = render(request, "login.html", _locale(request, None), status_code=status_code,
                      user=None, csrf_token=token, error=error, email=email)
    response.headers.update(headers or {})
    csrf.set_login_cookie(response, request, settings, token)
    return response


@router.post("/login")
async def log_in(request: Request, settings: SettingsDep,
                 username: Annotated[str, Form()] = "",
                 password: Annotated[str, Form()] = "") -> Response:
    """The API's login (same password check, limits and audit), then a console session. A
    field left out is a failed login like any other, answered with the form, not a 422."""
    try:
        login = await attempt_login(request, username, password,
                                    timedelta(hours=settings.login_token_hours))
    except TooManyAttempts as exc:
        return _login_form(request, settings, error="too_many", status_code=429, email=username,
                           headers={"Retry-After": str(exc.retry_after)})
    except accounts.LoginFailed:
        # One message for an unknown e-mail, a wrong password and a deactivated user.
        return _login_form(request, settings, error="wrong", status_code=401, email=username)
    await run_in_threadpool(_start_session, request.app.state.engine, login)
    response = RedirectResponse(HOME, status_code=303)
    sessions.set_cookie(response, request, settings, login.access_token, login.expires_at)
    response.delete_cookie(csrf.LOGIN_COOKIE, path=sessions.COOKIE_PATH)
    return response


def _start_session(engine: Engine, login: LoginResult) -> None:
    with Session(engine) as session:
        sessions.start(session, login)


@router.post("/logout")
def log_out(request: Request, session: SessionDep, settings: SettingsDep,
            user: AnyUser) -> Response:
    sessions.end(session, user)
    response = RedirectResponse(LOGIN, status_code=303)
    sessions.clear_cookie(response, request, settings)
    return response


@router.post("/locale")
def switch_language(request: Request, session: SessionDep, user: AnyUser,
                    locale: Annotated[str, Form()] = "") -> Response:
    """The user's language, kept on the user: it follows them to any browser."""
    if locale in i18n.LOCALES and locale != user.user.locale:
        row = session.merge(user.user)
        audit.record(session, user.principal.actor, "user.locale", "user", row.id,
                     before={"locale": row.locale}, after={"locale": locale})
        row.locale = locale
        session.add(row)
        session.commit()
    return RedirectResponse(HOME, status_code=303)


PENDING = PREFIX + "/pending"


@router.get("/pending")
def pending_page(request: Request, session: SessionDep, user: AnyUser) -> HTMLResponse:
    """The caller's pending devices; the buttons only for the roles that may use them."""
    return _pending_page(request, session, user)


def _pending_page(request: Request, session: Session, user: ConsoleUser, *,
                  status_code: int = 200, problem: str | None = None,
                  problem_state: str | None = None,
                  problem_detail: str | None = None) -> HTMLResponse:
    listing = pending.list_pending(session, user.principal, request.query_params)
    done = request.query_params.get("done")
    done_device = None
    if done in pending.DONE and problem is None:
        done_device = _visible_device(session, user, request.query_params.get("device", ""))
    else:
        done = None  # an unknown code is no message: nothing from the URL reaches the page
    if listing.error and problem is None:
        status_code = 400
    return render(request, "pending.html", _locale(request, user), status_code=status_code,
                  user=user, listing=listing, done=done, done_device=done_device,
                  problem=problem, problem_state=problem_state, problem_detail=problem_detail,
                  may_act=user.user.role == Role.admin)


def _visible_device(session: Session, user: ConsoleUser, device_id: str) -> Device | None:
    """The device of `device_id` if the caller may see it (as the API's routes find it, so
    another site's is "not found"); None otherwise, whatever `device_id` holds."""
    try:
        wanted = uuid.UUID(device_id)
    except ValueError:
        return None
    try:
        return visible_or_404(session, user.principal, Device, wanted, "device")
    except NotFound:
        return None


def _act(request: Request, session: Session, user: ConsoleUser, device_id: str,
         action: Callable[[uuid.UUID], Device], done: str) -> Response:
    """Run the API's own approve or reject on a device the caller may see; back to the list
    with what happened, or the list with why nothing did (409)."""
    device = _visible_device(session, user, device_id)
    if device is None:
        return render(request, "missing.html", _locale(request, user), status_code=404,
                      user=user)
    try:
        action(device.id)
    except Conflict as exc:
        session.rollback()
        session.refresh(device)
        if device.state != DeviceState.pending:
            # Approved or rejected meanwhile, or a replayed form: said in words, not as an error.
            return _pending_page(request, session, user, status_code=409,
                                 problem="not_pending", problem_state=device.state.value,
                                 problem_detail=device.wire_id)
        return _pending_page(request, session, user, status_code=409, problem="refused",
                             problem_detail=str(exc))
    return RedirectResponse(f"{PENDING}?done={done}&device={device.id}", status_code=303)


@router.post("/pending/{device_id}/approve")
def approve_pending(device_id: str, request: Request, session: SessionDep, box: SecretBoxDep,
                    user: AdminUser) -> Response:
    """POST /api/devices/{id}/approve, from the console: the same function, the same audit."""
    return _act(request, session, user, device_id,
                lambda wanted: provisioning.approve_claim(session, box, user.principal.actor,
                                                          wanted), "approved")


@router.get("/pending/{device_id}/reject")
def confirm_reject(device_id: str, request: Request, session: SessionDep,
                   user: AdminUser) -> HTMLResponse:
    """The confirmation a rejection asks for: a page with one form, no script needed."""
    locale = _locale(request, user)
    device = _visible_device(session, user, device_id)
    if device is None:
        return render(request, "missing.html", locale, status_code=404, user=user)
    if device.state != DeviceState.pending:
        return _pending_page(request, session, user, status_code=409, problem="not_pending",
                             problem_state=device.state.value, problem_detail=device.wire_id)
    return render(request, "reject.html", locale, user=user, device=device)


@router.post("/pending/{device_id}/reject")
def reject_pending(device_id: str, request: Request, session: SessionDep,
                   user: AdminUser) -> Response:
    """POST /api/devices/{id}/reject, from the console: the same function, the same audit."""
    return _act(request, session, user, device_id,
                lambda wanted: provisioning.reject_claim(session, user.principal.actor, wanted),
                "rejected")


@router.get("/audit")
def audit_page(request: Request, session: SessionDep, settings: SettingsDep,
               user: AdminUser) -> HTMLResponse:
    """The audit log, for admins as GET /api/audit is; dates are days where the console's
    users are (KINHBAC_CONSOLE_TIMEZONE). A bad filter gets the page and what is wrong (400)."""
    filters = audit_log.parse_filters(request.query_params)
    listing = audit_log.list_entries(session, filters, ZoneInfo(settings.console_timezone))
    return render(request, "audit.html", _locale(request, user),
                  status_code=400 if filters.errors else 200, user=user, filters=filters,
                  listing=listing, actor_max=audit_log.ACTOR_MAX,
                  action_max=audit_log.ACTION_MAX)


# ---- sites

SITES = PREFIX + "/sites"
# The reveal's answer holds the site's secrets: kept by no cache, not even the browser's own
# history (HttpHygiene says no-store too; this page does not lean on it).
SECRET_HEADERS = {"cache-control": "no-store", "pragma": "no-cache"}
OVERLAP_TYPED_MAX = 32  # of a refused overlap, shown back in the form: no number is longer


@router.get("/sites")
def sites_page(request: Request, session: SessionDep, user: AnyUser) -> HTMLResponse:
    """The caller's sites, as GET /api/sites lists them, with their gateways and devices."""
    return render(request, "sites.html", _locale(request, user), user=user,
                  sites=site_pages.list_sites(session, user.principal,
                                              request.app.state.site_counts),
                  counts_max_age_s=request.app.state.site_counts.max_age_s)


def _missing_site(request: Request, user: ConsoleUser) -> HTMLResponse:
    return render(request, "missing.html", _locale(request, user), status_code=404, user=user,
                  what="site")


def _site_page(request: Request, session: Session, user: ConsoleUser, site: Site, *,
               status_code: int = 200, **context: Any) -> HTMLResponse:
    return render(request, "site.html", _locale(request, user), status_code=status_code,
                  user=user, view=site_pages.site_view(session, user.principal, site),
                  may_reveal=user.user.role in STAFF_ROLES,
                  may_rotate=user.user.role == Role.admin, **context)


@router.get("/sites/{site_id}")
def site_page(site_id: str, request: Request, session: SessionDep,
              user: AnyUser) -> HTMLResponse:
    """One site, without its secrets; another site's answers as one that does not exist."""
    try:
        site = site_pages.visible_site(session, user.principal, site_id)
    except NotFound:
        return _missing_site(request, user)
    done = request.query_params.get("done")
    return _site_page(request, session, user, site, done=done if done == "rotated" else None)


@router.post("/sites/{site_id}/reveal")
def reveal_site_secrets(site_id: str, request: Request, session: SessionDep, box: SecretBoxDep,
                        user: StaffUser) -> HTMLResponse:
    """GET /api/sites/{id}/profile, from the console: the same roles, the same audit entry
    (`site.profile_read`). The secrets are in this answer only: a POST's page, never a URL,
    and not stored by any cache."""
    try:
        site = site_pages.visible_site(session, user.principal, site_id)
    except NotFound:
        return _missing_site(request, user)
    profile = fleet_sites.read_profile(session, box, user.principal.actor, site)
    response = _site_page(request, session, user, site, profile=profile)
    response.headers.update(SECRET_HEADERS)
    return response


@router.get("/sites/{site_id}/rotate")
def confirm_rotation(site_id: str, request: Request, session: SessionDep, settings: SettingsDep,
                     user: AdminUser) -> HTMLResponse:
    """The confirmation a claim-key rotation asks for, with its overlap (the fleet's default)."""
    try:
        site = site_pages.visible_site(session, user.principal, site_id)
    except NotFound:
        return _missing_site(request, user)
    return _rotation_form(request, user, site, settings,
                          overlap=f"{settings.claim_key_overlap_hours:g}")


def _rotation_form(request: Request, user: ConsoleUser, site: Site, settings: Settings, *,
                   overlap: str, status_code: int = 200,
                   problem: str | None = None) -> HTMLResponse:
    return render(request, "site_rotate.html", _locale(request, user), status_code=status_code,
                  user=user, site=site, overlap=overlap[:OVERLAP_TYPED_MAX], problem=problem,
                  overlap_max=site_pages.OVERLAP_MAX_HOURS,
                  default_overlap=settings.claim_key_overlap_hours)


@router.post("/sites/{site_id}/rotate")
def rotate_claim_key(site_id: str, request: Request, session: SessionDep, box: SecretBoxDep,
                     settings: SettingsDep, user: AdminUser,
                     overlap_hours: Annotated[str, Form()] = "") -> Response:
    """POST /api/sites/{id}/claim-key/rotate, from the console: the same function, default and
    audit entry (`site.rotate_claim_key`). An overlap the API would refuse, or a rotation made
    meanwhile, gets the form again with what is wrong, and nothing changes."""
    try:
        site = site_pages.visible_site(session, user.principal, site_id)
    except NotFound:
        return _missing_site(request, user)
    rotation = site_pages.parse_rotation(overlap_hours)
    if rotation is None:
        return _rotation_form(request, user, site, settings, overlap=overlap_hours,
                              status_code=422, problem="overlap")
    try:
        fleet_sites.rotate_claim_key(session, box, user.principal.actor, site.id, rotation,
                                     default_overlap_hours=settings.claim_key_overlap_hours)
    except Conflict:
        session.rollback()
        return _rotation_form(request, user, site, settings, overlap=overlap_hours,
                              status_code=409, problem="meanwhile")
    return RedirectResponse(f"{SITES}/{site.id}?done=rotated", status_code=303)


# ---- rollouts


def rollout_reader(user: AnyUser) -> ConsoleUser:
    """Admins and viewers not limited to sites, or the 403 page (reads_rollouts)."""
    if not reads_rollouts(user):
        raise NotAllowed
    return user


RolloutReader = Annotated[ConsoleUser, Depends(rollout_reader)]
ROLLOUTS = PREFIX + "/rollouts"


@router.get("/rollouts")
def rollouts_page(request: Request, session: SessionDep, user: RolloutReader) -> HTMLResponse:
    """Rollouts, running first; a damaged page link gets the page and what is wrong (400)."""
    listing = rollouts.list_rollouts(session, request.query_params)
    return render(request, "rollouts.html", _locale(request, user),
                  status_code=400 if listing.error else 200, user=user, listing=listing,
                  failures=rollouts.failures, may_act=user.user.role == Role.admin)


def _missing_rollout(request: Request, user: ConsoleUser) -> HTMLResponse:
    return render(request, "missing.html", _locale(request, user), status_code=404, user=user,
                  what="rollout")


def _live_view(session: Session, rollout_id: str) -> rollouts.LiveView | None:
    """The rollout's view, or None for an id that names no rollout (or is no id)."""
    wanted = rollouts.parse_id(rollout_id)
    if wanted is None:
        return None
    try:
        return rollouts.live_view(session, wanted)
    except NotFound:
        return None


def _rollout_page(request: Request, session: Session, user: ConsoleUser, rollout_id: str, *,
                  template: str = "rollout.html", status_code: int = 200,
                  **context: Any) -> HTMLResponse:
    view = _live_view(session, rollout_id)
    if view is None:
        return _missing_rollout(request, user)
    if context.get("done") and view.detail.state not in rollouts.DONE_STATES[context["done"]]:
        context["done"] = None  # no longer true: the page shows the state as it is
    if context.get("action") and not view.may(context["action"]):
        # Changed meanwhile, or a stale page: the rollout as it is, and why not (409).
        template, status_code, context = "rollout.html", 409, {"refused": context["action"]}
    return render(request, template, _locale(request, user), status_code=status_code, user=user,
                  view=view, may_act=user.user.role == Role.admin,
                  poll_s=rollouts.POLL_S, **context)


@router.get("/rollouts/new")
def new_rollout_page(request: Request, session: SessionDep, user: AdminUser) -> HTMLResponse:
    """The form that starts a rollout, for admins as POST /api/rollouts is."""
    return _new_rollout_form(request, session, user, rollouts.NewRollout())


def _new_rollout_form(request: Request, session: Session, user: ConsoleUser,
                      new: rollouts.NewRollout, *, status_code: int = 200,
                      sizes: list[int] | None = None) -> HTMLResponse:
    releases, sites = rollouts.form_choices(session)
    return render(request, "rollout_new.html", _locale(request, user), status_code=status_code,
                  user=user, new=new, releases=releases, sites=sites, sizes=sizes,
                  max_field=rollouts.MAX_FIELD)


@router.post("/rollouts/new")
def create_rollout(request: Request, session: SessionDep, user: AdminUser,
                   form: Annotated[dict[str, Any], Depends(_form_fields)]) -> Response:
    """Preview (the wave sizes, nothing written) or Create, with the API's own functions: the
    same checks, refusals and audit entry (`rollout.create`) as POST /api/rollouts."""
    new = rollouts.parse_form(form)
    if new.request is None:
        return _new_rollout_form(request, session, user, new, status_code=422)
    try:
        if form.get("do") == "create":
            created = rollout_rules.create_rollout(session, user.principal.actor, new.request)
            return RedirectResponse(f"{ROLLOUTS}/{created.id}?done=created", status_code=303)
        sizes = rollout_rules.preview(session, new.request)
    except (Invalid, Conflict) as exc:
        session.rollback()
        new.errors.append((getattr(exc, "field", "target"), str(exc)))
        return _new_rollout_form(request, session, user, new, status_code=exc.status)
    return _new_rollout_form(request, session, user, new, sizes=sizes)


@router.get("/rollouts/{rollout_id}")
def rollout_page(rollout_id: str, request: Request, session: SessionDep,
                 user: RolloutReader) -> HTMLResponse:
    """One rollout, live: its script asks /live every few seconds; without it, the page's
    refresh link does the same."""
    done = request.query_params.get("done")
    return _rollout_page(request, session, user, rollout_id,
                         done=done if done in rollouts.DONE_STATES else None)


@router.get("/rollouts/{rollout_id}/live")
def rollout_live(rollout_id: str, request: Request, session: SessionDep,
                 user: RolloutReader) -> HTMLResponse:
    """The live part of a rollout's page alone (HTML, the same template and checks), for its
    script to swap in."""
    return _rollout_page(request, session, user, rollout_id, template="rollout_live.html")


@router.get("/rollouts/{rollout_id}/{action}")
def confirm_rollout_action(rollout_id: str, action: str, request: Request,
                           session: SessionDep, user: AdminUser) -> HTMLResponse:
    """The confirmation each of pause, resume and cancel asks for: a page with one form."""
    if action not in rollouts.ACTIONS:
        return _missing_rollout(request, user)
    return _rollout_page(request, session, user, rollout_id, template="rollout_confirm.html",
                         action=action)


_RULES = {"pause": rollout_rules.pause, "resume": rollout_rules.resume,
          "cancel": rollout_rules.cancel}


@router.post("/rollouts/{rollout_id}/{action}")
def rollout_action(rollout_id: str, action: str, request: Request, session: SessionDep,
                   user: AdminUser) -> Response:
    """POST /api/rollouts/{id}/pause, resume or cancel, from the console: the same function, so
    the same checks and audit entry. A state that forbids it: the page says why (409)."""
    wanted = rollouts.parse_id(rollout_id)
    if action not in rollouts.ACTIONS or wanted is None:
        return _missing_rollout(request, user)
    try:
        _RULES[action](session, user.principal.actor, wanted)
    except NotFound:
        session.rollback()
        return _missing_rollout(request, user)
    except Conflict:
        # The state forbids it (the API's 409): the page says so in the user's language.
        session.rollback()
        return _rollout_page(request, session, user, rollout_id, status_code=409,
                             refused=action)
    return RedirectResponse(f"{ROLLOUTS}/{wanted}?done={action}", status_code=303)


# ---- releases


RELEASES = PREFIX + "/releases"


@router.get("/releases")
def releases_page(request: Request, session: SessionDep, user: AdminUser) -> HTMLResponse:
    """The releases, newest first, for admins as GET /api/releases is."""
    listing = release_pages.list_releases(session, request.query_params)
    return render(request, "releases.html", _locale(request, user),
                  status_code=400 if listing.error else 200, user=user, listing=listing)


def _upload_form(request: Request, user: ConsoleUser, *, status_code: int = 200,
                 reason: str | None = None, fields: dict[str, str] | None = None,
                 too_large: bool = False,
                 refused_path: release_pages.FolderPathRefused | None = None) -> HTMLResponse:
    """The upload form; after a refusal, with the fleet's reason and what was typed (a chosen
    folder's file that no board could take: named in the user's language)."""
    settings: Settings = request.app.state.settings
    return render(request, "release_new.html", _locale(request, user), status_code=status_code,
                  user=user, reason=reason, reason_code=release_pages.FIXED_REASONS.get(
                      reason or ""), fields=fields or {}, too_large=too_large,
                  refused_path=refused_path,
                  max_upload=settings.release_max_upload_bytes,
                  max_files=release_manifest.MAX_FILES, version_max=releases.MAX_VERSION,
                  folder_max=release_pages.BOARD_FOLDER_MAX)


@router.get("/releases/new")
def new_release_page(request: Request, user: AdminUser) -> HTMLResponse:
    return _upload_form(request, user, fields={"kind": "bundle", "folder": "/lib/node"})


UPLOAD_FIELDS = releases.FIELDS | {csrf.FIELD, "folder", release_pages.PATHS_FIELD}


async def _received_upload(request: Request, user: AdminUser, settings: SettingsDep,
                           store: ArtifactsDep) -> uploads.Upload | uploads.UploadRefused:
    """The form's fields and files, streamed to disk as the API's upload route receives them
    (same limits, same per-file checks), once the caller's role is known. Its CSRF token must
    come before the files, as the form puts it: no byte of a file is stored without it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.release_max_upload_bytes:
        # HttpHygiene leaves this to us (a page, not its JSON); the body is not read.
        return uploads.UploadRefused(413, "body", "too large")

    def check(fields: dict[str, str], name: str, size: int) -> None:
        given = fields.get(csrf.FIELD)
        csrf.check_token(user.csrf_token, given)
        releases.check_part(fields, name, size)

    await run_in_threadpool(store.purge_stale_incoming)
    try:
        upload = await uploads.receive(request, store, fields=UPLOAD_FIELDS,
                                       file_field=releases.FILE_FIELD,
                                       max_files=release_manifest.MAX_FILES, check_file=check)
    except uploads.UploadRefused as exc:
        return exc
    try:
        csrf.check_token(user.csrf_token, upload.fields.get(csrf.FIELD))  # a form with no file
    except csrf.CsrfRefused:
        upload.discard()
        raise
    return upload


@router.post("/releases/new")
def upload_release(request: Request, session: SessionDep, store: ArtifactsDep,
                   signer: ReleaseSignerDep, user: AdminUser,
                   received: Annotated[uploads.Upload | uploads.UploadRefused,
                                       Depends(_received_upload)]) -> Response:
    """POST /api/releases, from the console: the same receipt, the same create_release, the
    same audit. A refusal gets the form again with the fleet's reason and the API's status."""
    if isinstance(received, uploads.UploadRefused):
        return _upload_form(request, user, status_code=received.status,
                            reason=None if received.status == 413 else str(received),
                            too_large=received.status == 413)
    typed = {k: v for k, v in received.fields.items() if k != csrf.FIELD}
    try:
        if received.fields.get("kind") == "bundle":
            release_pages.board_paths(received.files, received.fields)
        created = releases.create_release(session, store, signer, user.principal.actor,
                                          received)
    except FleetError as exc:
        session.rollback()
        return _upload_form(request, user, status_code=exc.status, reason=str(exc),
                            fields=typed, refused_path=exc if isinstance(
                                exc, release_pages.FolderPathRefused) else None)
    finally:
        received.discard()  # whatever was not kept
    return RedirectResponse(f"{RELEASES}/{created.id}", status_code=303)


@router.get("/releases/{release_id}")
def release_page(release_id: str, request: Request, session: SessionDep,
                 user: AdminUser) -> HTMLResponse:
    """One release: its signed manifest, its files, and which of the caller's boards it fits."""
    locale = _locale(request, user)
    try:
        view = release_pages.release_view(session, user.principal, release_id)
    except NotFound:
        return render(request, "missing.html", locale, status_code=404, user=user,
                      what="release")
    return render(request, "release.html", locale, user=user, view=view,
                  named_short=release_pages.NAMED_SHORT)
