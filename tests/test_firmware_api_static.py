"""The firmware uses only what the ESP32 port has, called as the port's C accepts it.

kinhbac/emulator/api_check.py reads firmware/ (and the wire codec it carries as /lib/wire.py)
with `ast` and checks every use of a port module it can type against esp32_api.json, the table
read from MicroPython's ESP32 source. The emulated boards cannot catch these: their stand-ins
and the unix port may accept what a chip refuses.
"""

from pathlib import Path

import pytest

from kinhbac.emulator.api_check import check_paths, check_source, project_modules

REPO = Path(__file__).resolve().parent.parent
FIRMWARE = REPO / "firmware"
WIRE = REPO / "kinhbac" / "wire.py"

# Findings in firmware/ that its owner is fixing: (file, name, words of the problem). Each
# matches one violation; any other violation fails the test. Remove an entry with its fix.
KNOWN_VIOLATIONS: list[tuple[str, str, str]] = []


def firmware_violations():
    paths = [p for p in sorted(FIRMWARE.rglob("*.py")) if p.name != "manifest.py"]
    return check_paths(paths, FIRMWARE, project_modules(FIRMWARE), {"wire": WIRE}, REPO)


def _known(v) -> bool:
    return any(v.path == path and v.name == name and words in v.problem
               for path, name, words in KNOWN_VIOLATIONS)


def test_firmware_calls_only_what_the_esp32_port_accepts():
    new = [str(v) for v in firmware_violations() if not _known(v)]
    assert not new, "firmware uses the ESP32 port's API wrongly:\n" + "\n".join(new)


def problems(source: str) -> list[str]:
    return [f"{v.name}: {v.problem} [{v.error}]" for v in check_source(source)]


def test_hard_irq_keyword_is_refused_as_the_port_refuses_it():
    found = problems(
        "from machine import Pin\n"
        "def on_edge(pin):\n"
        "    pass\n"
        "p = Pin(4, Pin.IN, Pin.PULL_UP)\n"
        "p.irq(handler=on_edge, trigger=Pin.IRQ_FALLING, hard=True)\n"
    )
    assert len(found) == 1
    assert found[0].startswith("machine.Pin.irq: unexpected keyword argument 'hard'")
    assert "TypeError: extra keyword arguments given (py/argcheck.c:" in found[0]
    assert "ports/esp32/machine_pin.c:" in found[0]


def test_hard_irq_through_an_attribute_set_in_another_method_is_found():
    found = problems(
        "import machine\n"
        "class Counter:\n"
        "    def __init__(self, pin):\n"
        "        self.pin = machine.Pin(pin, machine.Pin.IN)\n"
        "    def arm(self):\n"
        "        self.pin.irq(self.edge, trigger=machine.Pin.IRQ_RISING, hard=True)\n"
        "    def edge(self, pin):\n"
        "        pass\n"
    )
    assert [f.split(":")[0] for f in found] == ["machine.Pin.irq"]


def test_unknown_functions_and_names_are_reported():
    found = problems(
        "import machine, network\n"
        "from machine import Frobnicator\n"
        "machine.frobnicate()\n"
        "network.WLAN(network.STA_IF).reconnect()\n"
        "x = machine.Pin.PULL_HOLD\n"
    )
    assert any(f.startswith("machine.Frobnicator: the port's machine has no") for f in found)
    assert any(f.startswith("machine.frobnicate: the port's machine module has no")
               for f in found)
    assert any(f.startswith("network.WLAN.reconnect: WLAN has no 'reconnect'") for f in found)
    assert any(f.startswith("machine.Pin.PULL_HOLD: Pin has no") for f in found)
    assert len(found) == 4


def test_wrong_keywords_are_reported_with_the_ports_error():
    found = problems(
        "import machine, network, time\n"
        "machine.Pin(4, mode=machine.Pin.IN, pulls=None)\n"
        "network.WLAN(network.STA_IF).connect(ssid='site', key='secret')\n"
        "time.sleep_ms(ms=10)\n"
        "machine.I2C(0).readfrom_mem(0x76, 0xD0, nbytes=2)\n"
    )
    assert len(found) == 4, found
    assert "unexpected keyword argument 'pulls'" in found[0]
    assert "TypeError: extra keyword arguments given" in found[0]
    assert "'ssid' can only be passed by position" in found[1]
    assert "'ms' can only be passed by position" in found[2]
    assert "TypeError: function doesn't take keyword arguments" in found[2]
    # The C names the third argument "arg", whatever the documentation calls it.
    assert "unexpected keyword argument 'nbytes'" in found[3]


def test_too_many_positional_arguments_are_reported():
    found = problems(
        "import machine, esp32\n"
        "machine.reset(1)\n"
        "machine.Pin(4).irq(None, 3, None, True)\n"
        "esp32.Partition('vfs', 4096, 1)\n"
        "machine.RTC(0)\n"
    )
    assert len(found) == 4, found
    assert found[0].startswith("machine.reset: 1 positional arguments given, it takes at most 0")
    assert "TypeError: function takes %d positional arguments but %d were given" in found[0]
    assert "TypeError: extra positional arguments given" in found[1]
    assert "TypeError: function expected at most %d arguments, got %d" in found[2]
    assert found[3].startswith("machine.RTC: 1 positional arguments given")


