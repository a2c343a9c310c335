"""ESP-IDF's app-rollback bookkeeping in an emulated board's "otadata" partition.

The partition holds two `esp_ota_select_entry_t` (esp_flash_partitions.h), one at the start of
each of its two 4 KiB sectors: `<I20sII`, the OTA sequence number (slot = (seq - 1) % the number
of ota_N partitions), a label, the image state and the CRC-32 of the sequence number. The entry
in use is the valid one with the higher sequence number.

Three parts of ESP-IDF v5.2.2 (the version MicroPython v1.24.1 builds with) write it, and the
emulator plays them on the flash image:
- the second-stage bootloader at every chip reset (`boot`): bootloader_utility.c,
  `bootloader_utility_get_selected_boot_partition`, `bootloader_utility_load_boot_image` and
  `set_actual_ota_seq`, with CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE and
  CONFIG_BOOTLOADER_SKIP_VALIDATE_IN_DEEP_SLEEP, which MicroPython's
  ports/esp32/boards/sdkconfig.base:16-17 sets for every build;
- esp_ota_set_boot_partition() (`plan_set_boot`, `set_boot`), which
  `esp32.Partition.set_boot()` calls (ports/esp32/esp32_partition.c:248);
- esp_ota_mark_app_valid_cancel_rollback() (`mark_app_valid`), which
  `esp32.Partition.mark_app_valid_cancel_rollback()` calls (ports/esp32/esp32_partition.c:260):
  esp_ota_ops.c, `esp_ota_current_ota_is_workable(true)`.
`boot_partition` and `next_update_partition` read it as esp_ota_get_boot_partition() and
esp_ota_get_next_update_partition() do.

Every slot runs the same interpreter and the same filesystem on an emulated board; which slot
the bootloader started (`boot`'s answer, esp32.Partition.RUNNING) and the states it leaves are
what the firmware and a test read. Images are checked as the bootloader checks them
(esp32_image.verify).
"""

import struct
import zlib
from dataclasses import dataclass, replace

from kinhbac.emulator import esp32_image
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
ESP_ERR_INVALID_ARG = 0x102
ESP_ERR_NOT_FOUND = 0x105
ESP_ERR_OTA_VALIDATE_FAILED = 0x1503  # esp_ota_ops.h:31
# esp_err_to_name(), which the port's check_esp_err puts in the OSError (mphalport.c:93)
ERROR_NAMES = {ESP_FAIL: "ESP_FAIL", ESP_ERR_INVALID_ARG: "ESP_ERR_INVALID_ARG",
               ESP_ERR_NOT_FOUND: "ESP_ERR_NOT_FOUND",
               ESP_ERR_OTA_VALIDATE_FAILED: "ESP_ERR_OTA_VALIDATE_FAILED"}

_SUBTYPE_OTA_DATA = 0x00
_SUBTYPE_FACTORY = 0x00
_SUBTYPE_OTA_0 = 0x10
_SUBTYPE_OTA_MAX = 0x20  # ota_0..ota_15
_SUBTYPE_TEST = 0x20
# The bootloader's partition indices (bootloader_utility.h): the OTA slots are 0 and up.
FACTORY_INDEX = -1
TEST_APP_INDEX = -2
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
    """Erase entry `index`'s sector and program the entry, as every writer does."""
    erase_sector(flash, part, index)
    program_entry(flash, part, index, entry)


def erase_sector(flash: FlashImage, part: Partition, index: int) -> None:
    flash.erase(part.offset + index * SECTOR_SIZE, SECTOR_SIZE)


def program_entry(flash: FlashImage, part: Partition, index: int, entry: Entry) -> None:
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


def _apps(table: tuple[Partition, ...]) -> tuple[dict[int, Partition], Partition | None,
                                                  Partition | None]:
    """The bootloader's view of the table (bootloader_utility_load_partition_table): OTA apps by
    slot (its app_count is how many, gaps or not), the factory app, the test app."""
    ota: dict[int, Partition] = {}
    factory = test = None
    for p in table:
        if p.type != TYPE_APP:
            continue
        if p.subtype == _SUBTYPE_FACTORY:
            factory = p
        elif p.subtype == _SUBTYPE_TEST:
            test = p
        elif p.subtype & 0xF0 == _SUBTYPE_OTA_0:
            ota[p.subtype & 0x0F] = p
    return ota, factory, test


