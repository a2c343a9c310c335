"""Users (admin only), each city-wide or limited to some sites (`site_ids`)."""

import uuid

from fastapi import APIRouter, status
from sqlmodel import select

from kinhbac.fleet import accounts
from kinhbac.fleet.deps import Admin, Limit, Offset, SessionDep
from kinhbac.fleet.models import Page, User, UserCreate, UserPublic, UserUpdate
from kinhbac.fleet.store import get_or_404, page

router = APIRouter(prefix="/api/users", tags=["users"])


@router.post("", response_model=UserPublic, status_code=status.HTTP_201_CREATED)
def create_user(data: UserCreate, session: SessionDep, caller: Admin) -> User:
    return accounts.create_user(session, caller.actor, data)


@router.get("", response_model=Page[UserPublic])
def list_users(session: SessionDep, caller: Admin, limit: Limit = 50, offset: Offset = 0) -> Page:
    return page(session, select(User), UserPublic, order_by=(User.email,),
                limit=limit, offset=offset)


@router.get("/{user_id}", response_model=UserPublic)
def get_user(user_id: uuid.UUID, session: SessionDep, caller: Admin) -> User:
    return get_or_404(session, User, user_id, "user")


@router.patch("/{user_id}", response_model=UserPublic)
def update_user(user_id: uuid.UUID, data: UserUpdate, session: SessionDep, caller: Admin) -> User:
    """Change a user's role, name, password, sites or whether it may log in; a change of
    sites holds from the user's next request."""
    return accounts.update_user(session, caller.actor, user_id, data)
