"""`kinhbac rollout ...`: start a release's rollout to a site, a tag or a list of devices, follow
it wave by wave, pause, resume or cancel it (admins). Plain output for people, `--json` for
scripts; messages go to stderr so that stdout stays parseable.

Exit codes: 0 done (a watch: the rollout completed); 1 failed, or a watch ended on a rollout
that paused or was cancelled (the message says why and what to do next); 2 wrong usage.
"""

import json
import re
import time
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kinhbac.admin.cli import admin_session, when
from kinhbac.admin.errors import AdminToolError, FleetRefused, FleetUnreachable
from kinhbac.device import FLEET_TOKEN_ENV
from kinhbac.fleet_client_setup import (
    EXIT_FAILED,
    EXIT_USAGE,
    FleetUrl,
    Json,
    command_failure,
    print_json,
)
from kinhbac.fleet_client_setup import AdminToken as Token

if TYPE_CHECKING:  # httpx is imported by the commands, not by `kinhbac`
    from kinhbac.admin.client import AdminClient

WATCH_INTERVAL_S = 2.0  # a poll every 2 s: a wave moves in minutes, a person watches in seconds
# A watch keeps polling through a fleet that does not answer (a restart, a network blip) for
# this long before it gives up; the rollout goes on without it.
WATCH_PATIENCE_S = 120.0
BAR_WIDTH = 30  # characters of a wave's bar in a terminal
DEFAULT_WAVES = "1,10,50,100"
ROLLOUT_STATES = ("created", "running", "paused", "completed", "cancelled")
DEVICE_STATES = ("pending", "offered", "downloading", "verifying", "installed", "rebooting",
                 "confirmed", "failed", "rolled_back", "timed_out", "cancelled")
IN_PROGRESS = ("offered", "downloading", "verifying", "installed", "rebooting")
FAILURES = ("failed", "rolled_back", "timed_out")  # what counts against a wave's threshold
WATCH_ENDS = ("completed", "cancelled", "paused")
_DURATION_PART = re.compile(r"(\d+)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_WIRE_ID = re.compile(r"^[0-9a-fA-F]{16}$")

rollout_app = typer.Typer(
    help="Rollouts of releases to sites, tags or devices, in waves: create, status, pause, "
    "resume, cancel, list (admins; admin extra).",
    no_args_is_help=True,
)

# Reading a rollout takes a viewer's token too (not one limited to sites).
ReaderToken = Annotated[str | None, typer.Option(
    "--token", envvar=FLEET_TOKEN_ENV, show_default=False,
    help="An admin's or a viewer's API token (kbt_...).")]
RolloutRef = Annotated[str, typer.Argument(
    help="The rollout's id, or its first 8 hex digits or more.", show_default=False)]


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    return command_failure("rollout", message, code)


def _fleet(url: str | None, token: str | None) -> AbstractContextManager["AdminClient"]:
    return admin_session("rollout", url, token)


# ----- reading what the admin typed


def parse_duration(text: str) -> int:
    """Seconds in "24h", "90m", "1d12h", "45s" or plain "3600"; ValueError naming the
    problem."""
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration: give e.g. 24h, 90m, 2d, 1d12h or a "
                         "number of seconds")
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


