"""The ESP32 ROM's serial bootloader (download mode): enough of it that esptool flashes a board.

An ESP32 powered on with GPIO0 held low stays in its mask ROM and speaks a small command
protocol on UART0 instead of booting from flash. This module plays that ROM for an emulated
board: bytes from the board's serial port go to `RomLoader.feed`, replies go back through the
`send` callback, and flash writes land in the board's flash image with NOR semantics.

The protocol (esptool's docs, advanced-topics/serial-protocol, and esptool/loader.py):
SLIP frames; a request is `<BBHI` (0x00, opcode, data length, checksum) then data; a reply is
`<BBHI` (0x01, opcode, data length, value) then data ending in four status bytes (status,
error, two reserved), the ESP32 ROM's width. Only what esptool's `--no-stub` path uses is here:
the flasher stub cannot run, since the emulated chip executes no Xtensa code.
"""

import hashlib
import struct
import zlib
from collections.abc import Callable

from kinhbac.emulator.flash import FLASH_SIZE, FlashImage

SLIP_END = 0xC0
SLIP_ESC = 0xDB
SLIP_ESC_END = 0xDC
SLIP_ESC_ESC = 0xDD

FLASH_BEGIN = 0x02
FLASH_DATA = 0x03
FLASH_END = 0x04
SYNC = 0x08
WRITE_REG = 0x09
READ_REG = 0x0A
SPI_SET_PARAMS = 0x0B
SPI_ATTACH = 0x0D
READ_FLASH_SLOW = 0x0E
CHANGE_BAUDRATE = 0x0F
FLASH_DEFL_BEGIN = 0x10
FLASH_DEFL_DATA = 0x11
FLASH_DEFL_END = 0x12
SPI_FLASH_MD5 = 0x13
GET_SECURITY_INFO = 0x14

# The ROM's error codes (second status byte).
ERR_INVALID_MESSAGE = 0x05  # also the ESP32 ROM's answer to a command it does not have
ERR_FAILED_TO_ACT = 0x06
ERR_BAD_CHECKSUM = 0x07
ERR_DEFLATE = 0x0B

SYNC_PAYLOAD = b"\x07\x07\x12\x20" + b"\x55" * 32
SYNC_REPLIES = 8  # the ROM answers one SYNC eight times; esptool reads them all
# Any non-zero value will do: esptool takes a zero SYNC value to mean its flasher stub answered.
SYNC_VALUE = 1
CHECKSUM_SEED = 0xEF
READ_FLASH_SLOW_BLOCK = 64  # the ROM's largest read; it always replies with 64 bytes
MAX_FRAME = 0x10000 + 8  # the length field is 16 bits

ROM_FAULTS = frozenset({"no_sync", "corrupt_write"})

# Registers esptool reads, at the ESP32's addresses (esptool/targets/esp32.py).
CHIP_DETECT_MAGIC_ADDR = 0x40001000
ESP32_MAGIC = 0x00F01D83
EFUSE_BLK0_BASE = 0x3FF5A000
APB_CTL_DATE_ADDR = 0x3FF6607C
UART0_CLKDIV_ADDR = 0x3FF40014
GPIO_STRAP_ADDR = 0x3FF44038

# The eFuse words of an ESP32-D0WD-V3. The chip revision is spread over three bits: word 3
# bit 15, word 5 bit 20 and APB_CTL_DATE bit 31, all set on a v3; the package (D0WD = 1) sits
# in word 3 bits 9-11. Everything else reads 0: dual core, BT, no flash encryption, no
# secure boot, coding scheme none.
EFUSE_WORD3 = (1 << 15) | (1 << 9)
EFUSE_WORD5 = 1 << 20
APB_CTL_DATE_V3 = 1 << 31
XTAL_HZ = 40_000_000
ROM_BAUD = 115_200  # esptool always syncs at this rate or below; a pty has no real rate
STRAP_DOWNLOAD_BOOT = 0x03  # GPIO0 low: "boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))"

