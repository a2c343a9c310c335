"""Writing a MicroPython image with esptool's Python API, and what the chip says about itself.

The only module that imports esptool. esptool's own errors are turned into FlashErrors that
tell the technician what to do: the wrong port, a board not in download mode, a write whose
MD5 does not match.

After the image, the filesystem partition is erased (unless the data is to be kept): the
ESP32 port mounts it at boot and, when that fails, formats it only if its first block is blank;
old data from another layout or a damaged filesystem makes it print "The filesystem appears to
be corrupted" every 3 s for ever (ports/esp32/modules/inisetup.py, MicroPython v1.24.1).
"""

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kinhbac.device import partitions
from kinhbac.device.errors import FlashError
from kinhbac.device.partitions import Partition, PartitionTableError

ROM_BAUD = 115200  # every ESP32 ROM bootloader starts at this rate
CONNECT_ATTEMPTS = 3  # esptool's default of 7 keeps a technician waiting half a minute
_SIZE = re.compile(r"^(\d+)\s*(KB|MB)$", re.IGNORECASE)


@dataclass(frozen=True)
class ChipInfo:
    """What the ROM bootloader says about the board, recorded with the device in the fleet."""

    chip: str  # e.g. "ESP32-D0WD-V3 (revision v3.1)"
    mac: str  # aa:bb:cc:dd:ee:ff, the base MAC from eFuse
    flash_size: int | None  # bytes; None when the flash chip's id is not one esptool knows
    image_offset: int  # where a combined MicroPython image goes on this chip


@dataclass(frozen=True)
class ResetModes:
    """How esptool reaches download mode and leaves it: esptool's `--before` and `--after`.

    A USB-serial adapter with the usual auto-reset circuit: default-reset / hard-reset (DTR
    and RTS drive EN and IO0). A board without it, or an emulated board behind a pty (which
    has no DTR/RTS): no-reset for both, with the boot mode changed by hand or by the test.
    """

    before: str = "default-reset"
    after: str = "hard-reset"


AUTO_RESET = ResetModes()
NO_RESET = ResetModes("no-reset", "no-reset")


def flash_size_bytes(text: str | None) -> int | None:
    """esptool's "4MB" / "512KB" as bytes (binary multiples, as esptool means them)."""
    found = _SIZE.match(text.strip()) if text else None
    if found is None:
        return None
    return int(found.group(1)) * (1024 if found.group(2).upper() == "KB" else 1024 * 1024)


@contextmanager
def _esptool_logger() -> Iterator[Any]:
    """A logger for esptool's output during one flash: its progress goes to a callback, its
    words are kept for an error message. esptool has one logger per process, so the one
    installed before is put back afterwards."""
    from esptool.logger import EspLog, TemplateLogger, log

    class FlashLogger(TemplateLogger):
        def __init__(self) -> None:
            self.on_progress: Callable[[float], None] | None = None
            self.lines: list[str] = []

        def print(self, *args: object, **kwargs: object) -> None:
            text = " ".join(str(a) for a in args).strip()
            if text:
                self.lines = [*self.lines[-20:], text]

        def note(self, message: str) -> None:
            self.print("Note:", message)

        def warning(self, message: str) -> None:
            self.print("Warning:", message)

        def error(self, message: str) -> None:
            self.print("Error:", message)

        def stage(self, finish: bool = False) -> None:
            pass

        def progress_bar(self, cur_iter: int, total_iters: int, prefix: str = "",
                         suffix: str = "", bar_length: int = 30) -> None:
            if self.on_progress is not None and total_iters:
                self.on_progress(min(1.0, cur_iter / total_iters))

        def set_verbosity(self, verbosity: str) -> None:
            pass

    previous = EspLog.instance
    logger = FlashLogger()
    log.set_logger(logger)
    try:
        yield logger
    finally:
        EspLog.instance = previous


def _explain(exc: Exception, port: str, stage: str) -> FlashError:
    """esptool's error as a FlashError that says what to do."""
    text = str(exc)
    lowered = text.lower()
    if stage == "open" or "could not open port" in lowered or "errno 2" in lowered:
        return FlashError(
            f"cannot open serial port {port} ({text.strip().splitlines()[0]}): check the cable "
            "and the port name (ls /dev/ttyUSB* /dev/ttyACM*), that you may use it (the "
            "dialout group), and that no serial monitor holds it"
        )
    if stage == "connect":
        return FlashError(
            f"the board on {port} did not answer esptool's SYNC: it is not in download mode. "
            "Hold BOOT, press and release EN, release BOOT, then run the command again (or "
            "use --reset manual to be prompted at the right moment). esptool said: "
            f"{text.strip().splitlines()[0] if text.strip() else type(exc).__name__}"
        )
    if "md5" in lowered:
        return FlashError(
            f"the image was written but the flash does not hold it (MD5 check failed: {text}). "
            "Flash again; if it repeats, try another cable or a lower --baud: the board's "
            "flash may be failing"
        )
    if "timed out" in lowered or "no serial data" in lowered:
        return FlashError(
            f"the board on {port} stopped answering while {stage} ({text}): check the cable "
            "and the power supply, then flash again"
        )
    return FlashError(f"esptool failed while {stage}: {text}")


