"""What the Rollouts pages show: the rollouts (running first, keyset pages), one rollout's live
view (its waves, its devices by state, its failures) and the form that starts one.

Every number comes from the API's own functions (kinhbac/fleet/rollouts.py): a rollout is
`rollouts.detail` of `rollouts.get_rollout` (the rules applied first, as GET /api/rollouts/{id}
does), its failures `rollouts.list_devices`, a preview `rollouts.preview` (create_rollout's
checks and wave sizes). Who may read and act is decided in pages.py, as the API's routes decide.
"""

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlmodel import Session, col, select

from kinhbac.fleet import rollouts
from kinhbac.fleet.console.paging import parse_time_cursor, time_cursor
from kinhbac.fleet.models import (
    Release,
    Rollout,
    RolloutCreate,
    RolloutDetail,
    RolloutDevicePublic,
    RolloutState,
    RolloutWave,
    Site,
)

PAGE_SIZE = 50  # as the other lists
FAILURES_SHOWN = 50  # the newest failures on the live view; the rest are the API's (?state=)
POLL_S = 5  # the live view's script asks again this often: a wave lasts minutes at the least
RELEASES_OFFERED = 100  # newest releases the form offers
# Running first (they change), then paused (they wait for someone), then the finished ones.
RANK = {RolloutState.running: 0, RolloutState.paused: 1}
FINISHED_RANK = 2
FINAL = (RolloutState.completed, RolloutState.cancelled)
ACTIONS = ("pause", "resume", "cancel")
# The states each action needs, as rollouts.pause/resume/cancel check them.
ALLOWED_FROM = {"pause": (RolloutState.running,), "resume": (RolloutState.paused,),
                "cancel": (RolloutState.running, RolloutState.paused)}
# The state each "done" message tells of: it is shown only while still true, so a page kept or
# bookmarked with ?done=pause says nothing once the rollout has been resumed.
DONE_STATES = {"created": (RolloutState.running,), "pause": (RolloutState.paused,),
               "resume": (RolloutState.running,), "cancel": (RolloutState.cancelled,)}
# A page link's cursor: the last row's rank (one digit), then its paging.time_cursor.
_RANKS = tuple(str(rank) for rank in range(FINISHED_RANK + 1))
_WIRE_IDS = re.compile(r"[\s,;]+")
MAX_FIELD = 10_000  # a pasted device list of MAX_TARGET_DEVICES ids fits; more is a mistake


def _rank(state: RolloutState) -> int:
    return RANK.get(state, FINISHED_RANK)


@dataclass
class RolloutList:
    rows: list[RolloutDetail]
    total: int
    next_after: str | None  # the next page's cursor; None on the last page
    after: str = ""
    error: str | None = None  # "after": a damaged page link


def _cursor(rollout: Rollout) -> str:
    return f"{_rank(rollout.state)}_{time_cursor(rollout.created_at, rollout.id)}"


def list_rollouts(session: Session, params: Mapping[str, str]) -> RolloutList:
    """One page of rollouts: running, then paused, then the rest, each newest first. Keyset
    pages (after the last row's rank, time and id), so a rollout started meanwhile does not
    push one onto the next page twice."""
    after = params.get("after", "").strip()
    listing = RolloutList(rows=[], total=0, next_after=None, after=after)
    rank = sa.case({RolloutState.running.value: 0, RolloutState.paused.value: 1},
                   value=sa.cast(Rollout.state, sa.String), else_=FINISHED_RANK)
    query = select(Rollout.id)
    if after:
        rank_text, _, rest = after.partition("_")
        position = parse_time_cursor(rest) if rank_text in _RANKS else None
        if position is None:
            listing.error = "after"
            return listing
        last_rank, (at, last_id) = int(rank_text), position
        query = query.where(sa.or_(rank > last_rank, sa.and_(rank == last_rank, sa.or_(
            Rollout.created_at < at, sa.and_(Rollout.created_at == at, Rollout.id < last_id)))))
    listing.total = session.exec(select(sa.func.count()).select_from(Rollout)).one()
    ids = session.exec(query.order_by(rank, col(Rollout.created_at).desc(),
                                      col(Rollout.id).desc()).limit(PAGE_SIZE + 1)).all()
    for rollout_id in ids[:PAGE_SIZE]:
        # As GET /api/rollouts: each read applies the rules first.
        listing.rows.append(rollouts.detail(session, rollouts.get_rollout(session, rollout_id)))
    if len(ids) > PAGE_SIZE:
        last = session.get(Rollout, ids[PAGE_SIZE - 1])
        assert last is not None
        listing.next_after = _cursor(last)
    return listing


