"""The flash image of an emulated board: one file laid out like a 4 MB ESP32's SPI flash.

The layout is the one MicroPython's ESP32_GENERIC OTA build uses, so that esptool (download
mode), the OTA code and the firmware's filesystem all see the same bytes they would on a board.
"""

from pathlib import Path

from kinhbac.device import partitions

FLASH_SIZE = 4 * 1024 * 1024
SECTOR_SIZE = 4096  # the smallest erasable unit of SPI NOR flash
ERASED = 0xFF  # NOR flash reads 0xFF after an erase; programming can only clear bits

# The table's format is the technician tool's reader's (kinhbac.device.partitions): one codec,
# so the emulator cannot write a table the tool reads differently.
PARTITION_TABLE_OFFSET = partitions.TABLE_OFFSET
PARTITION_TABLE_MAX = partitions.TABLE_SIZE
TYPE_APP = partitions.TYPE_APP
TYPE_DATA = partitions.TYPE_DATA
Partition = partitions.Partition
encode_partition_table = partitions.encode
decode_partition_table = partitions.parse  # PartitionTableError (a ValueError) if refused


# MicroPython's partitions-4MiB-ota.csv: two 1.5 MiB app slots and a littlefs "vfs" partition.
# The tables live with the codec, where the fleet sizes releases against the same one.
OTA_LAYOUT = partitions.ESP32_GENERIC_OTA

# MicroPython's partitions-4MiB.csv (ESP32_GENERIC without OTA): one 1.9 MiB app, 2 MiB "vfs".
# A board flashed with that build's firmware.bin has this table instead.
GENERIC_LAYOUT = partitions.ESP32_GENERIC


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
