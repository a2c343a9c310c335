"""Logging in (e-mail and password -> a bearer token) and who the caller is."""

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import OAuth2PasswordRequestForm
from sqlalchemy import Engine
from sqlmodel import Session

from kinhbac.fleet import accounts
from kinhbac.fleet.deps import AnyUser, SessionDep, SettingsDep
from kinhbac.fleet.login_limits import LoginLimiter, TooManyAttempts
from kinhbac.fleet.models import LoginResult, UserPublic

router = APIRouter(prefix="/api/auth", tags=["auth"])


@router.post("/login", response_model=LoginResult, responses={
    429: {"description": "too many failed logins from this address or for this account, or "
          "too many password checks at once: try again after Retry-After seconds"}})
async def login(
    request: Request,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    settings: SettingsDep,
) -> LoginResult:
    """A bearer token for the user's e-mail (as `username`) and password. Anyone may call it,
    within the limits on failed logins (docs/fleet.md, "Logging in")."""
    try:
        return await attempt_login(request, form.username, form.password,
                                   timedelta(hours=settings.login_token_hours))
    except TooManyAttempts as exc:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail=str(exc),
                            headers={"Retry-After": str(exc.retry_after)}) from None
    except accounts.LoginFailed:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail="wrong e-mail or password",
            headers={"WWW-Authenticate": "Bearer"},
        ) from None


async def attempt_login(request: Request, email: str, password: str,
                        ttl: timedelta) -> LoginResult:
    """A login token for `email` and `password`, within the limits on failed logins (the API's
    login and the console's both come here); TooManyAttempts past them, LoginFailed (counted
    and audited) for a wrong e-mail or password."""
    # Async, with no session of its own until it holds a hash slot: a login waiting for one
    # holds no worker thread and no pooled connection, so a login flood leaves other routes
    # (the gateways' key refresh, health) their threads and connections.
    limiter: LoginLimiter = request.app.state.login_limiter
    engine: Engine = request.app.state.engine
    address = request.client.host if request.client else "unknown"
    account = email.strip().lower()
    limiter.check(address, account)
    try:
        async with limiter.hashing():
            # Again: failures counted while this login waited for its slot count against it.
            limiter.check(address, account)
            result = await run_in_threadpool(_check_password, engine, email, password, ttl)
    except accounts.LoginFailed:
        limiter.failed(address, account)
        await run_in_threadpool(_record_failure, engine, account, address)
        raise
    limiter.succeeded(account)
    return result


def _check_password(engine: Engine, email: str, password: str, ttl: timedelta) -> LoginResult:
    with Session(engine) as session:
        return accounts.login(session, email, password, ttl=ttl)


def _record_failure(engine: Engine, account: str, address: str) -> None:
    with Session(engine) as session:
        accounts.record_failed_login(session, account, address)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
def logout(session: SessionDep, caller: AnyUser) -> None:
    """End this token's session: it is deleted, and refused from now on."""
    assert caller.token_id is not None
    accounts.logout(session, caller.actor, caller.token_id)


@router.get("/me", response_model=UserPublic)
def me(caller: AnyUser) -> UserPublic:
    """The calling user (`site_ids`: the user's sites; a token may reach fewer)."""
    return UserPublic.model_validate(caller.user)
