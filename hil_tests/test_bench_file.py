"""The bench file: what a lab writes about its bench, and the errors that say what is wrong
before any board is touched."""

from pathlib import Path

import pytest

from .bench import Bench, BenchFileError, Wiring, load
from .rig import BenchRig

EXAMPLE = Path(__file__).parent / "bench.example.toml"


def test_the_example_bench_file_reads_as_documented():
    bench = load(EXAMPLE)
    assert bench.runs_nodes and bench.gateway_host == "192.168.50.1"
    wired = bench.wiring("/dev/ttyUSB0")
    assert (wired.source_port, wired.dac_pin, wired.pulse_pin, wired.bme280) == \
        ("/dev/ttyUSB2", 25, 26, True)
    assert "{state}" in wired.power
    # A board the file does not list has no controls: its tests that need one are skipped.
    bare = bench.wiring("/dev/ttyACM0")
    assert (bare.power, bare.source_port, bare.bme280) == (None, None, False)


@pytest.mark.parametrize(("text", "names"), [
    ("gateway_host = 1", "gateway_host = 1 is not str"),
    ("[wifi]\nssid = 'x'\npasword = 'y'", "unknown key 'pasword'"),
    ("[access_point]\ndown = 'wifi down'", "give both down and up"),
    ("[[boards]]\npower = 'x {state}'", "each board needs its port"),
    ("[[boards]]\nport = '/dev/ttyUSB0'\npower = 'uhubctl -a off'", "must contain {state}"),
    ("[[boards]]\nport = '/dev/ttyUSB0'\nwifi_range = 'kb-range out'", "must contain {state}"),
    ("[[boards]]\nport = '/dev/ttyUSB0'\ndac_pin = 25", "give its source_port too"),
    ("[[boards]]\nport = '/dev/ttyUSB0'\ndac_pin = true\nsource_port = 'p'", "dac_pin = True"),
    ("[[boards]]\nport = 'a'\n[[boards]]\nport = 'a'", "port a is listed twice"),
    ("gateway_host = ", "is not valid TOML"),
])
def test_a_bench_file_mistake_is_named(tmp_path, text, names):
    path = tmp_path / "bench.toml"
    path.write_text(text)
    with pytest.raises(BenchFileError, match=names.replace("{", r"\{").replace("}", r"\}")
                       .replace("(", r"\(").replace(")", r"\)")):
        load(path)


def test_a_missing_bench_file_is_named(tmp_path):
    with pytest.raises(BenchFileError, match="cannot read the bench file"):
        load(tmp_path / "nowhere.toml")


def test_a_control_the_bench_lacks_skips_naming_it_and_where_the_docs_explain_it():
    rig = BenchRig("ttyUSB0", Bench(), Wiring("/dev/ttyUSB0"))
    for action, control in ((lambda: rig.power_cut(), "power switch"),
                            (lambda: rig.access_point(False), "access point control"),
                            (lambda: rig.wifi_range(False), "range control"),
                            (lambda: rig.set_level_volts(1.0), "voltage source"),
                            (lambda: rig.set_pulse_rate(10), "pulse source"),
                            (lambda: rig.reference_temperature(), "reference thermometer")):
        with pytest.raises(pytest.skip.Exception, match=f"ttyUSB0: the bench has no {control}"
                           r".*\(docs/hil.md"):
            action()


def test_the_bench_commands_run_and_a_failing_one_is_an_error_naming_it(tmp_path):
    log = tmp_path / "power.log"
    wiring = Wiring("/dev/ttyUSB0", power=f"sh -c 'echo {{state}} >> {log}'")
    rig = BenchRig("ttyUSB0", Bench(access_point_down="false", access_point_up="true"), wiring)
    rig.power_cut()  # off, then on again after the capacitors have drained
    assert log.read_text().split() == ["off", "on"]
    rig.access_point(True)
    with pytest.raises(RuntimeError, match="access point down command `false` failed"):
        rig.access_point(False)


def test_a_bench_rig_puts_back_what_a_test_left_changed(tmp_path):
    """A test that fails with its board off, the AP down or the board out of range must not
    leave the next test so: close() switches back what this rig switched, and nothing else."""
    log = tmp_path / "bench.log"
    record = f"sh -c 'echo {{what}} {{state}} >> {log}'"
    wiring = Wiring("/dev/ttyUSB0", power=record.replace("{what}", "power"),
                    wifi_range=record.replace("{what}", "range"))
    bench = Bench(access_point_down=f"sh -c 'echo ap down >> {log}'",
                  access_point_up=f"sh -c 'echo ap up >> {log}'")
    rig = BenchRig("ttyUSB0", bench, wiring)
    rig.power_cut(restore=False)
    rig.access_point(False)
    rig.wifi_range(False)
    rig.close()
    assert log.read_text().splitlines() == [
        "power off", "ap down", "range out", "power on", "ap up", "range in"]
    log.write_text("")
    rig.close()  # nothing left changed: nothing switched
    assert log.read_text() == ""
