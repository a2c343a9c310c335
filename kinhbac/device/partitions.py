"""The ESP32's partition table, read from a MicroPython image or the board's flash, to find the
filesystem partition that `kinhbac device flash` erases; and the tables of the MicroPython builds
the fleet's boards run, which the emulated flash lays out and the fleet sizes releases against.

ESP-IDF's binary format (components/partition_table/gen_esp32part.py): 32-byte entries
`<2sBBII16sI` (magic 0xAA 0x50, type, subtype, offset, size, label, flags) from 0x8000, then an
MD5 entry (0xEB 0xEB, 14 bytes 0xFF, the MD5 of the entries before it), then 0xFF to 0xC00.
"""

import hashlib
import struct
from dataclasses import dataclass

TABLE_OFFSET = 0x8000  # CONFIG_PARTITION_TABLE_OFFSET's default; MicroPython's makeimg.py too
TABLE_SIZE = 0xC00  # gen_esp32part's MAX_PARTITION_LENGTH
TYPE_APP = 0x00
TYPE_DATA = 0x01
# MicroPython's flashbdev.py (ports/esp32/modules/flashbdev.py:3-7): the filesystem is the data
# partition labelled "vfs", else TinyUF2's "ffat".
FILESYSTEM_LABELS = ("vfs", "ffat")

# App subtypes: factory is 0x00, ota_0..ota_15 are 0x10..0x1F (gen_esp32part.py SUBTYPES).
SUBTYPE_OTA_FIRST = 0x10
SUBTYPE_OTA_LAST = 0x1F

_ENTRY = struct.Struct("<2sBBII16sI")
_ENTRY_MAGIC = b"\xaa\x50"
_MD5_MAGIC = b"\xeb\xeb"


class PartitionTableError(ValueError):
    """No partition table, or one the ESP-IDF bootloader would refuse."""


@dataclass(frozen=True)
class Partition:
    label: str
    type: int
    subtype: int
    offset: int
    size: int


# MicroPython's ports/esp32/partitions-4MiB-ota.csv (ESP32_GENERIC-OTA): two 1.5 MiB app slots
# and a littlefs "vfs" partition. The emulated boards' flash has this table.
ESP32_GENERIC_OTA = (
    Partition("nvs", TYPE_DATA, 0x02, 0x9000, 0x4000),
    Partition("otadata", TYPE_DATA, 0x00, 0xD000, 0x2000),
    Partition("phy_init", TYPE_DATA, 0x01, 0xF000, 0x1000),
    Partition("ota_0", TYPE_APP, 0x10, 0x10000, 0x180000),
    Partition("ota_1", TYPE_APP, 0x11, 0x190000, 0x180000),
    Partition("vfs", TYPE_DATA, 0x81, 0x310000, 0xF0000),
)

# MicroPython's partitions-4MiB.csv (ESP32_GENERIC without OTA): one 1.9 MiB app, 2 MiB "vfs".
ESP32_GENERIC = (
    Partition("nvs", TYPE_DATA, 0x02, 0x9000, 0x6000),
    Partition("phy_init", TYPE_DATA, 0x01, 0xF000, 0x1000),
    Partition("factory", TYPE_APP, 0x00, 0x10000, 0x1F0000),
    Partition("vfs", TYPE_DATA, 0x81, 0x200000, 0x200000),
)


def encode(partitions: tuple[Partition, ...]) -> bytes:
    """The binary table as gen_esp32part writes it, MD5 entry included, padded to TABLE_SIZE
    (what the emulated boards' flash carries)."""
    entries = b"".join(
        _ENTRY.pack(_ENTRY_MAGIC, p.type, p.subtype, p.offset, p.size, p.label.encode(), 0)
        for p in partitions
    )
    table = entries + _MD5_MAGIC + b"\xff" * 14 + hashlib.md5(entries).digest()
    return table + b"\xff" * (TABLE_SIZE - len(table))


def parse(raw: bytes) -> tuple[Partition, ...]:
    """The partitions of a binary table; refuses an absent table or one whose MD5 is wrong."""
    found = []
    for start in range(0, len(raw) - _ENTRY.size + 1, _ENTRY.size):
        entry = raw[start : start + _ENTRY.size]
        if entry[:2] == _MD5_MAGIC:
            if hashlib.md5(raw[:start]).digest() != entry[16:]:
                raise PartitionTableError("its MD5 does not match its entries")
            break
        if entry[:2] != _ENTRY_MAGIC:
            break  # 0xFF: the end of a table built without the MD5 entry
        _, ptype, subtype, offset, size, label, _flags = _ENTRY.unpack(entry)
        found.append(Partition(label.split(b"\x00", 1)[0].decode(errors="replace"), ptype,
                               subtype, offset, size))
    if not found:
        raise PartitionTableError("there is none")
    return tuple(found)


def filesystem(partitions: tuple[Partition, ...]) -> Partition | None:
    """The partition MicroPython mounts at /, as its flashbdev.py picks it; None if none."""
    for label in FILESYSTEM_LABELS:
        for p in partitions:
            if p.type == TYPE_DATA and p.label == label:
                return p
    return None


def ota_slots(partitions: tuple[Partition, ...]) -> tuple[Partition, ...]:
    """The OTA app partitions (ota_0, ota_1, ...) an update can be written to; () for a table
    without OTA."""
    return tuple(p for p in partitions
                 if p.type == TYPE_APP and SUBTYPE_OTA_FIRST <= p.subtype <= SUBTYPE_OTA_LAST)
