"""One emulated ESP32 board: a `micropython` process behind a serial port that outlives it.

The board's serial port is a pty owned by the emulator, so its path stays the same across
resets, power cuts and deep sleeps, as a USB serial adapter's does. Behind it, each boot of the
board is a fresh `micropython` process running the stand-in ROM (standins/_rom.py) on its own
internal pty; the emulator copies bytes between the two, plays the UART's part for Ctrl-C, and
answers the process's hardware calls (I2C, ADC, pins, watchdog, RTC memory, WiFi).
"""

import asyncio
import contextlib
import errno
import logging
import os
import signal
import struct
import termios
import time
import tty
from pathlib import Path
from typing import TYPE_CHECKING

from kinhbac.emulator.access_point import WifiTiming
from kinhbac.emulator.console import Console
from kinhbac.emulator import esp32_image, otadata
from kinhbac.emulator.devices import ADC2_PINS, AnalogSource, I2CDevice, PulseSource
from kinhbac.emulator.flash import FlashImage, Partition
from kinhbac.emulator.rom_loader import ROM_FAULTS, RomLoader

if TYPE_CHECKING:
    from kinhbac.emulator.site import Emulator

log = logging.getLogger(__name__)

STANDINS = Path(__file__).parent / "standins"

# machine.reset_cause() values on the ESP32 port.
PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5
# What the ESP32's ROM prints for each (a soft reset never reaches the ROM).
ROM_RESET_REASONS = {
    PWRON_RESET: (0x1, "POWERON_RESET"),
    HARD_RESET: (0xC, "SW_CPU_RESET"),
    WDT_RESET: (0x8, "TG1WDT_SYS_RESET"),
    DEEPSLEEP_RESET: (0x5, "DEEPSLEEP_RESET"),
}

RTC_MEMORY_SIZE = 2048
CTRL_C = 0x03

# Hardware call ops: the same table as standins/_hw.py.
OP_I2C_WRITE = 1
OP_I2C_READ = 2
OP_I2C_SCAN = 3
OP_ADC_READ = 4
OP_ADC_ATTEN = 5
OP_PIN_IRQ = 6
OP_PIN_WRITE = 7
OP_WDT_START = 8
OP_WDT_FEED = 9
OP_RESET = 10
OP_DEEPSLEEP = 11
OP_RTC_MEM_READ = 12
OP_RTC_MEM_WRITE = 13
OP_WLAN_CONNECT = 14
OP_WLAN_DISCONNECT = 15
OP_ROUTE = 16
# Known to the stand-ins network.py and socket.py (standins/_hw.py lists them too).
OP_WLAN_STATUS = 18
OP_RESOLVE = 19
OP_OTA = 21  # esp32.Partition's OTA calls (otadata.py); `a` says which:
OTA_BOOT = 0  # esp_ota_get_boot_partition()
OTA_RUNNING = 1  # esp_ota_get_running_partition()
OTA_NEXT = 2  # esp_ota_get_next_update_partition(the partition at the payload's address)
OTA_SET_BOOT = 3  # esp_ota_set_boot_partition(the partition at the payload's address)
OTA_MARK_VALID = 4  # esp_ota_mark_app_valid_cancel_rollback()
_ENOENT = 2
ONE_WAY_OPS = (OP_PIN_WRITE, OP_WDT_FEED)
STALLABLE_OPS = (OP_I2C_WRITE, OP_I2C_READ, OP_I2C_SCAN, OP_ADC_READ)
# 40 and up: setting up the emulated hardware (standins/_hw.py).
OP_I2C_INIT = 40
OP_RTC_SET = 41
OP_WLAN_ACTIVE = 42
OP_ROM_READY = 43
# A held I2C bus ends a transaction after the controller's timeout: the port programs
# `timeout` (default 50,000 us) in APB cycles, clamped to the ESP32's 20-bit I2C_TIME_OUT
# register (ports/esp32/machine_i2c.c:84-85; ESP-IDF hal/i2c_ll.h I2C_LL_MAX_TIMEOUT).
I2C_MAX_TIMEOUT_S = 0xFFFFF / 80e6  # 13.1 ms at the 80 MHz APB clock
I2C_DEFAULT_TIMEOUT_S = 0.05
I2C_SCAN_ADDRESSES = 0x78 - 0x08  # extmod/machine_i2c.c scans 0x08..0x77, one probe each
I2C_SOFT = 0x80  # bit 7 of a bus number: a SoftI2C, wired to that bus's devices
FLASH_ERASE_MS = 45.0  # Winbond W25Q32JV sector erase (4 KiB), typical; max 400 ms
EV_EDGE = 1
EV_LINK = 2

_HDR = struct.Struct("<BHH")
_RESP = struct.Struct("<bH")
_ENODEV = 19
_EIO = 5
# WiFi disconnect reasons (ESP-IDF esp_wifi_types.h) the emulated driver reports.
REASON_ASSOC_LEAVE = 8  # after WLAN.disconnect()
REASON_BEACON_TIMEOUT = 200
REASON_NO_AP_FOUND = 201
REASON_AUTH_FAIL = 202
REASON_HANDSHAKE_TIMEOUT = 204
REASON_CONNECTION_FAIL = 205