# SPI0, the controller wired to the flash: esptool runs raw flash commands through its user
# command registers to read the flash's JEDEC id whatever --flash-size says.
SPI0_BASE = 0x3FF42000
SPI_CMD = SPI0_BASE + 0x00
SPI_ADDR = SPI0_BASE + 0x04
SPI_USER = SPI0_BASE + 0x1C
SPI_USER1 = SPI0_BASE + 0x20
SPI_USER2 = SPI0_BASE + 0x24
SPI_MISO_DLEN = SPI0_BASE + 0x2C
SPI_W0 = SPI0_BASE + 0x80
SPI_CMD_USR = 1 << 18  # set to start a user command; the hardware clears it when done
SPI_USR_MISO = 1 << 28
SPI_USR_ADDR_LEN_SHIFT = 26

FLASH_CMD_RDID = 0x9F
FLASH_CMD_RDSFDP = 0x5A
# A Winbond W25Q32 (4 MB): RDID shifts out manufacturer 0xEF, memory type 0x40, capacity 0x16.
FLASH_JEDEC_ID = bytes([0xEF, 0x40, 0x16])
# The start of its SFDP table (JESD216): the signature, revision 1.6, one parameter header.
FLASH_SFDP = b"SFDP" + bytes.fromhex("060100ff00060110800000ff")

_UNESCAPE = {SLIP_ESC_END: SLIP_END, SLIP_ESC_ESC: SLIP_ESC}
_REQUEST = struct.Struct("<BBHI")
_REPLY = struct.Struct("<BBHI")
_BLOCK_HEADER = struct.Struct("<IIII")


