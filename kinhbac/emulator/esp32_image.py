"""A synthetic ESP32 firmware image, for flashing emulated boards where no real image exists.

No MicroPython build for the ESP32 can be downloaded here, and the emulated chip runs no
Xtensa code anyway, so tests flash this instead: a well-formed ESP32 image (the format the
ROM and esptool read) shaped like a second-stage bootloader, which lives at 0x1000 on an ESP32.
`combined_image` puts one together with a partition table and an app as MicroPython's
firmware.bin is put together.

Layout (all little-endian):

    header           magic 0xE9, segment count, flash mode, flash size | frequency, entry point
    extended header  WP pin, SPI drive strengths, chip id, revision range, hash-appended flag
    segments         per segment: load address, length, then the bytes (length a multiple of 4)
    checksum         zero padding up to the last byte of a 16-byte line, then the XOR of every
                     segment byte, seeded with 0xEF
    SHA-256          of everything above, since the hash-appended flag is set

`app_image` builds an *app* in the same format (what `ota_0`/`ota_1` hold and what an image
release carries), and `verify` checks one on flash as ESP-IDF's esp_image_verify() does.
"""

import hashlib
import random
import struct
from collections.abc import Callable

from kinhbac.emulator.flash import (
    OTA_LAYOUT,
    PARTITION_TABLE_OFFSET,
    TYPE_APP,
    Partition,
    encode_partition_table,
)

IMAGE_MAGIC = 0xE9
CHECKSUM_SEED = 0xEF  # the ROM's checksum starts from this, not from 0
WP_PIN_DISABLED = 0xEE  # tells the ROM not to remap the flash's write-protect pin
CHIP_ID_ESP32 = 0
FLASH_MODE_DIO = 2
FLASH_4MB_40MHZ = 0x20  # size in the high nibble (0x2 = 4 MB), frequency in the low (0 = 40 MHz)
MAX_REV_FULL = 399  # any ESP32 up to v3.99, as ESP-IDF's default build allows

# RAM load addresses of the ESP32's second-stage bootloader: a bootloader runs from RAM, so it
# needs none of the 64 KiB flash-mapping alignment an app's IROM/DROM segments do.
DRAM_LOAD = 0x3FFF0000
IRAM_LOAD = 0x40080400

_HEADER = struct.Struct("<BBBBI")
_EXTENDED_HEADER = struct.Struct("<BBBBHBHH4sB")
_SEGMENT_HEADER = struct.Struct("<II")
# ESP-IDF's esp_bootloader_desc_t at the start of the DRAM segment; esptool image-info prints
# it, so a synthetic image names itself as one.
_BOOTLOADER_DESC = struct.Struct("<B3sI32s24s16s")
BOOTLOADER_DESC_MAGIC = 0x50

_SHA256_LEN = 32
_FIXED_BYTES = (
    _HEADER.size + _EXTENDED_HEADER.size + 2 * _SEGMENT_HEADER.size + 16 + _SHA256_LEN
)  # 16: the padding and checksum line, full when the segments end on a 16-byte boundary
MIN_SIZE = 256
MAX_SIZE = 0x7000  # 0x1000 + 0x7000 is the partition table at 0x8000: a bootloader stops there

# Segment bytes come from a few values only, so that zlib halves them (esptool's compressed
# write then really compresses), and include SLIP's 0xC0 and 0xDB so that every write
# exercises the framing's escapes.
_ALPHABET = bytes([0x00, 0x55, 0xC0, 0xDB, 0xDC, 0xDD, 0x12, 0xFF])


