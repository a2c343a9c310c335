"""The ESP32 ROM's download mode on emulated boards, driven by the real esptool over the pty."""

import hashlib
import struct
import time

import esptool
import pytest
import serial
from esptool.bin_image import LoadFirmwareImage
from esptool.cmds import attach_flash, detect_chip, detect_flash_size, erase_region, write_flash
from esptool.targets.esp32 import ESP32ROM
from esptool.util import FatalError, NotImplementedInROMError

from kinhbac.emulator.board import HARD_RESET, PWRON_RESET
from kinhbac.emulator.esp32_image import synthetic_image
from kinhbac.emulator.flash import FLASH_SIZE, FlashImage
from kinhbac.emulator.rom_loader import RomLoader

BOOTLOADER_OFFSET = 0x1000
# A pty has no DTR/RTS to reset the chip with, and the emulated chip cannot run esptool's
# flasher stub: talk to the ROM as it is.
PTY_ARGS = ["--chip", "esp32", "--before", "no-reset", "--no-stub", "--connect-attempts", "1"]


def run_esptool(board, *command: str, after: str = "no-reset") -> None:
    """The esptool command line, as a technician would type it for this board."""
    esptool.main([*PTY_ARGS, "--port", board.tty_path, "--after", after, *command])


def connect(board, attempts: int = 1):
    """esptool's own chip detection on the board's port, as `kinhbac device flash` will use it."""
    return detect_chip(board.tty_path, connect_mode="no-reset", connect_attempts=attempts)


def test_esptool_detects_an_esp32_d0wd_v3_and_reads_the_boards_mac(board):
    board.power_on(download=True)
    with connect(board) as esp:
        assert isinstance(esp, ESP32ROM) and not esp.IS_STUB
        assert esp.get_chip_description() == "ESP32-D0WD-V3 (revision v3.0)"
        assert esp.get_chip_revision() == 300
        assert bytes(esp.read_mac()) == board.mac
        assert esp.get_crystal_freq() == 40
        assert esp.flash_id() == 0x1640EF  # Winbond (0xEF), device 0x4016
        assert detect_flash_size(esp) == "4MB"
        # The ROM's slow read, 64 bytes a command: the partition table the flash was made with.
        assert esp.read_flash(0x8000, 160) == board.flash.read(0x8000, 160)
    assert board.in_download_mode and board.running


@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "uncompressed"])
def test_write_flash_lands_byte_identical_in_the_flash_image(board, compress):
    first, image = synthetic_image(seed=1), synthetic_image(seed=2)
    board.power_on(download=True)
    with connect(board) as esp:
        attach_flash(esp)
        # The second write only comes out right if FLASH_BEGIN erased what the first wrote.
        for data in (first, image):
            write_flash(
                esp, [(BOOTLOADER_OFFSET, data)], compress=compress, no_compress=not compress
            )
    assert board.flash.read(BOOTLOADER_OFFSET, len(image)) == image
    assert board.flash.read(0, BOOTLOADER_OFFSET) == b"\xff" * BOOTLOADER_OFFSET


def test_esptool_command_line_writes_and_verifies_in_a_few_seconds(board, tmp_path):
    image_path = tmp_path / "bootloader.bin"
    image_path.write_bytes(synthetic_image(seed=3))
    board.power_on(download=True)
    started = time.monotonic()
    # --chip esp32 asks GET_SECURITY_INFO first: only a prompt error reply keeps this quick.
    # At the baud rate technicians use: esptool syncs at 115200, then asks the ROM to change.
    run_esptool(board, "--baud", "460800", "write-flash", hex(BOOTLOADER_OFFSET), str(image_path))
    run_esptool(board, "verify-flash", hex(BOOTLOADER_OFFSET), str(image_path))
    assert time.monotonic() - started < 5
    assert board.flash.read(BOOTLOADER_OFFSET, image_path.stat().st_size) == image_path.read_bytes()


@pytest.fixture
def esptool_output():
    """What esptool prints, whatever logger another test left installed (esptool keeps one)."""
    from esptool.logger import EspLog, TemplateLogger, log

    class Collector(TemplateLogger):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def print(self, *args, **kwargs) -> None:
            self.lines.append(" ".join(str(arg) for arg in args))

        def note(self, message: str) -> None:
            self.lines.append(message)

        warning = error = note

        def stage(self, finish: bool = False) -> None:
            pass

        def progress_bar(self, *args, **kwargs) -> None:
            pass

        def set_verbosity(self, verbosity: str) -> None:
            pass

    previous = EspLog.instance
    collector = Collector()
    log.set_logger(collector)
    yield collector.lines
    EspLog.instance = previous


