"""The rig: what a bench does to a board, the same calls for an emulated board and a real one.

On an emulated board each control is the emulator's (its power, its access point, the sensor
models wired to its pins). On a bench each maps to what docs/hil.md tells a lab to wire: a
command switching the board's USB port (uhubctl), commands taking a second access point down
and up, and a second MicroPython board whose DAC and PWM pins drive this board's level and pulse
pins. A control the bench lacks skips the test that needs it, naming the control: a test never
passes for want of what it should have checked.
"""

import shlex
import subprocess
import time
from typing import NoReturn

import pytest

from kinhbac.transport.raw_repl import RawRepl
from kinhbac.transport.serial_link import connect

from .bench import Bench, Wiring

SOURCE_VREF = 3.3  # the source board's DAC: 8 bits from 0 to its supply
POWER_SETTLE_S = 1.0  # a USB port switched off: long enough for the board's capacitors


def skip_missing(board: str, control: str, section: str) -> NoReturn:
    pytest.skip(f"{board}: the bench has no {control} (docs/hil.md, \"{section}\")")


class Rig:
    """What a test may do to its board. Every control is a method; a bench without it skips."""

    def __init__(self, name: str) -> None:
        self.name = name

    def power_cut(self, restore: bool = True) -> None:
        """Cut the board's power without warning; with `restore`, power comes back at once."""
        skip_missing(self.name, "power switch", "Power")

    def power_on(self) -> None:
        skip_missing(self.name, "power switch", "Power")

    def access_point(self, up: bool) -> None:
        """Take the access point the board uses down, or bring it back."""
        skip_missing(self.name, "access point control", "A second access point")

    def wifi_range(self, in_range: bool) -> None:
        """Take this board alone out of its access point's range, or bring it back (the
        access point stays up for the others)."""
        skip_missing(self.name, "range control", "Out of range")

    def set_level_volts(self, volts: float) -> None:
        """The voltage on the node's level pin (kinhbac.emulator.launcher.LEVEL_PIN)."""
        skip_missing(self.name, "voltage source on the level pin", "The source board")

    def set_pulse_rate(self, hz: float) -> None:
        """Pulses at `hz` on the node's pulse pin (launcher.PULSE_PIN); 0 stops them."""
        skip_missing(self.name, "pulse source on the pulse pin", "The source board")

    def pulses_sent(self) -> int | None:
        """How many pulses the source has sent since the rate was set, where it can count
        them (an emulated meter); None where it cannot (a PWM pin)."""
        return None

    def reference_temperature(self) -> float:
        """The temperature the node's BME280 should read, from the bench's reference."""
        skip_missing(self.name, "reference thermometer", "Sensors")

    def has_bme280(self) -> bool:
        return False

    def close(self) -> None:
        """Leave the board as found: powered, its access point up, its inputs quiet."""


class EmulatedRig(Rig):
    """The emulator's own controls and sensor models."""

    REFERENCE_C = 24.5  # what the emulated BME280 is set to read

    def __init__(self, name: str, board, emulator, bme280, level, meter) -> None:
        super().__init__(name)
        self.board = board
        self.emulator = emulator
        self.bme280 = bme280
        self.level = level
        self.meter = meter
        self.bme280.temperature_c = self.REFERENCE_C
        self._sent_before = 0
        self._off = False  # the rig cut the power and left it off

    def power_cut(self, restore: bool = True) -> None:
        self.board.power_cut(restore=restore)
        self._off = not restore

    def power_on(self) -> None:
        self.board.power_on()
        self._off = False

    def access_point(self, up: bool) -> None:
        self.emulator.access_point_up(up)

    def wifi_range(self, in_range: bool) -> None:
        self.board.set_in_range(in_range)

    def set_level_volts(self, volts: float) -> None:
        self.level.volts = volts

    def set_pulse_rate(self, hz: float) -> None:
        self.meter.stop()
        if hz > 0:  # counted from here until the next rate is set (0 only stops)
            self._sent_before = self.meter.emitted
            self.meter.start(hz)

    def pulses_sent(self) -> int | None:
        return self.meter.emitted - self._sent_before

    def reference_temperature(self) -> float:
        return self.REFERENCE_C

    def has_bme280(self) -> bool:
        return True

    def close(self) -> None:
        self.meter.stop()
        if not self.emulator.access_point.is_up:  # a test that failed with it down left it so
            self.emulator.access_point_up(True)
        if not self.board.in_range:
            self.board.set_in_range(True)
        # Not `board.running`: a board in deep sleep is not running either, and wakes by itself.
        if self._off:
            self.power_on()


