"""Logging in (e-mail and password -> a bearer token) and who the caller is."""

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.security import OAuth2PasswordRequestForm

from kinhbac.fleet import accounts
from kinhbac.fleet.deps import AnyUser, SessionDep, SettingsDep
from kinhbac.fleet.models import LoginResult, UserPublic

router = APIRouter(prefix="/api/auth", tags=["auth"])


@router.post("/login", response_model=LoginResult)
def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    session: SessionDep,
    settings: SettingsDep,
) -> LoginResult:
    """A bearer token for the user's e-mail (as `username`) and password. Anyone may call it."""
    try:
        return accounts.login(session, form.username, form.password,
                              ttl=timedelta(hours=settings.login_token_hours))
    except accounts.LoginFailed:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail="wrong e-mail or password",
            headers={"WWW-Authenticate": "Bearer"},
        ) from None


@router.get("/me", response_model=UserPublic)
def me(caller: AnyUser) -> UserPublic:
    """The calling user."""
    return UserPublic.model_validate(caller.user)