def verify_app(flash: FlashImage, part: Partition) -> str | None:
    """esp_image_verify() on a partition: None if its image verifies, else why not."""
    return esp32_image.verify(flash.read, part.offset, part.size)


def boot(flash: FlashImage, retained: Partition | None = None) -> Partition | None:
    """What the second-stage bootloader does at a chip reset: the app partition it starts (None
    for a flash without a partition table it can read), after writing otadata as it does.

    `retained` is the app the last full boot started, which the bootloader keeps in RTC memory:
    given on a wake from deep sleep, it is started again without a look at otadata or at the
    image (bootloader_utility_load_boot_image_from_deep_sleep, bootloader_utility.c:490-507;
    bootloader_start.c:41-47), so a deep sleep is no failed trial boot.

    A flash where no app slot holds an image that verifies (a blank emulated flash: the
    interpreter stands in for the app) starts the slot otadata selects, where a chip would
    reset for ever ("No bootable app partitions in the partition table")."""
    try:
        table = flash.partitions()
    except ValueError:
        return None
    if retained is not None and retained in table:
        return retained
    ota, factory, test = _apps(table)
    app_count = len(ota)
    part = find(flash)
    initial = False  # ota_has_initial_contents
    start = FACTORY_INDEX
    if part is not None:
        entries = read(flash, part)
        # bootloader_utility_get_selected_boot_partition (bootloader_utility.c:350-441)
        for k in (0, 1):
            if entries[k].state == PENDING_VERIFY:
                # A trial boot that ended before its image was marked valid: rolled back.
                entries[k] = replace(entries[k], state=ABORTED)
                write(flash, part, k, entries[k])
        if (entries[0].invalid and entries[1].invalid) or app_count == 0:
            if factory is None:
                start = 0
                initial = entries[0].initial and entries[1].initial
        else:
            k = active(entries)
            if k >= 0:
                start = (entries[k].seq - 1) % app_count
                if entries[k].state == NEW:
                    # An image's first boot after esp_ota_set_boot_partition(): on trial
                    # until marked valid.
                    write(flash, part, k, replace(entries[k], state=PENDING_VERIFY))
    # bootloader_utility_load_boot_image (bootloader_utility.c:510-562): from the selected
    # slot down to the factory app, then up through the OTA slots, then the test app; the
    # first whose image verifies is started.
    def at(index: int) -> Partition | None:
        if index == FACTORY_INDEX:
            return factory
        return ota.get(index) if 0 <= index < app_count else None

    order = [i for i in range(start, FACTORY_INDEX - 1, -1) if at(i)]
    order += [i for i in range(start + 1, app_count) if at(i)]
    candidates = [(i, at(i)) for i in order] + ([(TEST_APP_INDEX, test)] if test else [])
    chosen = next(((i, p) for i, p in candidates if p and verify_app(flash, p) is None),
                  candidates[0] if candidates else None)
    if chosen is None:
        return None
    index, started = chosen
    if part is not None and index > FACTORY_INDEX and initial:
        # set_actual_ota_seq (bootloader_utility.c:463-488): otadata nobody wrote (an image
        # esptool flashed) records the slot started, valid.
        write(flash, part, 0, Entry(seq=index + 1, state=VALID, crc=select_crc(index + 1)))
    return started


def boot_partition(flash: FlashImage) -> Partition | None:
    """esp_ota_get_boot_partition() (esp_ota_ops.c:525-552): the app otadata names for the next
    boot, without looking at its image; None without an otadata partition."""
    part = find(flash)
    if part is None:
        return None
    entries = read(flash, part)
    count, _ = _app_slots(flash)
    k = active(entries)
    if (entries[0].invalid and entries[1].invalid) or count == 0 or k < 0:
        return _default_boot_partition(flash)
    return _app(flash, _SUBTYPE_OTA_0 + (entries[k].seq - 1) % count)