def test_esptool_image_info_accepts_the_synthetic_image(tmp_path, esptool_output):
    image = synthetic_image(8192, seed=7)
    assert len(image) == 8192
    parsed = LoadFirmwareImage("esp32", image)
    assert parsed.chip_id == 0 and len(parsed.segments) == 2
    assert parsed.checksum == parsed.calculate_checksum()
    assert parsed.append_digest and parsed.stored_digest == parsed.calc_digest
    assert parsed.stored_digest == hashlib.sha256(image[:-32]).digest()

    path = tmp_path / "synthetic.bin"
    path.write_bytes(image)
    esptool.main(["image-info", str(path)])
    out = "\n".join(esptool_output)
    assert "Detected image type: ESP32" in out
    assert "Checksum: " in out and "(valid)" in out and "invalid" not in out
    assert "kinhbac synthetic image" in out


def test_synthetic_images_differ_by_seed_and_refuse_sizes_that_do_not_fit():
    assert synthetic_image(seed=1) != synthetic_image(seed=2)
    assert synthetic_image(seed=1) == synthetic_image(seed=1)
    with pytest.raises(ValueError):
        synthetic_image(0x8000)  # would overwrite the partition table at 0x8000
    with pytest.raises(ValueError):
        synthetic_image(1000)  # not a whole number of 16-byte lines


def test_a_bit_flipped_in_flash_fails_esptools_md5_check(board):
    image = synthetic_image(seed=4)
    board.power_on(download=True, rom_faults=frozenset({"corrupt_write"}))
    with connect(board) as esp:
        attach_flash(esp)
        with pytest.raises(FatalError, match="MD5 of file does not match data in flash"):
            write_flash(esp, [(BOOTLOADER_OFFSET, image)], no_compress=True)
    written = board.flash.read(BOOTLOADER_OFFSET, len(image))
    flipped = int.from_bytes(written, "little") ^ int.from_bytes(image, "little")
    assert flipped.bit_count() == 1


def test_a_board_that_never_answers_sync_fails_to_connect_in_bounded_time(board):
    board.power_on(download=True, rom_faults=frozenset({"no_sync"}))
    started = time.monotonic()
    with pytest.raises(FatalError, match="Failed to connect to .*No serial data received"):
        connect(board, attempts=1)
    assert time.monotonic() - started < 3


def test_a_board_running_micropython_does_not_answer_esptool(board):
    board.write_files({"main.py": b"print('app running')\n"})
    board.power_on()
    board.console.wait_for(">>> ", timeout=15)
    started = time.monotonic()
    with pytest.raises(FatalError, match="Failed to connect to"):
        connect(board, attempts=1)
    assert time.monotonic() - started < 3
    assert not board.in_download_mode


def test_power_cycle_after_flashing_boots_micropython_with_its_files_intact(board):
    board.write_files(
        {"main.py": b"print('files', open('/note.txt').read())\n", "note.txt": b"kept"}
    )
    vfs = board.flash.partition("vfs")
    filesystem = board.flash.read(vfs.offset, vfs.size)
    board.power_on(download=True)
    with connect(board) as esp:
        attach_flash(esp)
        write_flash(esp, [(BOOTLOADER_OFFSET, synthetic_image())], compress=True)
    assert board.flash.read(vfs.offset, vfs.size) == filesystem

    board.power_cut(restore=False)
    assert not board.running
    mark = board.console.mark()
    board.power_on()
    board.console.wait_for("boot:0x13 (SPI_FAST_FLASH_BOOT)", timeout=15, since=mark)
    board.console.wait_for("files kept", timeout=15, since=mark)
    assert board.boots == [PWRON_RESET, PWRON_RESET]


def test_esptool_erases_a_region_through_the_roms_flash_begin(board):
    board.write_files({"main.py": b"print('app running')\n"})
    vfs = board.flash.partition("vfs")
    board.flash.program(vfs.offset - 4, b"kept")  # the end of ota_1, next to vfs
    board.power_on(download=True)
    with connect(board) as esp:
        attach_flash(esp)
        # The ESP32 ROM has no ERASE_REGION: esptool's loader refuses it without the stub...
        with pytest.raises(NotImplementedInROMError):
            esp.erase_region(vfs.offset, vfs.size)
        # ...and its erase-region command sends a FLASH_BEGIN of that size instead, which
        # the ROM erases up front.
        erase_region(esp, vfs.offset, vfs.size)
    assert board.flash.read(vfs.offset, vfs.size) == b"\xff" * vfs.size
    assert board.flash.read(vfs.offset - 4, 4) == b"kept"