def parse_waves(text: str) -> list[int]:
    """"1,10,50,100" as [1, 10, 50, 100]; the fleet judges the numbers (increasing, last
    100), so its words are the ones the admin reads."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"--waves {text!r}: give cumulative percents separated by commas, "
                         f"e.g. {DEFAULT_WAVES}") from None


def _target(site: str | None, tag: str | None, devices: list[str] | None) -> dict[str, Any]:
    given = [name for name, value in (("--site", site), ("--tag", tag), ("--device", devices))
             if value]
    if len(given) != 1:
        raise _fail("give the rollout's target: one of --site SITE, --tag TAG or --device "
                    "WIRE_ID (repeatable)" + (f", not {' and '.join(given)}" if given else ""),
                    EXIT_USAGE)
    if site:
        return {"site": site}
    if tag:
        return {"tag": tag}
    assert devices
    for wire_id in devices:
        if not _WIRE_ID.match(wire_id):
            raise _fail(f"--device {wire_id!r}: give the device's wire id (16 hex digits, "
                        "e.g. 6b62a1b2c3d4e5f6), as `kinhbac device list` shows it", EXIT_USAGE)
    return {"devices": [wire_id.lower() for wire_id in devices]}


def _rollout_ref(ref: str) -> str:
    """`ref` if it can name a rollout (an id, or 8 hex digits of one at least); else exit 2."""
    from kinhbac.admin.client import ROLLOUT_ID_MIN_PREFIX

    digits = ref.strip().lower().replace("-", "")
    if len(digits) < ROLLOUT_ID_MIN_PREFIX or len(digits) > 32 or \
            any(c not in "0123456789abcdef" for c in digits):
        raise _fail(f"{ref!r} names no rollout: give its id, or its first "
                    f"{ROLLOUT_ID_MIN_PREFIX} hex digits or more, as `kinhbac rollout list` "
                    "shows them", EXIT_USAGE)
    return ref


# ----- how a rollout reads


def short(rollout_id: str) -> str:
    return rollout_id[:8]


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _target_text(target: dict[str, Any]) -> str:
    if "devices" in target:
        count = len(target["devices"])
        return f"{count} device" + ("" if count == 1 else "s")
    kind, value = next(iter(target.items()))
    return f"{kind} {value}"


def _counts_text(counts: dict[str, int], total: int | None = None) -> str:
    """"confirmed 3, downloading 1, pending 8", in the order a device goes through them."""
    text = ", ".join(f"{state} {counts[state]}" for state in DEVICE_STATES if counts.get(state))
    text = text or "no devices"
    return f"{text} (of {total})" if total is not None else text


def _failures(counts: dict[str, int]) -> int:
    return sum(counts.get(state, 0) for state in FAILURES)


def _headline(rollout: dict[str, Any]) -> str:
    release = rollout["release"]
    return (f"rollout {short(rollout['id'])}: {release['kind']} {release['version']} to "
            f"{_target_text(rollout['target'])}")


def _wave_label(rollout: dict[str, Any], index: int) -> str:
    """A wave as people count them, from 1 (as the fleet's pause reasons do; the API's `index`
    and `wave` filter count from 0)."""
    return (f"wave {index + 1} of {len(rollout['waves'])} "
            f"({rollout['waves'][index]['percent']}%)")


def _state_text(rollout: dict[str, Any]) -> str:
    state = rollout["state"]
    if state in ("running", "paused"):
        state += f", {_wave_label(rollout, rollout['current_wave'])}"
    return state


def _summary(rollout: dict[str, Any]) -> list[tuple[str, str]]:
    release = rollout["release"]
    rows = [
        ("id", rollout["id"]),
        ("release", f"{release['kind']} {release['version']} ({release['id']})"),
        ("target", _target_text(rollout["target"])),
        ("state", _state_text(rollout)),
    ]
    if rollout.get("paused_reason"):
        rows.append(("paused", rollout["paused_reason"]))
    rows += [
        ("devices", _counts_text(rollout["counts"], rollout["total"])),
        ("thresholds", (f"advance at {rollout['success_threshold']}% confirmed, pause past "
                        f"{rollout['failure_threshold']}% failed")),
        ("deadline", f"{_duration(rollout['device_deadline_s'])} per device"),
        ("created", f"{when(rollout['created_at'])} by {rollout['created_by']}"),
    ]
    return rows


def _wave_rows(rollout: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for wave in rollout["waves"]:
        started = when(wave["started_at"]) if wave.get("started_at") else "not started"
        rows.append((str(wave["index"] + 1), f"{wave['percent']}%", str(wave["size"]), started,
                     _counts_text(wave["counts"]) if wave.get("started_at") else "-"))
    return rows


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _print_rollout(rollout: dict[str, Any]) -> None:
    for name, value in _summary(rollout):
        typer.echo(f"{name + ':':<12}{value}")
    typer.echo("")
    _table(("WAVE", "PERCENT", "DEVICES", "STARTED", "PROGRESS"), _wave_rows(rollout))


def _print_devices(devices: list[dict[str, Any]]) -> None:
    if not devices:
        typer.echo("no devices in this rollout", err=True)
        return
    _table(("DEVICE", "WAVE", "STATE", "BYTES", "UPDATED", "REASON"),
           [(d["device_id"], str(d["wave"]), d["state"], str(d["bytes"]),
             when(d["updated_at"]), d.get("reason") or "") for d in devices])


def what_next(rollout: dict[str, Any]) -> str:
    """Why a rollout stopped moving, and the commands that move it on."""
    ref = short(rollout["id"])
    counts, total = rollout["counts"], rollout["total"]
    if rollout["state"] == "completed":
        failed = _failures(counts)
        return (f"completed: {counts.get('confirmed', 0)} of {total} devices confirmed"
                + (f", {failed} failed (`kinhbac rollout status {ref} --devices` names them)"
                   if failed else ""))
    if rollout["state"] == "cancelled":
        return (f"cancelled: {_counts_text(counts, total)}; no device is offered the release "
                "any more, and those that confirmed it keep running it")
    reason = rollout.get("paused_reason") or "by an admin"
    return (f"paused: {reason}; see `kinhbac rollout status {ref} --devices`, then "
            f"`kinhbac rollout resume {ref}` or `kinhbac rollout cancel {ref}`")


# ----- watching


def _progress_line(rollout: dict[str, Any]) -> str:
    """One plain line: the rollout's state and its current wave's counts."""
    line = f"{datetime.now(UTC):%H:%M:%S} {_state_text(rollout)}"
    if rollout["state"] in ("running", "paused") and rollout["waves"]:
        wave = rollout["waves"][rollout["current_wave"]]
        line += f": {_counts_text(wave['counts'], wave['size'])}"
    return line + f"; all: {_counts_text(rollout['counts'], rollout['total'])}"


def _wave_bar(wave: dict[str, Any]) -> Any:
    """A wave's devices as one bar: confirmed (green), failed (red), on their way (yellow),
    not yet offered (dim)."""
    from rich.text import Text

    size = max(wave["size"], 1)
    counts = wave["counts"]
    bar = Text()
    so_far = drawn = 0
    for count, style in ((counts.get("confirmed", 0), "green"), (_failures(counts), "red"),
                         (sum(counts.get(s, 0) for s in IN_PROGRESS), "yellow")):
        so_far += count
        cells = round(so_far * BAR_WIDTH / size) - drawn  # rounded as a whole: never too long
        bar.append("█" * cells, style=style)
        drawn += cells
    bar.append("░" * (BAR_WIDTH - drawn), style="dim")
    return bar


def _live_view(rollout: dict[str, Any], note: str | None) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    for column in ("wave", "", "confirmed", "failed", "on the way", "started"):
        table.add_column(column)
    for wave in rollout["waves"]:
        counts = wave["counts"]
        current = rollout["state"] in ("running", "paused") and \
            wave["index"] == rollout["current_wave"]
        table.add_row(
            Text(f"{'>' if current else ' '} {wave['index'] + 1} ({wave['percent']}%)",
                 style="bold" if current else ""),
            _wave_bar(wave),
            f"{counts.get('confirmed', 0)}/{wave['size']}",
            str(_failures(counts)),
            str(sum(counts.get(s, 0) for s in IN_PROGRESS)),
            when(wave["started_at"])[11:] if wave.get("started_at") else "-",
        )
    legend = Text.assemble(("█", "green"), " confirmed  ", ("█", "red"), " failed  ",
                           ("█", "yellow"), " on the way  ", ("░", "dim"), " not yet offered",
                           style="dim")
    parts: list[Any] = [Text(f"{_headline(rollout)}: {_state_text(rollout)}", style="bold"),
                        table, legend]
    if note:
        parts.append(Text(note, style="yellow"))
    return Group(*parts)


def watch(fleet: "AdminClient", rollout: dict[str, Any], *, as_json: bool) -> dict[str, Any]:
    """Poll the rollout every WATCH_INTERVAL_S until it completes, pauses or is cancelled; its
    last detail. In a terminal a live view of every wave; otherwise a line (or, with
    `as_json`, a JSON line) each time something changed."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    rollout_id = rollout["id"]
    unanswered_since: float | None = None
    note: str | None = None  # while the fleet does not answer: since when

    def fetch(current: dict[str, Any]) -> dict[str, Any]:
        """The rollout as the fleet has it now; `current` while the fleet does not answer."""
        nonlocal unanswered_since, note
        try:
            found = fleet.rollout(rollout_id)
        except FleetUnreachable as exc:
            now = time.monotonic()
            if unanswered_since is None:
                unanswered_since = now
                note = (f"no answer from the fleet since {datetime.now(UTC):%H:%M:%S}; trying "
                        "again")
                if not live_view:
                    typer.echo(f"kinhbac rollout: {note}", err=True)
            elif now - unanswered_since > WATCH_PATIENCE_S:
                raise AdminToolError(
                    f"{exc}; stopped watching after {WATCH_PATIENCE_S:.0f} s without an "
                    f"answer (the rollout goes on: `kinhbac rollout status {short(rollout_id)} "
                    "--watch` to watch again)") from exc
            return current
        unanswered_since, note = None, None
        return found

    live_view = console.is_terminal and not as_json
    current = rollout
    if not live_view:
        last_seen: Any = None
        while True:
            seen = (current["state"], current["current_wave"], current["paused_reason"],
                    json.dumps([w["counts"] for w in current["waves"]], sort_keys=True))
            if seen != last_seen:
                last_seen = seen
                typer.echo(json.dumps(current, sort_keys=True) if as_json
                           else _progress_line(current))
            if current["state"] in WATCH_ENDS:
                return current
            time.sleep(WATCH_INTERVAL_S)
            current = fetch(current)

    from rich.live import Live

    with Live(_live_view(current, note), console=console, auto_refresh=False) as live:
        while current["state"] not in WATCH_ENDS:
            time.sleep(WATCH_INTERVAL_S)
            current = fetch(current)
            live.update(_live_view(current, note), refresh=True)
    return current