def _catches_sigint(pid: int) -> bool:
    """Whether the process has a SIGINT handler installed now (Linux: /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # no procfs: signal as before
    except OSError:
        return False
    return False


class Board:
    """An emulated ESP32 board. Its public methods may be called from any thread."""

    def __init__(
        self,
        emulator: "Emulator",
        index: int,
        name: str,
        workdir: Path,
        mac: bytes,
        heap_bytes: int,
    ) -> None:
        self.emulator = emulator
        self.index = index
        self.name = name
        # Absolute: the interpreter runs in this folder and is handed the flash image's path.
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mac = mac
        self.heap_bytes = heap_bytes
        self.flash = FlashImage(self.workdir / "flash.bin")
        if not self.flash.exists():
            self.flash.create()
            # As MicroPython's firmware.bin leaves a board: its app in ota_0 (an image with
            # MicroPython's empty version), so that a rollback has an image to go back to.
            ota_0 = self.flash.partition("ota_0")
            self.flash.program(ota_0.offset, esp32_image.app_image())
        self.console = Console()
        self.boots: list[int] = []  # reset cause of every boot, oldest first
        # esp32.Partition.mark_app_valid_cancel_rollback(): the boot (index in boots) of each call
        self.app_valid_calls: list[int] = []
        # The app partition the bootloader started at the last chip reset (esp32.Partition.
        # RUNNING), None before the first boot or with no table; and the one RTC memory keeps
        # for a wake from deep sleep (lost with the power).
        self.running_app: Partition | None = None
        self._retained_app: Partition | None = None
        self.rtc_memory = b""
        self.in_range = True
        self.pin_outputs: dict[int, int] = {}
        # Options, read at each boot: ticks_ms() at boot (2**30 - 5000 runs a board across the
        # ESP32's ticks wrap five seconds in) and the CPU stall of a 4 KiB flash erase.
        self.ticks_start_ms = 0
        self.flash_erase_ms = FLASH_ERASE_MS
        self._rtc_offset_ns: int | None = None  # RTC ns since 2000 minus host ns; None: reset
        self._i2c_timeout_s: dict[int, float] = {}
        self._wifi_started = False  # esp_wifi_start() ran: ADC2 belongs to WiFi
        self._driven: dict[int, int] = {}  # pin -> level a device model drives it to
        self.lost_serial_bytes = 0  # output written while no one was reading the port

        self._i2c: dict[int, dict[int, I2CDevice]] = {}
        self._analog: dict[int, AnalogSource] = {}
        self._irq_pins: set[int] = set()
        self._wlan_credentials: tuple[str, str] | None = None
        self._link_up = False
        self._link_task: asyncio.Task | None = None  # the WiFi driver, while connect() holds
        self.wifi_timing: WifiTiming | None = None  # None: the access point's
        self._wifi_reason = 0  # the last disconnect reason, 0 for none (network_wlan.c)
        self._wifi_retrying = False  # connect() asked for and the driver still trying
        self._dns_known = False  # a DHCP lease (and its DNS server) since boot
        self._held = False  # the AP is gone and the driver has not noticed yet
        self._wifi_changed = asyncio.Event()
        self._wdt_timeout = 0.0
        self._wdt_deadline = 0.0
        self._wdt_task: asyncio.Task | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._int_master = -1
        self._int_slave = -1
        self._events_writer: asyncio.StreamWriter | None = None
        self._call_writer: asyncio.StreamWriter | None = None
        self._last_out_cr = False
        self._last_sigint = 0.0
        self._servers: list[asyncio.AbstractServer] = []
        self._lock = asyncio.Lock()
        self._stalled = False
        self._unstall: asyncio.Event | None = None
        self._rom: RomLoader | None = None  # set while the chip sits in download mode

        # The serial port: the emulator keeps both ends open so that the path stays valid and
        # a host closing it does not hang up the board.
        self._ext_master, self._ext_slave = os.openpty()
        tty.setraw(self._ext_master)
        tty.setraw(self._ext_slave)
        os.set_blocking(self._ext_master, False)
        self.tty_path = os.ttyname(self._ext_slave)
        link = self.workdir / "tty"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(self.tty_path)

    # ----- public API (any thread) -----

    @property
    def link_up(self) -> bool:
        return self._link_up

    @property
    def link_usable(self) -> bool:
        """Up, and its packets get through (not in the moments after its AP vanished)."""
        return self._link_up and not self._held

    @property
    def dns_known(self) -> bool:
        """A DHCP lease since boot gave lwIP a DNS server (it keeps it after a link loss)."""
        return self._dns_known

    @property
    def running(self) -> bool:
        """Powered and running something: MicroPython, or the ROM in download mode."""
        return self._process is not None or self._rom is not None

    @property
    def in_download_mode(self) -> bool:
        return self._rom is not None

    @property
    def reset_cause(self) -> int | None:
        return self.boots[-1] if self.boots else None

    def power_on(self, download: bool = False, rom_faults: frozenset[str] = frozenset()) -> None:
        """Apply power: the board boots from its flash. With `download` (GPIO0 held low) it
        stays in the ROM's serial bootloader on the same port instead, for esptool to flash;
        `rom_faults` ("no_sync", "corrupt_write") make that ROM misbehave, for tests."""
        unknown = set(rom_faults) - ROM_FAULTS
        if unknown:
            raise ValueError(f"unknown ROM faults {sorted(unknown)}; known: {sorted(ROM_FAULTS)}")
        if download:
            self.emulator.call(self._boot_download_mode(frozenset(rom_faults)))
        else:
            self.emulator.call(self._boot(PWRON_RESET))

    def _refuse_if_on(self) -> None:
        # Power applied to a board that runs MicroPython changes nothing on a real board; here
        # it would start a second interpreter beside the first.
        if self._process is not None:
            raise RuntimeError(f"{self.name} is already on: power_cut(restore=False) first, "
                               "or press_reset()")

    def power_cut(self, restore: bool = True) -> None:
        """Cut the power without warning (SIGKILL): flash keeps what was written, RAM and RTC
        memory are lost. With `restore`, power comes back at once and the board boots again."""
        self.emulator.call(self._power_cut(restore))

    def press_reset(self) -> None:
        """The EN button: the chip resets as at power-on, flash kept, RTC memory cleared."""
        self.emulator.call(self._power_cut(restore=True))

    def attach_i2c(self, device: I2CDevice, bus: int = 0) -> None:
        self._i2c.setdefault(bus, {})[device.address] = device

    def attach_analog(self, pin: int, source: AnalogSource) -> None:
        source.unit = 2 if pin in ADC2_PINS else 1
        self._analog[pin] = source

    def attach_pulses(self, pin: int, source: PulseSource) -> None:
        self._driven[pin] = 1  # a meter's output idles high
        source.attach(self._edge_from_thread)

    def drive_pin(self, pin: int, level: int) -> None:
        """Drive an input pin to a level from outside (an edge if it changes), from any thread."""
        self._edge_from_thread(pin, 1 if level else 0)

    def stall_peripherals(self) -> None:
        """A peripheral locks up. The I2C devices hold the bus: each transaction fails with
        ETIMEDOUT after the bus's timeout, as on the ESP32. ADC reads block until the board
        resets, which no ESP32 ADC does: it is how a test hangs the main loop for the watchdog.
        """
        self.emulator.loop.call_soon_threadsafe(setattr, self, "_stalled", True)

    def set_in_range(self, in_range: bool) -> None:
        """Move the board into or out of the access point's range."""
        self.in_range = in_range
        self.emulator.call(self.refresh_link())

    def write_files(self, files: dict[str, bytes]) -> None:
        """Write files into the board's filesystem while it is powered off (factory flashing)."""
        if self.running:
            raise RuntimeError(f"{self.name} is running: power it off before writing its flash")
        self.emulator.factory(self, "write", files)

    def read_file(self, path: str) -> bytes | None:
        """Read one file from the board's filesystem while it is powered off."""
        if self.running:
            raise RuntimeError(f"{self.name} is running: power it off before reading its flash")
        return self.emulator.factory(self, "read", {path: b""}).get(path)

    # ----- loop side -----

    async def _boot(self, cause: int) -> None:
        async with self._lock:
            self._refuse_if_on()
            self._rom = None  # power applied again: the chip resets out of download mode
            await self._spawn(cause)

    async def _boot_download_mode(self, faults: frozenset[str]) -> None:
        async with self._lock:
            await self._kill()
            self.rtc_memory = b""  # a chip reset, as the EN button is
            self._rtc_offset_ns = None
            self._retained_app = None
            self.boots.append(PWRON_RESET)
            self._emit(_rom_banner(PWRON_RESET, download=True))
            self._rom = RomLoader(
                flash=self.flash,
                mac=self.mac,
                send=self._emit,
                on_exit=self._leave_download_mode,
                faults=faults,
            )

    def _leave_download_mode(self, reboot: bool) -> None:
        """FLASH_END: the ROM reboots (booting from flash: GPIO0 is no longer held by then) or
        jumps to the code in flash, which is no chip reset."""
        rom = self._rom

        async def leave() -> None:
            async with self._lock:
                if self._rom is not rom:
                    return  # power was cut or applied meanwhile
                self._rom = None
                if reboot:
                    await self._spawn(HARD_RESET)
                else:
                    await self._spawn(self.boots[-1], chip_reset=False)

        asyncio.get_running_loop().create_task(leave())

    async def _power_cut(self, restore: bool) -> None:
        async with self._lock:
            await self._kill()
            self.rtc_memory = b""
            self._rtc_offset_ns = None  # the RTC stops with the power
            self._retained_app = None
            if restore:
                await self._spawn(PWRON_RESET)

    async def _restart(self, cause: int, delay_s: float = 0.0) -> None:
        """A reset the running board asked for (machine.reset, deep sleep, its watchdog)."""
        asked_by = self._process  # a call read after a power cut finds no process: moot
        async with self._lock:
            if asked_by is None or self._process is not asked_by:
                return  # the power was cut (or the board reset) first: that reset is moot
            await self._kill()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            await self._spawn(cause)

    async def shutdown(self) -> None:
        async with self._lock:
            await self._kill()
        for server in self._servers:
            server.close()
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._ext_master)
        for fd in (self._ext_master, self._ext_slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / "tty").unlink()

    async def start_servers(self, sockdir: Path) -> None:
        """Listen for the board's hardware calls and event channel; attach the serial port."""
        self._calls_path = str(sockdir / f"{self.index}.calls")
        self._events_path = str(sockdir / f"{self.index}.events")
        self._servers = [
            await asyncio.start_unix_server(self._serve_calls, self._calls_path),
            await asyncio.start_unix_server(self._serve_events, self._events_path),
        ]
        asyncio.get_running_loop().add_reader(self._ext_master, self._on_host_input)

    async def _spawn(self, cause: int, chip_reset: bool = True) -> None:
        if chip_reset:
            self.boots.append(cause)
        self._stalled = False
        self._unstall = asyncio.Event()
        self._i2c_timeout_s.clear()
        self._wifi_started = False
        if self._rtc_offset_ns is None:  # power-on: the RTC starts at 2000-01-01 00:00:00
            self._rtc_offset_ns = -time.time_ns()
        self._reset_wifi()
        self._irq_pins.clear()
        self._interpreter_up = False  # until _rom.py says OP_ROM_READY: see _on_host_input
        self._int_master, self._int_slave = os.openpty()
        # Raw, but with ISIG so that the emulator can tell running code (Ctrl-C must raise
        # KeyboardInterrupt) from the REPL reading input (Ctrl-C is a character).
        tty.setraw(self._int_slave)
        attrs = termios.tcgetattr(self._int_slave)
        attrs[3] |= termios.ISIG
        termios.tcsetattr(self._int_slave, termios.TCSANOW, attrs)
        os.set_blocking(self._int_master, False)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.workdir),
            "KINHBAC_CALLS": self._calls_path,
            "KINHBAC_EVENTS": self._events_path,
            "KINHBAC_FLASH": str(self.flash.path),
            "KINHBAC_MAC": self.mac.hex(),
            "KINHBAC_RESET_CAUSE": str(cause),
            "KINHBAC_BOARD_INDEX": str(self.index),
            "KINHBAC_TICKS_START_MS": str(int(self.ticks_start_ms)),
            "KINHBAC_RTC_OFFSET_NS": str(self._rtc_offset_ns),
            "KINHBAC_ERASE_US": str(round(self.flash_erase_ms * 1000)),
            "TZ": "UTC0",  # the ESP32 port has no time zone: its localtime() is UTC
        }
        if cause != SOFT_RESET and chip_reset:
            self._emit(_rom_banner(cause))
        if cause != SOFT_RESET:
            # The second-stage bootloader; a wake from deep sleep starts the app it kept.
            retained = self._retained_app if cause == DEEPSLEEP_RESET else None
            self.running_app = await asyncio.to_thread(otadata.boot, self.flash, retained)
            self._retained_app = self.running_app
        self._process = await asyncio.create_subprocess_exec(
            self.emulator.micropython,
            "-X",
            f"heapsize={self.heap_bytes}",
            "-i",
            str(STANDINS / "_rom.py"),
            stdin=self._int_slave,
            stdout=self._int_slave,
            stderr=self._int_slave,
            cwd=self.workdir,
            env=env,
            start_new_session=True,
        )
        asyncio.get_running_loop().add_reader(self._int_master, self._on_board_output)
        asyncio.get_running_loop().create_task(self._watch(self._process))

    async def _kill(self) -> None:
        self._rom = None
        proc, self._process = self._process, None
        if self._unstall is not None:
            self._unstall.set()  # release calls parked by stall_peripherals()
        self._stop_wdt()
        if self._link_task:
            self._link_task.cancel()
        self._link_up = False
        self.emulator.access_point.cut(self)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        self._close_internal_pty()

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """A process that ends by itself (Ctrl-D at the REPL, a crash) soft-reboots the board."""
        code = await proc.wait()
        if proc is not self._process:
            return  # the emulator stopped it on purpose
        self._drain_board_output()
        if code == 0:
            self._emit(b"MPY: soft reboot\r\n")
            cause = SOFT_RESET
        else:
            self._emit(f"\r\nemulator: board process ended with status {code}\r\n".encode())
            cause = HARD_RESET
        async with self._lock:
            if proc is self._process:
                self._process = None
                self._stop_wdt()
                self.emulator.access_point.cut(self)
                self._close_internal_pty()
                await self._spawn(cause)

    def _close_internal_pty(self) -> None:
        if self._int_master >= 0:
            asyncio.get_running_loop().remove_reader(self._int_master)
            self._drain_board_output()
            for fd in (self._int_master, self._int_slave):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._int_master = self._int_slave = -1

    # ----- serial port -----

    def _on_board_output(self) -> None:
        try:
            chunk = os.read(self._int_master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: the process closed its end
            asyncio.get_running_loop().remove_reader(self._int_master)
            return
        if chunk:
            self._emit(self._cook(chunk))

    def _drain_board_output(self) -> None:
        if self._int_master < 0:
            return
        while True:
            try:
                chunk = os.read(self._int_master, 4096)
            except OSError:
                return
            if not chunk:
                return
            self._emit(self._cook(chunk))

    def _cook(self, chunk: bytes) -> bytes:
        """Turn a lone LF into CRLF, as the ESP32 port's UART output does."""
        out = bytearray()
        prev_cr = self._last_out_cr
        for byte in chunk:
            if byte == 0x0A and not prev_cr:
                out += b"\r"
            out.append(byte)
            prev_cr = byte == 0x0D
        self._last_out_cr = prev_cr
        return bytes(out)

    def _emit(self, data: bytes) -> None:
        self.console.append(data)
        try:
            os.write(self._ext_master, data)
        except BlockingIOError:
            self.lost_serial_bytes += len(data)  # no one is reading: a UART drops it too
        except OSError:
            pass

    def _on_host_input(self) -> None:
        try:
            data = os.read(self._ext_master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if self._rom is not None:
            self._rom.feed(data)  # replies come back through _emit
            return
        if self._process is None or self._int_master < 0:
            return  # the board is off or in reset: the bytes go nowhere
        for_board = bytearray()
        for byte in data:
            if byte == CTRL_C and not self._interpreter_up:
                # The micropython launcher is still starting (a SIGINT would kill it and the
                # board would come back with a hard reset), or _rom.py is still importing the
                # stand-ins (C on a chip). An ESP32 ignores the UART while its ROM and early
                # boot run, so the byte is dropped.
                continue
            if byte == CTRL_C and self._code_running():
                self._write_to_board(for_board)
                for_board.clear()
                self._interrupt()
            else:
                for_board.append(byte)
        self._write_to_board(for_board)

    def _code_running(self) -> bool:
        try:
            return bool(termios.tcgetattr(self._int_slave)[3] & termios.ISIG)
        except termios.error:
            return False

    def _interrupt(self) -> None:
        # One KeyboardInterrupt per burst of Ctrl-C: tools send two or three in a row, and a
        # SIGINT arriving after the REPL took over would end the process.
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_sigint < 0.1 or self._process is None:
            return
        # The unix port turns its terminal's ISIG on a moment before it installs its SIGINT
        # handler, and resets the handler to the default a moment before turning ISIG off; a
        # SIGINT in those moments would end the process, a hard reset no chip makes. So the
        # signal goes only while the process catches it; otherwise the Ctrl-C is lost, as a
        # UART byte arriving at such a moment can be.
        if not _catches_sigint(self._process.pid):
            return
        self._last_sigint = loop.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._process.pid, signal.SIGINT)

    def _write_to_board(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._int_master, view)
            except BlockingIOError:
                # The board is not reading (its UART RX buffer is full): like a UART, drop.
                return
            except OSError:
                return
            view = view[n:]

    # ----- hardware calls -----

    async def _serve_calls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._call_writer = writer
        try:
            while True:
                header = await reader.readexactly(_HDR.size)
                op, a, n = _HDR.unpack(header)
                payload = await reader.readexactly(n) if n else b""
                try:
                    reply = await self._handle_call(op, a, payload)
                    status = 0
                except OSError as exc:
                    reply, status = b"", -(exc.errno or _EIO)
                if op not in ONE_WAY_OPS:
                    writer.write(_RESP.pack(status, len(reply)) + reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _handle_call(self, op: int, a: int, payload: bytes) -> bytes:
        if self._stalled and op in STALLABLE_OPS and self._unstall is not None:
            if op != OP_ADC_READ:
                return await self._i2c_held(op, a)
            await self._unstall.wait()
            raise OSError(_EIO, "the board was reset during a stalled call")
        if op == OP_WLAN_CONNECT:
            self._wifi_started = True  # connect() needs active(True), which started WiFi
        if op == OP_PIN_WRITE:
            self.pin_outputs[a] = payload[0]
            return b""
        if op == OP_WDT_FEED:
            self._feed_wdt()
            return b""
        if op == OP_I2C_WRITE:
            self._i2c_device(a).write(payload)
            return b""
        if op == OP_I2C_READ:
            (count,) = struct.unpack("<H", payload)
            return self._i2c_device(a).read(count)
        if op == OP_I2C_SCAN:
            return bytes(sorted(self._i2c.get(a & ~I2C_SOFT, {})))
        if op == OP_ADC_READ:
            source = self._analog_source(a)
            if a in ADC2_PINS and self._wifi_started:
                # adc2_get_raw(): WiFi holds the ADC2 lock from esp_wifi_start() to _stop()
                # (ESP-IDF adc_legacy.c, adc_lock_try_acquire -> ESP_ERR_TIMEOUT).
                raise OSError(errno.ETIMEDOUT, "ADC2 is taken by WiFi")
            kind = payload[0]
            value = (source.read, source.read_u16, source.read_uv)[kind]()
            return struct.pack("<I", value)
        if op == OP_ADC_ATTEN:
            self._analog_source(a).atten(payload[0])
            return b""
        if op == OP_PIN_IRQ:
            (self._irq_pins.add if payload[0] else self._irq_pins.discard)(a)
            return b""
        if op == OP_WDT_START:
            self._start_wdt(struct.unpack("<I", payload)[0] / 1000)
            return b""
        if op == OP_RESET:
            asyncio.get_running_loop().create_task(self._restart(a))
            return b""
        if op == OP_DEEPSLEEP:
            (ms,) = struct.unpack("<I", payload)
            asyncio.get_running_loop().create_task(self._restart(DEEPSLEEP_RESET, ms / 1000))
            return b""
        if op == OP_RTC_MEM_READ:
            return self.rtc_memory
        if op == OP_RTC_MEM_WRITE:
            self.rtc_memory = bytes(payload[:RTC_MEMORY_SIZE])
            return b""
        if op == OP_RTC_SET:
            (self._rtc_offset_ns,) = struct.unpack("<q", payload)
            return b""
        if op == OP_I2C_INIT:
            (us,) = struct.unpack("<I", payload)
            # A SoftI2C (bus | I2C_SOFT) waits its whole timeout for SCL to rise
            # (extmod/machine_i2c.c:53-62); the hardware bus's is clamped by its register.
            soft = a & I2C_SOFT
            self._i2c_timeout_s[a] = us / 1e6 if soft else min(us / 1e6, I2C_MAX_TIMEOUT_S)
            return b""
        if op == OP_WLAN_ACTIVE:
            self._wifi_started = bool(a)
            return b""
        if op == OP_ROM_READY:
            # _rom.py runs (its SIGINT handler is set) and has imported the stand-ins, which
            # are C on a chip, there before the first byte of Python runs. Importing them takes
            # the unix port a while; a Ctrl-C in that time would stop a boot before _boot.py's
            # mount, a window a chip does not have, so the bytes were dropped until now.
            self._interpreter_up = True
            return b""
        if op == OP_WLAN_CONNECT:
            ssid, _, password = payload.partition(b"\x00")
            self._wlan_connect(ssid.decode(), password.decode(), reconnects=a)
            return b""
        if op == OP_WLAN_DISCONNECT:
            self._wlan_disconnect()
            return b""
        if op == OP_WLAN_STATUS:
            return struct.pack("<BBBH", self._link_up, self._wifi_retrying, self._dns_known,
                               self._wifi_reason)
        if op == OP_RESOLVE:
            # Blocks the board for as long as lwIP would: the call is synchronous on the chip.
            address = await self.emulator.access_point.resolve(self, payload.decode())
            return b"\x00" + address.encode() if address else b"\x01"
        if op == OP_OTA:
            return await self._ota_call(a, struct.unpack("<I", payload)[0])
        if op == OP_ROUTE:
            # The loopback port that stands for address:port, and lwIP's SYN time in ms for
            # the stand-in's sockets (TCP_USER_TIMEOUT).
            ap = self.emulator.access_point
            port = await ap.route(self, payload.decode(), a)
            return struct.pack("<HH", port, min(int(ap.syn_timeout_s * 1000), 0xFFFF))
        raise OSError(_EIO, f"unknown hardware call {op}")

    async def _ota_call(self, call: int, address: int) -> bytes:
        """An esp32.Partition OTA call: its esp_err_t, a partition's address (0 for none) and
        how many sectors the stand-in is to stall for, then the error's name."""
        err, erased = otadata.ESP_OK, 0
        found: Partition | None = None
        if call == OTA_BOOT:
            found = await asyncio.to_thread(otadata.boot_partition, self.flash)
        elif call == OTA_RUNNING:
            found = self.running_app
        elif call == OTA_NEXT:
            found = await asyncio.to_thread(
                otadata.next_update_partition, self.flash, self._partition_at(address))
        elif call == OTA_SET_BOOT:
            err = await self._set_boot(self._partition_at(address))
        elif call == OTA_MARK_VALID:
            self.app_valid_calls.append(len(self.boots) - 1)
            err, rewrote = await asyncio.to_thread(otadata.mark_app_valid, self.flash)
            erased = int(rewrote)
        else:
            raise OSError(_EIO, f"unknown OTA call {call}")
        return (struct.pack("<iIB", err, found.offset if found else 0, erased)
                + otadata.ERROR_NAMES.get(err, "").encode())

    async def _set_boot(self, target: Partition) -> int:
        """esp_ota_set_boot_partition(): verify, then for each otadata sector it rewrites, the
        erase, the erase's time with the board stalled in it, and the entry programmed. A power
        cut in that time leaves the sector erased and the other sector's entry in use."""
        asked_by, power_went = self._process, self._unstall  # _kill() sets the event
        err, writes = await asyncio.to_thread(otadata.plan_set_boot, self.flash, target)
        part = otadata.find(self.flash)
        for sector, entry in writes:
            assert part is not None and power_went is not None
            await asyncio.to_thread(otadata.erase_sector, self.flash, part, sector)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(power_went.wait(), self.flash_erase_ms / 1000)
            if power_went.is_set() or self._process is not asked_by:
                return err  # the power went during the erase: nothing more is written
            if entry is not None:
                await asyncio.to_thread(otadata.program_entry, self.flash, part, sector, entry)
        return err

    def _partition_at(self, address: int) -> Partition:
        for part in self.flash.partitions():
            if part.offset == address:
                return part
        raise OSError(_ENOENT, f"no partition at {address:#x}")

    async def _i2c_held(self, op: int, a: int) -> bytes:
        """An I2C transaction on a bus a device holds: the controller's timeout, ETIMEDOUT."""
        bus = a if op == OP_I2C_SCAN else a >> 8
        timeout = self._i2c_timeout_s.get(bus, min(I2C_DEFAULT_TIMEOUT_S, I2C_MAX_TIMEOUT_S))
        if op == OP_I2C_SCAN:
            await asyncio.sleep(timeout * I2C_SCAN_ADDRESSES)
            return b""  # every probe timed out: no device answered
        await asyncio.sleep(timeout)
        raise OSError(errno.ETIMEDOUT, "the I2C bus is held")

    def _i2c_device(self, bus_addr: int) -> I2CDevice:
        device = self._i2c.get((bus_addr >> 8) & ~I2C_SOFT, {}).get(bus_addr & 0xFF)
        if device is None:
            raise OSError(_ENODEV, "no I2C device at that address")  # the ESP32 port's NACK
        return device

    def _analog_source(self, pin: int) -> AnalogSource:
        source = self._analog.get(pin)
        if source is None:
            raise OSError(_EIO, f"nothing is wired to ADC pin {pin}")
        return source

    # ----- events: pin edges and WiFi -----

    async def _serve_events(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._events_writer = writer
        self._send_event(EV_LINK, int(self._link_up), 0)
        for pin, level in list(self._driven.items()):
            self._send_event(EV_EDGE, pin, level)  # levels already on the pins at boot
        with contextlib.suppress(ConnectionError):
            await reader.read()  # the board never writes here; EOF means it is gone
        if self._events_writer is writer:
            self._events_writer = None
        writer.close()

    def _send_event(self, kind: int, a: int, b: int) -> None:
        writer = self._events_writer
        if writer is not None and not writer.is_closing():
            writer.write(_HDR.pack(kind, a, b))

    def _edge_from_thread(self, pin: int, level: int) -> None:
        self._driven[pin] = level
        self.emulator.loop.call_soon_threadsafe(self._send_event, EV_EDGE, pin, level)

    # ----- WiFi: the station driver, as ESP-IDF runs it under the ESP32 port -----
    # WLAN.connect() starts attempts (scan, join, DHCP); each that fails leaves a disconnect
    # reason, and the port's event handler starts the next at once, for ever or `reconnects`
    # times (ports/esp32/network_wlan.c). A link that is up stays up until the AP's beacons
    # stay away for the beacon timeout. Timing: WifiTiming (access_point.py).

    def _reset_wifi(self) -> None:
        """A chip reset: no driver, no lease, no reason yet."""
        self._stop_driver()
        self._wlan_credentials = None
        self._link_up = False
        self._wifi_reason = 0
        self._wifi_retrying = False
        self._dns_known = False
        self._held = False

    def _timing(self) -> WifiTiming:
        return self.wifi_timing or self.emulator.access_point.wifi

    def _ap_in_reach(self) -> bool:
        """An AP with the board's SSID is up and in range (whatever the password)."""
        ap = self.emulator.access_point
        creds = self._wlan_credentials
        return (self._process is not None and creds is not None and self.in_range
                and ap.is_up and creds[0] == ap.ssid)

    def _wlan_connect(self, ssid: str, password: str, reconnects: int) -> None:
        if self._link_up and self._wlan_credentials == (ssid, password):
            return  # already on that AP
        self._stop_driver()
        if self._link_up:
            self._set_link(False)
        self._wlan_credentials = (ssid, password)
        self._wifi_retrying = True
        self._link_task = asyncio.get_running_loop().create_task(self._wifi_driver(reconnects))

    def _wlan_disconnect(self) -> None:
        self._stop_driver()
        self._wlan_credentials = None
        self._wifi_retrying = False
        if self._link_up:
            self._set_link(False)
        self._wifi_reason = REASON_ASSOC_LEAVE

    def _stop_driver(self) -> None:
        if self._link_task is not None:
            self._link_task.cancel()
            self._link_task = None
        self._held = False
        self.emulator.access_point.hold(self, False)

    def _set_link(self, up: bool) -> None:
        self._link_up = up
        if up:
            self._dns_known = True
            self._wifi_reason = 0  # IP_EVENT_STA_GOT_IP clears it
            self._send_event(EV_LINK, 1, 0)
        else:
            self._held = False
            self._send_event(EV_LINK, 0, 0)  # first, so the board rarely sees a cut first
            self.emulator.access_point.cut(self)
        self._refresh_routes()

    def _refresh_routes(self) -> None:
        loop = asyncio.get_running_loop()
        loop.create_task(self.emulator.access_point.refresh_routes(self))

    async def refresh_link(self) -> None:
        """The AP or the range changed: the driver looks again."""
        self._wifi_changed.set()

    async def _wifi_driver(self, reconnects: int) -> None:
        failures = 0  # wifi_sta_reconnects: not reset by a success, as on the port
        wrong = 0
        while True:
            reason, wrong = await self._wifi_attempt(wrong)
            if reason is None:
                self._set_link(True)
                reason = await self._wifi_hold()
                self._set_link(False)
            self._wifi_reason = reason
            failures += 1
            if reconnects and failures >= reconnects:
                self._wifi_retrying = False  # the handler gives up; status() shows the reason
                self._link_task = None
                return

    async def _wifi_attempt(self, wrong: int) -> tuple[int | None, int]:
        """One esp_wifi_connect(): None when it got an IP, else its disconnect reason."""
        timing = self._timing()
        ap = self.emulator.access_point
        if not self._ap_in_reach():
            await asyncio.sleep(timing.scan_missed_s)
            return REASON_NO_AP_FOUND, wrong
        assert self._wlan_credentials is not None
        if not ap.accepts(*self._wlan_credentials):
            reasons = ap.wrong_password_reasons or (REASON_AUTH_FAIL,)
            reason = reasons[wrong % len(reasons)]
            await asyncio.sleep(_failed_join_s(reason, timing))
            return reason, wrong + 1
        await asyncio.sleep(timing.association_s)
        if not self._ap_in_reach():
            return REASON_NO_AP_FOUND, wrong  # it went while the board was joining
        return None, wrong

    async def _wifi_hold(self) -> int:
        """Keep the link until the AP has been out of reach for the beacon timeout."""
        ap = self.emulator.access_point
        while True:
            await self._wait_wifi_change()
            if self._ap_in_reach():
                continue
            # Its beacons stopped: the board still thinks it is connected, its packets go
            # nowhere (held, sent on if the AP comes back in time).
            self._held = True
            ap.hold(self, True)
            self._refresh_routes()
            try:
                await asyncio.wait_for(self._until_in_reach(), self._timing().beacon_timeout_s)
            except TimeoutError:
                return REASON_BEACON_TIMEOUT
            self._held = False
            ap.hold(self, False)
            self._refresh_routes()

    async def _until_in_reach(self) -> None:
        while not self._ap_in_reach():
            await self._wait_wifi_change()

    async def _wait_wifi_change(self) -> None:
        await self._wifi_changed.wait()
        self._wifi_changed.clear()

    # ----- watchdog -----

    def _start_wdt(self, timeout_s: float) -> None:
        self._wdt_timeout = timeout_s
        self._feed_wdt()

    def _feed_wdt(self) -> None:
        if self._wdt_timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        self._wdt_deadline = loop.time() + self._wdt_timeout
        if self._wdt_task is None:
            self._wdt_task = loop.create_task(self._wdt_watch())

    async def _wdt_watch(self) -> None:
        loop = asyncio.get_running_loop()
        while (remaining := self._wdt_deadline - loop.time()) > 0:
            await asyncio.sleep(remaining)
        self._emit(b"\r\nE (wdt) Task watchdog got triggered.\r\n")
        self._wdt_task = None  # so that the restart below does not cancel this very task
        await self._restart(WDT_RESET)

    def _stop_wdt(self) -> None:
        self._wdt_timeout = 0.0
        if self._wdt_task and self._wdt_task is not asyncio.current_task():
            self._wdt_task.cancel()
        self._wdt_task = None


def _rom_banner(cause: int, download: bool = False) -> bytes:
    """The first lines an ESP32's ROM prints on every chip reset."""
    code, name = ROM_RESET_REASONS[cause]
    boot_mode = (
        "boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))\r\nwaiting for download"
        if download
        else "boot:0x13 (SPI_FAST_FLASH_BOOT)"
    )
    return f"ets Jul 29 2019 12:21:46\r\n\r\nrst:0x{code:x} ({name}),{boot_mode}\r\n".encode()


def _failed_join_s(reason: int, timing: WifiTiming) -> float:
    """How long an attempt with the wrong password takes to end with `reason`."""
    if reason == REASON_CONNECTION_FAIL:
        return timing.scan_missed_s  # the next try after a failed handshake (ESP32 logs)
    if reason == REASON_AUTH_FAIL:
        return timing.scan_found_s + timing.join_s  # refused at authentication
    return timing.scan_found_s + timing.join_s + timing.handshake_fail_s
