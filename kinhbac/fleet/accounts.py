"""Users and their bearer tokens: creation, changes, login, revocation; each change audited.

A user may be limited to some sites, and an API token to some of its user's; admins are
city-wide and cannot be limited (kinhbac/fleet/deps.py applies the limits).
"""

import uuid
from datetime import timedelta

from sqlmodel import Session, func, select

from kinhbac.fleet import audit
from kinhbac.fleet.audit import Actor
from kinhbac.fleet.errors import Conflict, Invalid, NotFound
from kinhbac.fleet.models import (
    ApiToken,
    ApiTokenCreate,
    ApiTokenIssued,
    ApiTokenPublic,
    LoginResult,
    Role,
    Site,
    TokenKind,
    User,
    UserCreate,
    UserPublic,
    UserUpdate,
    utcnow,
)
from kinhbac.fleet.security import (
    USER_TOKEN_PREFIX,
    hash_password,
    hash_token,
    new_token,
    verify_password,
)
from kinhbac.fleet.store import commit, get_or_404

API_TOKEN_DAYS = 90  # an API token's life when the admin gives none (KINHBAC_API_TOKEN_DAYS)


class LoginFailed(Exception):
    """Wrong e-mail or password, or a deactivated user (the caller is not told which)."""


def _known_sites(session: Session, site_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """`site_ids` without repeats, if every one is a site; Invalid naming those that are not."""
    wanted = sorted(set(site_ids))
    if not wanted:
        return []
    found = set(session.exec(select(Site.id).where(Site.id.in_(wanted))).all())
    unknown = [str(site_id) for site_id in wanted if site_id not in found]
    if unknown:
        raise Invalid("site_ids", f"no site {', '.join(unknown)}")
    return wanted


def _refuse_admin_sites(user: User) -> None:
    if user.role == Role.admin and user.site_ids:
        raise Invalid("site_ids", f"{user.email} is an admin, and admins see every site: give "
                      "no site_ids, or another role")


def create_user(session: Session, actor: Actor, data: UserCreate) -> User:
    if session.exec(select(User).where(User.email == data.email)).first() is not None:
        raise Conflict(f"a user with e-mail {data.email} already exists")
    user = User.model_validate(data, update={"password_hash": hash_password(data.password)})
    user.set_sites(_known_sites(session, data.site_ids))
    _refuse_admin_sites(user)
    session.add(user)
    audit.record(session, actor, "user.create", "user", user.id,
                 after=audit.snapshot(user, UserPublic))
    commit(session, f"a user with e-mail {data.email} already exists")
    session.refresh(user)
    return user


def update_user(session: Session, actor: Actor, user_id: uuid.UUID, data: UserUpdate) -> User:
    user = get_or_404(session, User, user_id, "user")
    before = audit.snapshot(user, UserPublic)
    changes = data.model_dump(exclude_unset=True)
    password = changes.pop("password", None)
    sites_set = "site_ids" in changes
    site_ids = changes.pop("site_ids", None)
    for name, value in changes.items():
        if value is None and name != "full_name":
            raise Invalid(name, f"{name} cannot be null")
        setattr(user, name, value)
    if sites_set:
        if site_ids is None:
            raise Invalid("site_ids", "site_ids cannot be null: [] makes the user city-wide")
        user.set_sites(_known_sites(session, site_ids))
    _refuse_admin_sites(user)
    if user.role == Role.admin and before["role"] != Role.admin:
        _refuse_limited_tokens(session, user)
    if password is not None:
        user.password_hash = hash_password(password)
        # A new password ends every session of the old one: a stolen token dies with it.
        revoked = session.exec(select(ApiToken).where(ApiToken.user_id == user.id)).all()
        for row in revoked:
            session.delete(row)
    if before["role"] == Role.admin and before["is_active"] and not _is_active_admin(user):
        _keep_an_admin(session, user)
    user.updated_at = utcnow()
    after = audit.snapshot(user, UserPublic)
    if password is not None:
        after["password_changed"] = True
        after["tokens_revoked"] = len(revoked)
    audit.record(session, actor, "user.update", "user", user.id, before=before, after=after)
    session.add(user)
    commit(session, "the user changed meanwhile; try again")
    session.refresh(user)
    return user


def _refuse_limited_tokens(session: Session, user: User) -> None:
    """An admin's tokens reach every site: a token made to reach fewer is refused, not widened."""
    limited = [row.name for row in session.exec(
        select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.created_at)
    ).all() if row.site_ids]
    if limited:
        raise Invalid("role", f"{user.email} has API tokens limited to sites "
                      f"({', '.join(limited)}); an admin's would reach every site: revoke them "
                      "first")