@dataclass
class LiveView:
    """One rollout as its page and its live endpoint show it."""

    detail: RolloutDetail
    failures: list[RolloutDevicePublic]  # newest first, at most FAILURES_SHOWN
    failures_total: int

    @property
    def final(self) -> bool:
        return self.detail.state in FINAL

    def may(self, action: str) -> bool:
        return self.detail.state in ALLOWED_FROM[action]

    def finished(self, wave: RolloutWave) -> bool:
        """Started, and none of its devices is left in a state that is not final."""
        return wave.started_at is not None and not any(
            wave.counts.get(s.value, 0) for s in rollouts.NON_TERMINAL)

    def to_advance(self, wave: RolloutWave) -> int:
        """Confirmed devices the wave needs to advance: WaveTally.succeeded, as a number."""
        return -(-self.detail.success_threshold * wave.size // 100)

    def to_pause(self, wave: RolloutWave) -> int:
        """Failed devices that pause the rollout: WaveTally.failed_too_often, as a number."""
        return self.detail.failure_threshold * wave.size // 100 + 1


def failures(detail: RolloutDetail) -> int:
    """Its devices that failed, rolled back or timed out: the rules' FAILURES."""
    return sum(detail.counts.get(s.value, 0) for s in rollouts.FAILURES)


def parse_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def live_view(session: Session, rollout_id: uuid.UUID) -> LiveView:
    """The rollout's detail (the API's) and its failed devices; NotFound as the API's."""
    detail = rollouts.detail(session, rollouts.get_rollout(session, rollout_id))
    failed = rollouts.latest_failures(session, rollout_id, FAILURES_SHOWN)
    return LiveView(detail=detail, failures=failed, failures_total=failures(detail))


# ---- the form that starts one


@dataclass
class NewRollout:
    """The form as sent (kept to show it again) and what it makes, or why not."""

    values: dict[str, str] = field(default_factory=lambda: {
        "release_id": "", "target": "site", "site": "", "tag": "", "devices": "",
        "waves": "1,10,50,100", "success_threshold": "95", "failure_threshold": "5",
        "deadline_h": "24", "allow_downgrade": ""})
    request: RolloutCreate | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)  # (field, the fleet's words)


def _waves(text: str) -> list[Any]:
    parts = [p.strip().removesuffix("%").strip() for p in text.split(",")]
    return [int(p) if p.isdigit() else p for p in parts if p]


def _number(text: str) -> Any:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return text  # left for RolloutCreate to refuse with its own words


def parse_form(form: Mapping[str, Any]) -> NewRollout:
    """The form as a RolloutCreate, checked by the API's own model; field errors otherwise."""
    new = NewRollout()
    for name in new.values:
        given = form.get(name)
        if isinstance(given, str):
            if len(given) > MAX_FIELD:
                new.errors.append((name, f"longer than {MAX_FIELD} characters"))
            new.values[name] = given[:MAX_FIELD]
    if new.errors:
        return new
    v = new.values
    kind = v["target"] if v["target"] in ("site", "tag", "devices") else "site"
    target: dict[str, Any] = {
        "site": {"site": v["site"].strip() or None},
        "tag": {"tag": v["tag"].strip() or None},
        "devices": {"devices": [w for w in _WIRE_IDS.split(v["devices"].strip().lower()) if w]
                    or None},
    }[kind]
    deadline: Any = v["deadline_h"].strip().replace(",", ".")
    try:
        deadline = round(float(deadline) * 3600)
    except ValueError:
        new.errors.append(("deadline_h", "not a number of hours"))
    body = {"release_id": v["release_id"] or None, "target": target,
            "waves": _waves(v["waves"]), "success_threshold": _number(v["success_threshold"]),
            "failure_threshold": _number(v["failure_threshold"]),
            "device_deadline_s": deadline if isinstance(deadline, int) else 86400,
            "allow_downgrade": v["allow_downgrade"] == "yes"}
    try:
        request = RolloutCreate.model_validate(body)
        request.target.kind_and_value()
    except ValidationError as exc:
        for error in exc.errors():
            where = [str(part) for part in error["loc"]]
            name = {"target": kind, "device_deadline_s": "deadline_h"}.get(where[0], where[0])
            new.errors.append((name, error["msg"].removeprefix("Value error, ")))
        return new
    except ValueError:
        new.errors.append((kind, "empty"))
        return new
    if not new.errors:
        new.request = request
    return new


def form_choices(session: Session) -> tuple[list[Release], list[Site]]:
    """The releases (newest first) and sites the form offers."""
    releases = list(session.exec(select(Release).order_by(col(Release.created_at).desc())
                                 .limit(RELEASES_OFFERED)))
    sites = list(session.exec(select(Site).order_by(Site.name)))
    return releases, sites
