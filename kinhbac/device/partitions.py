"""The ESP32's partition table, read from a MicroPython image or the board's flash, to find the
filesystem partition that `kinhbac device flash` erases.

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