def _is_active_admin(user: User) -> bool:
    return user.role == Role.admin and user.is_active


def _keep_an_admin(session: Session, leaving: User) -> None:
    others = session.exec(
        select(func.count()).select_from(User).where(
            User.role == Role.admin, User.is_active, User.id != leaving.id
        )
    ).one()
    if others == 0:
        raise Conflict(f"{leaving.email} is the last active admin; make another admin first")


def login(session: Session, email: str, password: str, *, ttl: timedelta) -> LoginResult:
    """A new login token for the user; LoginFailed otherwise."""
    user = session.exec(select(User).where(User.email == email.strip().lower())).first()
    if not verify_password(user.password_hash if user else None, password):
        raise LoginFailed
    assert user is not None
    if not user.is_active:
        raise LoginFailed
    token = new_token(USER_TOKEN_PREFIX)
    expires_at = utcnow() + ttl
    # Expired tokens are of no use to anyone: purged as logins come.
    for stale in session.exec(select(ApiToken).where(ApiToken.expires_at <= utcnow())).all():
        session.delete(stale)
    row = ApiToken(name="login", user_id=user.id, kind=TokenKind.login,
                   token_hash=hash_token(token), expires_at=expires_at)
    session.add(row)
    audit.record(session, Actor("user", user.email, user.id), "api_token.login", "api_token",
                 row.id, after=audit.snapshot(row, ApiTokenPublic))
    commit(session, "token collision; try again")
    return LoginResult(access_token=token, expires_at=expires_at)


def record_failed_login(session: Session, email: str, address: str) -> None:
    """Audit a refused login: who was tried, from where (never the password)."""
    session.rollback()  # nothing of the refused attempt is kept but this entry
    user = session.exec(select(User).where(User.email == email)).first()
    audit.record(session, Actor("anonymous", address), "user.login_failed", "user",
                 user.id if user else email[:64], after={"email": email[:320]})
    session.commit()


def logout(session: Session, actor: Actor, token_id: uuid.UUID) -> None:
    """End the session of the token that made the request."""
    row = session.get(ApiToken, token_id)
    if row is None:
        return
    audit.record(session, actor, "api_token.logout", "api_token", row.id,
                 before=audit.snapshot(row, ApiTokenPublic))
    session.delete(row)
    session.commit()


def issue_api_token(session: Session, actor: Actor, data: ApiTokenCreate, *,
                    default_days: int = API_TOKEN_DAYS) -> ApiTokenIssued:
    """A longer-lived token for a user (a script, a technician's tool), shown once; it
    expires after `expires_in_days`, by default `default_days`. It may be limited to some of
    the user's sites (`site_ids`), never to more than the user's."""
    user = session.get(User, data.user_id)
    if user is None:
        raise Invalid("user_id", f"no user {data.user_id}")
    site_ids = _known_sites(session, data.site_ids)
    if site_ids and user.role == Role.admin:
        raise Invalid("site_ids", f"{user.email} is an admin, and an admin's tokens reach every "
                      "site: give no site_ids")
    beyond = [str(site_id) for site_id in site_ids
              if user.site_ids and site_id not in user.site_ids]
    if beyond:
        raise Invalid("site_ids", f"site {', '.join(beyond)} is not one of {user.email}'s "
                      "sites: a token reaches no further than its user")
    token = new_token(USER_TOKEN_PREFIX)
    expires_at = utcnow() + timedelta(days=data.expires_in_days or default_days)
    row = ApiToken(name=data.name, user_id=user.id, kind=TokenKind.api,
                   token_hash=hash_token(token), expires_at=expires_at)
    row.set_sites(site_ids)
    session.add(row)
    audit.record(session, actor, "api_token.create", "api_token", row.id,
                 after=audit.snapshot(row, ApiTokenPublic))
    commit(session, "token collision; try again")
    session.refresh(row)
    return ApiTokenIssued.model_validate(row, update={"token": token})


def revoke_api_token(session: Session, actor: Actor, token_id: uuid.UUID) -> None:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no token {token_id}")
    audit.record(session, actor, "api_token.delete", "api_token", row.id,
                 before=audit.snapshot(row, ApiTokenPublic))
    session.delete(row)
    commit(session, "the token changed meanwhile; try again")