class RomError(Exception):
    """A command the ROM refuses; `code` goes back to the host as the error status byte."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def efuse_words(mac: bytes) -> dict[int, int]:
    """The eFuse read registers holding the MAC and chip revision, by address."""
    # esptool reads words 2 and 1 as one big-endian 64-bit string and keeps bytes 2..7: the top
    # of word 2 is the MAC's CRC byte (left 0 here: esptool does not check it), the rest the MAC.
    words = {
        1: int.from_bytes(mac[2:6], "big"),
        2: int.from_bytes(mac[0:2], "big"),
        3: EFUSE_WORD3,
        5: EFUSE_WORD5,
    }
    return {EFUSE_BLK0_BASE + 4 * n: value for n, value in words.items()}


class RomLoader:
    """One session of the ESP32's download mode: SLIP frames in, replies out through `send`."""

    def __init__(
        self,
        *,
        flash: FlashImage,
        mac: bytes,
        send: Callable[[bytes], None],
        on_exit: Callable[[bool], None],
        faults: frozenset[str] = frozenset(),
    ) -> None:
        unknown = faults - ROM_FAULTS
        if unknown:
            raise ValueError(f"unknown ROM faults {sorted(unknown)}; known: {sorted(ROM_FAULTS)}")
        self.flash = flash
        self.faults = faults
        self._send = send
        self._on_exit = on_exit  # FLASH_END: True to reboot, False to run the code in flash
        self._frame = bytearray()
        self._in_frame = False
        self._escaped = False
        self.registers: dict[int, int] = {
            CHIP_DETECT_MAGIC_ADDR: ESP32_MAGIC,
            APB_CTL_DATE_ADDR: APB_CTL_DATE_V3,
            UART0_CLKDIV_ADDR: round(XTAL_HZ / ROM_BAUD),
            GPIO_STRAP_ADDR: STRAP_DOWNLOAD_BOOT,
            **efuse_words(mac),
        }
        # The write in progress since the last FLASH_BEGIN or FLASH_DEFL_BEGIN.
        self._writing = False
        self._write_offset = 0
        self._block_size = 0
        self._next_seq = 0
        self._written = 0
        self._inflate: Callable[[bytes], bytes] | None = None  # set for a compressed write
        self._corrupt_next_block = False
        self._handlers: dict[int, Callable[[bytes, int], tuple[int, bytes]]] = {
            READ_REG: self._read_reg,
            WRITE_REG: self._write_reg,
            SPI_ATTACH: self._accept,
            SPI_SET_PARAMS: self._accept,
            CHANGE_BAUDRATE: self._accept,  # a pty carries any rate
            FLASH_BEGIN: self._flash_begin,
            FLASH_DATA: self._flash_data,
            FLASH_DEFL_BEGIN: self._flash_defl_begin,
            FLASH_DEFL_DATA: self._flash_defl_data,
            SPI_FLASH_MD5: self._flash_md5,
            READ_FLASH_SLOW: self._read_flash_slow,
        }

    def feed(self, data: bytes) -> None:
        """Bytes from the host; whole frames are answered at once, in order, as the ROM does."""
        if "no_sync" in self.faults:
            return  # as a chip that is not in download mode: nothing here answers
        for byte in data:
            if byte == SLIP_END:
                if self._frame:
                    self._handle(bytes(self._frame))
                self._frame.clear()
                self._in_frame = True  # an END also opens the next frame
                self._escaped = False
            elif not self._in_frame:
                continue  # noise between frames
            elif self._escaped:
                self._escaped = False
                self._frame.append(_UNESCAPE.get(byte, byte))
            elif byte == SLIP_ESC:
                self._escaped = True
            elif len(self._frame) < MAX_FRAME:
                self._frame.append(byte)
            else:
                self._frame.clear()  # longer than any request: noise, wait for the next END
                self._in_frame = False

    # ----- framing -----

    def _handle(self, frame: bytes) -> None:
        if len(frame) < _REQUEST.size or frame[0] != 0x00:
            return  # not a request: the ROM ignores it
        _, op, length, checksum = _REQUEST.unpack_from(frame)
        data = frame[_REQUEST.size :]
        if op == SYNC:
            if data == SYNC_PAYLOAD:
                for _ in range(SYNC_REPLIES):
                    self._reply(op, SYNC_VALUE)
            return
        if op in (FLASH_END, FLASH_DEFL_END):
            self._reply(op)
            self._on_exit(len(data) >= 4 and struct.unpack_from("<I", data)[0] == 0)
            return
        handler = self._handlers.get(op)
        try:
            if length != len(data):
                raise RomError(ERR_INVALID_MESSAGE, "length field does not match the data")
            if handler is None:  # GET_SECURITY_INFO among them: the ESP32 ROM predates it
                raise RomError(ERR_INVALID_MESSAGE, f"no command {op:#04x} in this ROM")
            value, payload = handler(data, checksum)
        except RomError as exc:
            self._reply(op, error=exc.code)
        except (struct.error, ValueError):
            self._reply(op, error=ERR_INVALID_MESSAGE)
        else:
            self._reply(op, value, payload)

    def _reply(self, op: int, value: int = 0, payload: bytes = b"", error: int = 0) -> None:
        status = bytes([1 if error else 0, error, 0, 0])
        body = _REPLY.pack(0x01, op, len(payload) + len(status), value) + payload + status
        escaped = body.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")
        self._send(b"\xc0" + escaped + b"\xc0")

    # ----- registers -----

    def _read_reg(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        (address,) = struct.unpack("<I", data)
        return self.registers.get(address, 0), b""

    def _write_reg(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        # Several (address, value, mask, delay) writes may come in one command.
        for address, value, mask, _delay_us in struct.iter_unpack("<IIII", data):
            old = self.registers.get(address, 0)
            self.registers[address] = (old & ~mask) | (value & mask)
            if address == SPI_CMD and value & mask & SPI_CMD_USR:
                self._run_spi_command()
        return 0, b""

    def _run_spi_command(self) -> None:
        """Run the flash command set up in SPI0's user registers; it completes at once."""
        command = self.registers.get(SPI_USER2, 0) & 0xFF
        address_bits = min(32, (self.registers.get(SPI_USER1, 0) >> SPI_USR_ADDR_LEN_SHIFT) + 1)
        address = self.registers.get(SPI_ADDR, 0) >> (32 - address_bits)
        if command == FLASH_CMD_RDID:
            answer = FLASH_JEDEC_ID
        elif command == FLASH_CMD_RDSFDP:
            answer = FLASH_SFDP[address : address + 4]
        else:
            answer = b""  # status registers and resets: 0 means idle and not write-protected
        fill = b"\xff" if command == FLASH_CMD_RDSFDP else b"\x00"
        word = int.from_bytes(answer.ljust(4, fill)[:4], "little")
        if self.registers.get(SPI_USER, 0) & SPI_USR_MISO:
            miso_bits = (self.registers.get(SPI_MISO_DLEN, 0) & 0xFFFFFF) + 1
            word &= (1 << min(miso_bits, 32)) - 1
        self.registers[SPI_W0] = word
        self.registers[SPI_CMD] &= ~SPI_CMD_USR  # esptool polls for this bit to clear

    def _accept(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        return 0, b""

    # ----- flash -----

    def _flash_begin(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        self._begin(data, inflate=None)
        return 0, b""

    def _flash_defl_begin(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        # The size to erase is the uncompressed size, which esptool rounds up to whole blocks.
        self._begin(data, inflate=zlib.decompressobj().decompress)
        return 0, b""

    def _begin(self, data: bytes, inflate: Callable[[bytes], bytes] | None) -> None:
        # The ESP32 ROM takes four words; later chips' fifth (encrypted) word is not for it.
        erase_size, _blocks, block_size, offset = struct.unpack("<IIII", data)
        if offset + erase_size > FLASH_SIZE:
            raise RomError(ERR_FAILED_TO_ACT, "past the end of the flash")
        if erase_size:
            self.flash.erase(offset, erase_size)  # the ROM erases up front, before any data
        self._writing = True
        self._write_offset = offset
        self._block_size = block_size
        self._next_seq = 0
        self._written = 0
        self._inflate = inflate
        self._corrupt_next_block = "corrupt_write" in self.faults

    def _block(self, data: bytes, checksum: int) -> bytes:
        """Check a FLASH_DATA or FLASH_DEFL_DATA block and return its bytes."""
        if not self._writing:
            raise RomError(ERR_FAILED_TO_ACT, "no flash write begun")
        size, seq, _, _ = _BLOCK_HEADER.unpack_from(data)
        block = data[_BLOCK_HEADER.size :]
        if size != len(block) or seq != self._next_seq:
            raise RomError(ERR_INVALID_MESSAGE, "block length or sequence number is wrong")
        expected = CHECKSUM_SEED
        for byte in block:
            expected ^= byte
        if expected != checksum & 0xFF:
            raise RomError(ERR_BAD_CHECKSUM, "block checksum is wrong")
        self._next_seq += 1
        return block

    def _flash_data(self, data: bytes, checksum: int) -> tuple[int, bytes]:
        if self._inflate is not None:
            raise RomError(ERR_FAILED_TO_ACT, "a compressed write is in progress")
        block = self._block(data, checksum)
        self._program(self._write_offset + (self._next_seq - 1) * self._block_size, block)
        return 0, b""

    def _flash_defl_data(self, data: bytes, checksum: int) -> tuple[int, bytes]:
        if self._inflate is None:
            raise RomError(ERR_FAILED_TO_ACT, "no compressed write begun")
        block = self._block(data, checksum)
        try:
            inflated = self._inflate(block)
        except zlib.error as exc:
            raise RomError(ERR_DEFLATE, str(exc)) from exc
        self._program(self._write_offset + self._written, inflated)
        self._written += len(inflated)
        return 0, b""

    def _program(self, offset: int, block: bytes) -> None:
        if offset + len(block) > FLASH_SIZE:
            raise RomError(ERR_FAILED_TO_ACT, "past the end of the flash")
        if self._corrupt_next_block and block:
            # A bit that does not hold: the ROM's write check misses it, the MD5 does not.
            block = bytes([block[0] ^ 0x01]) + block[1:]
            self._corrupt_next_block = False
        self.flash.program(offset, block)

    def _flash_md5(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        address, size, _, _ = struct.unpack("<IIII", data)
        if address + size > FLASH_SIZE:
            raise RomError(ERR_FAILED_TO_ACT, "past the end of the flash")
        # The ROM answers in hex text, 32 characters; esptool's stub sends the 16 raw bytes.
        return 0, hashlib.md5(self.flash.read(address, size)).hexdigest().encode()

    def _read_flash_slow(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        address, size = struct.unpack("<II", data)
        if size > READ_FLASH_SLOW_BLOCK or address + size > FLASH_SIZE:
            raise RomError(ERR_FAILED_TO_ACT, "read too long or past the end of the flash")
        return 0, self.flash.read(address, size).ljust(READ_FLASH_SLOW_BLOCK, b"\xff")
