"""Pulse sensors on a running node: the ESP32 port's Pin.irq (no hard IRQ), and a total that
outlives a reset (RTC memory) and a power cut (flash, up to its last write)."""

import json
import time

import pytest
from test_firmware import start_nodes, wait_until

from kinhbac.emulator import launcher
from kinhbac.emulator.board import HARD_RESET, PWRON_RESET, WDT_RESET
from kinhbac.emulator.receiver import Receiver
from kinhbac.transport.serial_link import connect

WATER = next(i for i, e in enumerate(launcher.SENSOR_KIT) if e["kind"] == "pulse")
PER_PULSE = launcher.SENSOR_KIT[WATER]["per_pulse"]
# A water meter's pace (a reed switch gives a few pulses a second). The board's scheduler
# queue takes such edges one at a time; bursts from a loaded host can still lose one.
RATE_HZ = 20


@pytest.fixture
def receiver():
    with Receiver({}) as rx:
        yield rx


def water(receiver, node, boot=None):
    """The water totals the gateway got, oldest first (of one boot, or of all)."""
    return [r.value for r in receiver.readings_of(node.device)
            if r.sensor == WATER and (boot is None or r.boot == boot)]


def run_meter(receiver, node, pulses):
    """Let the meter give `pulses` at RATE_HZ; returns the total the node then reports."""
    node.meter.start(rate_hz=RATE_HZ, count=pulses)
    wait_until(lambda: not node.meter.running, timeout=pulses / RATE_HZ + 10, what="the pulses")
    node.meter.stop()
    # Readings taken after the last edge, so that the total has settled.
    receiver.wait_for_count(receiver.count(node.device) + 10 * len(launcher.SENSOR_KIT),
                            node.device)
    return water(receiver, node)[-1]


def test_pulse_node_boots_and_counts_on_a_board_whose_pin_irq_has_no_hard_irq(
        emulator, receiver):
    (node,) = start_nodes(emulator, receiver)
    receiver.wait_for_count(20, node.device)
    total = run_meter(receiver, node, 20)
    # Every edge, or all but one that a burst from a loaded host can cost (see RATE_HZ).
    assert 19 * PER_PULSE <= total <= 20 * PER_PULSE
    text = node.board.console.text()
    assert "SAFE MODE" not in text and "Traceback" not in text
    assert node.board.boots == [PWRON_RESET]


def machine_reset(node):
    repl = connect(node.board.tty_path)
    repl.enter_raw_repl()  # Ctrl-C: the app stops where it is, nothing saved on the way out
    repl.link.write(b"import machine\nmachine.reset()\x04")


@pytest.mark.parametrize("reset", ["machine.reset", "watchdog"])
def test_pulse_total_survives_a_reset(emulator, receiver, reset):
    (node,) = start_nodes(emulator, receiver, watchdog_ms=1000)
    receiver.wait_for_count(20, node.device)
    before = run_meter(receiver, node, 20)
    assert before > 0
    time.sleep(0.5)  # more than a housekeeping tick: the count is in RTC memory
    if reset == "machine.reset":
        machine_reset(node)
        cause = HARD_RESET
    else:
        node.board.stall_peripherals()  # the next sensor read never returns
        cause = WDT_RESET
    wait_until(lambda: water(receiver, node, boot=2), what="water readings of the next boot")
    assert node.board.boots == [PWRON_RESET, cause]
    assert water(receiver, node, boot=2)[0] == before  # not 0: the total went on
    after = run_meter(receiver, node, 4)
    assert before < after <= before + 4 * PER_PULSE


def test_pulse_total_survives_a_power_cut_up_to_its_last_flash_write(emulator, receiver):
    (node,) = start_nodes(emulator, receiver, pulse_flash_s=1)
    receiver.wait_for_count(20, node.device)
    before = run_meter(receiver, node, 20)
    time.sleep(1.5)  # past pulse_flash_s: the totals are on flash
    node.board.power_cut()  # RTC memory is lost with the power
    wait_until(lambda: water(receiver, node, boot=2), what="water readings of the next boot")
    assert node.board.boots == [PWRON_RESET, PWRON_RESET]
    assert water(receiver, node, boot=2)[0] == before
    node.board.power_cut(restore=False)
    state = json.loads(node.board.read_file("/state.json"))
    assert state["pulses"] == {"water": round(before / PER_PULSE)}
