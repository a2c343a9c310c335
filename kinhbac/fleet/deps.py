"""Request dependencies: the database session, the service key, and who is calling.

Every route states who may call it in its signature, with one of the aliases at the bottom
(`Admin`, `Staff`, `AnyUser`, `GatewayCaller`) or its own `require(...)`. No credentials or
bad ones: 401. Good credentials of a role the route does not allow: 403.
"""

import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, select

from kinhbac.fleet.audit import Actor
from kinhbac.fleet.crypto import SecretBox
from kinhbac.fleet.models import ApiToken, Gateway, Role, User, utcnow
from kinhbac.fleet.security import GATEWAY_TOKEN_PREFIX, USER_TOKEN_PREFIX, hash_token
from kinhbac.fleet.settings import Settings


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


# Dependencies that only read memory are async: FastAPI would run a sync one on the
# threadpool, a thread hop per dependency per request.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_secret_box(request: Request) -> SecretBox:
    return request.app.state.secret_box


SessionDep = Annotated[Session, Depends(get_session)]
# Pagination of list routes.
Limit = Annotated[int, Query(ge=1, le=500, description="items per page")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="items to skip")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SecretBoxDep = Annotated[SecretBox, Depends(get_secret_box)]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: a user (with a role) or a gateway."""

    user: User | None = None
    gateway: Gateway | None = None
    token_id: uuid.UUID | None = None  # the user's token that made this request

    @property
    def role(self) -> Role | None:
        return self.user.role if self.user else None

    @property
    def actor(self) -> Actor:
        if self.user is not None:
            return Actor("user", self.user.email, self.user.id)
        assert self.gateway is not None
        return Actor("gateway", f"gateway {self.gateway.name}", self.gateway.id)

    def describe(self) -> str:
        return f"a {self.role.value}" if self.role else "a gateway"


_bearer = HTTPBearer(
    auto_error=False,
    description="a user's token (kbt_..., from /api/auth/login or an admin) or a gateway's "
    "(kbg_...)",
)


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=reason, headers={"WWW-Authenticate": "Bearer"}
    )


def get_principal(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller named by the bearer token; 401 without a valid one."""
    if credentials is None:
        raise _unauthorized("missing bearer token (Authorization: Bearer <token>)")
    token = credentials.credentials
    digest = hash_token(token)
    if token.startswith(GATEWAY_TOKEN_PREFIX):
        gateway = session.exec(select(Gateway).where(Gateway.token_hash == digest)).first()
        if gateway is not None:
            return Principal(gateway=gateway)
    elif token.startswith(USER_TOKEN_PREFIX):
        found = session.exec(
            select(ApiToken, User)
            .join(User, User.id == ApiToken.user_id)
            .where(ApiToken.token_hash == digest)
        ).first()
        if found is not None:
            api_token, user = found
            if api_token.expires_at is not None and api_token.expires_at <= utcnow():
                raise _unauthorized("token expired: log in again")
            if not user.is_active:
                raise _unauthorized("this user is deactivated")
            return Principal(user=user, token_id=api_token.id)
    raise _unauthorized("unknown or revoked token")


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def require(*roles: Role) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that lets through users with one of `roles`, and refuses everyone else."""
    allowed = frozenset(roles)
    names = ", ".join(role.value for role in roles)

    async def check(principal: CurrentPrincipal) -> Principal:
        if principal.role not in allowed:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"only {names} may do this; the caller is {principal.describe()}",
            )
        return principal

    return check


async def require_gateway(principal: CurrentPrincipal) -> Gateway:
    """The calling gateway; users are refused (403)."""
    if principal.gateway is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"only gateways may do this; the caller is {principal.describe()}",
        )
    return principal.gateway


Admin = Annotated[Principal, Depends(require(Role.admin))]
Staff = Annotated[Principal, Depends(require(Role.admin, Role.technician))]
AnyUser = Annotated[Principal, Depends(require(Role.admin, Role.technician, Role.viewer))]
GatewayCaller = Annotated[Gateway, Depends(require_gateway)]
