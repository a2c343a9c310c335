"""The node firmware on the board, reporting to the host's gateway: who it says it is, what its
sensors read, and what its watchdog does to a hung loop."""

import json
import re

import pytest

from kinhbac import mqtt_contract

from .boards import LEVEL_SCALE

FIRMWARE_VERSION = re.search(r'^VERSION = "([^"]+)"', open(
    __file__.rsplit("/", 2)[0] + "/firmware/node/app.py").read(), re.M).group(1)
WDT_RESET = 3  # machine.WDT_RESET on the ESP32 port


def _status(node) -> dict:
    topic = mqtt_contract.device_status_topic(mqtt_contract.DEFAULT_PREFIX, "hil", node.device)
    with node.site.collector.lock:
        return dict(node.site.collector.retained.get(topic) or {})


def _boots(node) -> set[int]:
    return {boot for boot, _ in node.readings()}


def test_the_node_says_who_it_is_and_its_boot_counter_rises_at_each_reset(node):
    status = _status(node)
    assert status["device"] == node.device
    assert status["device"] == (b"kb" + node.board.identity.mac).hex()  # "kb" and its MAC
    assert status["firmware"] == FIRMWARE_VERSION
    first = max(_boots(node))
    assert status["boot"] == first

    with node.board.tool() as tool:  # machine.reset(), as the technician's tool resets it
        tool.stop_app()
        tool.reset()
    node.site.collector.wait_for(lambda: max(_boots(node)) > first, 90,
                                 f"{node.board.name}'s readings of its next boot")
    assert max(_boots(node)) == first + 1
    node.site.collector.wait_for(lambda: _status(node).get("boot") == first + 1, 30,
                                 "the status of the next boot")


def _latest(node, sensor: str, after: tuple[int, int] = (-1, -1)) -> list[float]:
    """The sensor's values in the order taken, of the readings after (boot, seq) `after`."""
    return [r["value"] for key, r in sorted(node.readings().items())
            if r["sensor"] == sensor and key > after]


def _mark(node) -> tuple[int, int]:
    """The last (boot, seq) in so far."""
    return max(node.readings(), default=(-1, -1))


def test_each_sensor_reads_within_its_physical_range(node):
    """The BME280 against the bench's reference (exact on emulated boards), the level probe
    against the volts the rig puts on its pin, the meter's litres against the pulses sent."""
    rig = node.board.rig
    if not rig.has_bme280():
        pytest.skip(f"{node.board.name}: no BME280 on the bench (docs/hil.md, \"Sensors\")")
    mark = _mark(node)
    node.wait_readings(10)
    temperatures = _latest(node, "temperature", mark)
    humidity = _latest(node, "humidity", mark)
    pressure = _latest(node, "pressure", mark)
    assert temperatures and humidity and pressure
    assert all(-40 <= t <= 85 for t in temperatures)  # the BME280's operating range
    assert all(0 <= h <= 100 for h in humidity)
    assert all(30_000 <= p <= 110_000 for p in pressure)
    reference = rig.reference_temperature()
    tolerance = 0.01 if node.board.emulated else 1.5  # the BME280's datasheet: ±1 °C typical
    assert abs(temperatures[-1] - reference) <= tolerance, (temperatures[-1], reference)


# Inside the ADC's usable 0.15-2.45 V at 11 dB (the node refuses readings outside it).
@pytest.mark.parametrize("volts", [0.5, 1.2, 2.0])
def test_the_level_reads_the_voltage_on_its_pin(node, volts):
    node.board.rig.set_level_volts(volts)
    mark = _mark(node)
    node.wait_readings(12)
    levels = _latest(node, "level", mark)[-3:]  # after the new voltage has settled
    expected = volts * LEVEL_SCALE
    # The ESP32's SAR ADC at 11 dB, calibrated: a few tens of millivolts off, the emulator as
    # the chip (kinhbac/emulator/devices.py calibrated_mv).
    assert levels and all(abs(level - expected) <= 0.1 * LEVEL_SCALE for level in levels), \
        (levels, expected)


def test_the_meter_counts_the_pulses_it_is_sent(node):
    """The meter reports a running total (litres since provisioning): what it rises by is
    what the source sent, half a litre a pulse."""
    rig = node.board.rig
    before = _latest(node, "water")[-1]  # no pulses come in before the rate is set
    mark = _mark(node)
    rig.set_pulse_rate(20)
    node.wait_readings(10)
    rig.set_pulse_rate(0)
    node.wait_readings(10)  # the rounds after the last pulse
    totals = _latest(node, "water", mark)
    assert totals == sorted(totals), totals  # a running total never goes back
    counted = (totals[-1] - before) / 0.5
    sent = rig.pulses_sent()
    if sent is None:  # a PWM pin: its rate times how long it ran is all that is known
        assert counted > 0
        pytest.skip(f"{node.board.name}: the pulse source cannot count what it sent; the "
                    f"meter counted {counted:.0f} pulses")
    assert counted == sent, (before, totals, sent)


def test_the_watchdog_resets_a_loop_that_hangs(board):
    """The node arms the ESP32's watchdog; code that stops feeding it gets the board reset,
    and the reset is reported as the watchdog's."""
    with board.repl() as repl:
        repl.exec("from machine import WDT\nwdt = WDT(timeout=2000)")
        repl.link.write(b"while True:\r\n    pass\r\n\x04")  # hangs: no feed, no answer
        # Its reset banner: reconnecting sooner would send a Ctrl-C into the loop.
        repl.read_until(b"rst:", timeout=15)
        with board.after_reset(repl, reset=False) as fresh:
            assert fresh.eval("__import__('machine').reset_cause()") == WDT_RESET


def test_config_file_is_json_the_node_wrote(node):
    """What the technician's tool wrote is what the node runs on."""
    with node.board.repl() as repl:
        config = json.loads(repl.fs_get("/config.json"))
    assert config["device_id"] == node.device and config["gateway"]["port"] == \
        node.lab.gateway_address[1]
