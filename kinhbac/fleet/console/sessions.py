"""Console sessions: a login token (the API's, from the API's own login path) in an HttpOnly
cookie, with a row that holds the CSRF token of its forms.

The session is the token's row in `api_token`, so it ends as an API login does: logout deletes
it, it expires after KINHBAC_LOGIN_TOKEN_HOURS, a new password or a deactivated user ends it.
An API token pasted into the cookie is refused: only a token with a console session row is one.
"""

import secrets
from dataclasses import dataclass
from datetime import datetime

from fastapi import Request, Response
from sqlmodel import Session, select

from kinhbac.fleet import accounts
from kinhbac.fleet.console import pending
from kinhbac.fleet.deps import Principal, reachable_sites, token_refusal
from kinhbac.fleet.models import ApiToken, ConsoleSession, LoginResult, Site, User
from kinhbac.fleet.security import USER_TOKEN_PREFIX, hash_token
from kinhbac.fleet.settings import Settings

COOKIE = "kinhbac_console"
COOKIE_PATH = "/console"  # the API never reads it: its callers send Authorization headers
# Lax, not Strict: an operator following a link to the console from a message arrives logged
# in; cross-site posts still carry no cookie, and every form has a CSRF token besides.
SAMESITE = "lax"
_CSRF_BYTES = 32


@dataclass(frozen=True)
class ConsoleUser:
    """Who a console request is from: the same Principal the API builds, and its session."""

    principal: Principal
    user: User
    csrf_token: str
    expires_at: datetime | None
    sites: list[Site]  # the sites the user is limited to, by name; [] for city-wide
    pending: int = 0  # devices awaiting approval at the user's sites: the navigation shows it


def start(session: Session, login: LoginResult) -> str:
    """Give the login token just issued a console session; its CSRF token."""
    token = session.exec(select(ApiToken).where(
        ApiToken.token_hash == hash_token(login.access_token))).one()
    csrf = secrets.token_urlsafe(_CSRF_BYTES)
    session.add(ConsoleSession(token_id=token.id, csrf_token=csrf))
    session.commit()
    return csrf


def resolve(session: Session, cookie: str | None) -> ConsoleUser | None:
    """The console user of a session cookie; None for no cookie, or one that ended."""
    if not cookie or not cookie.startswith(USER_TOKEN_PREFIX):
        return None
    found = session.exec(
        select(ApiToken, User, ConsoleSession)
        .join(User, User.id == ApiToken.user_id)
        .join(ConsoleSession, ConsoleSession.token_id == ApiToken.id)
        .where(ApiToken.token_hash == hash_token(cookie))
    ).first()
    if found is None:
        return None
    token, user, console = found
    if token_refusal(token, user) is not None:
        return None
    principal = Principal(user=user, token_id=token.id, site_ids=reachable_sites(user, token))
    sites = []
    if principal.site_ids is not None:
        sites = list(session.exec(select(Site).where(Site.id.in_(principal.site_ids))
                                  .order_by(Site.name)).all())
    # One count per page: cheap beside the page's own queries (device.state is indexed).
    return ConsoleUser(principal=principal, user=user, csrf_token=console.csrf_token,
                       expires_at=token.expires_at, sites=sites,
                       pending=pending.count(session, principal))


def end(session: Session, user: ConsoleUser) -> None:
    """Log out: the token goes (audited as an API logout), and its session row with it."""
    assert user.principal.token_id is not None
    accounts.logout(session, user.principal.actor, user.principal.token_id)


def secure(request: Request, settings: Settings) -> bool:
    """Whether cookies get the Secure flag: over HTTPS (uvicorn takes X-Forwarded-Proto from a
    trusted proxy), or always when the setting says so."""
    return request.url.scheme == "https" or settings.console_secure_cookie


def set_cookie(response: Response, request: Request, settings: Settings, value: str,
               expires_at: datetime) -> None:
    response.set_cookie(
        COOKIE, value, path=COOKIE_PATH, httponly=True, samesite=SAMESITE,
        secure=secure(request, settings), expires=expires_at,
    )


def clear_cookie(response: Response, request: Request, settings: Settings) -> None:
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite=SAMESITE,
                           secure=secure(request, settings))
