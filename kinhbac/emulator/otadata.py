"""ESP-IDF's app-rollback bookkeeping in an emulated board's "otadata" partition.

The partition holds two `esp_ota_select_entry_t` (esp_flash_partitions.h), one at the start of
each of its two 4 KiB sectors: `<I20sII`, the OTA sequence number (slot = (seq - 1) % the number
of ota_N partitions), a label, the image state and the CRC-32 of the sequence number. The entry
in use is the valid one with the higher sequence number.

Two parts of ESP-IDF v5.2 write it, and the emulator plays both on the flash image:
- the second-stage bootloader at every chip reset (`boot`): bootloader_utility.c,
  `bootloader_utility_get_selected_boot_partition` and `set_actual_ota_seq`, with
  CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE, which MicroPython's ports/esp32/boards/sdkconfig.base
  sets for every build;
- esp_ota_mark_app_valid_cancel_rollback() (`mark_app_valid`), which
  `esp32.Partition.mark_app_valid_cancel_rollback()` calls (ports/esp32/esp32_partition.c:263):
  esp_ota_ops.c, `esp_ota_current_ota_is_workable(true)`.

Which app slot the bootloader picks changes nothing on an emulated board (every slot runs the
same interpreter and the same filesystem); the states it leaves are what a test reads.
"""

import struct
import zlib
from dataclasses import dataclass, replace

from kinhbac.emulator.flash import SECTOR_SIZE, TYPE_APP, TYPE_DATA, FlashImage, Partition

# esp_ota_img_states_t (esp_flash_partitions.h)
NEW = 0x0
PENDING_VERIFY = 0x1
VALID = 0x2
INVALID = 0x3
ABORTED = 0x4
UNDEFINED = 0xFFFFFFFF

# esp_err_t codes (esp_err.h) these calls return.
ESP_OK = 0
ESP_FAIL = -1
ESP_ERR_NOT_FOUND = 0x105
ERROR_NAMES = {ESP_FAIL: "ESP_FAIL", ESP_ERR_NOT_FOUND: "ESP_ERR_NOT_FOUND"}

_SUBTYPE_OTA_DATA = 0x00
_SUBTYPE_FACTORY = 0x00
_SUBTYPE_OTA_0 = 0x10
_ENTRY = struct.Struct("<I20sII")
_ERASED_SEQ = 0xFFFFFFFF


def select_crc(seq: int) -> int:
    """bootloader_common_ota_select_crc: esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4)."""
    return zlib.crc32(struct.pack("<I", seq), 0xFFFFFFFF)


@dataclass(frozen=True)
class Entry:
    """One esp_ota_select_entry_t."""

    seq: int = _ERASED_SEQ
    label: bytes = b"\xff" * 20
    state: int = UNDEFINED
    crc: int = 0xFFFFFFFF

    @classmethod
    def for_seq(cls, seq: int, state: int) -> "Entry":
        """An entry as ESP-IDF writes one: the label left erased, the CRC of `seq`."""
        return cls(seq=seq, state=state, crc=select_crc(seq))

    def pack(self) -> bytes:
        return _ENTRY.pack(self.seq, self.label, self.state, self.crc)

    @property
    def initial(self) -> bool:
        """Never written, or its CRC does not match (the bootloader's "initial contents")."""
        return self.seq == _ERASED_SEQ or self.crc != select_crc(self.seq)

    @property
    def invalid(self) -> bool:
        """bootloader_common_ota_select_invalid: not a slot to boot."""
        return self.seq == _ERASED_SEQ or self.state in (INVALID, ABORTED)

    @property
    def valid(self) -> bool:
        """bootloader_common_ota_select_valid."""
        return not self.invalid and self.crc == select_crc(self.seq)


def find(flash: FlashImage) -> Partition | None:
    """The otadata partition (data/ota), or None: a table without one (a non-OTA build), or a
    table the chip could not have booted with."""
    try:
        table = flash.partitions()
    except ValueError:
        return None
    return next((p for p in table if p.type == TYPE_DATA and p.subtype == _SUBTYPE_OTA_DATA),
                None)


def read(flash: FlashImage, part: Partition) -> list[Entry]:
    """The two entries, from the start of the partition's two sectors."""
    return [Entry(*_ENTRY.unpack(flash.read(part.offset + k * SECTOR_SIZE, _ENTRY.size)))
            for k in (0, 1)]


def write(flash: FlashImage, part: Partition, index: int, entry: Entry) -> None:
    """Erase entry `index`'s sector and program the entry, as both writers do."""
    flash.erase(part.offset + index * SECTOR_SIZE, SECTOR_SIZE)
    flash.program(part.offset + index * SECTOR_SIZE, entry.pack())


def active(entries: list[Entry]) -> int:
    """bootloader_common_get_active_otadata: the index of the entry in use, or -1."""
    valid = [k for k in (0, 1) if entries[k].valid]
    if len(valid) == 2:
        return 0 if entries[0].seq == max(entries[0].seq, entries[1].seq) else 1
    return valid[0] if valid else -1


def active_entry(flash: FlashImage) -> Entry | None:
    """The entry in use (its `state` tells whether the running image was kept), or None."""
    part = find(flash)
    if part is None:
        return None
    entries = read(flash, part)
    k = active(entries)
    return entries[k] if k >= 0 else None


def _app_slots(flash: FlashImage) -> tuple[int, bool]:
    """esp_ota_get_app_partition_count (ota_0, ota_1, ... without a gap), and a factory app."""
    apps = {p.subtype for p in flash.partitions() if p.type == TYPE_APP}
    count = 0
    while _SUBTYPE_OTA_0 + count in apps:
        count += 1
    return count, _SUBTYPE_FACTORY in apps


def boot(flash: FlashImage) -> None:
    """What the second-stage bootloader writes to otadata as it picks the app to start."""
    part = find(flash)
    if part is None:
        return  # boots the factory app; otadata untouched
    entries = read(flash, part)
    # A boot that ended before its image was marked valid: that image is rolled back.
    for k in (0, 1):
        if entries[k].state == PENDING_VERIFY:
            entries[k] = replace(entries[k], state=ABORTED)
            write(flash, part, k, entries[k])
    count, factory = _app_slots(flash)
    if (entries[0].invalid and entries[1].invalid) or count == 0:
        if not factory and entries[0].initial and entries[1].initial:
            # Booting ota_0 from an otadata nobody wrote (an image esptool flashed): ota_0 is
            # recorded as the slot in use, valid (set_actual_ota_seq).
            write(flash, part, 0, Entry.for_seq(1, VALID))
        return
    k = active(entries)
    if k >= 0 and entries[k].state == NEW:
        # An image's first boot after esp_ota_set_boot_partition(): on trial until marked valid.
        write(flash, part, k, replace(entries[k], state=PENDING_VERIFY))


def mark_app_valid(flash: FlashImage) -> tuple[int, bool]:
    """esp_ota_mark_app_valid_cancel_rollback(): its esp_err_t, and whether it rewrote a sector."""
    part = find(flash)
    if part is None:
        return ESP_ERR_NOT_FOUND, False
    entries = read(flash, part)
    k = active(entries)
    if k < 0 or _app_slots(flash)[0] == 0:
        return ESP_FAIL, False  # "Running firmware is factory"
    if entries[k].state == VALID:
        return ESP_OK, False
    write(flash, part, k, replace(entries[k], state=VALID))
    return ESP_OK, True
