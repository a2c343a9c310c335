"""What an emulated board does at boot with what its `vfs` partition holds, as the ESP32 port's
_boot.py and inisetup.py (MicroPython v1.24.1) do: mount it, format it when its first block is
blank, or report it corrupted for ever."""

import random
import time

import pytest

from kinhbac.emulator.flash import SECTOR_SIZE
from kinhbac.transport.serial_link import connect

# The first line of inisetup.py's message (ports/esp32/modules/inisetup.py:28).
CORRUPTED = "The filesystem appears to be corrupted. If you had important data there, you"
MAIN_PY = {"main.py": b"print('main.py ran')\n"}


def overwrite_superblocks(board, data: bytes) -> None:
    """Put `data` over the start of the vfs partition: littlefs keeps its superblock in blocks
    0 and 1, so the files beyond are intact but the filesystem no longer mounts."""
    vfs = board.flash.partition("vfs")
    board.flash.erase(vfs.offset, 2 * SECTOR_SIZE)
    board.flash.program(vfs.offset, data)


def garbage(n: int = 2 * SECTOR_SIZE) -> bytes:
    return bytes(random.Random(7).randrange(0, 255) for _ in range(n))  # never a blank 0xFF run


def test_a_filesystem_of_garbage_is_reported_corrupted_for_ever_and_main_never_runs(board):
    board.write_files(MAIN_PY)
    overwrite_superblocks(board, garbage())
    board.power_on()
    first = board.console.wait_for(CORRUPTED, timeout=15)
    started = time.monotonic()
    board.console.wait_for(CORRUPTED, since=first, timeout=6)
    board.console.wait_for(CORRUPTED, since=board.console.mark(), timeout=6)
    assert time.monotonic() - started > 4  # every 3 s, as time.sleep(3) in the port's loop
    text = board.console.text()
    assert "main.py ran" not in text and ">>> " not in text
    assert "Performing initial setup" not in text  # nothing was formatted

    # Ctrl-C ends the loop (inisetup.py:23) and the REPL starts with nothing mounted, as on a
    # chip: the old files are out of reach and nothing can be written.
    repl = connect(board.tty_path)
    assert repl.eval("__import__('os').listdir('/')") == []
    repl.exec("try:\n open('/x', 'w')\nexcept OSError as e:\n err = e.errno")
    assert repl.eval("err") == 19  # ENODEV: no filesystem at that path
    board.power_cut(restore=False)
    assert "main.py ran" not in board.console.text()


def test_a_blank_first_block_is_formatted_at_boot_with_the_ports_boot_py(board):
    board.write_files(MAIN_PY)
    # Garbage everywhere but the first block: inisetup looks at block 0 only.
    overwrite_superblocks(board, b"\xff" * SECTOR_SIZE + garbage(SECTOR_SIZE))
    board.power_on()
    board.console.wait_for(">>> ", timeout=15)
    text = board.console.text()
    assert "Performing initial setup" in text and CORRUPTED not in text
    assert "main.py ran" not in text  # formatted: the old files are gone
    board.power_cut(restore=False)
    assert board.read_file("/boot.py") == (
        b"# This file is executed on every boot (including wake-boot from deepsleep)\n"
        b"#import esp\n#esp.osdebug(None)\n#import webrepl\n#webrepl.start()\n")
    assert board.read_file("/main.py") is None


def test_erasing_only_the_first_block_leaves_the_old_filesystem_in_use(board):
    """Why `kinhbac device flash` erases the whole partition: the port's mount finds littlefs's
    superblock in block 1 too (extmod/vfs.c, mp_vfs_autodetect), so inisetup never runs."""
    board.write_files(MAIN_PY)
    vfs = board.flash.partition("vfs")
    board.flash.erase(vfs.offset, SECTOR_SIZE)
    board.power_on()
    board.console.wait_for("main.py ran", timeout=15)
    assert "Performing initial setup" not in board.console.text()


def test_factory_writes_refuse_a_corrupted_filesystem_instead_of_formatting_it(board):
    overwrite_superblocks(board, garbage())
    with pytest.raises(RuntimeError, match="CORRUPTED: the vfs partition holds neither"):
        board.write_files(MAIN_PY)
    with pytest.raises(RuntimeError, match="CORRUPTED"):
        board.read_file("/main.py")
    vfs = board.flash.partition("vfs")
    assert board.flash.read(vfs.offset, 64) == garbage()[:64]  # left as it was


def test_reading_a_blank_board_leaves_its_first_boot_to_format_it(board):
    assert board.read_file("/main.py") is None
    board.power_on()
    board.console.wait_for(">>> ", timeout=15)
    assert "Performing initial setup" in board.console.text()