def _default_boot_partition(flash: FlashImage) -> Partition | None:
    """find_default_boot_partition (esp_ota_ops.c:497-523): factory, else the lowest OTA slot,
    else the test app."""
    for subtype in (_SUBTYPE_FACTORY, *range(_SUBTYPE_OTA_0, _SUBTYPE_OTA_MAX), _SUBTYPE_TEST):
        found = _app(flash, subtype)
        if found is not None:
            return found
    return None


def _app(flash: FlashImage, subtype: int) -> Partition | None:
    """esp_partition_find_first(APP, subtype, NULL)."""
    return next((p for p in flash.partitions() if p.type == TYPE_APP and p.subtype == subtype),
                None)


def next_update_partition(flash: FlashImage, start: Partition) -> Partition | None:
    """esp_ota_get_next_update_partition(start) (esp_ota_ops.c:592-638): the OTA slot after
    `start` in slot order, else the first OTA slot (`start` the last one, or no OTA slot at
    all); None for a table without OTA slots."""
    first = None
    after_start = False
    for subtype in range(_SUBTYPE_OTA_0, _SUBTYPE_OTA_MAX):
        p = _app(flash, subtype)
        if p is None:
            continue
        if first is None:
            first = p
        if p == start:
            after_start = True
        elif after_start:
            return p
    return first


# One otadata rewrite: the sector's index and the entry programmed after its erase (None: the
# sector is only erased).
Write = tuple[int, Entry | None]


def plan_set_boot(flash: FlashImage, target: Partition) -> tuple[int, list[Write]]:
    """esp_ota_set_boot_partition(target) (esp_ota_ops.c:454-495): its esp_err_t and the
    otadata sectors it would rewrite, in order, without writing them."""
    if verify_app(flash, target) is not None:
        return ESP_ERR_OTA_VALIDATE_FAILED, []  # image_validate, before anything else
    if target.type != TYPE_APP:
        return ESP_ERR_INVALID_ARG, []
    part = find(flash)
    if part is None:
        return ESP_ERR_NOT_FOUND, []
    if target.subtype == _SUBTYPE_FACTORY:
        # Back to the factory app: otadata erased whole.
        return ESP_OK, [(k, None) for k in range(part.size // SECTOR_SIZE)]
    # esp_rewrite_ota_data (esp_ota_ops.c:407-452)
    count, _ = _app_slots(flash)
    slot = target.subtype & 0x0F  # SUB_TYPE_ID
    if slot >= count:
        return ESP_ERR_INVALID_ARG, []
    entries = read(flash, part)
    k = active(entries)
    if k >= 0:
        # The smallest sequence number at or above the active one that selects `slot`.
        seq = entries[k].seq
        i = 0
        while seq > (slot + 1) % count + i * count:
            i += 1
        new_seq, sector = ((slot + 1) % count + i * count) & 0xFFFFFFFF, 1 - k
    else:
        new_seq, sector = slot + 1, 0
    # The other sector's entry is rewritten whole: what it held (its label) and the new
    # sequence number, its CRC, and ESP_OTA_IMG_NEW (rollback is enabled: set_new_state_otadata)
    entry = replace(entries[sector], seq=new_seq, state=NEW, crc=select_crc(new_seq))
    return ESP_OK, [(sector, entry)]


def apply(flash: FlashImage, writes: list[Write]) -> None:
    """Erase each sector and program its entry (rewrite_ota_seq, esp_ota_ops.c:381-395)."""
    part = find(flash)
    for sector, entry in writes:
        assert part is not None
        erase_sector(flash, part, sector)
        if entry is not None:
            program_entry(flash, part, sector, entry)


def set_boot(flash: FlashImage, target: Partition) -> int:
    """esp_ota_set_boot_partition(target), written at once: its esp_err_t."""
    err, writes = plan_set_boot(flash, target)
    apply(flash, writes)
    return err


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
