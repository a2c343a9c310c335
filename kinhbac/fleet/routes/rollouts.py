"""Rollouts: an admin sends a release to a site, a tag or a list of devices, in waves, and
pauses, resumes or cancels it; admins and viewers who are not limited to sites read them.

Rollouts are city-wide, like releases: a caller limited to sites gets 403, even for reading,
since a rollout's devices and events span sites.
"""

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status

from kinhbac.fleet import rollouts
from kinhbac.fleet.deps import Admin, CurrentPrincipal, Limit, Offset, Principal, SessionDep
from kinhbac.fleet.models import (
    Page,
    Role,
    RolloutCreate,
    RolloutDetail,
    RolloutDevicePublic,
    RolloutDeviceState,
    RolloutEventPublic,
    RolloutState,
)

router = APIRouter(prefix="/api/rollouts", tags=["rollouts"])


async def city_wide_reader(principal: CurrentPrincipal) -> Principal:
    """Admins, and viewers not limited to sites; everyone else 403."""
    if principal.role not in (Role.admin, Role.viewer) or principal.site_ids is not None:
        limited = " limited to sites" if principal.site_ids is not None else ""
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="only admins and viewers not limited to sites may read rollouts; the caller "
            f"is {principal.describe()}{limited}")
    return principal


Reader = Annotated[Principal, Depends(city_wide_reader)]
_CONFLICT = {409: {"description": "not possible in the rollout's state, which it names"}}


@router.post("", response_model=RolloutDetail, status_code=status.HTTP_201_CREATED, responses={
    409: {"description": "some of the target's devices are in another running or paused "
          "rollout, which it names"},
    422: {"description": "a field that cannot be used, by name: no such release or site, no "
          "active device in the target, a downgrade without allow_downgrade"}})
def create_rollout(body: RolloutCreate, session: SessionDep, caller: Admin) -> RolloutDetail:
    """Start a rollout: its first wave's devices are offered the release at once (audited as
    `rollout.create`)."""
    return rollouts.create_rollout(session, caller.actor, body)


@router.get("", response_model=Page[RolloutDetail])
def list_rollouts(session: SessionDep, caller: Reader, state: RolloutState | None = None,
                  limit: Limit = 50, offset: Offset = 0) -> Page[RolloutDetail]:
    """Rollouts, newest first."""
    return rollouts.list_rollouts(session, state=state, limit=limit, offset=offset)


@router.get("/{rollout_id}", response_model=RolloutDetail)
def get_rollout(rollout_id: uuid.UUID, session: SessionDep, caller: Reader) -> RolloutDetail:
    """A rollout with its waves and its devices counted by state."""
    return rollouts.detail(session, rollouts.get_rollout(session, rollout_id))


@router.get("/{rollout_id}/devices", response_model=Page[RolloutDevicePublic])
def list_rollout_devices(
    rollout_id: uuid.UUID, session: SessionDep, caller: Reader,
    state: RolloutDeviceState | None = None,
    wave: Annotated[int | None, Query(ge=0, lt=100)] = None,
    limit: Limit = 50, offset: Offset = 0,
) -> Page[RolloutDevicePublic]:
    """A rollout's devices in its order (wave by wave)."""
    return rollouts.list_devices(session, rollout_id, state=state, wave=wave, limit=limit,
                                 offset=offset)


@router.get("/{rollout_id}/events", response_model=Page[RolloutEventPublic])
def list_rollout_events(
    rollout_id: uuid.UUID, session: SessionDep, caller: Reader,
    device: Annotated[str | None, Query(pattern=r"^[0-9a-f]{16}$",
                                        description="one device's, by wire id")] = None,
    limit: Limit = 50, offset: Offset = 0,
) -> Page[RolloutEventPublic]:
    """Every step of the rollout's devices, in the order recorded; `ignored` marks a step that
    would have moved a device backwards or came after its final state."""
    return rollouts.list_events(session, rollout_id, device=device, limit=limit, offset=offset)


@router.post("/{rollout_id}/pause", response_model=RolloutDetail, responses=_CONFLICT)
def pause_rollout(rollout_id: uuid.UUID, session: SessionDep, caller: Admin) -> RolloutDetail:
    """No more offers until resumed; devices mid-download stop (audited)."""
    return rollouts.pause(session, caller.actor, rollout_id)


@router.post("/{rollout_id}/resume", response_model=RolloutDetail, responses=_CONFLICT)
def resume_rollout(rollout_id: uuid.UUID, session: SessionDep, caller: Admin) -> RolloutDetail:
    """Running again: the current wave's failures so far are accepted, only new ones pause it
    again (audited)."""
    return rollouts.resume(session, caller.actor, rollout_id)


@router.post("/{rollout_id}/cancel", response_model=RolloutDetail, responses=_CONFLICT)
def cancel_rollout(rollout_id: uuid.UUID, session: SessionDep, caller: Admin) -> RolloutDetail:
    """Stop for good: devices not finished are cancelled (audited)."""
    return rollouts.cancel(session, caller.actor, rollout_id)
