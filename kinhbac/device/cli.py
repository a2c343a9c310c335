"""`kinhbac device ...`: the technician's commands. Plain output for people, `--json` for
scripts; progress and messages go to stderr so that stdout stays parseable.

Exit codes: 0 done; 1 failed (the message says what to do; nothing is left half-registered);
2 wrong usage; 3 provisioned, but the fleet did not report the device online in time.
"""

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kinhbac.device.errors import DeviceToolError
from kinhbac.device.site_profiles import SITES_DIR_ENV, SiteProfiles, staleness
from kinhbac.fleet_client_setup import (
    EXIT_FAILED,
    FleetUrl,
    Json,
    command_failure,
    fleet_session,
    is_local,
    print_json,
)
from kinhbac.fleet_client_setup import TechnicianToken as Token

if TYPE_CHECKING:  # httpx is imported by the commands that talk to the fleet, not by `kinhbac`
    from kinhbac.device.fleet_client import FleetClient

EXIT_NOT_ONLINE = 3
STALE_CHECK_TIMEOUT_S = 5.0  # a kept profile is checked on the way, not waited for

device_app = typer.Typer(
    help="The technician's tools: flash and register boards, list, show and revoke devices "
    "(device extra).",
    no_args_is_help=True,
)
sites_app = typer.Typer(help="Site profiles kept on this laptop for flashing offline.",
                        no_args_is_help=True)
device_app.add_typer(sites_app, name="sites")

SitesDir = Annotated[Path | None, typer.Option(
    "--sites-dir", envvar=SITES_DIR_ENV, show_default=False,
    help="Where site profiles are kept (default ~/.config/kinhbac/sites).")]


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    return command_failure("device", message, code)


def _fleet(url: str | None, token: str | None) -> AbstractContextManager["FleetClient"]:
    """A fleet client; every DeviceToolError inside becomes one clear line and exit 1."""
    def connect() -> "FleetClient":
        from kinhbac.device.fleet_client import FleetClient

        return FleetClient(url, token)

    return fleet_session("device", connect, DeviceToolError,
                         warn_in_clear="the token and device secrets")


def _site_slugs(fleet: "FleetClient") -> dict[str, str]:
    return {site["id"]: site["slug"] for site in fleet.sites()}


def _describe(device: dict[str, Any], slugs: dict[str, str]) -> list[tuple[str, str]]:
    status = device.get("status") or {}
    rows = [
        ("id", device["id"]),
        ("mac", device["mac"]),
        ("wire id", device["wire_id"]),
        ("site", slugs.get(device.get("site_id") or "", device.get("site_id") or "-")),
        ("state", device["state"]),
        ("online", "yes" if device.get("online") else "no"),
        ("firmware", device.get("firmware_version") or "-"),
        ("key id", str(device.get("key_id"))),
        ("chip", device.get("chip") or "-"),
        ("flash size", f"{device['flash_size']} bytes" if device.get("flash_size") else "-"),
        ("board", device.get("board") or "-"),
        ("tags", ", ".join(device.get("tags") or []) or "-"),
        ("last seen", status.get("last_seen_at") or device.get("last_seen_at") or "never"),
    ]
    if status:
        rows.append(("heard by", f"{status.get('site')}/{status.get('gateway')}"))
    return rows


def _print_device(device: dict[str, Any], slugs: dict[str, str]) -> None:
    for name, value in _describe(device, slugs):
        typer.echo(f"{name + ':':<12}{value}")


# ----- register / list / show / revoke


