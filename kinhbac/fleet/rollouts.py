"""Rollouts: one release sent to a target in waves that advance and pause by themselves
(docs/ota.md, "Rollouts").

The rules live here, as functions over the records, so that every path that changes a rollout
runs the same ones: an admin's request (create, pause, resume, cancel), each read of a
rollout, each batch of progress the MQTT ingest commits (apply_progress), and the app's
periodic task (tick), which also times out devices past their deadline.

    rollout:  running -> (paused <-> running) -> completed;  running | paused -> cancelled
    device:   pending -> offered -> downloading -> verifying -> installed -> rebooting
              -> confirmed; failed / rolled_back from any of those; timed_out past its
              deadline; cancelled with its rollout. Terminal: confirmed, failed, rolled_back,
              timed_out, cancelled.

A wave is a share of the target's devices, shuffled by the rollout's id so that each wave is a
sample. Wave k holds the devices up to ceil(p_k % of N) in that order, at least one more than
wave k-1; a wave is judged by its own devices only.
"""

import asyncio
import hashlib
import json
import logging
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from packaging.version import InvalidVersion, Version
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from kinhbac.fleet import audit
from kinhbac.fleet.audit import Actor
from kinhbac.fleet.errors import Conflict, Invalid, NotFound
from kinhbac.fleet.models import (
    Device,
    DeviceState,
    DeviceTag,
    OtaAssignment,
    OtaAssignments,
    Page,
    Release,
    ReleaseKind,
    Rollout,
    RolloutCreate,
    RolloutDetail,
    RolloutDevice,
    RolloutDevicePublic,
    RolloutDeviceState,
    RolloutEvent,
    RolloutEventPublic,
    RolloutEventSource,
    RolloutRelease,
    RolloutState,
    RolloutTargetKind,
    RolloutWave,
    Site,
    utcnow,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

TICK_S = 10.0  # the periodic task: deadlines are hours, so a device times out within 10 s of its
NAMED_AT_MOST = 5  # devices a refusal names before "and N more"
MAX_REASON = 500  # rollout_device.reason and rollout_event.reason
# Steps of one device in one ingest batch: a gateway sends about eight per update; more is a
# broken or hostile gateway, and the batch must stay bounded (kinhbac/fleet/ingest.py).
MAX_STEPS_PER_DEVICE = 32

S = RolloutDeviceState
TERMINAL = frozenset({S.confirmed, S.failed, S.rolled_back, S.timed_out, S.cancelled})
NON_TERMINAL = tuple(s for s in S if s not in TERMINAL)
FAILURES = (S.failed, S.rolled_back, S.timed_out)
# The order progress moves in; failed and rolled_back end it from any of these.
PROGRESS = {S.pending: 0, S.offered: 1, S.downloading: 2, S.verifying: 3, S.installed: 4,
            S.rebooting: 5, S.confirmed: 6}
LIVE = (RolloutState.running, RolloutState.paused)  # a device is in at most one of these
FLEET = Actor("fleet", "fleet")  # what the rules do by themselves, in the audit log


def _cut(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def _named(names: Sequence[str]) -> str:
    shown = ", ".join(names[:NAMED_AT_MOST])
    more = len(names) - NAMED_AT_MOST
    return f"{shown} and {more} more" if more > 0 else shown


# ---- waves


def wave_ends(waves: Sequence[int], total: int) -> list[int]:
    """Where each wave ends in the shuffled order: ceil(p % of total), at least one past the
    previous wave's end, at most `total` (so a target smaller than its waves leaves the last
    waves empty, and an empty wave is done at once)."""
    ends: list[int] = []
    previous = 0
    for percent in waves:
        end = min(total, max(-(-percent * total // 100), previous + 1))
        ends.append(end)
        previous = end
    return ends


def shuffled(devices: Iterable[Device], rollout_id: uuid.UUID) -> list[Device]:
    """The devices in the rollout's order: sorted by wire id, then shuffled with the rollout's
    id as the seed, so the same rollout always orders the same devices the same way."""
    ordered = sorted(devices, key=lambda d: d.wire_id)
    random.Random(rollout_id.int).shuffle(ordered)
    return ordered


# ---- creating


def _site(session: Session, given: str) -> Site:
    site = session.exec(select(Site).where(Site.slug == given)).first()
    if site is None:
        with suppress(ValueError):
            site = session.get(Site, uuid.UUID(given))
    if site is None:
        named = session.exec(select(Site).where(Site.name == given).order_by(Site.slug)).all()
        if len(named) > 1:
            raise Invalid("target", f"{len(named)} sites are named {given!r} "
                          f"({_named([s.slug for s in named])}): give the slug")
        site = named[0] if named else None
    if site is None:
        raise Invalid("target", f"no site {given!r} (give its slug, name or id)")
    return site


def _target_devices(session: Session, kind: RolloutTargetKind, value: Any) -> list[Device]:
    active = Device.state == DeviceState.active
    if kind == RolloutTargetKind.site:
        site = _site(session, value)
        devices = list(session.exec(select(Device).where(Device.site_id == site.id, active)))
        if not devices:
            raise Invalid("target", f"site {value!r} has no active devices")
        return devices
    if kind == RolloutTargetKind.tag:
        devices = list(session.exec(select(Device).join(DeviceTag).where(DeviceTag.tag == value,
                                                                          active)))
        if not devices:
            raise Invalid("target", f"no active device has the tag {value!r}")
        return devices
    found = {d.wire_id: d for d in session.exec(select(Device).where(
        col(Device.wire_id).in_(value)))}
    unknown = [w for w in value if w not in found]
    if unknown:
        raise Invalid("target", f"no device {_named(unknown)}")
    inactive = [f"{w} ({found[w].state.value})" for w in value if found[w].state != DeviceState.active]
    if inactive:
        raise Invalid("target", f"only active devices take updates: {_named(inactive)}")
    return [found[w] for w in value]


def _reported_version(device: Device) -> Version | None:
    firmware = device.status.firmware if device.status is not None else None
    if not firmware:
        return None
    try:
        return Version(firmware)
    except InvalidVersion:
        return None  # a firmware string that is no version: it gets the update


def short_of_flash(release: Release, devices: Iterable[Device],
                   running_it: set[uuid.UUID]) -> tuple[int, list[Device]]:
    """A bundle's `min_free_bytes` and the devices, by wire id, that reported less free flash
    (too_full's rule, which the console's release page shows); (0, []) for an image."""
    if release.kind != ReleaseKind.bundle:
        return 0, []
    needed = json.loads(release.manifest).get("min_free_bytes") or 0
    short = sorted((d for d in devices if d.id not in running_it
                    and d.free_flash_bytes is not None and d.free_flash_bytes < needed),
                   key=lambda d: d.wire_id)
    return needed, short


def too_full(release: Release, devices: Iterable[Device],
             running_it: set[uuid.UUID]) -> str | None:
    """Why a bundle cannot go to these devices for want of flash, or None.

    A device is short when the free flash it last reported (its HELLO, kept on its record) is
    less than the manifest's `min_free_bytes`, the figure each node checks an offer against
    itself. Not checked: images (they go to an OTA partition, sized at upload), devices that
    already run the release (nothing is downloaded), and devices that never reported a figure
    (firmware before it: each refuses an offer too large for it, naming both sizes)."""
    needed, short = short_of_flash(release, devices, running_it)
    if not short:
        return None
    named = [f"{d.wire_id} ({d.free_flash_bytes:,} bytes free)" for d in short]
    return (f"{len(short)} of the target's devices reported less free flash than bundle "
            f"{release.version} needs ({needed:,} bytes, its manifest's min_free_bytes): "
            f"{_named(named)}; free flash on them, or leave them out by targeting the others "
            "(a device list or a tag without them)")


def _busy(session: Session, device_ids: list[uuid.UUID]) -> tuple[Rollout, int] | None:
    """A live rollout holding some of these devices, and how many of them."""
    rows = session.exec(
        select(Rollout, func.count()).join(RolloutDevice, RolloutDevice.rollout_id == Rollout.id)
        .where(col(Rollout.state).in_(LIVE), col(RolloutDevice.device_id).in_(device_ids))
        .group_by(Rollout.id).order_by(Rollout.created_at)).all()
    return (rows[0][0], rows[0][1]) if rows else None


@dataclass(frozen=True)
class _Checked:
    """A rollout request that passed every check but the busy one, with what it resolved to."""

    release: Release
    kind: RolloutTargetKind
    value: Any
    devices: list[Device]  # the target's, unordered
    running_it: set[uuid.UUID]  # those that already run the release


def _check(session: Session, data: RolloutCreate) -> _Checked:
    """The checks a rollout must pass before anything is locked or written: the release, the
    target, a downgrade, the free flash. Invalid naming the field otherwise."""
    release = session.get(Release, data.release_id)
    if release is None:
        raise Invalid("release_id", f"no release {data.release_id}")
    kind, value = data.target.kind_and_value()
    devices = _target_devices(session, kind, value)

    target = Version(release.version)
    running_it: set[uuid.UUID] = set()
    newer: list[str] = []
    if release.kind == ReleaseKind.bundle:  # a HELLO reports the app bundle's version
        for device in devices:
            version = _reported_version(device)
            if version == target:
                running_it.add(device.id)
            elif version is not None and version > target:
                newer.append(f"{device.wire_id} ({version})")
    if newer and not data.allow_downgrade:
        raise Invalid("allow_downgrade", f"release {release.version} is older than what "
                      f"{len(newer)} of the target's devices run: {_named(newer)}; set "
                      "allow_downgrade to send it anyway")
    short = too_full(release, devices, running_it)
    if short is not None:
        raise Invalid("target", short)
    return _Checked(release, kind, value, devices, running_it)


def _refuse_busy(session: Session, devices: list[Device]) -> None:
    busy = _busy(session, [d.id for d in devices])
    if busy is not None:
        other, count = busy
        raise Conflict(f"{count} of the target's devices are in rollout {other.id} "
                       f"({other.state.value}) already: cancel it or let it complete first")


def preview(session: Session, data: RolloutCreate) -> list[int]:
    """How many devices each wave of this rollout would hold, refused as create_rollout would
    refuse it (the same checks), without writing or locking anything (the console's preview).
    The sizes are create_rollout's: the same target and wave_ends; only which devices fall in
    which wave depends on the new rollout's id."""
    checked = _check(session, data)
    _refuse_busy(session, checked.devices)
    ends = wave_ends(data.waves, len(checked.devices))
    return [end - start for start, end in zip([0, *ends], ends, strict=False)]


def create_rollout(session: Session, actor: Actor, data: RolloutCreate,
                   now: datetime | None = None) -> RolloutDetail:
    """Check and record a rollout, audited, and start its first wave."""
    now = now or utcnow()
    checked = _check(session, data)
    release, kind, value, running_it = (checked.release, checked.kind, checked.value,
                                        checked.running_it)
    rollout_id = uuid.uuid4()
    devices = shuffled(checked.devices, rollout_id)
    # Two admins starting rollouts of the same devices at once: the second waits here for the
    # first to commit (PostgreSQL), then finds them busy.
    session.exec(select(Device.id).where(col(Device.id).in_([d.id for d in devices]))
                 .order_by(Device.id).with_for_update()).all()
    _refuse_busy(session, devices)

    rollout = Rollout(
        id=rollout_id, release_id=release.id, target_kind=kind, target_value=value,
        waves=list(data.waves), wave_started_at=[None] * len(data.waves),
        success_threshold=data.success_threshold, failure_threshold=data.failure_threshold,
        device_deadline_s=data.device_deadline_s, allow_downgrade=data.allow_downgrade,
        state=RolloutState.running, current_wave=0, created_at=now, created_by=actor.label,
        created_by_id=actor.id, updated_at=now)
    session.add(rollout)
    session.flush()  # its devices refer to it
    ends = wave_ends(data.waves, len(devices))
    wave = 0
    for position, device in enumerate(devices):
        while position >= ends[wave]:
            wave += 1
        record = RolloutDevice(rollout_id=rollout.id, device_id=device.id, position=position,
                               wave=wave, updated_at=now)
        if device.id in running_it:
            reason = f"already runs {release.version}"
            record.state, record.reason = S.confirmed, reason
            session.add(_event(rollout.id, device.id, now, S.pending, S.confirmed,
                               RolloutEventSource.fleet, reason=reason))
        session.add(record)
    session.flush()
    _start_wave(session, rollout, 0, now)
    evaluate(session, rollout, now)
    shown = detail(session, rollout)
    audit.record(session, actor, "rollout.create", "rollout", rollout.id,
                 after=shown.model_dump(mode="json"))
    session.commit()
    log.info("%s started rollout %s: %s %s to %s %s, %d devices", actor.label, rollout.id,
             release.kind.value, release.version, kind.value, value if kind != "devices" else
             f"of {len(value)}", len(devices))
    return detail(session, rollout)


def _event(rollout_id: uuid.UUID, device_id: uuid.UUID, at: datetime, before: S, after: S,
           source: RolloutEventSource, *, reason: str | None = None, size: int = 0,
           ignored: bool = False) -> RolloutEvent:
    return RolloutEvent(rollout_id=rollout_id, device_id=device_id, at=at, from_state=before,
                        to_state=after, source=source, reason=_cut(reason) if reason else None,
                        bytes=size, ignored=ignored, received_at=utcnow())


# ---- the rules


def _start_wave(session: Session, rollout: Rollout, wave: int, now: datetime) -> None:
    """Wave `wave` begins: its devices are offered from now, each until now + its deadline."""
    started = list(rollout.wave_started_at)
    started[wave] = now.isoformat()
    rollout.wave_started_at = started
    rollout.current_wave = wave
    rollout.failures_accepted = 0
    rollout.updated_at = now
    session.execute(
        sa.update(RolloutDevice)
        .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave == wave,
               col(RolloutDevice.state).in_(NON_TERMINAL))
        .values(deadline_at=now + timedelta(seconds=rollout.device_deadline_s), updated_at=now))


def _time_out(session: Session, rollout: Rollout, now: datetime) -> int:
    late = session.exec(
        select(RolloutDevice).where(
            RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave <= rollout.current_wave,
            col(RolloutDevice.state).in_(NON_TERMINAL), col(RolloutDevice.deadline_at) <= now)
        .order_by(RolloutDevice.device_id)).all()
    for record in late:
        reason = (f"no final state within {rollout.device_deadline_s} s of its wave's start "
                  f"(last: {record.state.value})")
        session.add(_event(rollout.id, record.device_id, now, record.state, S.timed_out,
                           RolloutEventSource.fleet, reason=reason, size=record.bytes))
        record.state, record.reason, record.updated_at = S.timed_out, reason, now
        session.add(record)
    if late:
        session.flush()
    return len(late)


def _counts(session: Session, rollout_id: uuid.UUID) -> dict[int, Counter[str]]:
    """Devices by wave and state."""
    by_wave: dict[int, Counter[str]] = {}
    for wave, state, n in session.exec(
            select(RolloutDevice.wave, RolloutDevice.state, func.count())
            .where(RolloutDevice.rollout_id == rollout_id)
            .group_by(RolloutDevice.wave, RolloutDevice.state)).all():
        by_wave.setdefault(wave, Counter())[S(state).value] += n
    return by_wave


@dataclass(frozen=True)
class WaveTally:
    size: int
    confirmed: int
    failures: int
    unfinished: int  # devices not in a final state
    counts: Counter[str]

    @classmethod
    def of(cls, counts: Counter[str]) -> "WaveTally":
        return cls(size=sum(counts.values()), confirmed=counts[S.confirmed.value],
                   failures=sum(counts[s.value] for s in FAILURES),
                   unfinished=sum(counts[s.value] for s in NON_TERMINAL), counts=counts)

    def succeeded(self, threshold: int) -> bool:
        return self.confirmed * 100 >= threshold * self.size

    def failed_too_often(self, threshold: int) -> bool:
        return self.failures >= 1 and self.failures * 100 > threshold * self.size


def _pause(session: Session, rollout: Rollout, reason: str, now: datetime) -> None:
    rollout.state, rollout.paused_reason, rollout.updated_at = RolloutState.paused, reason, now
    audit.record(session, FLEET, "rollout.pause", "rollout", rollout.id,
                 after={"state": "paused", "paused_reason": reason})
    log.warning("rollout %s paused itself: %s", rollout.id, reason)


def evaluate(session: Session, rollout: Rollout, now: datetime | None = None) -> bool:
    """Apply the rules to a running rollout (the caller holds its row, e.g. locked()): time
    out devices past their deadline, pause on too many failures, advance a wave that
    succeeded, complete the last. Whether anything changed; the caller commits."""
    now = now or utcnow()
    if rollout.state != RolloutState.running:
        return False
    changed = _time_out(session, rollout, now) > 0
    last = len(rollout.waves) - 1
    while True:
        by_wave = _counts(session, rollout.id)
        wave = rollout.current_wave
        tally = WaveTally.of(by_wave.get(wave, Counter()))
        new_failures = tally.failures > rollout.failures_accepted
        # People count waves from 1; the API's `index` and `?wave=` count from 0.
        where = f"wave {wave + 1} of {last + 1} ({rollout.waves[wave]}% of the target)"
        if new_failures and tally.failed_too_often(rollout.failure_threshold):
            c = tally.counts
            _pause(session, rollout, _cut(
                f"{where}: {tally.failures} of its {tally.size} devices failed "
                f"({c[S.failed.value]} failed, {c[S.rolled_back.value]} rolled back, "
                f"{c[S.timed_out.value]} timed out), past the {rollout.failure_threshold}% "
                "failure threshold"), now)
            return True
        finished = tally.unfinished == 0
        # A wave whose every device is final but below the success threshold, with failures
        # an admin accepted by resuming: it goes on as if it had succeeded.
        accepted = finished and not new_failures
        if wave < last and (tally.succeeded(rollout.success_threshold) or accepted):
            _start_wave(session, rollout, wave + 1, now)
            audit.record(session, FLEET, "rollout.advance", "rollout", rollout.id,
                         after={"current_wave": wave + 1, "wave_counts": dict(tally.counts)})
            log.info("rollout %s: %s done (%d of %d confirmed), wave %d starts", rollout.id,
                     where, tally.confirmed, tally.size, wave + 2)
            changed = True
            continue
        if wave < last and finished:
            _pause(session, rollout, _cut(
                f"{where}: every device finished and {tally.confirmed} of {tally.size} are "
                f"confirmed, below the {rollout.success_threshold}% success threshold; resume "
                "to start the next wave anyway"), now)
            return True
        if wave == last and not any(sum(c[s.value] for s in NON_TERMINAL)
                                    for c in by_wave.values()):
            rollout.state, rollout.updated_at = RolloutState.completed, now
            totals = sum(by_wave.values(), Counter())
            audit.record(session, FLEET, "rollout.complete", "rollout", rollout.id,
                         after={"state": "completed", "counts": dict(totals)})
            log.info("rollout %s completed: %s", rollout.id, dict(totals))
            return True
        if changed:
            rollout.updated_at = now
        return changed


def locked(session: Session, rollout_id: uuid.UUID) -> Rollout | None:
    """The rollout, its row locked until the transaction ends (PostgreSQL; SQLite locks the
    whole database on the first write), so instances apply the rules one at a time."""
    return session.exec(select(Rollout).where(Rollout.id == rollout_id)
                        .with_for_update()).first()


def get_rollout(session: Session, rollout_id: uuid.UUID, now: datetime | None = None) -> Rollout:
    """A rollout, with the rules applied first (a read sees its state as of now)."""
    rollout = locked(session, rollout_id)
    if rollout is None:
        raise NotFound(f"no rollout {rollout_id}")
    if evaluate(session, rollout, now):
        session.commit()
        session.refresh(rollout)
    else:
        session.rollback()  # lets the row lock go
        rollout = session.get(Rollout, rollout_id)
        assert rollout is not None
    return rollout


def tick(engine: Engine, now: datetime | None = None) -> int:
    """Apply the rules to every running rollout, each in its own transaction (the periodic
    task). How many changed."""
    with Session(engine) as session:
        ids = session.exec(select(Rollout.id).where(Rollout.state == RolloutState.running)
                           .order_by(Rollout.id)).all()
    changed = 0
    for rollout_id in ids:
        with Session(engine) as session:
            rollout = locked(session, rollout_id)
            if rollout is not None and evaluate(session, rollout, now):
                session.commit()
                changed += 1
    return changed


@asynccontextmanager
async def running(app: "FastAPI") -> AsyncIterator[None]:
    """The app's periodic task while the block runs: tick() every app.state.rollout_tick_s
    (TICK_S unless a test sets it)."""
    from starlette.concurrency import run_in_threadpool

    interval = getattr(app.state, "rollout_tick_s", TICK_S)

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await run_in_threadpool(tick, app.state.engine)
            except Exception:  # the database away, or a bug: try again next time, loudly
                log.exception("rollouts: the periodic check failed; retrying in %s s", interval)

    task = asyncio.create_task(loop(), name="fleet-rollouts")
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


# ---- what an admin does


def pause(session: Session, actor: Actor, rollout_id: uuid.UUID) -> RolloutDetail:
    rollout = _locked_or_404(session, rollout_id)
    now = utcnow()
    if evaluate(session, rollout, now):  # it may have paused or completed meanwhile
        session.commit()
        rollout = _locked_or_404(session, rollout_id)
    if rollout.state != RolloutState.running:
        raise Conflict(f"rollout {rollout_id} is {rollout.state.value}: only a running one "
                       "can be paused")
    before = {"state": rollout.state.value}
    rollout.state, rollout.paused_reason = RolloutState.paused, f"paused by {actor.label}"
    rollout.updated_at = now
    audit.record(session, actor, "rollout.pause", "rollout", rollout.id, before=before,
                 after={"state": "paused", "paused_reason": rollout.paused_reason})
    session.commit()
    return detail(session, rollout)


def resume(session: Session, actor: Actor, rollout_id: uuid.UUID) -> RolloutDetail:
    """Running again. The current wave's failures so far are accepted (only new ones pause it
    again), and every device not finished gets at least a whole deadline from now: no one was
    offered anything while it was paused."""
    rollout = _locked_or_404(session, rollout_id)
    if rollout.state != RolloutState.paused:
        raise Conflict(f"rollout {rollout_id} is {rollout.state.value}: only a paused one can "
                       "be resumed")
    now = utcnow()
    before = {"state": rollout.state.value, "paused_reason": rollout.paused_reason}
    tally = WaveTally.of(_counts(session, rollout.id).get(rollout.current_wave, Counter()))
    rollout.state, rollout.paused_reason = RolloutState.running, None
    rollout.failures_accepted = tally.failures
    rollout.updated_at = now
    fresh = now + timedelta(seconds=rollout.device_deadline_s)
    session.execute(
        sa.update(RolloutDevice)
        .where(RolloutDevice.rollout_id == rollout.id,
               RolloutDevice.wave <= rollout.current_wave,
               col(RolloutDevice.state).in_(NON_TERMINAL),
               sa.or_(col(RolloutDevice.deadline_at).is_(None),
                      col(RolloutDevice.deadline_at) < fresh))
        .values(deadline_at=fresh, updated_at=now))
    audit.record(session, actor, "rollout.resume", "rollout", rollout.id, before=before,
                 after={"state": "running", "failures_accepted": tally.failures})
    evaluate(session, rollout, now)
    session.commit()
    return detail(session, rollout)


def cancel(session: Session, actor: Actor, rollout_id: uuid.UUID) -> RolloutDetail:
    """Cancelled: every device not finished is cancelled (its gateway stops offering; a node
    that already switched keeps what it confirmed)."""
    rollout = _locked_or_404(session, rollout_id)
    if rollout.state not in LIVE:
        raise Conflict(f"rollout {rollout_id} is {rollout.state.value} already: only a running "
                       "or paused one can be cancelled")
    now = utcnow()
    before = {"state": rollout.state.value}
    reason = f"rollout cancelled by {actor.label}"
    open_records = session.exec(select(RolloutDevice).where(
        RolloutDevice.rollout_id == rollout.id, col(RolloutDevice.state).in_(NON_TERMINAL))
        .order_by(RolloutDevice.device_id)).all()
    for record in open_records:
        session.add(_event(rollout.id, record.device_id, now, record.state, S.cancelled,
                           RolloutEventSource.admin, reason=reason, size=record.bytes))
        record.state, record.reason, record.updated_at = S.cancelled, reason, now
        session.add(record)
    rollout.state, rollout.updated_at = RolloutState.cancelled, now
    audit.record(session, actor, "rollout.cancel", "rollout", rollout.id, before=before,
                 after={"state": "cancelled", "devices_cancelled": len(open_records)})
    session.commit()
    return detail(session, rollout)


def _locked_or_404(session: Session, rollout_id: uuid.UUID) -> Rollout:
    rollout = locked(session, rollout_id)
    if rollout is None:
        raise NotFound(f"no rollout {rollout_id}")
    return rollout


# ---- what the API shows


def _target(rollout: Rollout) -> dict[str, Any]:
    return {rollout.target_kind.value: rollout.target_value}


def detail(session: Session, rollout: Rollout) -> RolloutDetail:
    release = session.get(Release, rollout.release_id)
    assert release is not None  # RESTRICT: a release in a rollout is never deleted
    by_wave = _counts(session, rollout.id)
    waves = []
    for index, percent in enumerate(rollout.waves):
        counts = by_wave.get(index, Counter())
        started = rollout.wave_started_at[index] if index < len(rollout.wave_started_at) \
            else None
        waves.append(RolloutWave(index=index, percent=percent, size=sum(counts.values()),
                                 started_at=datetime.fromisoformat(started) if started else None,
                                 counts=dict(sorted(counts.items()))))
    totals = sum(by_wave.values(), Counter())
    return RolloutDetail(
        id=rollout.id,
        release=RolloutRelease(id=release.id, kind=release.kind, version=release.version),
        target=_target(rollout), state=rollout.state, paused_reason=rollout.paused_reason,
        waves=waves, current_wave=rollout.current_wave, counts=dict(sorted(totals.items())),
        total=sum(totals.values()), success_threshold=rollout.success_threshold,
        failure_threshold=rollout.failure_threshold,
        device_deadline_s=rollout.device_deadline_s, allow_downgrade=rollout.allow_downgrade,
        created_at=rollout.created_at, created_by=rollout.created_by,
        updated_at=rollout.updated_at)


def list_rollouts(session: Session, *, state: RolloutState | None, limit: int,
                  offset: int) -> Page[RolloutDetail]:
    """Rollouts, newest first, each as its detail (the rules applied to running ones)."""
    query = select(Rollout.id)
    if state is not None:
        query = query.where(Rollout.state == state)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    ids = session.exec(query.order_by(col(Rollout.created_at).desc(), Rollout.id)
                       .limit(limit).offset(offset)).all()
    items = [detail(session, get_rollout(session, rollout_id)) for rollout_id in ids]
    return Page(items=items, total=total, limit=limit, offset=offset)


def list_devices(session: Session, rollout_id: uuid.UUID, *, state: RolloutDeviceState | None,
                 wave: int | None, limit: int, offset: int) -> Page[RolloutDevicePublic]:
    get_rollout(session, rollout_id)
    query = (select(RolloutDevice, Device.wire_id)
             .join(Device, Device.id == RolloutDevice.device_id)
             .where(RolloutDevice.rollout_id == rollout_id))
    if state is not None:
        query = query.where(RolloutDevice.state == state)
    if wave is not None:
        query = query.where(RolloutDevice.wave == wave)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(RolloutDevice.position).limit(limit).offset(offset)).all()
    return Page(items=[RolloutDevicePublic(
        device_id=wire_id, name=None, wave=r.wave, state=r.state, bytes=r.bytes, reason=r.reason,
        offered_at=r.offered_at, deadline_at=r.deadline_at, updated_at=r.updated_at)
        for r, wire_id in rows], total=total, limit=limit, offset=offset)


def latest_failures(session: Session, rollout_id: uuid.UUID, limit: int
                    ) -> list[RolloutDevicePublic]:
    """The rollout's devices in a FAILURES state, the most recently changed first, in one
    query (a live view asks for them every few seconds; the caller has read the rollout)."""
    rows = session.exec(
        select(RolloutDevice, Device.wire_id)
        .join(Device, Device.id == RolloutDevice.device_id)
        .where(RolloutDevice.rollout_id == rollout_id,
               col(RolloutDevice.state).in_(list(FAILURES)))
        .order_by(col(RolloutDevice.updated_at).desc(), col(Device.wire_id).desc())
        .limit(limit)).all()
    return [RolloutDevicePublic(
        device_id=wire_id, name=None, wave=r.wave, state=r.state, bytes=r.bytes, reason=r.reason,
        offered_at=r.offered_at, deadline_at=r.deadline_at, updated_at=r.updated_at)
        for r, wire_id in rows]


def list_events(session: Session, rollout_id: uuid.UUID, *, device: str | None, limit: int,
                offset: int) -> Page[RolloutEventPublic]:
    """A rollout's events in the order they were recorded; `device`: one device's (wire id)."""
    get_rollout(session, rollout_id)
    query = (select(RolloutEvent, Device.wire_id)
             .join(Device, Device.id == RolloutEvent.device_id)
             .where(RolloutEvent.rollout_id == rollout_id))
    if device is not None:
        query = query.where(Device.wire_id == device)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(RolloutEvent.id).limit(limit).offset(offset)).all()
    return Page(items=[RolloutEventPublic(
        device_id=wire_id, at=e.at, from_state=e.from_state, to_state=e.to_state, bytes=e.bytes,
        reason=e.reason, source=e.source, ignored=e.ignored) for e, wire_id in rows],
        total=total, limit=limit, offset=offset)


# ---- what gateways fetch


def manifest_sha256(release: Release) -> str:
    """SHA-256 of the release's canonical manifest bytes, as stored: its first 4 bytes are the
    release ref on the wire (docs/ota.md, "How the parts talk")."""
    return hashlib.sha256(release.manifest).hexdigest()


def assignments(session: Session, site_id: uuid.UUID,
                now: datetime | None = None) -> OtaAssignments:
    """Each device at the site that a running rollout offers a release to now: its wave has
    started, it is not in a final state, its deadline has not passed."""
    now = now or utcnow()
    rows = session.exec(
        select(Device.wire_id, Rollout.id, Release)
        .select_from(RolloutDevice)
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .join(Device, Device.id == RolloutDevice.device_id)
        .join(Release, Release.id == Rollout.release_id)
        .where(Device.site_id == site_id, Device.state == DeviceState.active,
               Rollout.state == RolloutState.running,
               RolloutDevice.wave <= Rollout.current_wave,
               col(RolloutDevice.state).in_(NON_TERMINAL),
               col(RolloutDevice.deadline_at) > now)
        .order_by(Device.wire_id)).all()
    return OtaAssignments(assignments=[
        OtaAssignment(device_id=wire_id, rollout_id=rollout_id, release_id=release.id,
                      kind=release.kind, version=release.version,
                      manifest_sha256=manifest_sha256(release))
        for wire_id, rollout_id, release in rows])


# ---- progress from the gateways (the MQTT ingest's batches)


def _source(state: S, boot: int | None) -> RolloutEventSource:
    # `offered` is the gateway's own step; so is a `failed` without a node's boot (the gateway
    # refused the release: signature, hash, cache); the rest are the node's OTA_RESULT.
    if state == S.offered or boot is None:
        return RolloutEventSource.gateway
    return RolloutEventSource.node


def _why_ignored(rollout: Rollout, record: RolloutDevice, new: S, size: int) -> str | None:
    """Why a step is recorded but not applied; None: apply it."""
    current = record.state
    if current in TERMINAL:
        return f"{current.value} again" if new == current else \
            f"after its final state ({current.value})"
    if record.wave > rollout.current_wave:
        return f"its wave ({record.wave}) has not started"
    if new in (S.failed, S.rolled_back):
        return None
    if new == current:
        return None if size > record.bytes else f"{current.value} again"
    if PROGRESS[new] < PROGRESS[current]:
        return f"backwards from {current.value}"
    return None


def apply_progress(session: Session, steps: list[dict[str, Any]],
                   now: datetime | None = None) -> list[str]:
    """Apply update steps to their devices' rollout records and apply the rules to the
    rollouts they touch, in the caller's transaction (the caller commits). What was refused,
    one reason each: a device not registered at the topic's site, an unknown rollout, a
    rollout of another release, a device not in it.

    A step is a dict: wire_id, site (the topic's), release_id, rollout_id (uuid.UUID or None),
    state, bytes, reason, at (the gateway's clock), boot. Each device's steps go in the order
    the gateway heard them; each is recorded as an event, those that would move the device
    backwards or come after its final state marked ignored; a step recorded already (the
    broker's redelivery) is not recorded twice."""
    now = now or utcnow()
    refused: list[str] = []
    if not steps:
        return refused
    site = Site.__table__
    devices = {wire_id: (device_id, slug) for wire_id, device_id, slug in session.exec(
        select(Device.wire_id, Device.id, site.c.slug)
        .select_from(Device).outerjoin(site, site.c.id == Device.site_id)
        .where(col(Device.wire_id).in_(sorted({s["wire_id"] for s in steps})))).all()}
    named = {s["rollout_id"] for s in steps if s["rollout_id"] is not None}
    released = {s["release_id"] for s in steps if s["rollout_id"] is None}
    device_ids = sorted(device_id for device_id, _ in devices.values())
    # Rows locked in id order, so that instances writing at once never wait on each other
    # in a circle.
    found = {r.id: r for r in session.exec(
        select(Rollout).where(sa.or_(col(Rollout.id).in_(named), sa.and_(
            col(Rollout.release_id).in_(released), col(Rollout.state).in_(LIVE))))
        .order_by(Rollout.id).with_for_update()).all()} if device_ids else {}
    records = {(r.rollout_id, r.device_id): r for r in session.exec(
        select(RolloutDevice).where(col(RolloutDevice.rollout_id).in_(sorted(found)),
                                    col(RolloutDevice.device_id).in_(device_ids))
        .order_by(RolloutDevice.rollout_id, RolloutDevice.device_id).with_for_update()).all()
    } if found else {}
    touched: set[uuid.UUID] = set()

    def order(step: dict[str, Any]) -> tuple[str, datetime, int]:
        return step["wire_id"], step["at"], PROGRESS.get(S(step["state"]), len(PROGRESS))

    for step in sorted(steps, key=order):
        wire_id, release_id = step["wire_id"], step["release_id"]
        if wire_id not in devices:
            refused.append(f"{wire_id}: an update step for a device the fleet does not know")
            continue
        device_id, home = devices[wire_id]
        if home != step["site"]:
            refused.append(f"{wire_id}: an update step under site {step['site']!r}, registered "
                           f"at {home!r}" if home else f"{wire_id}: an update step under site "
                           f"{step['site']!r}, registered at no site")
            continue
        if step["rollout_id"] is not None:
            rollout = found.get(step["rollout_id"])
            if rollout is None:
                refused.append(f"{wire_id}: no rollout {step['rollout_id']}")
                continue
            if rollout.release_id != release_id:
                refused.append(f"{wire_id}: rollout {rollout.id} sends release "
                               f"{rollout.release_id}, not {release_id}")
                continue
            record = records.get((rollout.id, device_id))
        else:
            held = [(found[r], rec) for (r, d), rec in records.items()
                    if d == device_id and found[r].release_id == release_id
                    and found[r].state in LIVE]
            rollout, record = held[0] if held else (None, None)  # type: ignore[assignment]
        if rollout is None or record is None:
            refused.append(f"{wire_id}: in no rollout of release {release_id}"
                           if rollout is None else f"{wire_id}: not in rollout {rollout.id}")
            continue
        _apply_step(session, rollout, record, step, now)
        touched.add(rollout.id)
    session.flush()
    for rollout_id in sorted(touched):
        evaluate(session, found[rollout_id], now)
    session.flush()
    return refused


def _apply_step(session: Session, rollout: Rollout, record: RolloutDevice,
                step: dict[str, Any], now: datetime) -> None:
    new, size, at = S(step["state"]), step["bytes"], step["at"]
    already = session.exec(select(RolloutEvent.id).where(
        RolloutEvent.rollout_id == rollout.id, RolloutEvent.device_id == record.device_id,
        RolloutEvent.at == at, RolloutEvent.to_state == new, RolloutEvent.bytes == size)
        .limit(1)).first()
    if already is not None:
        return  # the same step delivered again: recorded once
    why = _why_ignored(rollout, record, new, size)
    reported = step["reason"] or None
    source = _source(new, step["boot"])
    if why is not None:
        reason = f"ignored: {why}" + (f"; {reported}" if reported else "")
        session.add(_event(rollout.id, record.device_id, at, record.state, new, source,
                           reason=reason, size=size, ignored=True))
        session.flush()  # a second copy of it later in this batch finds it
        return
    session.add(_event(rollout.id, record.device_id, at, record.state, new, source,
                       reason=reported, size=size))
    record.state, record.updated_at = new, now
    if size:  # a step without a byte count (offered, most final states) keeps the last one
        record.bytes = size
    if reported or new in TERMINAL:
        record.reason = _cut(reported) if reported else None
    if record.offered_at is None:
        record.offered_at = at  # offered, or a later step whose offer was not heard
    session.add(record)
    session.flush()
