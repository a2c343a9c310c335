"""`kinhbac device flash --image` erases the board's filesystem partition, found in the
partition table the board will boot with, so that the ESP32 port formats it at the next boot;
`--keep-data` keeps it. Real esptool (ROM, no stub), emulated boards, the real fleet."""

import pytest
from typer.testing import CliRunner

from kinhbac.cli import app
from kinhbac.device.errors import BoardError, FlashError
from kinhbac.device.esp_flash import NO_RESET, flash_image
from kinhbac.device.provision import EmulatedBoardBoot
from kinhbac.emulator.esp32_image import combined_image, synthetic_image
from kinhbac.emulator.flash import GENERIC_LAYOUT, SECTOR_SIZE

from .conftest import SITE, firmware
from .test_flash import Steps, board_config, image_file, provisioner, wired_board

OLD_FILES = {"old.txt": b"left by the last owner", "buf/00000001": b"\x01" * 48,
             "config.json": b'{"secret": "the old one"}'}
ERASE_OTA = ("erasing the filesystem (vfs, 0xf0000 bytes at 0x310000): data on the board is "
             "lost; --keep-data keeps it")
CORRUPTED = "The filesystem appears to be corrupted"


def used_board(emulator):
    """A board that ran before: files on its filesystem, powered off."""
    board = wired_board(emulator, power_on=False)
    board.write_files(OLD_FILES)
    return board


def flash(site, board, tmp_path, steps=None, image=None, **fields):
    return provisioner(site, board, steps or Steps(), EmulatedBoardBoot(board),
                       image=image or image_file(tmp_path), use_stub=False, **fields).run()


def test_a_reflash_erases_the_old_filesystem_and_the_board_formats_it_and_is_provisioned(
        emulator, site, sites_dir, tmp_path):
    board = used_board(emulator)
    steps = Steps()
    result = flash(site, board, tmp_path, steps)

    assert ERASE_OTA in steps.seen
    written = steps.seen.index("image written at 0x1000 and checked (MD5)")
    assert written < steps.seen.index(ERASE_OTA)
    assert "Performing initial setup" in board.console.text()  # the port's inisetup formatted
    assert result.filesystem == "erased" and result.as_json()["filesystem"] == "erased"
    config = board_config(board)
    assert config["device_id"] == result.device["wire_id"]
    for path in ("/old.txt", "/buf/00000001"):
        assert board.read_file(path) is None, path
    for path, data in firmware().items():
        assert board.read_file(path) == data, path


def test_keep_data_leaves_the_old_files_in_place(emulator, site, sites_dir, tmp_path):
    board = used_board(emulator)
    vfs = board.flash.partition("vfs")
    steps = Steps()
    result = flash(site, board, tmp_path, steps, keep_data=True)

    assert not any("erasing the filesystem" in s for s in steps.seen)
    assert "filesystem kept (--keep-data): the board's old files stay" in steps.seen
    assert "Performing initial setup" not in board.console.text()
    assert result.filesystem == "kept"
    assert board_config(board)["device_id"] == result.device["wire_id"]  # replaced as always
    assert board.read_file("/old.txt") == OLD_FILES["old.txt"]
    assert board.read_file("/buf/00000001") == OLD_FILES["buf/00000001"]
    assert board.flash.read(vfs.offset, 8) != b"\xff" * 8


def test_a_filesystem_the_port_calls_corrupted_stops_keep_data_and_the_erase_cures_it(
        emulator, site, sites_dir, tmp_path):
    board = used_board(emulator)
    vfs = board.flash.partition("vfs")
    board.flash.erase(vfs.offset, 2 * SECTOR_SIZE)
    board.flash.program(vfs.offset, bytes(range(256)) * 32)  # neither littlefs nor blank

    with pytest.raises(BoardError) as failed:
        flash(site, board, tmp_path, keep_data=True)
    message = str(failed.value)
    assert "the board has no filesystem" in message and CORRUPTED in message
    assert "flash again without --keep-data" in message
    assert CORRUPTED in board.console.text()  # the board said so itself, at boot
    assert site.devices() == []  # refused before anything was registered

    board.power_cut(restore=False)
    mark = board.console.mark()
    result = flash(site, board, tmp_path)
    assert result.filesystem == "erased"
    assert "Performing initial setup" in board.console.text(mark)
    assert CORRUPTED not in board.console.text(mark)
    assert board_config(board)["device_id"] == result.device["wire_id"]


def test_the_erase_follows_the_partition_table_the_image_brings(
        emulator, site, sites_dir, tmp_path):
    board = used_board(emulator)  # its flash has the OTA layout: vfs at 0x310000
    image = tmp_path / "firmware.bin"
    # A firmware.bin of the ESP32_GENERIC build without OTA: its table puts vfs at 0x200000.
    image.write_bytes(combined_image(GENERIC_LAYOUT, seed=5))
    steps = Steps()
    result = flash(site, board, tmp_path, steps, image=image)

    assert ("erasing the filesystem (vfs, 0x200000 bytes at 0x200000): data on the board is "
            "lost; --keep-data keeps it") in steps.seen
    assert board.flash.partition("vfs").offset == 0x200000  # the board boots with that table
    assert "Performing initial setup" in board.console.text()
    assert board_config(board)["device_id"] == result.device["wire_id"]
    assert board.read_file("/old.txt") is None


def test_keep_data_without_an_image_is_a_usage_error_and_help_says_what_stays():
    done = CliRunner().invoke(app, ["device", "flash", "--port", "/dev/null", "--site", SITE,
                                    "--keep-data"])
    assert done.exit_code == 2
    assert "--keep-data goes with --image" in done.output
    shown = CliRunner().invoke(app, ["device", "flash", "--help"], env={"COLUMNS": "200"})
    text = " ".join(shown.output.replace("│", " ").split())
    assert "--keep-data" in text and "erases the filesystem partition" in text
    assert "The filesystem appears to be corrupted" in text


def test_a_flash_with_no_partition_table_is_refused_before_anything_is_erased(board):
    board.write_files(OLD_FILES)
    board.flash.erase(0x8000, 0x1000)  # a chip erased whole, then given only a bootloader
    vfs_before = board.flash.read(0x310000, 0xF0000)
    board.power_on(download=True)
    erased = []
    with pytest.raises(FlashError) as failed:
        flash_image(board.tty_path, synthetic_image(0x2000), modes=NO_RESET, use_stub=False,
                    connect_attempts=1, on_erase=erased.append)
    assert "no usable partition table at 0x8000 in the board's flash" in str(failed.value)
    assert "flash a complete MicroPython image" in str(failed.value)
    assert erased == [] and board.flash.read(0x310000, 0xF0000) == vfs_before
