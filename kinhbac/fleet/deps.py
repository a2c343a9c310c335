"""Request dependencies: the database session, the service key, and who is calling.

Every route states who may call it in its signature, with one of the aliases at the bottom
(`Admin`, `Staff`, `AnyUser`, `GatewayCaller`) or its own `require(...)`. No credentials or
bad ones: 401. Good credentials of a role the route does not allow: 403.

A user may also be limited to some sites (and a token to some of its user's): the caller's
`site_ids`. Every route that reads or changes a site, a gateway or a device goes through the
helpers at the end, `visible_only` for queries and `visible_or_404`/`check_placeable` for
single records, so that the limit is applied in one place. A record at another site answers
404, as one that does not exist: a limited caller cannot probe for ids elsewhere.
"""

import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, SQLModel, select
from sqlmodel.sql.expression import SelectOfScalar

from kinhbac.fleet.artifacts import ArtifactStore
from kinhbac.fleet.audit import Actor
from kinhbac.fleet.crypto import SecretBox
from kinhbac.fleet.errors import Invalid, NotFound
from kinhbac.fleet.models import ApiToken, Device, Gateway, Role, Site, User, utcnow
from kinhbac.fleet.security import GATEWAY_TOKEN_PREFIX, USER_TOKEN_PREFIX, hash_token
from kinhbac.fleet.settings import Settings
from kinhbac.fleet.signing import ReleaseSigner


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


# Dependencies that only read memory are async: FastAPI would run a sync one on the
# threadpool, a thread hop per dependency per request.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_secret_box(request: Request) -> SecretBox:
    return request.app.state.secret_box


async def get_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


async def get_release_signer(request: Request) -> ReleaseSigner:
    return request.app.state.release_signer


SessionDep = Annotated[Session, Depends(get_session)]
# Pagination of list routes.
Limit = Annotated[int, Query(ge=1, le=500, description="items per page")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="items to skip")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SecretBoxDep = Annotated[SecretBox, Depends(get_secret_box)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]
ReleaseSignerDep = Annotated[ReleaseSigner, Depends(get_release_signer)]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: a user (with a role) or a gateway."""

    user: User | None = None
    gateway: Gateway | None = None
    token_id: uuid.UUID | None = None  # the user's token that made this request
    # The sites a user's request may reach; None: every site (admins, users not limited).
    site_ids: frozenset[uuid.UUID] | None = None

    @property
    def role(self) -> Role | None:
        return self.user.role if self.user else None

    def sees(self, site_id: uuid.UUID | None) -> bool:
        """Whether the caller may see and act on what is at `site_id` (None: no site)."""
        return self.site_ids is None or site_id in self.site_ids

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
            refused = token_refusal(api_token, user)
            if refused is not None:
                raise _unauthorized(refused)
            return Principal(user=user, token_id=api_token.id,
                             site_ids=reachable_sites(user, api_token))
    raise _unauthorized("unknown or revoked token")


def token_refusal(api_token: ApiToken, user: User) -> str | None:
    """Why a user's login token no longer admits anyone (expired, user deactivated), or None.
    The API and the console's sessions (whose session is such a token) both ask this."""
    if api_token.expires_at is not None and api_token.expires_at <= utcnow():
        return "token expired: log in again"
    if not user.is_active:
        return "this user is deactivated"
    return None


def reachable_sites(user: User, token: ApiToken) -> frozenset[uuid.UUID] | None:
    """The sites a request with `token` reaches: its user's, narrowed by the token's own limit
    (so a token never reaches beyond its user); None: every site. Read per request, so a change
    to a user's sites holds from its next request on."""
    if user.role == Role.admin:
        return None  # admins are city-wide; neither an admin nor its tokens can be limited
    reach: frozenset[uuid.UUID] | None = None
    for limit in (user.site_ids, token.site_ids):
        if limit:
            reach = frozenset(limit) if reach is None else reach & frozenset(limit)
    return reach


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


# ---- site scoping: what a caller limited to sites sees

M = TypeVar("M", Site, Gateway, Device)


# The column that places a record of each kind at a site.
_SITE_COLUMN: dict[type[SQLModel], Any] = {
    Site: Site.id, Gateway: Gateway.site_id, Device: Device.site_id,
}


def _site_column(model: type[Site | Gateway | Device]) -> Any:
    return _SITE_COLUMN[model]


def visible_only(query: SelectOfScalar[Any], caller: Principal,
                 model: type[Site | Gateway | Device]) -> SelectOfScalar[Any]:
    """`query` narrowed to the records of `model` at the caller's sites (a page's total counts
    only those); unchanged for a city-wide caller. Devices at no site are city-wide records."""
    if caller.site_ids is None:
        return query
    return query.where(_site_column(model).in_(caller.site_ids))


def visible_or_404(session: Session, caller: Principal, model: type[M], id: uuid.UUID,
                   what: str) -> M:
    """The record, if it exists and is at one of the caller's sites; NotFound otherwise, in the
    same words either way."""
    record = session.get(model, id)
    if record is None or not caller.sees(getattr(record, _site_column(model).key)):
        raise NotFound(f"no {what} {id}")
    return record


def check_placeable(caller: Principal, site_id: uuid.UUID | None,
                    field: str = "site_id") -> None:
    """Refuse (422 on `field`) to put a device at a site the caller does not see, or at none,
    which would take it out of the caller's sites; an unseen site reads as an unknown one."""
    if caller.sees(site_id):
        return
    if site_id is None:
        raise Invalid(field, "you are limited to some sites: give one of them "
                      f"({', '.join(sorted(str(s) for s in caller.site_ids or ()))})")
    raise Invalid(field, f"no site {site_id}")