def flash_image(
    port: str,
    image: bytes,
    *,
    modes: ResetModes = AUTO_RESET,
    baud: int = ROM_BAUD,
    use_stub: bool = True,
    offset: int | None = None,
    keep_data: bool = False,
    connect_attempts: int = CONNECT_ATTEMPTS,
    on_connected: Callable[[ChipInfo], None] | None = None,
    on_progress: Callable[[float], None] | None = None,
    on_erase: Callable[[Partition], None] | None = None,
) -> ChipInfo:
    """Write `image` to the board's flash and check it, then erase its filesystem partition
    unless `keep_data`; return what the chip said.

    `on_connected` runs once the chip has answered and before anything is written: it may
    raise to stop there (the fleet refusing the board, say). esptool checks each write's MD5
    against the flash and fails if they differ. `on_erase` runs before the erase, with the
    partition it will erase (found in the partition table the board will boot with).
    """
    from esptool import cmds
    from esptool.util import FatalError

    with _esptool_logger() as logger:
        try:
            esp = cmds.detect_chip(port, ROM_BAUD, modes.before,
                                   connect_attempts=connect_attempts)
        except FatalError as exc:
            opening = "could not open" in str(exc).lower()
            raise _explain(exc, port, "open" if opening else "connect") from exc
        except OSError as exc:
            raise _explain(exc, port, "open") from exc
        stage = "reading the chip"
        try:
            mac = bytes(esp.read_mac("BASE_MAC")).hex(":")
            chip = esp.get_chip_description()
            if use_stub:
                stage = "starting esptool's stub"
                esp = cmds.run_stub(esp)
            if baud != ROM_BAUD:
                stage = "changing the baud rate"
                esp.change_baud(baud)
            stage = "attaching the flash"
            cmds.attach_flash(esp)
            try:
                size = flash_size_bytes(cmds.detect_flash_size(esp))
            except FatalError:
                size = None  # secure download mode, or a flash id esptool does not know
            info = ChipInfo(chip=chip, mac=mac, flash_size=size,
                            image_offset=esp.BOOTLOADER_FLASH_OFFSET if offset is None
                            else offset)
            if size is not None and info.image_offset + len(image) > size:
                raise FlashError(
                    f"the image ({len(image)} bytes at {info.image_offset:#x}) does not fit "
                    f"this board's {size // 1024} KiB flash: use an image built for it"
                )
            if on_connected is not None:
                on_connected(info)
            stage = "writing the image"
            logger.on_progress = on_progress
            cmds.write_flash(esp, [(info.image_offset, image)], flash_size="keep")
            logger.on_progress = None
            if not keep_data:
                stage = "reading the partition table"
                fs = _filesystem_partition(esp, image, info)
                if fs is not None:
                    if on_erase is not None:
                        on_erase(fs)
                    stage = "erasing the filesystem"
                    # With the stub: its ERASE_REGION command. The ESP32 ROM has none; esptool
                    # then sends a FLASH_BEGIN of that size, which the ROM erases up front.
                    cmds.erase_region(esp, fs.offset, fs.size)
            stage = "resetting the board"
            cmds.reset_chip(esp, modes.after)
            return info
        except FatalError as exc:
            raise _explain(exc, port, stage) from exc
        except OSError as exc:  # the port vanished (USB unplugged)
            raise FlashError(f"the serial port {port} failed while {stage}: {exc}; check the "
                             "cable and flash again") from exc
        finally:
            esp._port.close()  # esptool's loader has no close() of its own


def _filesystem_partition(esp: Any, image: bytes, info: ChipInfo) -> Partition | None:
    """The filesystem partition of the table the board will boot with: the image's own when
    it carries one (a MicroPython build's firmware.bin does, at 0x8000), else the flash's."""
    start = partitions.TABLE_OFFSET - info.image_offset
    if 0 <= start and start + partitions.TABLE_SIZE <= len(image):
        raw, where = image[start : start + partitions.TABLE_SIZE], "in the image"
    else:
        raw = esp.read_flash(partitions.TABLE_OFFSET, partitions.TABLE_SIZE)
        where = "in the board's flash"
    try:
        fs = partitions.filesystem(partitions.parse(raw))
    except PartitionTableError as exc:
        raise FlashError(
            f"no usable partition table at {partitions.TABLE_OFFSET:#x} {where} ({exc}), so the "
            "board cannot start MicroPython: flash a complete MicroPython image (firmware.bin "
            "from micropython.org, which carries the bootloader, the partition table and the "
            "app)") from exc
    if fs is None:
        return None
    end = fs.offset + fs.size
    if fs.offset < info.image_offset + len(image) and info.image_offset < end:
        raise FlashError(
            f"the image ({len(image)} bytes at {info.image_offset:#x}) reaches into the "
            f"filesystem partition {fs.label} ({fs.size:#x} bytes at {fs.offset:#x}) of its "
            "partition table: the image is damaged or not built for this layout")
    if info.flash_size is not None and end > info.flash_size:
        raise FlashError(
            f"the partition table puts the filesystem ({fs.label}, {fs.size:#x} bytes at "
            f"{fs.offset:#x}) past the end of this board's {info.flash_size // 1024} KiB "
            "flash: use an image built for its flash size")
    return fs
