"""App rollback on the emulated boards: the otadata partition as ESP-IDF v5.2's bootloader and
esp_ota_mark_app_valid_cancel_rollback() leave it (kinhbac/emulator/otadata.py), and
esp32.Partition.mark_app_valid_cancel_rollback() answering as the port does."""

import pytest
from test_emulator import boot_with

from kinhbac.emulator import otadata
from kinhbac.emulator.flash import (
    GENERIC_LAYOUT,
    OTA_LAYOUT,
    TYPE_APP,
    TYPE_DATA,
    FlashImage,
    Partition,
)
from kinhbac.transport.serial_link import connect

# A table with a factory app beside the OTA slots (ESP-IDF's partitions_two_ota.csv).
FACTORY_AND_OTA = (
    Partition("nvs", TYPE_DATA, 0x02, 0x9000, 0x4000),
    Partition("otadata", TYPE_DATA, 0x00, 0xD000, 0x2000),
    Partition("phy_init", TYPE_DATA, 0x01, 0xF000, 0x1000),
    Partition("factory", TYPE_APP, 0x00, 0x10000, 0x100000),
    Partition("ota_0", TYPE_APP, 0x10, 0x110000, 0x100000),
    Partition("ota_1", TYPE_APP, 0x11, 0x210000, 0x100000),
)


@pytest.fixture
def flash(tmp_path):
    image = FlashImage(tmp_path / "flash.bin")
    image.create(OTA_LAYOUT)
    return image


def entries(flash):
    return otadata.read(flash, otadata.find(flash))


def updated(flash):
    """As esp_ota_set_boot_partition() leaves otadata after an update into ota_1."""
    part = otadata.find(flash)
    otadata.write(flash, part, 0, otadata.Entry.for_seq(1, otadata.VALID))
    otadata.write(flash, part, 1, otadata.Entry.for_seq(2, otadata.NEW))


def test_an_entrys_crc_is_the_one_esp_idfs_otatool_writes():
    # otatool.py: binascii.crc32(struct.pack('I', seq), 0xFFFFFFFF); ota_0's entry reads
    # 01 00 00 00 ... 9a 98 43 47 on a board.
    assert otadata.select_crc(1) == 0x4743989A
    assert otadata.Entry.for_seq(1, otadata.VALID).pack()[-4:] == bytes.fromhex("9a984347")


def test_an_image_esptool_flashed_boots_from_ota_0_already_valid(flash):
    otadata.boot(flash)  # otadata erased, no factory app: set_actual_ota_seq
    assert entries(flash) == [otadata.Entry.for_seq(1, otadata.VALID), otadata.Entry()]
    assert otadata.mark_app_valid(flash) == (otadata.ESP_OK, False)  # nothing to write


def test_a_new_image_is_on_trial_until_marked_valid_then_kept(flash):
    updated(flash)
    otadata.boot(flash)
    assert otadata.active_entry(flash) == otadata.Entry.for_seq(2, otadata.PENDING_VERIFY)
    assert otadata.mark_app_valid(flash) == (otadata.ESP_OK, True)
    assert otadata.active_entry(flash) == otadata.Entry.for_seq(2, otadata.VALID)
    otadata.boot(flash)
    assert otadata.active_entry(flash) == otadata.Entry.for_seq(2, otadata.VALID)
    assert otadata.mark_app_valid(flash) == (otadata.ESP_OK, False)  # every boot may call it


def test_a_new_image_reset_before_it_is_marked_is_rolled_back(flash):
    updated(flash)
    otadata.boot(flash)
    otadata.boot(flash)  # the trial boot ended without the call
    assert entries(flash)[1].state == otadata.ABORTED
    assert otadata.active_entry(flash) == otadata.Entry.for_seq(1, otadata.VALID)


def test_marking_without_an_otadata_partition_is_esp_err_not_found(tmp_path):
    image = FlashImage(tmp_path / "flash.bin")
    image.create(GENERIC_LAYOUT)
    otadata.boot(image)
    assert otadata.mark_app_valid(image) == (otadata.ESP_ERR_NOT_FOUND, False)


def test_marking_the_factory_app_is_esp_fail(tmp_path):
    image = FlashImage(tmp_path / "flash.bin")
    image.create(FACTORY_AND_OTA)
    otadata.boot(image)  # otadata erased: the bootloader starts the factory app, writes nothing
    assert entries(image) == [otadata.Entry(), otadata.Entry()]
    # "Running firmware is factory"
    assert otadata.mark_app_valid(image) == (otadata.ESP_FAIL, False)


def test_the_stand_in_answers_as_the_port_and_each_call_is_counted(emulator):
    ota = emulator.add_board()
    generic = emulator.add_board()
    generic.flash.create(GENERIC_LAYOUT)
    call = "esp32.Partition.mark_app_valid_cancel_rollback()"
    for board in (ota, generic):
        boot_with(board, "import esp32\n")
    assert connect(ota.tty_path).eval(call) is None
    # check_esp_err (ports/esp32/mphalport.c:64-104): OSError(-code, the code's name)
    repl = connect(generic.tty_path)
    repl.exec(f"try:\n    {call}\nexcept OSError as e:\n    caught = e.args\n")
    assert repl.eval("caught") == (-261, "ESP_ERR_NOT_FOUND")
    assert ota.app_valid_calls == [0] and generic.app_valid_calls == [0]