def test_esptool_soft_reset_leaves_download_mode_and_runs_micropython(board, tmp_path):
    board.write_files({"main.py": b"print('app running')\n"})
    image_path = tmp_path / "bootloader.bin"
    image_path.write_bytes(synthetic_image())
    board.power_on(download=True)
    mark = board.console.mark()
    # With no RTS line, "soft-reset" (FLASH_BEGIN of nothing, then FLASH_END "run") is how
    # esptool starts the code in flash over a pty; the ROM jumps there without a chip reset.
    run_esptool(board, "write-flash", hex(BOOTLOADER_OFFSET), str(image_path), after="soft-reset")
    board.console.wait_for("app running", timeout=15, since=mark)
    assert not board.in_download_mode
    assert board.boots == [PWRON_RESET]


def test_the_flasher_stub_is_refused_with_the_roms_error(board):
    board.power_on(download=True)
    without_no_stub = [arg for arg in PTY_ARGS if arg != "--no-stub"]
    with pytest.raises(FatalError, match="Failed to enter RAM download mode"):
        esptool.main([*without_no_stub, "--port", board.tty_path, "read-mac"])


def test_rom_faults_are_checked_by_name(board):
    with pytest.raises(ValueError, match="no_sink"):
        board.power_on(download=True, rom_faults=frozenset({"no_sink"}))
    assert not board.running


def test_flash_programming_only_clears_bits_until_an_erase(tmp_path):
    flash = FlashImage(tmp_path / "flash.bin")
    flash.create()
    flash.program(0x2000, b"\x0f\xf0")
    flash.program(0x2000, b"\xff\x00")
    assert flash.read(0x2000, 2) == b"\x0f\x00"
    flash.erase(0x2001, 1)  # a whole sector goes, never less
    assert flash.read(0x2000, 0x1000) == b"\xff" * 0x1000
    with pytest.raises(ValueError):
        flash.program(FLASH_SIZE - 1, b"\x00\x00")


def slip_request(op: int, data: bytes = b"", checksum: int = 0) -> bytes:
    body = struct.pack("<BBHI", 0x00, op, len(data), checksum) + data
    return b"\xc0" + body.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"


def test_rom_replies_byte_for_byte_and_reboots_on_flash_end(tmp_path):
    flash = FlashImage(tmp_path / "flash.bin")
    flash.create()
    sent: list[bytes] = []
    exits: list[bool] = []
    rom = RomLoader(flash=flash, mac=bytes(6), send=sent.append, on_exit=exits.append)

    rom.feed(slip_request(0x14))  # GET_SECURITY_INFO: the ESP32 ROM does not have it
    assert sent == [b"\xc0\x01\x14\x04\x00\x00\x00\x00\x00\x01\x05\x00\x00\xc0"]

    frame = slip_request(0x0A, struct.pack("<I", 0x40001000))  # READ_REG of the chip magic
    rom.feed(frame[:5])  # a pty hands over bytes as they come, not frame by frame
    rom.feed(frame[5:])
    assert sent[-1] == b"\xc0\x01\x0a\x04\x00\x83\x1d\xf0\x00\x00\x00\x00\x00\xc0"

    # ERASE_REGION is a command of esptool's stub, not of the ROM: the ROM's error 0x05.
    rom.feed(slip_request(0xD1, struct.pack("<II", 0x310000, 0xF0000)))
    assert sent[-1] == b"\xc0\x01\xd1\x04\x00\x00\x00\x00\x00\x01\x05\x00\x00\xc0"

    rom.feed(slip_request(0x04, struct.pack("<I", 0)))  # FLASH_END, 0: reboot
    assert exits == [True]


def test_flash_end_asking_for_a_reboot_resets_the_chip_into_micropython(board):
    board.write_files({"main.py": b"print('app running')\n"})
    board.power_on(download=True)
    mark = board.console.mark()
    with serial.Serial(board.tty_path) as port:  # what esptool's stub path sends to reboot
        port.write(slip_request(0x04, struct.pack("<I", 0)))
        board.console.wait_for("rst:0xc (SW_CPU_RESET)", timeout=15, since=mark)
    board.console.wait_for("app running", timeout=15, since=mark)
    assert board.boots == [PWRON_RESET, HARD_RESET]
