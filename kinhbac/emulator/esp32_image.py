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
"""

import hashlib
import random
import struct

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
    the app are synthetic images; the table is the one given, so a test can flash a layout."""
    app_offset = next(p.offset for p in partitions if p.type == TYPE_APP)
    image = bytearray(synthetic_image(bootloader_size, seed=seed))
    image += b"\xff" * (PARTITION_TABLE_OFFSET - BOOTLOADER_OFFSET - len(image))
    image += encode_partition_table(partitions)
    image += b"\xff" * (app_offset - BOOTLOADER_OFFSET - len(image))
    image += synthetic_image(app_size, seed=seed + 1)
    assert len(image) <= app_offset - BOOTLOADER_OFFSET + app_size
    return bytes(image)
