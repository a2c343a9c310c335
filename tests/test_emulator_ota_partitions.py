"""The OTA app slots of an emulated board, as the ESP32 port's esp32.Partition and ESP-IDF
v5.2.2's bootloader handle them: an app image written to get_next_update(), set_boot() (which
verifies it first), the trial boot, the rollback, and power cuts in between. The board runs
MicroPython code that uses exactly the port's API; the host reads the flash as a chip keeps it.
"""

import hashlib
import time

import esptool
import pytest
from esptool.bin_image import LoadFirmwareImage
from test_emulator import boot_with
from test_rom_loader import esptool_output  # noqa: F401 (a fixture)

from kinhbac.device.esp_flash import NO_RESET, flash_image
from kinhbac.emulator import esp32_image, otadata
from kinhbac.emulator.board import DEEPSLEEP_RESET
from kinhbac.emulator.esp32_image import app_image, app_version, combined_image
from kinhbac.emulator.flash import GENERIC_LAYOUT, OTA_LAYOUT, SECTOR_SIZE, FlashImage
from kinhbac.transport.serial_link import connect

# Runs on the board: an image from the board's filesystem into an app slot, a block at a time,
# as the node writes a downloaded one (writeblocks without an offset erases each block first).
HELPERS = """\
import esp32, os, machine, time

def write_image(name, part=None, blocks=None):
    part = part or esp32.Partition(esp32.Partition.RUNNING).get_next_update()
    buf = bytearray(4096)
    block = 0
    with open(name, 'rb') as f:
        while blocks is None or block < blocks:
            n = f.readinto(buf)
            if not n:
                break
            for i in range(n, 4096):
                buf[i] = 0xFF
            part.writeblocks(block, buf)
            block += 1
    return part

def label(which):
    return esp32.Partition(which).info()[4]

def set_boot_error(part):
    try:
        part.set_boot()
    except OSError as e:
        return e.args
"""

RUNNING = "label(esp32.Partition.RUNNING)"
BOOT = "label(esp32.Partition.BOOT)"
VALIDATE_FAILED = (-0x1503, "ESP_ERR_OTA_VALIDATE_FAILED")


def slot_digest(board, label: str) -> str:
    part = board.flash.partition(label)
    return hashlib.sha256(board.flash.read(part.offset, part.size)).hexdigest()


def otadata_bytes(board) -> bytes:
    part = otadata.find(board.flash)
    return board.flash.read(part.offset, part.size)


def start(board, files: dict[str, bytes] | None = None):
    board.write_files({k: v for k, v in (files or {}).items()})
    boot_with(board, HELPERS)
    return connect(board.tty_path)


def reset(board):
    mark = board.console.mark()
    board.press_reset()
    board.console.wait_for(">>> ", timeout=15, since=mark)
    return connect(board.tty_path)


# ----- the app image builder -----


def test_esptool_reads_the_app_image_and_its_version(tmp_path, esptool_output):  # noqa: F811
    image = app_image("1.4.0", size=12288, seed=3)
    assert len(image) == 12288 and app_version(image) == "1.4.0"
    parsed = LoadFirmwareImage("esp32", image)
    kinds = [seg.get_memory_type(parsed) for seg in parsed.segments]
    assert kinds[0] == ["DROM"] and ["IROM"] in kinds  # the app description leads DROM
    assert parsed.checksum == parsed.calculate_checksum()
    assert parsed.append_digest and parsed.stored_digest == parsed.calc_digest

    path = tmp_path / "app.bin"
    path.write_bytes(image)
    esptool.main(["image-info", str(path)])
    out = "\n".join(esptool_output)
    assert "App version: 1.4.0" in out
    assert "(valid)" in out and "invalid" not in out
    assert "ESP-IDF: v5.2.2" in out