def synthetic_image(size: int = 16384, *, seed: int = 0) -> bytes:
    """A valid ESP32 bootloader-shaped image of exactly `size` bytes; the seed picks its bytes."""
    if size % 16 or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(
            f"size must be a multiple of 16 from {MIN_SIZE} to {MAX_SIZE:#x} bytes, not {size}"
        )
    rng = random.Random(seed)
    payload = size - _FIXED_BYTES
    dram_len = (payload // 4) & ~3
    description = _BOOTLOADER_DESC.pack(
        BOOTLOADER_DESC_MAGIC,
        b"\x00" * 3,
        seed & 0xFFFFFFFF,
        b"kinhbac synthetic image",
        b"generated, not compiled",
        b"\x00" * 16,
    )
    dram = description + bytes(rng.choices(_ALPHABET, k=dram_len - len(description)))
    iram = bytes(rng.choices(_ALPHABET, k=payload - dram_len))
    segments = ((DRAM_LOAD, dram), (IRAM_LOAD, iram))

    entry_point = IRAM_LOAD
    image = bytearray(
        _HEADER.pack(IMAGE_MAGIC, len(segments), FLASH_MODE_DIO, FLASH_4MB_40MHZ, entry_point)
    )
    image += _EXTENDED_HEADER.pack(
        WP_PIN_DISABLED, 0, 0, 0, CHIP_ID_ESP32, 0, 0, MAX_REV_FULL, b"\x00" * 4, 1
    )
    checksum = CHECKSUM_SEED
    for address, data in segments:
        image += _SEGMENT_HEADER.pack(address, len(data)) + data
        for byte in data:
            checksum ^= byte
    image += b"\x00" * (15 - len(image) % 16)
    image.append(checksum)
    image += hashlib.sha256(image).digest()
    assert len(image) == size, (len(image), size)
    return bytes(image)


BOOTLOADER_OFFSET = 0x1000  # where an ESP32's ROM loads the second-stage bootloader from


def combined_image(partitions: tuple[Partition, ...] = OTA_LAYOUT, *,
                   bootloader_size: int = 0x2000, app_size: int = 0x2000, seed: int = 0) -> bytes:
    """A whole-flash image laid out as MicroPython's makeimg.py lays out firmware.bin, to be
    written at 0x1000: a bootloader, the partition table at 0x8000 and an app at the first app
    partition, the gaps filled with 0xFF (ports/esp32/makeimg.py, v1.24.1). The bootloader and
    the app are synthetic images (`synthetic_image`, `app_image`); the table is the one
    given, so a test can flash a layout."""
    app_offset = next(p.offset for p in partitions if p.type == TYPE_APP)
    image = bytearray(synthetic_image(bootloader_size, seed=seed))
    image += b"\xff" * (PARTITION_TABLE_OFFSET - BOOTLOADER_OFFSET - len(image))
    image += encode_partition_table(partitions)
    image += b"\xff" * (app_offset - BOOTLOADER_OFFSET - len(image))
    image += app_image(size=app_size, seed=seed + 1)
    assert len(image) <= app_offset - BOOTLOADER_OFFSET + app_size
    return bytes(image)


# ----- apps -----
# An app image as ESP-IDF v5.2's build makes one (esp_app_format.h, esp_app_desc.h; MicroPython
# v1.24.1 builds with ESP-IDF v5.2.2): the flash-mapped DROM segment first, starting with the
# 256-byte esp_app_desc_t, then RAM segments, then the flash-mapped IROM (code) segment.
# Mapped segments must sit at a flash offset congruent to their address modulo the 64 KiB MMU
# page (esp_image_format.c, verify_segment_header); app partitions start on 64 KiB boundaries,
# so an app built for one slot verifies in every slot.

APP_DESC_MAGIC = 0xABCD5432  # ESP_APP_DESC_MAGIC_WORD (esp_app_desc.h:21)
_APP_DESC = struct.Struct("<II8s32s32s16s16s32s32s80s")  # esp_app_desc_t, 256 bytes
APP_VERSION_MAX = 31  # char version[32], NUL-terminated (esp_app_desc.c's static assert)
# soc/esp32/include/soc/soc.h: the flash-mapped ranges (should_map) and the app's RAM.
DROM_LOW, DROM_HIGH = 0x3F400000, 0x3F800000
IROM_LOW, IROM_HIGH = 0x400D0000, 0x40400000
APP_DRAM_LOAD = 0x3FFB0000  # dram0_0_seg of the app's linker script, clear of the bootloader
APP_IRAM_LOAD = 0x40080000  # SOC_IRAM_LOW
MMU_PAGE = 0x10000
MAX_SEGMENTS = 16  # ESP_IMAGE_MAX_SEGMENTS
_SIXTEEN_MB = 0x1000000
# The emulated chip is an ESP32-D0WD-V3 (rom_loader.py's eFuses): revision v3.0.
CHIP_REVISION = 300
_APP_MIN_SIZE = 1024
_APP_FIXED = _HEADER.size + _EXTENDED_HEADER.size + 4 * _SEGMENT_HEADER.size + 16 + _SHA256_LEN


def app_image(version: str = "", *, size: int = 16384, seed: int = 0,
              project_name: str = "", idf_ver: str = "v5.2.2") -> bytes:
    """A valid ESP32 app image of exactly `size` bytes whose esp_app_desc_t carries `version`.

    MicroPython's own builds leave `version` and `project_name` empty
    (CONFIG_APP_EXCLUDE_PROJECT_VER_VAR and _NAME_VAR in ports/esp32/boards/sdkconfig.base),
    which is the default here; a test that wants to tell images apart gives a version."""
    if size % 16 or size < _APP_MIN_SIZE:
        raise ValueError(f"an app image's size must be a multiple of 16 and at least "
                         f"{_APP_MIN_SIZE} bytes, not {size}")
    for name, text, limit in (("version", version, APP_VERSION_MAX),
                              ("project_name", project_name, 31), ("idf_ver", idf_ver, 31)):
        if len(text.encode()) > limit:
            raise ValueError(f"{name} {text!r} is longer than esp_app_desc_t's {limit} bytes")
    rng = random.Random(seed)
    description = _APP_DESC.pack(
        APP_DESC_MAGIC, 0, b"\x00" * 8, version.encode(), project_name.encode(),
        b"", b"", idf_ver.encode(), hashlib.sha256(b"elf %d" % seed).digest(), b"\x00" * 80,
    )
    payload = size - _APP_FIXED
    quarter = (payload // 4) & ~3
    lengths = [max(quarter, len(description)), quarter, quarter]
    lengths.append(payload - sum(lengths))
    if lengths[-1] < 4:
        raise ValueError(f"{size} bytes is too small for an app image's four segments")
    # The entry point is call_start_cpu0, in IRAM on a chip; nothing runs it here.
    image = bytearray(
        _HEADER.pack(IMAGE_MAGIC, 4, FLASH_MODE_DIO, FLASH_4MB_40MHZ, APP_IRAM_LOAD)
    )
    image += _EXTENDED_HEADER.pack(
        WP_PIN_DISABLED, 0, 0, 0, CHIP_ID_ESP32, 0, 0, MAX_REV_FULL, b"\x00" * 4, 1
    )
    checksum = CHECKSUM_SEED
    for k, length in enumerate(lengths):
        data_offset = len(image) + _SEGMENT_HEADER.size
        if k == 0:  # DROM: the description, then read-only data
            address = DROM_LOW + data_offset % MMU_PAGE
            data = description + bytes(rng.choices(_ALPHABET, k=length - len(description)))
        elif k == 3:  # IROM: code, mapped like DROM
            address = IROM_LOW + data_offset % MMU_PAGE
            data = bytes(rng.choices(_ALPHABET, k=length))
        else:
            address = APP_DRAM_LOAD if k == 1 else APP_IRAM_LOAD
            data = bytes(rng.choices(_ALPHABET, k=length))
        image += _SEGMENT_HEADER.pack(address, len(data)) + data
        checksum ^= _xor(data)
    image += b"\x00" * (15 - len(image) % 16)
    image.append(checksum)
    image += hashlib.sha256(image).digest()
    assert len(image) == size, (len(image), size)
    return bytes(image)


def app_version(image: bytes) -> str | None:
    """The version in an app image's esp_app_desc_t (first segment), or None without one."""
    start = _HEADER.size + _EXTENDED_HEADER.size + _SEGMENT_HEADER.size
    if len(image) < start + _APP_DESC.size or image[0] != IMAGE_MAGIC:
        return None
    fields = _APP_DESC.unpack_from(image, start)
    if fields[0] != APP_DESC_MAGIC:
        return None
    return fields[3].split(b"\x00", 1)[0].decode("utf-8", "replace")


def _xor(data: bytes) -> int:
    """The XOR of every byte (the image checksum's fold of its 32-bit word XOR, same value)."""
    n = len(data)
    if n == 0:
        return 0
    width = 1 << (n - 1).bit_length()  # zero bytes change no XOR: fold halves of a power of 2
    value = int.from_bytes(data, "little")
    while width > 1:
        width //= 2
        value = (value >> (8 * width)) ^ (value & ((1 << (8 * width)) - 1))
    return value


def verify(read: Callable[[int, int], bytes], offset: int, size: int,
           chip_revision: int = CHIP_REVISION) -> str | None:
    """Check the app image at `offset` in a partition of `size` bytes as esp_image_verify()
    (ESP_IMAGE_VERIFY) does, reading flash through `read(address, length)`: None when it
    verifies, else the reason, in the words ESP-IDF logs it with.

    The checks and their order are image_load()'s (components/bootloader_support/src/
    esp_image_format.c, v5.2.2): header (magic, chip id and revision range, at most 16
    segments), each segment header (length a multiple of 4 under 16 MB; a flash-mapped
    segment congruent to its address modulo 64 KiB), the checksum byte at the end of the
    16-byte line, the image's length within the partition, then the appended SHA-256 when
    the header's hash_appended byte says so. The bootloader's further check that RAM segments
    do not overlap its own memory (verify_load_addresses) is not made."""
    header = read(offset, _HEADER.size + _EXTENDED_HEADER.size)
    magic, count = header[0], header[1]
    ext = _EXTENDED_HEADER.unpack_from(header, _HEADER.size)
    chip_id, min_rev_full, max_rev_full, hash_appended = ext[4], ext[6], ext[7], ext[9]
    if magic != IMAGE_MAGIC:
        return f"image at {offset:#x} has invalid magic byte (nothing flashed here?)"
    if chip_id != CHIP_ID_ESP32:
        return f"mismatch chip ID, expected {CHIP_ID_ESP32}, found {chip_id}"
    if min_rev_full > chip_revision:
        return f"Image requires chip rev >= v{min_rev_full // 100}.{min_rev_full % 100}"
    if max_rev_full not in (0, 0xFFFF) and chip_revision > max_rev_full:
        return f"Image requires chip rev <= v{max_rev_full // 100}.{max_rev_full % 100}"
    if count > MAX_SEGMENTS:
        return f"image at {offset:#x} segment count {count} exceeds max {MAX_SEGMENTS}"
    sha = hashlib.sha256(header) if hash_appended else None
    checksum = CHECKSUM_SEED
    address = offset + len(header)
    flash_end = offset + size  # reading on would read other partitions; past them, nothing
    for index in range(count):
        if address + _SEGMENT_HEADER.size > flash_end:
            return f"segment {index} header at {address:#x} is past the partition"
        segment = read(address, _SEGMENT_HEADER.size)
        load, length = _SEGMENT_HEADER.unpack(segment)
        data_address = address + _SEGMENT_HEADER.size
        if length & 3 or length >= _SIXTEEN_MB:
            return f"invalid segment length {length:#x}"
        mapped = DROM_LOW <= load < DROM_HIGH or IROM_LOW <= load < IROM_HIGH
        if mapped and data_address % MMU_PAGE != load % MMU_PAGE:
            return (f"Segment {index} load address {load:#010x}, doesn't match data "
                    f"{data_address:#010x}")
        if data_address + length > flash_end:
            return f"segment {index} runs past the partition"
        data = read(data_address, length)
        checksum ^= _xor(data)
        if sha is not None:
            sha.update(segment)
            sha.update(data)
        address = data_address + length
    image_len = address - offset
    padded = ((image_len + 1 + 15) & ~15) - image_len
    if address + padded > flash_end:
        return f"Image length {image_len + padded} doesn't fit in partition length {size}"
    line = read(address, padded)
    if line[-1] != checksum:
        return f"Checksum failed. Calculated {checksum:#x} read {line[-1]:#x}"
    image_len += padded
    digest = b""
    if hash_appended:
        digest = read(offset + image_len, _SHA256_LEN)
        image_len += _SHA256_LEN
    if image_len > size:
        return f"Image length {image_len} doesn't fit in partition length {size}"
    if sha is not None:
        sha.update(line)
        if sha.digest() != digest:
            return "Image hash failed - image is corrupt"
    return None