class BenchRig(Rig):
    """A real board's bench, as its bench file describes it."""

    def __init__(self, name: str, bench: Bench, wiring: Wiring) -> None:
        super().__init__(name)
        self.bench = bench
        self.wiring = wiring
        self._source: RawRepl | None = None
        # What this rig changed and close() puts back, whatever the test did after.
        self._left: set[str] = set()

    def _run(self, command: str, what: str) -> None:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: the bench's {what} command `{command}` failed "
                               f"({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def _power(self, state: str) -> None:
        if self.wiring.power is None:
            skip_missing(self.name, "power switch", "Power")
        self._run(self.wiring.power.format(state=state), f"power {state}")

    def power_cut(self, restore: bool = True) -> None:
        self._power("off")
        self._left.add("power")
        if restore:
            time.sleep(POWER_SETTLE_S)
            self.power_on()

    def power_on(self) -> None:
        self._power("on")
        self._left.discard("power")

    def access_point(self, up: bool) -> None:
        command = self.bench.access_point_up if up else self.bench.access_point_down
        if command is None:
            skip_missing(self.name, "access point control", "A second access point")
        self._run(command, "access point " + ("up" if up else "down"))
        (self._left.discard if up else self._left.add)("access point")

    def wifi_range(self, in_range: bool) -> None:
        if self.wiring.wifi_range is None:
            skip_missing(self.name, "range control", "Out of range")
        state = "in" if in_range else "out"
        self._run(self.wiring.wifi_range.format(state=state), f"range {state}")
        (self._left.discard if in_range else self._left.add)("range")

    def _source_board(self, pin: int | None, control: str) -> RawRepl:
        if self.wiring.source_port is None or pin is None:
            skip_missing(self.name, control, "The source board")
        if self._source is None:
            self._source = connect(self.wiring.source_port)
            self._source.enter_raw_repl()
        return self._source

    def set_level_volts(self, volts: float) -> None:
        source = self._source_board(self.wiring.dac_pin, "voltage source on the level pin")
        code = max(0, min(255, round(volts / SOURCE_VREF * 255)))
        source.exec(f"from machine import DAC, Pin\nDAC(Pin({self.wiring.dac_pin})).write({code})")

    def set_pulse_rate(self, hz: float) -> None:
        source = self._source_board(self.wiring.pulse_pin, "pulse source on the pulse pin")
        # Kept in the source board's globals: its REPL keeps them between calls.
        source.exec("try:\n _kb_pwm.deinit()\nexcept NameError:\n pass")
        if hz > 0:
            source.exec(f"from machine import PWM, Pin\n"
                        f"_kb_pwm = PWM(Pin({self.wiring.pulse_pin}), freq={int(hz)}, duty=512)")

    def reference_temperature(self) -> float:
        if not self.wiring.bme280 or self.wiring.room_temperature_c is None:
            skip_missing(self.name, "reference thermometer", "Sensors")
        return float(self.wiring.room_temperature_c)

    def has_bme280(self) -> bool:
        return self.wiring.bme280

    def close(self) -> None:
        # A test that failed midway may have left its board off, its AP down or out of range.
        if "power" in self._left:
            self.power_on()
        if "access point" in self._left:
            self.access_point(True)
        if "range" in self._left:
            self.wifi_range(True)
        if self._source is not None:
            try:
                self._source.exec("try:\n _kb_pwm.deinit()\nexcept NameError:\n pass")
                self._source.exit_raw_repl()
            finally:
                self._source.link.close()
                self._source = None