@device_app.command("register")
def register(
    mac: Annotated[str, typer.Option(help="The board's MAC (esptool read-mac prints it).")],
    site: Annotated[str | None, typer.Option(help="The site's slug.")] = None,
    board: Annotated[str | None, typer.Option(help="The board model, e.g. devkitc.")] = None,
    chip: Annotated[str | None, typer.Option(help="e.g. ESP32-D0WD-V3.")] = None,
    flash_size: Annotated[int | None, typer.Option(help="Flash size in bytes.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="A tag; give it again for more.")] = None,
    fleet_url: FleetUrl = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Register a board by its MAC; prints its identity and secret (shown this once)."""
    with _fleet(fleet_url, token) as fleet:
        site_id = fleet.find_site(site)["id"] if site else None
        device = fleet.register_device(mac, site_id=site_id, board=board, chip=chip,
                                       flash_size=flash_size, tags=tag or None)
    if as_json:
        print_json(device)
        return
    typer.echo(f"registered {device['mac']} as {device['id']}")
    typer.echo(f"wire id:    {device['wire_id']}")
    typer.echo(f"key id:     {device['key_id']}")
    typer.echo(f"secret:     {device['secret']}")
    typer.echo("The secret is shown this once: write it to the board's config now "
               "(`kinhbac device flash` does all of this for you).", err=True)


@device_app.command("list")
def list_devices(
    site: Annotated[str | None, typer.Option(help="Only this site (slug).")] = None,
    state: Annotated[str | None, typer.Option(
        help="registered, pending, active, revoked or rejected.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only devices with this tag.")] = None,
    firmware: Annotated[str | None, typer.Option(help="Only this firmware version.")] = None,
    mac: Annotated[str | None, typer.Option(help="Only this MAC.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many.")] = None,
    fleet_url: FleetUrl = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Devices in the fleet, oldest first, one a line."""
    with _fleet(fleet_url, token) as fleet:
        slugs = _site_slugs(fleet)
        site_id = None
        if site:
            site_id = next((i for i, s in slugs.items() if site in (s, i)), None)
            if site_id is None:
                raise _fail(f"no site {site!r} in the fleet: `kinhbac device sites list "
                            "--remote` lists them")
        devices = fleet.devices(limit=limit, site_id=site_id, state=state, tag=tag,
                                firmware_version=firmware, mac=mac)
    if as_json:
        print_json(devices)
        return
    if not devices:
        typer.echo("no devices match", err=True)
        return
    header = ("ID", "MAC", "WIRE ID", "SITE", "STATE", "ONLINE", "FIRMWARE")
    rows = [(d["id"], d["mac"], d["wire_id"], slugs.get(d.get("site_id") or "", "-"),
             d["state"], "yes" if d.get("online") else "no", d.get("firmware_version") or "-")
            for d in devices]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@device_app.command("show")
def show(
    device: Annotated[str, typer.Argument(help="The device's id, MAC or wire id.")],
    fleet_url: FleetUrl = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Everything the fleet knows about one device, its last status included."""
    with _fleet(fleet_url, token) as fleet:
        found = fleet.find_device(device)
        if as_json:
            print_json(found)
            return
        _print_device(found, _site_slugs(fleet))


@device_app.command("revoke")
def revoke(
    device: Annotated[str, typer.Argument(help="The device's id, MAC or wire id.")],
    fleet_url: FleetUrl = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Withdraw a device's key: its site's gateways refuse it from their next key refresh."""
    with _fleet(fleet_url, token) as fleet:
        revoked = fleet.revoke(fleet.find_device(device)["id"])
    if as_json:
        print_json(revoked)
        return
    typer.echo(f"revoked {revoked['mac']} ({revoked['id']}): its gateways refuse it from their "
               "next key refresh")


def _decide(decision: str, device: str, fleet_url: str | None, token: str | None,
            as_json: bool) -> None:
    with _fleet(fleet_url, token) as fleet:
        decided = fleet.decide_claim(fleet.find_device(device)["id"], decision)
    if as_json:
        print_json(decided)
    elif decision == "approve":
        typer.echo(f"approved {decided['mac']} ({decided['id']}) as key id {decided['key_id']}: "
                   "its gateway gives it its identity at its next claim")
    else:
        typer.echo(f"rejected {decided['mac']} ({decided['id']}): its claims are refused")


@device_app.command("approve")
def approve(
    device: Annotated[str, typer.Argument(help="The pending device's id, MAC or wire id.")],
    fleet_url: FleetUrl = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Approve a board flashed offline (admins); `list --state pending` shows them."""
    _decide("approve", device, fleet_url, token, as_json)


@device_app.command("reject")
def reject(
    device: Annotated[str, typer.Argument(help="The pending device's id, MAC or wire id.")],
    fleet_url: FleetUrl = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Reject a pending claim (admins): the board is kept out."""
    _decide("reject", device, fleet_url, token, as_json)


# ----- site profiles


def _stale_profiles(kept: list[dict[str, Any]], fleet_url: str | None, token: str | None
                    ) -> tuple[dict[str, str | None], str | None]:
    """Per kept profile's slug, what changed at its site since it was fetched (None: nothing),
    if the fleet can be asked; else why it could not (None: no fleet configured)."""
    if not (fleet_url and token) or not kept:
        return {}, None
    from kinhbac.device.errors import FleetNotFound
    from kinhbac.device.fleet_client import FleetClient

    found: dict[str, str | None] = {}
    try:
        with FleetClient(fleet_url, token, timeout=STALE_CHECK_TIMEOUT_S) as fleet:
            for profile in kept:
                try:
                    found[profile["slug"]] = staleness(profile, fleet.site(profile["id"]))
                except FleetNotFound:
                    found[profile["slug"]] = (
                        "stale: the fleet no longer shows this site to this token; run "
                        f"`kinhbac device sites fetch {profile['slug']}` to check")
    except DeviceToolError as exc:
        return found, f"not checked against the fleet: {exc}"
    return found, None


@sites_app.command("fetch")
def sites_fetch(
    site: Annotated[list[str] | None, typer.Argument(
        help="Slugs of the sites to keep; none: every site.", show_default=False)] = None,
    fleet_url: FleetUrl = None,
    token: Token = None,
    sites_dir: SitesDir = None,
) -> None:
    """Fetch site profiles (WiFi, gateway, sensor kit, claim key) and keep them on this
    laptop, for `kinhbac device flash --offline`."""
    profiles = SiteProfiles(sites_dir)
    with _fleet(fleet_url, token) as fleet:
        wanted = [fleet.find_site(ref) for ref in site] if site else fleet.sites()
        for found in wanted:
            path = profiles.save(fleet.site_profile(found["id"]))
            typer.echo(f"{found['slug']}: kept in {path} for "
                       f"{profiles.max_age.total_seconds() / 86400:g} days")
    if not wanted:
        typer.echo("the fleet has no sites yet", err=True)


@sites_app.command("list")
def sites_list(
    remote: Annotated[bool, typer.Option(
        "--remote", help="List the fleet's sites instead of the kept profiles.")] = False,
    fleet_url: FleetUrl = None,
    token: Token = None,
    sites_dir: SitesDir = None,
    as_json: Json = False,
) -> None:
    """The site profiles kept on this laptop, with when each expires and, when the fleet can
    be asked, whether the site changed since (or, with --remote, the fleet's sites)."""
    if remote:
        with _fleet(fleet_url, token) as fleet:
            sites = fleet.sites()
        if as_json:
            print_json(sites)
        for found in [] if as_json else sites:
            typer.echo(f"{found['slug']:<24}{found['name']}")
        return
    try:
        profiles = SiteProfiles(sites_dir)
        for slug in profiles.purge_expired():
            typer.echo(f"kinhbac device: the kept profile of site {slug} expired and was "
                       f"deleted: `kinhbac device sites fetch {slug}` while online", err=True)
        kept = profiles.all()
    except DeviceToolError as exc:
        raise _fail(str(exc)) from exc
    stale, unchecked = _stale_profiles(kept, fleet_url, token)
    if unchecked:
        typer.echo(f"kinhbac device: {unchecked}", err=True)
    if as_json:  # without the secrets: a listing is not where they belong
        print_json([{k: v for k, v in p.items() if k not in ("wifi_password", "claim_key")}
                     | ({"stale": stale[p["slug"]]} if p["slug"] in stale else {})
                     for p in kept])
        return
    if not kept:
        typer.echo(f"no site profiles in {profiles.folder}: `kinhbac device sites fetch` "
                   "keeps them", err=True)
    for profile in kept:
        expires = profiles.expires_at(profile)
        typer.echo(f"{profile['slug']:<24}fetched {profile.get('fetched_at', '?')}, "
                   f"expires {expires.isoformat() if expires else '?'}")
        if stale.get(profile["slug"]):
            typer.echo(f"{'':<24}{stale[profile['slug']]}")


# ----- flash


class ConsoleReporter:
    """The flow's steps and progress bars on stderr, with Rich."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self._progress: Any = None

    def _end_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def step(self, message: str) -> None:
        self._end_progress()
        self.console.print(f"[green]>[/green] {message}")

    def note(self, message: str) -> None:
        self._end_progress()
        self.console.print(f"  {message}")

    def ask(self, message: str) -> None:
        self._end_progress()
        self.console.print(f"[bold]{message}[/bold]")
        if sys.stdin.isatty():
            input()
        else:
            raise DeviceToolError("the board must be reset by hand (--reset manual), which "
                                  "needs a terminal to confirm each step")

    def progress(self, label: str, total: int) -> Callable[[int], None]:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._end_progress()
        self._progress = Progress(TextColumn("  {task.description}"), BarColumn(),
                                  DownloadColumn(), TimeRemainingColumn(), console=self.console)
        task = self._progress.add_task(label, total=total)
        self._progress.start()
        progress = self._progress
        return lambda done: progress.update(task, completed=done)

    def close(self) -> None:
        self._end_progress()


@device_app.command("flash")
def flash(
    port: Annotated[str, typer.Option(help="The board's serial port, e.g. /dev/ttyUSB0.")],
    site: Annotated[str, typer.Option(help="The site's slug: WiFi, gateway and sensor kit.")],
    image: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, show_default=False,
        help="A MicroPython image (.bin) to write with esptool first; without it the board "
        "must already run MicroPython.")] = None,
    offline: Annotated[bool, typer.Option(
        help="No fleet: give the board the site's claim key (from the kept profile), to be "
        "approved later.")] = False,
    reset: Annotated[str, typer.Option(
        help="auto: DTR/RTS reset the board (most USB boards); manual: you hold BOOT and "
        "press EN when asked.")] = "auto",
    setting: Annotated[list[str] | None, typer.Option(
        "--set", help="A node setting as name=value (e.g. interval_ms=5000); repeatable.")] = None,
    board: Annotated[str | None, typer.Option(help="The board model, e.g. devkitc.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="A tag; give it again for more.")] = None,
    reprovision: Annotated[bool, typer.Option(
        help="The fleet already has this board: issue it a new key.")] = False,
    keep_data: Annotated[bool, typer.Option(
        "--keep-data", help="With --image: do not erase the board's filesystem partition "
        "(vfs), which is erased by default. Its old files stay: buffered readings, counters "
        "(state.json), and files the new firmware no longer has; the old config is replaced "
        "as always, but its bytes, secret included, may remain in the flash. A filesystem "
        "the new image cannot mount (another partition layout, or damaged) makes the board "
        "print \"The filesystem appears to be corrupted\" for ever: then flash again "
        "without --keep-data.")] = False,
    wait: Annotated[float, typer.Option(
        min=0, help="Seconds to wait for the fleet to see the device online; 0: do not.")] = 120,
    baud: Annotated[int, typer.Option(help="Baud rate for writing the image.")] = 115200,
    stub: Annotated[bool, typer.Option(
        help="Run esptool's flasher stub (faster); --no-stub talks to the ROM only.")] = True,
    fleet_url: FleetUrl = None,
    token: Token = None,
    sites_dir: SitesDir = None,
    as_json: Json = False,
) -> None:
    """Flash a board and give it its identity; wait until the fleet sees it online.

    Writes the image with esptool and erases the filesystem partition (all files on the
    board are lost; --keep-data keeps them), copies the node's files over the raw REPL, writes
    its config with its identity from the fleet (or its site's claim key, offline), resets it.
    """
    from kinhbac.device.fleet_client import FleetClient
    from kinhbac.device.node_config import parse_setting
    from kinhbac.device.provision import (
        AutoReset,
        FlashRequest,
        ManualReset,
        NotOnline,
        Provisioner,
    )

    if reset not in ("auto", "manual"):
        raise _fail("--reset is auto or manual", 2)
    if keep_data and image is None:
        raise _fail("--keep-data goes with --image: without an image nothing is erased", 2)
    reporter = ConsoleReporter()
    try:
        request = FlashRequest(
            port=port, site=site, image=image, offline=offline,
            settings=dict(parse_setting(s) for s in setting or []), board=board,
            tags=tag or [], reprovision=reprovision, keep_data=keep_data, use_stub=stub,
            flash_baud=baud,
            wait_online_s=0 if offline else wait,
        )
        profiles = SiteProfiles(sites_dir)
        if offline:
            # Expired: refused (and deleted) here. Stale: said, if the fleet can tell.
            stale, _ = _stale_profiles([profiles.load(site)], fleet_url, token)
            if any(stale.values()):
                reporter.note(f"warning: {next(v for v in stale.values() if v)}")
        fleet = None if offline else FleetClient.from_env(fleet_url, token)
        if fleet is not None and fleet.url.startswith("http://") and not is_local(fleet.url):
            reporter.note(f"warning: {fleet.url} is plain http: the token and the device's "
                          "secret cross the network in clear")
        boot = AutoReset() if reset == "auto" else ManualReset(reporter)
        try:
            result = Provisioner(request, fleet=fleet, profiles=profiles,
                                 boot=boot, reporter=reporter).run()
        finally:
            if fleet is not None:
                fleet.close()
    except NotOnline as exc:
        reporter.close()
        if as_json:
            print_json(exc.result.as_json())
        raise _fail(str(exc), EXIT_NOT_ONLINE) from exc
    except DeviceToolError as exc:
        reporter.close()
        raise _fail(str(exc)) from exc
    except KeyboardInterrupt:
        reporter.close()
        raise _fail("stopped (Ctrl-C)") from None
    reporter.close()
    if as_json:
        print_json(result.as_json())
    elif result.claim_mode:
        typer.echo(f"{result.mac}: flashed for site {result.site} in claim mode; approve it in "
                   "the fleet once it shows as pending")
    else:
        assert result.device is not None
        state = "online" if result.online else "provisioned"
        typer.echo(f"{result.mac}: {state} as {result.device['id']} at site {result.site}, "
                   f"firmware {result.firmware_version}")
