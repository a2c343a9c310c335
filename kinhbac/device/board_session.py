"""The board's side of provisioning, through its serial raw REPL (kinhbac.transport): stop the
node's app, copy the firmware files and the config, check what landed, reset.

Every file is written to a temporary name and renamed over the old one (littlefs renames
atomically), then its SHA-256 is computed on the board and compared with the laptop's copy.
"""

import hashlib
import time
from collections.abc import Callable
from typing import Self

from kinhbac.device.errors import BoardError
from kinhbac.firmware import CONFIG_PATH
from kinhbac.transport.raw_repl import (
    CTRL_B,
    CTRL_C,
    CTRL_D,
    RawRepl,
    RemoteError,
    TransportError,
)
from kinhbac.transport.serial_link import DEFAULT_BAUD, open_serial

# The node waits `console_window_ms` (3 s by default) before it arms its watchdog; interrupting
# it there leaves a REPL without a watchdog that would reset the board mid-copy. A board that
# was just reset gets there within a few seconds; one that must boot MicroPython afresh
# (first boot formats its filesystem) takes longer.
PROMPT_TIMEOUT_S = 20.0
# Ctrl-C every quarter second: often enough to catch the console window, seldom enough that
# two never land on one boot's hand-over from the app to the REPL (which would end it).
INTERRUPT_EVERY_S = 0.25
QUIET_S = 0.3  # after the prompt, this long without a reset banner: the board has settled
# A board sitting in the raw REPL answers Ctrl-C with nothing. The Ctrl-B that leaves it is sent
# first, but a board that was resetting can lose that one byte, so it goes again whenever the
# board has said nothing for this long (at the friendly REPL it only prints the banner again).
SILENT_S = 2.0
RESTARTED = (b"rst:", b"soft reboot")  # what a board prints when it starts again
FRIENDLY_PROMPT = b">>> "
# Code run on the board: the SHA-256 of one file, read in small pieces for a small heap.
_SHA256_ON_BOARD = """\
import hashlib, binascii
h = hashlib.sha256()
with open({path!r}, 'rb') as f:
    b = bytearray(512)
    while True:
        n = f.readinto(b)
        if not n:
            break
        h.update(b if n == 512 else b[:n])
print(binascii.hexlify(h.digest()).decode())
"""


