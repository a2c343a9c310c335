"""The emulated board's flash image: ESP32 partition table and NOR flash semantics."""

import pytest

from kinhbac.device import partitions
from kinhbac.emulator.flash import (
    FLASH_SIZE,
    GENERIC_LAYOUT,
    OTA_LAYOUT,
    TYPE_APP,
    FlashImage,
    Partition,
    decode_partition_table,
    encode_partition_table,
)
from kinhbac.transport.serial_link import connect


def test_new_image_is_erased_and_carries_the_ota_partition_table(tmp_path):
    image = FlashImage(tmp_path / "flash.bin")
    image.create()
    assert image.path.stat().st_size == FLASH_SIZE
    assert image.partitions() == OTA_LAYOUT
    vfs = image.partition("vfs")
    assert (vfs.offset, vfs.size) == (0x310000, 0xF0000)
    assert image.partition("ota_0").size == image.partition("ota_1").size == 0x180000
    assert image.read(0, 16) == b"\xff" * 16  # no bootloader until one is flashed


def test_partition_table_bytes_follow_the_esp_idf_format():
    table = encode_partition_table(OTA_LAYOUT)
    first = table[:32]
    assert first[:2] == b"\xaa\x50"
    assert first[2:4] == b"\x01\x02"  # data, nvs
    assert int.from_bytes(first[4:8], "little") == 0x9000
    assert first[12:15] == b"nvs"
    md5_entry = table[32 * len(OTA_LAYOUT) : 32 * len(OTA_LAYOUT) + 32]
    assert md5_entry[:2] == b"\xeb\xeb"


def test_corrupted_partition_table_is_refused():
    table = bytearray(encode_partition_table(OTA_LAYOUT))
    table[40] ^= 0x01  # inside the second entry: its MD5 no longer matches
    with pytest.raises(ValueError, match="MD5"):
        decode_partition_table(bytes(table))


def test_board_finds_its_partitions_like_esp32_partition_does(board):
    board.power_on()
    board.console.wait_for(">>> ")
    repl = connect(board.tty_path)
    repl.exec("import esp32")
    vfs = repl.eval("esp32.Partition.find(esp32.Partition.TYPE_DATA, label='vfs')[0].info()")
    assert vfs[2:5] == (0x310000, 0xF0000, "vfs")
    apps = repl.eval("[p.info()[4] for p in esp32.Partition.find(esp32.Partition.TYPE_APP)]")
    assert apps == ["ota_0", "ota_1"]


def test_flash_programming_only_clears_bits_until_erased(board):
    board.power_on()
    board.console.wait_for(">>> ")
    repl = connect(board.tty_path)
    repl.exec("import esp32\np = esp32.Partition('nvs')\nbuf = bytearray(4)")
    repl.exec("p.ioctl(6, 0)\np.writeblocks(0, b'\\x0f\\xf0\\xff\\x00', 0)")
    repl.exec("p.writeblocks(0, b'\\xff\\xff\\x0f\\xff', 0)")  # without an erase in between
    repl.exec("p.readblocks(0, buf)")
    assert repl.eval("bytes(buf)") == b"\x0f\xf0\x0f\x00"
    repl.exec("p.ioctl(6, 0)\np.readblocks(0, buf)")
    assert repl.eval("bytes(buf)") == b"\xff\xff\xff\xff"
    nvs = board.flash.partition("nvs")
    assert board.flash.read(nvs.offset, 4) == b"\xff\xff\xff\xff"  # the image file itself


def test_first_boot_formats_the_filesystem_and_writes_boot_py(board):
    board.power_on()
    board.console.wait_for(">>> ")
    assert "Performing initial setup" in board.console.text()
    board.power_cut(restore=False)
    assert board.read_file("/boot.py").startswith(b"# This file is executed on every boot")


def test_the_technicians_tool_reads_the_table_the_emulator_writes():
    """kinhbac.device.partitions (the laptop's reader, which must not import the emulator; the
    emulated flash writes its tables with the same module) on the tables emulated boards
    carry: same partitions, same refusals."""
    table = encode_partition_table(GENERIC_LAYOUT)
    read = partitions.parse(table)
    assert [(p.label, p.type, p.subtype, p.offset, p.size) for p in read] == [
        (p.label, p.type, p.subtype, p.offset, p.size) for p in GENERIC_LAYOUT]
    assert partitions.filesystem(read).offset == 0x200000
    assert partitions.filesystem(partitions.parse(encode_partition_table(OTA_LAYOUT))).size \
        == 0xF0000
    # A table built without its MD5 entry (gen_esp32part --disable-md5sum) ends at 0xFF.
    without_md5 = table[: 32 * len(GENERIC_LAYOUT)] + b"\xff" * 32
    assert partitions.parse(without_md5) == read
    damaged = bytearray(table)
    damaged[40] ^= 0x01
    with pytest.raises(partitions.PartitionTableError, match="MD5"):
        partitions.parse(bytes(damaged))
    with pytest.raises(partitions.PartitionTableError, match="none"):
        partitions.parse(b"\xff" * 0xC00)
    # MicroPython's flashbdev.py: a data partition "vfs", else "ffat"; an app is never it.
    ffat = (Partition("vfs", TYPE_APP, 0x00, 0x10000, 0x100000),
            Partition("ffat", 0x01, 0x81, 0x200000, 0x100000))
    assert partitions.filesystem(partitions.parse(encode_partition_table(ffat))).label == "ffat"
    assert partitions.filesystem(partitions.parse(encode_partition_table(ffat[:1]))) is None