def _finish_watch(rollout: dict[str, Any]) -> None:
    """Say how the watched rollout ended; exit 1 unless it completed."""
    if rollout["state"] == "completed":
        typer.echo(f"kinhbac rollout: {what_next(rollout)}", err=True)
        return
    raise _fail(what_next(rollout))


def _watching(fleet: "AdminClient", rollout: dict[str, Any], as_json: bool) -> None:
    try:
        ended = watch(fleet, rollout, as_json=as_json)
    except KeyboardInterrupt:
        raise _fail(f"stopped watching (Ctrl-C); the rollout goes on: `kinhbac rollout status "
                    f"{short(rollout['id'])}`") from None
    _finish_watch(ended)


# ----- the commands


@rollout_app.command("create")
def create(
    release: Annotated[str, typer.Argument(
        help="The release: its version (e.g. 0.2.0) or its id.", show_default=False)],
    site: Annotated[str | None, typer.Option(
        help="Every device of this site (its slug, name or id).", show_default=False)] = None,
    tag: Annotated[str | None, typer.Option(
        help="Every device with this tag.", show_default=False)] = None,
    device: Annotated[list[str] | None, typer.Option(
        help="A device's wire id (16 hex digits); repeatable.", show_default=False)] = None,
    kind: Annotated[str | None, typer.Option(
        help="bundle or image, when both have that version.", show_default=False)] = None,
    waves: Annotated[str, typer.Option(
        help="Cumulative percents of the target, the last 100.")] = DEFAULT_WAVES,
    success_threshold: Annotated[int, typer.Option(
        help="Percent of a wave confirmed before the next one starts.")] = 95,
    failure_threshold: Annotated[int, typer.Option(
        help="Percent of a wave failed (at least one device) that pauses the rollout.")] = 5,
    deadline: Annotated[str, typer.Option(
        help="Each device's time to confirm, from its wave's start (or a resume), e.g. 24h, "
        "90m, 2d; past it the device is timed_out.")] = "24h",
    allow_downgrade: Annotated[bool, typer.Option(
        "--allow-downgrade", help="Also offer it to devices running a newer version.")] = False,
    watch_it: Annotated[bool, typer.Option(
        "--watch", help="Then follow it until it completes, pauses or is cancelled.")] = False,
    fleet_url: FleetUrl = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Start a rollout of a release to a site, a tag or a list of devices, in waves."""
    target = _target(site, tag, device)
    if kind not in (None, "bundle", "image"):
        raise _fail(f"--kind is bundle or image, not {kind!r}", EXIT_USAGE)
    try:
        wave_percents = parse_waves(waves)
        deadline_s = parse_duration(deadline)
    except ValueError as exc:
        raise _fail(str(exc), EXIT_USAGE) from exc
    with _fleet(fleet_url, token) as fleet:
        from kinhbac.admin.client import ROLLOUT_RELEASES

        found = fleet.find_release(release, kind, about=ROLLOUT_RELEASES)
        try:
            created = fleet.create_rollout({
                "release_id": found["id"], "target": target, "waves": wave_percents,
                "success_threshold": success_threshold, "failure_threshold": failure_threshold,
                "device_deadline_s": deadline_s, "allow_downgrade": allow_downgrade})
        except FleetRefused as exc:
            raise AdminToolError(f"{exc}{_create_hint(exc, target)}") from exc
        if as_json and not watch_it:
            print_json(created)
            return
        if not as_json:
            typer.echo(f"started {_headline(created)} ({created['total']} devices, waves "
                       f"{','.join(str(w['percent']) for w in created['waves'])}%): "
                       f"{created['id']}")
        if watch_it:
            _watching(fleet, created, as_json)


def _create_hint(refused: FleetRefused, target: dict[str, Any]) -> str:
    """What to check when the fleet refused a new rollout, beyond its own words."""
    if refused.status != 422:
        return ""  # a 409 names the rollout that holds the devices, and what to do
    if "allow_downgrade" in str(refused):
        return "; give --allow-downgrade to send it anyway"
    if "site" in target:
        return (f"; `kinhbac device list --site {target['site']}` lists the site's devices")
    if "tag" in target:
        return f"; `kinhbac device list --tag {target['tag']}` lists the tag's devices"
    return "; `kinhbac device list` lists the devices and their wire ids"


@rollout_app.command("status")
def status(
    rollout: RolloutRef,
    watch_it: Annotated[bool, typer.Option(
        "--watch", help=f"Follow it, polled every {WATCH_INTERVAL_S:g} s, until it completes, "
        "pauses or is cancelled.")] = False,
    devices: Annotated[bool, typer.Option(
        "--devices", help="Each device's wave, state and last reason too.")] = False,
    state: Annotated[str | None, typer.Option(
        help="With --devices: only devices in this state (e.g. failed).")] = None,
    fleet_url: FleetUrl = None,
    token: ReaderToken = None,
    as_json: Json = False,
) -> None:
    """A rollout's state, waves and counts (and, with --devices, each device)."""
    if state is not None and state not in DEVICE_STATES:
        raise _fail(f"--state is one of {', '.join(DEVICE_STATES)}, not {state!r}", EXIT_USAGE)
    if state is not None and not devices:
        raise _fail("--state goes with --devices", EXIT_USAGE)
    _rollout_ref(rollout)
    with _fleet(fleet_url, token) as fleet:
        found = fleet.find_rollout(rollout)
        if watch_it:
            _watching(fleet, found, as_json)
            return
        listed = fleet.rollout_devices(found["id"], state=state) if devices else None
    if as_json:
        print_json(found if listed is None else {**found, "devices": listed})
        return
    _print_rollout(found)
    if listed is not None:
        typer.echo("")
        _print_devices(listed)
    if found["state"] == "paused":
        typer.echo(f"kinhbac rollout: {what_next(found)}", err=True)


def _change(action: str, rollout: str, fleet_url: str | None, token: str | None,
            as_json: bool) -> None:
    _rollout_ref(rollout)
    with _fleet(fleet_url, token) as fleet:
        found = fleet.find_rollout(rollout)
        try:
            changed = fleet.change_rollout(found["id"], action)
        except FleetRefused as exc:
            if exc.status != 409:
                raise
            raise AdminToolError(f"{exc} (the rollout is {found['state']}; `kinhbac rollout "
                                 f"status {short(found['id'])}` shows it)") from exc
    if as_json:
        print_json(changed)
        return
    ref = short(changed["id"])
    typer.echo({
        "pause": f"paused {_headline(changed)}: no device is offered it until `kinhbac "
                 f"rollout resume {ref}`",
        "resume": f"resumed {_headline(changed)}: {_state_text(changed)}",
        "cancel": f"cancelled {_headline(changed)}: {_counts_text(changed['counts'])}; "
                  "devices that confirmed it keep running it",
    }[action])


@rollout_app.command("pause")
def pause(rollout: RolloutRef, fleet_url: FleetUrl = None, token: Token = None,
          as_json: Json = False) -> None:
    """Stop offering the release; devices mid-download finish what they have started."""
    _change("pause", rollout, fleet_url, token, as_json)


@rollout_app.command("resume")
def resume(rollout: RolloutRef, fleet_url: FleetUrl = None, token: Token = None,
           as_json: Json = False) -> None:
    """Offer the release again from the wave it paused in; only new failures pause it again."""
    _change("resume", rollout, fleet_url, token, as_json)


@rollout_app.command("cancel")
def cancel(rollout: RolloutRef, fleet_url: FleetUrl = None, token: Token = None,
           as_json: Json = False) -> None:
    """End the rollout for good: no more offers; devices that confirmed keep the release."""
    _change("cancel", rollout, fleet_url, token, as_json)


@rollout_app.command("events")
def events(
    rollout: RolloutRef,
    device: Annotated[str | None, typer.Option(
        help="Only this device's (its wire id).", show_default=False)] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many.")] = None,
    fleet_url: FleetUrl = None,
    token: ReaderToken = None,
    as_json: Json = False,
) -> None:
    """Every step of the rollout's devices, in the order the fleet recorded them."""
    _rollout_ref(rollout)
    if device is not None and not _WIRE_ID.match(device):
        raise _fail(f"--device {device!r}: give the device's wire id (16 hex digits)",
                    EXIT_USAGE)
    with _fleet(fleet_url, token) as fleet:
        found = fleet.find_rollout(rollout)
        steps = fleet.rollout_events(found["id"], device=device and device.lower(),
                                     limit=limit)
    if as_json:
        print_json(steps)
        return
    if not steps:
        typer.echo("no events match", err=True)
        return
    _table(("AT", "DEVICE", "STEP", "BY", "REASON"),
           [(when(e["at"]), e["device_id"], f"{e['from_state']} -> {e['to_state']}",
             e["source"], (e.get("reason") or "") + (" (recorded, not applied)" if e["ignored"]
                                                     else ""))
            for e in steps])


@rollout_app.command("list")
def list_rollouts(
    state: Annotated[str | None, typer.Option(
        help=f"Only rollouts in this state: {', '.join(ROLLOUT_STATES)}.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many.")] = None,
    fleet_url: FleetUrl = None,
    token: ReaderToken = None,
    as_json: Json = False,
) -> None:
    """The fleet's rollouts, newest first, one a line."""
    if state is not None and state not in ROLLOUT_STATES:
        raise _fail(f"--state is one of {', '.join(ROLLOUT_STATES)}, not {state!r}", EXIT_USAGE)
    with _fleet(fleet_url, token) as fleet:
        found = fleet.rollouts(state=state, limit=limit)
    if as_json:
        print_json(found)
        return
    if not found:
        typer.echo("no rollouts match", err=True)
        return
    _table(("ID", "RELEASE", "TARGET", "STATE", "CONFIRMED", "FAILED", "CREATED"),
           [(short(r["id"]), f"{r['release']['kind']} {r['release']['version']}",
             _target_text(r["target"]), _state_text(r),
             f"{r['counts'].get('confirmed', 0)}/{r['total']}", str(_failures(r["counts"])),
             when(r["created_at"])) for r in found])

