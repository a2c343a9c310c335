"""The flash image of an emulated board: one file laid out like a 4 MB ESP32's SPI flash.

The layout is the one MicroPython's ESP32_GENERIC OTA build uses, so that esptool (download
mode), the OTA code and the firmware's filesystem all see the same bytes they would on a board.
"""

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

FLASH_SIZE = 4 * 1024 * 1024
SECTOR_SIZE = 4096  # the smallest erasable unit of SPI NOR flash
ERASED = 0xFF  # NOR flash reads 0xFF after an erase; programming can only clear bits

PARTITION_TABLE_OFFSET = 0x8000
PARTITION_TABLE_MAX = 0xC00  # ESP-IDF reserves 3 KiB for the table
_ENTRY = struct.Struct("<2sBBII16sI")
_ENTRY_MAGIC = b"\xaa\x50"
_MD5_MAGIC = b"\xeb\xeb"

TYPE_APP = 0x00
TYPE_DATA = 0x01


@dataclass(frozen=True)
class Partition:
    label: str
    type: int
    subtype: int
    offset: int
    size: int


# MicroPython's partitions-4MiB-ota.csv: two 1.5 MiB app slots and a littlefs "vfs" partition.
OTA_LAYOUT = (
    Partition("nvs", TYPE_DATA, 0x02, 0x9000, 0x4000),
    Partition("otadata", TYPE_DATA, 0x00, 0xD000, 0x2000),
    Partition("phy_init", TYPE_DATA, 0x01, 0xF000, 0x1000),
    Partition("ota_0", TYPE_APP, 0x10, 0x10000, 0x180000),
    Partition("ota_1", TYPE_APP, 0x11, 0x190000, 0x180000),
    Partition("vfs", TYPE_DATA, 0x81, 0x310000, 0xF0000),
)

# MicroPython's partitions-4MiB.csv (ESP32_GENERIC without OTA): one 1.9 MiB app, 2 MiB "vfs".
# A board flashed with that build's firmware.bin has this table instead.
GENERIC_LAYOUT = (
    Partition("nvs", TYPE_DATA, 0x02, 0x9000, 0x6000),
    Partition("phy_init", TYPE_DATA, 0x01, 0xF000, 0x1000),
    Partition("factory", TYPE_APP, 0x00, 0x10000, 0x1F0000),
    Partition("vfs", TYPE_DATA, 0x81, 0x200000, 0x200000),
)


def encode_partition_table(partitions: tuple[Partition, ...]) -> bytes:
    """The binary partition table as ESP-IDF's gen_esp32part writes it, MD5 entry included."""
    entries = b"".join(
        _ENTRY.pack(_ENTRY_MAGIC, p.type, p.subtype, p.offset, p.size, p.label.encode(), 0)
        for p in partitions
    )
    md5_entry = _MD5_MAGIC + b"\xff" * 14 + hashlib.md5(entries).digest()
    table = entries + md5_entry
    return table + b"\xff" * (PARTITION_TABLE_MAX - len(table))


def decode_partition_table(raw: bytes) -> tuple[Partition, ...]:
    """Read the partitions back from the table's bytes; refuse a table whose MD5 does not match."""
    partitions = []
    for start in range(0, len(raw) - _ENTRY.size + 1, _ENTRY.size):
        chunk = raw[start : start + _ENTRY.size]
        if chunk[:2] == _MD5_MAGIC:
            if hashlib.md5(raw[:start]).digest() != chunk[16:]:
                raise ValueError("partition table MD5 does not match its entries")
            break
        if chunk[:2] != _ENTRY_MAGIC:
            break
        _, ptype, subtype, offset, size, label, _flags = _ENTRY.unpack(chunk)
        partitions.append(
            Partition(label.rstrip(b"\x00").decode(), ptype, subtype, offset, size)
        )
    if not partitions:
        raise ValueError("no partition table at 0x8000")
    return tuple(partitions)


class FlashImage:
    """A board's flash, kept in one file so that it survives power cuts and process restarts."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def create(self, partitions: tuple[Partition, ...] = OTA_LAYOUT) -> None:
        """Lay out a blank (fully erased) flash with the partition table written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as f:
            f.write(bytes([ERASED]) * FLASH_SIZE)
            f.seek(PARTITION_TABLE_OFFSET)
            f.write(encode_partition_table(partitions))

    def exists(self) -> bool:
        return self.path.exists() and self.path.stat().st_size == FLASH_SIZE

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def erase(self, offset: int, length: int) -> None:
        """Erase every sector the range touches: a chip erases whole sectors, never less."""
        start = offset - offset % SECTOR_SIZE
        end = -(-(offset + length) // SECTOR_SIZE) * SECTOR_SIZE
        self._check_range(start, end - start)
        with open(self.path, "r+b") as f:
            f.seek(start)
            f.write(bytes([ERASED]) * (end - start))

    def program(self, offset: int, data: bytes) -> None:
        """Program bytes as NOR flash does: a bit can go from 1 to 0, never back without an
        erase, so data written over unerased flash comes out as the AND of old and new."""
        self._check_range(offset, len(data))
        with open(self.path, "r+b") as f:
            f.seek(offset)
            old = f.read(len(data))
            merged = (int.from_bytes(old, "little") & int.from_bytes(data, "little")).to_bytes(
                len(data), "little"
            )
            f.seek(offset)
            f.write(merged)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > FLASH_SIZE:
            raise ValueError(
                f"0x{offset:x}+0x{length:x} is outside the {FLASH_SIZE // 1024} KiB flash"
            )

    def partitions(self) -> tuple[Partition, ...]:
        return decode_partition_table(self.read(PARTITION_TABLE_OFFSET, PARTITION_TABLE_MAX))

    def partition(self, label: str) -> Partition:
        for p in self.partitions():
            if p.label == label:
                return p
        raise KeyError(f"no partition labelled {label!r} in {self.path}")