def test_missing_required_arguments_are_reported():
    found = problems("import machine\nmachine.I2C(scl=machine.Pin(22), sda=machine.Pin(21))\n")
    assert len(found) == 1
    assert "required argument 'id' missing" in found[0]


def test_names_from_later_releases_say_so():
    found = problems("import esp32, machine\nesp32.PCNT(0)\nmachine.Pin(4).toggle()\n")
    assert len(found) == 2
    assert "(v1.26.0 has it)" in found[0]
    assert "(v1.26.0 has it)" in found[1]


def test_modules_outside_the_table_are_reported_unless_optional():
    found = problems(
        "import vfs\n"
        "try:\n"
        "    import espnow\n"
        "except ImportError:\n"
        "    espnow = None\n"
    )
    assert len(found) == 1 and found[0].startswith("vfs: not one of the firmware's modules")


def test_asyncio_streams_and_events_are_checked():
    found = problems(
        "import asyncio\n"
        "async def talk(host, port):\n"
        "    reader, writer = await asyncio.open_connection(host, port)\n"
        "    data = await reader.readexactly(4)\n"
        "    writer.write(data)\n"
        "    await writer.drain()\n"
        "    await writer.flush()\n"
        "    done = asyncio.Event()\n"
        "    await asyncio.wait_for_ms(done.wait(), 50, 1)\n"
    )
    assert len(found) == 2, found
    assert found[0].startswith("asyncio.StreamWriter.flush: StreamWriter has no 'flush'")
    assert found[1].startswith("asyncio.wait_for_ms: 3 positional arguments given")


def test_a_parameter_every_caller_passes_a_port_object_for_is_checked():
    found = problems(
        "import network\n"
        "def join(wlan, ssid):\n"
        "    wlan.connect(ssid, password='x')\n"
        "class Link:\n"
        "    def __init__(self):\n"
        "        self.wlan = network.WLAN(network.STA_IF)\n"
        "    def up(self):\n"
        "        join(self.wlan, 'site')\n"
    )
    assert len(found) == 1 and "unexpected keyword argument 'password'" in found[0]


def test_calls_the_port_accepts_pass():
    assert problems(
        "import machine, network, esp32, struct, time, json, os, gc, sys\n"
        "from micropython import const\n"
        "_N = const(4)\n"
        "p = machine.Pin(27, machine.Pin.IN, machine.Pin.PULL_UP)\n"
        "p.irq(lambda pin: None, trigger=machine.Pin.IRQ_FALLING)\n"
        "p.irq(None)\n"
        "p(1)\n"
        "adc = machine.ADC(machine.Pin(34), atten=machine.ADC.ATTN_11DB)\n"
        "adc.read_uv()\n"
        "i2c = machine.I2C(0, scl=machine.Pin(22), sda=machine.Pin(21), freq=400000)\n"
        "i2c.readfrom_mem_into(0x76, 0xD0, bytearray(2))\n"
        "machine.WDT(timeout=5000).feed()\n"
        "machine.RTC().memory(b'x')\n"
        "if machine.reset_cause() == machine.DEEPSLEEP_RESET:\n"
        "    machine.deepsleep(1000)\n"
        "w = network.WLAN(network.STA_IF)\n"
        "w.active(True)\n"
        "w.connect('site', 'secret')\n"
        "w.config('mac')\n"
        "w.config(hostname='node', reconnects=3)\n"
        "w.status() == network.STAT_CONNECTING\n"
        "esp32.Partition.find(esp32.Partition.TYPE_DATA, label='vfs')\n"
        "struct.pack_into('<HI', bytearray(6), 0, 1, 2)\n"
        "time.ticks_diff(time.ticks_ms(), 0)\n"
        "json.dumps({}, separators=(',', ':'))\n"
        "os.rename('a', 'b')\n"
        "gc.collect()\n"
        "sys.print_exception(ValueError())\n"
    ) == []


def test_feature_tests_guard_what_they_test():
    assert problems(
        "import hashlib\n"
        "_HAS_COPY = hasattr(hashlib.sha256(), 'copy')\n"
        "class Signer:\n"
        "    def __init__(self):\n"
        "        if _HAS_COPY:\n"
        "            self._inner = hashlib.sha256(b'k')\n"
        "            self._spare = self._inner.copy()\n"
        "    def digest(self):\n"
        "        return self._inner.copy()\n"
    ) == []


@pytest.mark.parametrize("snippet", ["machine.Pin(4).value(v=1)", "machine.reset_cause(1)"])
def test_each_wrong_call_is_one_finding(snippet):
    assert len(problems("import machine\n" + snippet + "\n")) == 1
