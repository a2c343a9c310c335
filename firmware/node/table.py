# The sensor table's rules: what a config's `sensors` (and the `i2c` bus they use) must be for
# build_sensors() to start them on an ESP32. Pure checks, no hardware, so that a table sent by
# CONFIG is judged whole before the running sensors stop. Loaded only for a check
# (node.sensors.check_table imports it and drops it after).
from micropython import const

from node.sensors import _FIELDS, MAX_SAMPLES

# The ESP32's GPIOs (ESP32 datasheet, "Pin Description"; not the S2/S3/C3 variants).
_GPIOS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23, 25,
          26, 27, 32, 33, 34, 35, 36, 37, 38, 39)
_ADC1_FIRST = const(32)  # ADC1 is GPIO32-39; ADC2 cannot be read while WiFi is on
_ADC2 = (0, 2, 4, 12, 13, 14, 15, 25, 26, 27)  # the ADC2 pins (ports/esp32/machine_adc.c)
_INPUT_ONLY_FIRST = const(34)  # GPIO34-39: inputs with no pull resistors (a pull is ignored)
_KINDS = ("bme280", "adc", "pulse")
_ATTEN_DB = (0, 2.5, 6, 11)
_PULLS = ("up", "down", "none")
_EDGES = ("falling", "rising")
_TEXT_MAX = const(64)  # bytes of a name or unit: a HELLO of many sensors still fits a frame
# HELLO payload bytes left for the sensor table and its failure counts: the frame's 1362 less
# the reset cause, a firmware version of up to 32 bytes, 8 drop counters, the counts' count and
# the free flash (u32).
_HELLO_TABLE_MAX = const(1289)
_HELLO_PER_SENSOR = const(10)  # a sensor's two str8 lengths and its two u32 failure counts


def _bad(field, problem):
    raise ValueError("%s: %s" % (field, problem))


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v):
    # A JSON number, finite: a huge one would poison every reading it scales.
    return (_int(v) or isinstance(v, float)) and -1e30 < v < 1e30


def check_pin(field, pin, output=False):
    """ValueError naming `field` unless `pin` is an ESP32 GPIO free for a sensor or a bus."""
    if not _int(pin) or pin not in _GPIOS:
        _bad(field, "%r is not an ESP32 GPIO (0-19, 21-23, 25-27, 32-39)" % (pin,))
    if 6 <= pin <= 11:
        _bad(field, "GPIO%d is wired to the flash chip" % pin)
    if pin == 1 or pin == 3:
        _bad(field, "GPIO%d is the serial console" % pin)
    if output and pin >= _INPUT_ONLY_FIRST:
        _bad(field, "GPIO%d is input-only" % pin)


def check_i2c(bus):
    """The config's `i2c`: a bus id and two pins that can drive the lines."""
    if not isinstance(bus, dict) or bus.get("id") not in (0, 1):
        _bad("i2c", "needs an id (0 or 1), scl and sda")
    for line in ("scl", "sda"):
        check_pin("i2c." + line, bus.get(line), output=True)
    if bus["scl"] == bus["sda"]:
        _bad("i2c.sda", "the same pin as scl")
    freq = bus.get("freq", 400000)
    if not _int(freq) or not 10000 <= freq <= 1000000:
        _bad("i2c.freq", "must be a whole number from 10000 to 1000000 (Hz)")


def _check_entry(i, entry, pins):
    where = "sensors[%d]" % i
    if not isinstance(entry, dict):
        _bad(where, "must be an object with name, kind and its settings")
    kind = entry.get("kind")
    if kind not in _KINDS:
        _bad(where + ".kind", "%r is not bme280, adc or pulse" % (kind,))
    if kind == "bme280":
        field = entry.get("field")
        if field not in _FIELDS:
            _bad(where + ".field", "%r is not temperature, pressure or humidity" % (field,))
        if entry.get("address", 0x76) not in (0x76, 0x77):
            _bad(where + ".address", "a BME280 answers at 0x76 (118) or 0x77 (119)")
        return
    if "pin" not in entry:
        _bad(where + ".pin", "missing")
    pin = entry["pin"]
    check_pin(where + ".pin", pin)
    if pin in pins:
        _bad(where + ".pin", "GPIO%d is already used by sensors[%d]" % (pin, pins[pin]))
    pins[pin] = i
    if kind == "adc":
        if pin in _ADC2:
            _bad(where + ".pin", "GPIO%d is no ADC1 pin: it is on ADC2, which cannot be read "
                 "while WiFi is on (always, on a node): use 32-39" % pin)
        if pin < _ADC1_FIRST:
            _bad(where + ".pin", "GPIO%d is no ADC1 pin (it has no ADC): use 32-39" % pin)
        if entry.get("atten", 11) not in _ATTEN_DB:
            _bad(where + ".atten", "must be 0, 2.5, 6 or 11 (dB)")
        samples = entry.get("samples", 1)
        if not _int(samples) or not 1 <= samples <= MAX_SAMPLES:
            _bad(where + ".samples", "must be a whole number from 1 to %d" % MAX_SAMPLES)
        for name in ("scale", "offset"):
            if not _number(entry.get(name, 0.0)):
                _bad(where + "." + name, "must be a number")
        return
    per_pulse = entry.get("per_pulse", 1.0)
    if not _number(per_pulse) or per_pulse <= 0:
        _bad(where + ".per_pulse", "must be a number above 0")
    pull = entry.get("pull", "up")
    if pull not in _PULLS:
        _bad(where + ".pull", "must be up, down or none")
    if pull != "none" and pin >= _INPUT_ONLY_FIRST:
        _bad(where + ".pull", "GPIO%d has no pull resistor: wire one, and set none" % pin)
    if entry.get("edge", "falling") not in _EDGES:
        _bad(where + ".edge", "must be falling or rising")


def check(table, i2c=None):
    """ValueError naming the first bad field of a sensor table (and of `i2c`, when given)."""
    if i2c is not None:
        check_i2c(i2c)
    if not isinstance(table, list) or len(table) > 255:
        _bad("sensors", "must be a list of at most 255 entries")
    pins = {}
    names = {}
    hello = 0
    bus = False
    for i, entry in enumerate(table):
        _check_entry(i, entry, pins)
        name = entry.get("name")
        unit = entry.get("unit", "")
        if not isinstance(name, str) or not name or len(name.encode()) > _TEXT_MAX:
            _bad("sensors[%d].name" % i, "must be text of 1 to %d bytes" % _TEXT_MAX)
        if not isinstance(unit, str) or len(unit.encode()) > _TEXT_MAX:
            _bad("sensors[%d].unit" % i, "must be text of at most %d bytes" % _TEXT_MAX)
        if name in names:
            _bad("sensors[%d].name" % i, "%r is already the name of sensors[%d]"
                 % (name, names[name]))
        names[name] = i
        hello += _HELLO_PER_SENSOR + len(name.encode()) + len(unit.encode())
        bus = bus or entry["kind"] == "bme280"
    if hello > _HELLO_TABLE_MAX:
        _bad("sensors", "names, units and failure counts take %d bytes, more than a HELLO "
             "frame holds (%d)" % (hello, _HELLO_TABLE_MAX))
    if bus and i2c is not None:
        for line in ("scl", "sda"):
            if i2c[line] in pins:
                _bad("sensors[%d].pin" % pins[i2c[line]],
                     "GPIO%d is the I2C bus's %s" % (i2c[line], line))