def test_the_default_app_image_has_micropythons_empty_version():
    # sdkconfig.base sets CONFIG_APP_EXCLUDE_PROJECT_VER_VAR: a real build's version is "".
    assert app_version(app_image()) == ""
    with pytest.raises(ValueError, match="longer than esp_app_desc_t"):
        app_image("1" * 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        app_image(size=5000)


@pytest.fixture
def flash(tmp_path):
    image = FlashImage(tmp_path / "flash.bin")
    image.create(OTA_LAYOUT)
    return image


def put(flash, label: str, data: bytes) -> None:
    flash.program(flash.partition(label).offset, data)


def test_an_app_image_verifies_in_either_slot_and_damage_is_named(flash):
    image = app_image("2.0.0", seed=1)
    for label in ("ota_0", "ota_1"):
        put(flash, label, image)
        assert otadata.verify_app(flash, flash.partition(label)) is None
    ota_1 = flash.partition("ota_1")

    def verdict(damaged: bytes) -> str | None:
        flash.erase(ota_1.offset, len(damaged) + SECTOR_SIZE)
        put(flash, "ota_1", damaged)
        return otadata.verify_app(flash, ota_1)

    assert "invalid magic byte" in verdict(b"\xe8" + image[1:])
    assert "Checksum failed" in verdict(flip(image, 600))
    assert "Image hash failed" in verdict(flip(image, len(image) - 1))  # the digest itself
    assert "segment length" in verdict(image[: len(image) // 2])  # the rest still erased
    assert "mismatch chip ID" in verdict(image[:12] + b"\x05" + image[13:])
    small = flash.partition("nvs")  # an image longer than its partition
    put(flash, "nvs", image[:SECTOR_SIZE * 4])
    assert otadata.verify_app(flash, small) is not None


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


# ----- set_boot, RUNNING and BOOT, the trial boot and the rollback -----


def test_an_update_boots_on_trial_and_rolls_back_at_the_next_reset_unless_marked(emulator):
    board = emulator.add_board()
    new = app_image("2.0.0", seed=2)
    repl = start(board, {"new.bin": new})
    assert repl.eval(RUNNING) == repl.eval(BOOT) == "ota_0"
    old_slot = slot_digest(board, "ota_0")

    repl.exec("p = write_image('new.bin')\np.set_boot()")
    ota_1 = board.flash.partition("ota_1")
    assert repl.eval("p.info()") == (0, 0x11, ota_1.offset, ota_1.size, "ota_1", False)
    assert repl.eval(BOOT) == "ota_1" and repl.eval(RUNNING) == "ota_0"  # until the reset
    assert otadata.read(board.flash, otadata.find(board.flash)) == [
        otadata.Entry.for_seq(1, otadata.VALID), otadata.Entry.for_seq(2, otadata.NEW)]

    repl = reset(board)
    assert repl.eval(RUNNING) == repl.eval(BOOT) == "ota_1"
    assert board.running_app.label == "ota_1"
    assert otadata.active_entry(board.flash) == otadata.Entry.for_seq(2, otadata.PENDING_VERIFY)
    assert slot_digest(board, "ota_0") == old_slot  # the old image untouched
    assert app_version(board.flash.read(ota_1.offset, len(new))) == "2.0.0"

    repl = reset(board)  # the trial boot ended without mark_app_valid_cancel_rollback()
    assert repl.eval(RUNNING) == repl.eval(BOOT) == "ota_0"
    entries = otadata.read(board.flash, otadata.find(board.flash))
    assert entries[1].state == otadata.ABORTED
    assert otadata.active_entry(board.flash) == otadata.Entry.for_seq(1, otadata.VALID)


def test_an_update_marked_valid_stays_and_its_next_update_slot_is_ota_0(emulator):
    board = emulator.add_board()
    repl = start(board, {"new.bin": app_image("2.0.0", seed=2)})
    repl.exec("write_image('new.bin').set_boot()")
    repl = reset(board)
    assert repl.eval(RUNNING) == "ota_1"
    repl.exec("esp32.Partition.mark_app_valid_cancel_rollback()")
    assert otadata.active_entry(board.flash) == otadata.Entry.for_seq(2, otadata.VALID)
    for _ in range(2):
        repl = reset(board)
        assert repl.eval(RUNNING) == repl.eval(BOOT) == "ota_1"
    assert repl.eval("esp32.Partition(esp32.Partition.RUNNING).get_next_update().info()[4]") \
        == "ota_0"
    assert repl.eval("esp32.Partition('ota_0').get_next_update().info()[4]") == "ota_1"
    # Not an OTA slot: the first one (esp_ota_get_next_update_partition's default).
    assert repl.eval("esp32.Partition('vfs').get_next_update().info()[4]") == "ota_0"
    assert board.app_valid_calls == [1]


def test_a_wake_from_deep_sleep_is_no_failed_trial_boot(emulator):
    # CONFIG_BOOTLOADER_SKIP_VALIDATE_IN_DEEP_SLEEP: the bootloader starts the app RTC memory
    # names without reading otadata, so a trial survives deep sleep; any other reset ends it.
    board = emulator.add_board()
    main = HELPERS + (
        "try:\n"
        "    os.remove('sleep-once')\n"
        "except OSError:\n"
        "    pass\n"
        "else:\n"
        "    machine.deepsleep(200)\n"
    )
    board.write_files({"new.bin": app_image("2.0.0", seed=2)})
    boot_with(board, main)
    repl = connect(board.tty_path)
    repl.exec("write_image('new.bin').set_boot()\nopen('sleep-once', 'w').close()")
    mark = board.console.mark()
    board.press_reset()  # the trial boot, which sleeps at once
    board.console.wait_for("rst:0x5 (DEEPSLEEP_RESET)", timeout=15, since=mark)
    board.console.wait_for(">>> ", timeout=15, since=mark)
    assert board.reset_cause == DEEPSLEEP_RESET
    repl = connect(board.tty_path)
    assert repl.eval(RUNNING) == "ota_1"
    assert otadata.active_entry(board.flash) == otadata.Entry.for_seq(2, otadata.PENDING_VERIFY)
    repl = reset(board)
    assert repl.eval(RUNNING) == "ota_0"


def test_a_deep_sleep_after_set_boot_wakes_in_the_old_slot(emulator):
    # The fast wake starts the app RTC memory names: the new slot waits for another reset.
    board = emulator.add_board()
    main = HELPERS + (
        "try:\n"
        "    os.remove('update-then-sleep')\n"
        "except OSError:\n"
        "    pass\n"
        "else:\n"
        "    write_image('new.bin').set_boot()\n"
        "    machine.deepsleep(200)\n"
    )
    board.write_files({"new.bin": app_image("2.0.0", seed=2), "update-then-sleep": b""})
    woke = boot_with(board, main, wait_for="rst:0x5 (DEEPSLEEP_RESET)")
    board.console.wait_for(">>> ", timeout=15, since=woke)
    repl = connect(board.tty_path)
    assert repl.eval(RUNNING) == "ota_0" and repl.eval(BOOT) == "ota_1"
    assert otadata.active_entry(board.flash) == otadata.Entry.for_seq(2, otadata.NEW)
    repl = reset(board)
    assert repl.eval(RUNNING) == "ota_1"
    assert otadata.active_entry(board.flash) == otadata.Entry.for_seq(2, otadata.PENDING_VERIFY)


# ----- set_boot refuses what the bootloader would refuse -----


def test_set_boot_refuses_a_damaged_image_as_the_port_does_and_leaves_otadata(emulator):
    image = app_image("2.0.0", seed=4)
    damaged = {
        "magic.bin": b"\x00" + image[1:],
        "checksum.bin": flip(image, 5000),
        "hash.bin": flip(image, len(image) - 5),
        "half.bin": image,  # written only in part below: a download cut short
    }
    board = emulator.add_board()
    repl = start(board, damaged)
    before = otadata_bytes(board)
    for name in damaged:
        blocks = 2 if name == "half.bin" else None
        repl.exec(f"p = write_image({name!r}, blocks={blocks})")
        assert repl.eval("set_boot_error(p)") == VALIDATE_FAILED, name
        assert otadata_bytes(board) == before, name
    assert repl.eval(BOOT) == "ota_0"
    # Not an app partition: the image check comes first, and an app image is the only way in.
    assert repl.eval("set_boot_error(esp32.Partition('vfs'))") == VALIDATE_FAILED
    repl = reset(board)
    assert repl.eval(RUNNING) == "ota_0"


# ----- power cuts -----


def test_a_power_cut_during_set_boots_otadata_write_boots_the_running_slot(emulator):
    # Both otadata entries in use: ota_0 (seq 1) and ota_1 (seq 2, running, valid). Updating
    # back to ota_0 rewrites sector 0; ESP-IDF never touches the entry in use meanwhile.
    board = emulator.add_board()
    put(board.flash, "ota_1", app_image("2.0.0", seed=2))
    part = otadata.find(board.flash)
    otadata.write(board.flash, part, 0, otadata.Entry.for_seq(1, otadata.VALID))
    otadata.write(board.flash, part, 1, otadata.Entry.for_seq(2, otadata.VALID))
    main = HELPERS + (
        "try:\n"
        "    os.remove('update-now')\n"
        "except OSError:\n"
        "    pass\n"
        "else:\n"
        "    p = write_image('new.bin')\n"
        "    print('image written to', p.info()[4])\n"
        "    time.sleep_ms(1000)\n"
        "    print('set_boot starts')\n"
        "    p.set_boot()\n"
        "    print('set_boot done')\n"
    )
    board.write_files({"main.py": main.encode(), "update-now": b"",
                       "new.bin": app_image("3.0.0", seed=3)})
    board.power_on()
    board.console.wait_for("image written to ota_0", timeout=20)
    board.flash_erase_ms = 5000  # a slow erase, so that the cut lands inside it
    board.console.wait_for("set_boot starts", timeout=10)
    deadline = time.monotonic() + 5
    sector_0 = part.offset
    while board.flash.read(sector_0, 32) != b"\xff" * 32:
        assert time.monotonic() < deadline, "set_boot never erased otadata's sector 0"
        time.sleep(0.01)
    mark = board.console.mark()
    board.power_cut()
    board.console.wait_for(">>> ", timeout=15, since=mark)
    assert "set_boot done" not in board.console.text()
    assert otadata.read(board.flash, part) == [
        otadata.Entry(), otadata.Entry.for_seq(2, otadata.VALID)]
    repl = connect(board.tty_path)
    assert repl.eval(RUNNING) == repl.eval(BOOT) == "ota_1"
    assert app_version(board.flash.read(board.flash.partition("ota_0").offset, 4096)) == "3.0.0"


def test_an_otadata_entry_cut_off_at_any_byte_boots_the_old_slot(flash):
    # A page program writes the entry's 32 bytes in order: sequence number, label, state, CRC.
    # Cut after any of them, the entry's CRC does not match and the old one stays in use.
    put(flash, "ota_0", app_image(seed=1))
    put(flash, "ota_1", app_image("2.0.0", seed=2))
    part = otadata.find(flash)
    assert otadata.boot(flash).label == "ota_0"
    err, writes = otadata.plan_set_boot(flash, flash.partition("ota_1"))
    assert err == otadata.ESP_OK and [w[0] for w in writes] == [1]
    sector, entry = writes[0]
    packed = entry.pack()
    for cut in range(len(packed) + 1):
        otadata.erase_sector(flash, part, sector)
        flash.program(part.offset + sector * SECTOR_SIZE, packed[:cut])
        started = otadata.boot(flash)
        assert started.label == ("ota_1" if cut == len(packed) else "ota_0"), cut
        otadata.write(flash, part, 0, otadata.Entry.for_seq(1, otadata.VALID))


def test_a_slot_damaged_after_set_boot_boots_the_old_slot_and_stays_on_trial(flash):
    put(flash, "ota_0", app_image(seed=1))
    put(flash, "ota_1", app_image("2.0.0", seed=2))
    assert otadata.boot(flash).label == "ota_0"
    assert otadata.set_boot(flash, flash.partition("ota_1")) == otadata.ESP_OK
    ota_1 = flash.partition("ota_1")
    assert flash.read(ota_1.offset + 700, 1) != b"\x00"
    flash.program(ota_1.offset + 700, b"\x00")  # bits cleared after the check
    assert otadata.boot(flash).label == "ota_0"  # the walk down from ota_1
    assert otadata.boot_partition(flash) == ota_1  # what otadata still names
    assert otadata.active_entry(flash) == otadata.Entry.for_seq(2, otadata.PENDING_VERIFY)
    assert otadata.boot(flash).label == "ota_0"
    assert otadata.active_entry(flash) == otadata.Entry.for_seq(1, otadata.VALID)


# ----- what a table without OTA slots answers -----


def test_a_build_without_ota_slots_answers_as_the_port(emulator):
    board = emulator.add_board()
    board.flash.create(GENERIC_LAYOUT)
    repl = start(board)
    assert repl.eval(RUNNING) == "factory"
    # esp_ota_get_boot_partition() is NULL without otadata, and so is the next update slot.
    repl.exec("try:\n    esp32.Partition(esp32.Partition.BOOT)\nexcept OSError as e:\n"
              "    boot_error = e.args\n")
    assert repl.eval("boot_error") == (2,)
    repl.exec("try:\n    esp32.Partition(esp32.Partition.RUNNING).get_next_update()\n"
              "except OSError as e:\n    next_error = e.args\n")
    assert repl.eval("next_error") == (2,)


def test_next_update_and_boot_partition_follow_esp_idf(flash):
    ota_0, ota_1 = flash.partition("ota_0"), flash.partition("ota_1")
    assert otadata.next_update_partition(flash, ota_0) == ota_1
    assert otadata.next_update_partition(flash, ota_1) == ota_0
    assert otadata.boot_partition(flash) == ota_0  # otadata erased, no factory app
    assert otadata.set_boot(flash, ota_1) == otadata.ESP_ERR_OTA_VALIDATE_FAILED  # blank slot
    put(flash, "ota_1", app_image(seed=5))
    assert otadata.set_boot(flash, ota_1) == otadata.ESP_OK
    assert otadata.boot_partition(flash) == ota_1
    # From nothing written, the entry goes to sector 0 with ota_1's first sequence number.
    assert otadata.read(flash, otadata.find(flash))[0] == otadata.Entry.for_seq(2, otadata.NEW)
    assert esp32_image.verify(flash.read, ota_1.offset, ota_1.size) is None


# ----- the block device, as the port's -----


def test_writeblocks_erases_whole_sectors_and_refuses_what_esp_partition_refuses(emulator):
    board = emulator.add_board()
    repl = start(board)
    repl.exec("s = esp32.Partition('ota_1')\n"
              "def err(f, *a):\n"
              "    try:\n"
              "        f(*a)\n"
              "    except OSError as e:\n"
              "        return e.args\n")
    # A simple write erases first, and esp_partition_erase_range takes whole sectors only.
    assert repl.eval("err(s.writeblocks, 0, bytes(100))") == (-0x104, "ESP_ERR_INVALID_SIZE")
    # Past the end of the partition.
    assert repl.eval("err(s.writeblocks, 384, bytes(4096))") == (-0x104, "ESP_ERR_INVALID_SIZE")
    assert repl.eval("err(s.readblocks, 385, bytearray(16))") == (-0x102, "ESP_ERR_INVALID_ARG")
    # An extended write does not erase: NOR flash ANDs the bytes into what is there.
    repl.exec("s.writeblocks(0, b'\\xf0' * 4096)\ns.writeblocks(0, b'\\x0f\\x3c', 8)\n"
              "b = bytearray(12)\ns.readblocks(0, b)")
    assert repl.eval("bytes(b)") == b"\xf0" * 8 + b"\x00\x30" + b"\xf0" * 2
    repl.exec("two = bytearray(2)\ns.readblocks(0, two, 8)")  # a read from an offset
    assert repl.eval("bytes(two)") == b"\x00\x30"
    assert repl.eval("(s.ioctl(6, 0), s.ioctl(4, 0), s.ioctl(5, 0), s.ioctl(42, 0))") == (
        0, 384, 4096, None)
    repl.exec("s.readblocks(0, b)")
    assert repl.eval("bytes(b)") == b"\xff" * 12
    # Blocks under 4 KiB: the rest of the sector is kept; ioctl cannot erase one.
    repl.exec("t = esp32.Partition('ota_1', 512)\ns.writeblocks(1, b'\\x11' * 4096)\n"
              "t.writeblocks(9, b'\\x22' * 512)\nc = bytearray(4096)\ns.readblocks(1, c)")
    assert repl.eval("bytes(c[:512]) == b'\\x11' * 512 and bytes(c[512:1024]) == "
                     "b'\\x22' * 512 and bytes(c[1024:]) == b'\\x11' * 3072")
    assert repl.eval("t.ioctl(6, 0)") == -22


# ----- flashing a board again -----


def test_a_board_flashed_again_boots_ota_0_whatever_otadata_said(emulator):
    # MicroPython's firmware.bin fills 0x9000-0x10000 with 0xFF (makeimg.py), so writing it at
    # 0x1000 erases otadata too: the bootloader then starts ota_0, the image just written, and
    # not the slot an earlier update left selected.
    board = emulator.add_board()
    put(board.flash, "ota_1", app_image("2.0.0", seed=2))
    part = otadata.find(board.flash)
    otadata.write(board.flash, part, 0, otadata.Entry.for_seq(1, otadata.VALID))
    otadata.write(board.flash, part, 1, otadata.Entry.for_seq(2, otadata.VALID))
    board.power_on(download=True)
    flash_image(board.tty_path, combined_image(app_size=0x2000, seed=8), modes=NO_RESET,
                use_stub=False, connect_attempts=1)
    assert otadata.read(board.flash, part) == [otadata.Entry(), otadata.Entry()]
    board.power_cut(restore=False)
    boot_with(board, HELPERS)
    assert board.running_app.label == "ota_0"
    assert connect(board.tty_path).eval(RUNNING) == "ota_0"
    assert otadata.read(board.flash, part)[0] == otadata.Entry.for_seq(1, otadata.VALID)
