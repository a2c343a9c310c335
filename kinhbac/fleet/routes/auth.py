"""Logging in (e-mail and password -> a bearer token) and who the caller is."""

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.security import OAuth2PasswordRequestForm

from kinhbac.fleet import accounts
from kinhbac.fleet.deps import AnyUser, SessionDep, SettingsDep
from kinhbac.fleet.login_limits import LoginLimiter, TooManyAttempts
from kinhbac.fleet.models import LoginResult, UserPublic

router = APIRouter(prefix="/api/auth", tags=["auth"])


@router.post("/login", response_model=LoginResult, responses={
    429: {"description": "too many failed logins from this address or for this account, or "
          "too many password checks at once: try again after Retry-After seconds"}})
def login(
    request: Request,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    session: SessionDep,
    settings: SettingsDep,
) -> LoginResult:
    """A bearer token for the user's e-mail (as `username`) and password. Anyone may call it,
    within the limits on failed logins (docs/fleet.md, "Logging in")."""
    limiter: LoginLimiter = request.app.state.login_limiter
    address = request.client.host if request.client else "unknown"
    account = form.username.strip().lower()
    try:
        limiter.check(address, account)
        with limiter.hashing():
            result = accounts.login(session, form.username, form.password,
                                    ttl=timedelta(hours=settings.login_token_hours))
    except TooManyAttempts as exc:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail=str(exc),
                            headers={"Retry-After": str(exc.retry_after)}) from None
    except accounts.LoginFailed:
        limiter.failed(address, account)
        accounts.record_failed_login(session, account, address)
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail="wrong e-mail or password",
            headers={"WWW-Authenticate": "Bearer"},
        ) from None
    limiter.succeeded(account)
    return result


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
def logout(session: SessionDep, caller: AnyUser) -> None:
    """End this token's session: it is deleted, and refused from now on."""
    assert caller.token_id is not None
    accounts.logout(session, caller.actor, caller.token_id)


@router.get("/me", response_model=UserPublic)
def me(caller: AnyUser) -> UserPublic:
    """The calling user (`site_ids`: the user's sites; a token may reach fewer)."""
    return UserPublic.model_validate(caller.user)