class BoardSession:
    """One serial session with a board that runs MicroPython."""

    def __init__(self, port: str, *, baud: int = DEFAULT_BAUD) -> None:
        self.port = port
        try:
            self.link = open_serial(port, baud)
        except TransportError as exc:
            raise BoardError(str(exc)) from exc
        self.repl = RawRepl(self.link)
        self._seen = bytearray()  # what the board printed before the REPL took over

    def close(self) -> None:
        if self.link.is_open:
            self.link.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read_available(self) -> bytes:
        data = self.link.read(max(1, self.link.in_waiting))
        self._seen += data
        del self._seen[:-4096]
        return data

    def stop_app(self, timeout: float = PROMPT_TIMEOUT_S, *, just_reset: bool = True) -> None:
        """Interrupt whatever runs (a booting node's app above all) and enter the raw REPL.

        Ctrl-C is sent until the friendly prompt shows and the board stays quiet: a board still
        in its ROM, or booting MicroPython, drops a single one. A node interrupted after its
        console window has armed its watchdog, which cannot be stopped and would reset the
        board in the middle of the copy, so a board that was not `just_reset` is reset first
        and caught in its window.
        """
        self._interrupt_to_prompt(timeout)
        if not just_reset:
            self._enter_raw_repl()
            self.reset()
            self._interrupt_to_prompt(timeout)
        self._enter_raw_repl()

    def _interrupt_to_prompt(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.link.reset_input_buffer()
        self.link.write(b"\r" + CTRL_B)  # leave a raw REPL left open by an earlier session
        output = bytearray()
        heard_at = time.monotonic()
        while True:
            if time.monotonic() > deadline:
                tail = bytes(self._seen[-400:]).decode(errors="replace").strip()
                raise BoardError(
                    f"the board on {self.port} did not reach the MicroPython prompt within "
                    f"{timeout:.0f} s. Is MicroPython on it (give --image to flash it), is "
                    "this the right port, and is no serial monitor holding it? "
                    + (f"It printed: {tail[-300:]!r}" if tail else "It printed nothing.")
                )
            if time.monotonic() - heard_at > SILENT_S:
                self.link.write(b"\r" + CTRL_B)
                heard_at = time.monotonic()
            self.link.write(b"\r" + CTRL_C)
            sent = time.monotonic()
            while time.monotonic() - sent < INTERRUPT_EVERY_S:
                if data := self._read_available():
                    output += data
                    heard_at = time.monotonic()
            if FRIENDLY_PROMPT in output[-64:]:
                settled = bytearray()
                quiet_until = time.monotonic() + QUIET_S
                while time.monotonic() < quiet_until:
                    settled += self._read_available()
                if not any(banner in settled for banner in RESTARTED):
                    return
            del output[:-64]

    def _enter_raw_repl(self) -> None:
        try:
            self.repl.enter_raw_repl()
        except TransportError as exc:
            raise BoardError(
                f"the board on {self.port} did not enter the raw REPL ({exc}): press EN to "
                "reset it and run the command again"
            ) from exc

    def _run(self, code: str, what: str, timeout: float | None = None) -> bytes:
        try:
            return self.repl.exec(code, timeout)
        except RemoteError as exc:
            raise BoardError(f"the board failed while {what}: {exc.traceback.strip()}") from exc
        except TransportError as exc:
            raise BoardError(
                f"the board on {self.port} stopped answering while {what} ({exc}): check the "
                "cable and run the command again"
            ) from exc

    def mac(self) -> str:
        """The board's base MAC, as esptool and the fleet write it."""
        out = self._run("import machine, binascii\n"
                        "print(binascii.hexlify(machine.unique_id()).decode())", "reading its MAC")
        raw = bytes.fromhex(out.decode().strip())
        if len(raw) != 6:
            raise BoardError(f"the board's machine.unique_id() is {raw.hex()}, not a MAC")
        return raw.hex(":")

    def sha256(self, path: str) -> str | None:
        """The SHA-256 of a file on the board, or None if it has none."""
        try:
            out = self.repl.exec(_SHA256_ON_BOARD.format(path=path), timeout=30)
        except RemoteError as exc:
            if "ENOENT" in exc.traceback or "Errno 2" in exc.traceback:
                return None
            raise BoardError(f"the board failed to read {path}: {exc.traceback.strip()}") from exc
        except TransportError as exc:
            raise BoardError(f"the board stopped answering while reading {path} ({exc})") from exc
        return out.decode().strip()

    def remove(self, path: str) -> None:
        """Delete a file; a file already gone is fine."""
        self._run(f"import os\ntry:\n os.remove({path!r})\nexcept OSError:\n pass",
                  f"removing {path}")

    def put(self, path: str, data: bytes,
            progress: Callable[[int, int], None] | None = None) -> None:
        """Write one file atomically and check its SHA-256 on the board."""
        folder = path.rsplit("/", 1)[0]
        try:
            if folder:
                self.repl.fs_mkdir(folder)
            self.repl.fs_put(data, path, progress)
        except RemoteError as exc:
            raise BoardError(f"the board failed to write {path}: {exc.traceback.strip()}") from exc
        except TransportError as exc:
            raise BoardError(
                f"the board on {self.port} stopped answering while writing {path} ({exc}): "
                "check the cable and run the command again"
            ) from exc
        landed = self.sha256(path)
        if landed != hashlib.sha256(data).hexdigest():
            raise BoardError(
                f"{path} on the board differs from what was sent (SHA-256 {landed} instead of "
                f"{hashlib.sha256(data).hexdigest()}): the board's flash or the cable may be "
                "faulty; run the command again"
            )

    def put_files(self, files: dict[str, bytes],
                  progress: Callable[[int, int], None] | None = None) -> None:
        """Write every file; `progress(bytes done, bytes in all)`."""
        total = sum(len(data) for data in files.values())
        done = 0
        for path, data in files.items():
            base = done
            self.put(path, data, progress and (lambda n, _t, base=base: progress(base + n, total)))
            done += len(data)
            if progress:
                progress(done, total)

    def write_config(self, config: bytes) -> None:
        """The node's config, replaced atomically: a power cut leaves the old or the new one."""
        self.put(CONFIG_PATH, config)

    def reset(self) -> None:
        """Reset the board (machine.reset()): it boots the node's app from its files."""
        try:
            if not self.repl.in_raw_repl:
                self.repl.enter_raw_repl()
            # The board resets before it could answer, so the code is sent and not waited on.
            self.link.write(b"import machine\nmachine.reset()\n" + CTRL_D)
            self.repl.read_until(b"OK", timeout=5)
        except TransportError as exc:
            raise BoardError(f"the board on {self.port} did not take the reset ({exc}): press "
                             "EN to reset it") from exc
        self.repl.in_raw_repl = False
        self.repl.discard_input()

    def read_lines(self, duration: float) -> list[str]:
        """Lines the board prints within `duration` seconds (its log while it starts)."""
        deadline = time.monotonic() + duration
        data = bytearray()
        while time.monotonic() < deadline:
            data += self.link.read(max(1, self.link.in_waiting))
        return [line for line in data.decode(errors="replace").splitlines() if line.strip()]
