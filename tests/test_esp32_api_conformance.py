"""The stand-in modules have the ESP32 port's names and take, and refuse, the port's arguments.

The firmware runs on emulated boards through the stand-ins in kinhbac/emulator/standins/, so a
stand-in that accepts more than the port would let firmware pass here and fail on a chip. Each
stand-in is held to kinhbac/emulator/esp32_api.json (read from MicroPython v1.24.1's ESP32
source) three ways:

- names: what `dir()` shows of each stand-in module, class and object in the real
  `micropython` binary, against the port's names (emulator-only hooks start with "_");
- signatures: each stand-in function's parameters (read with `ast`) against the port's
  positional and keyword arguments;
- wrong calls: made inside the `micropython` binary, they must raise what the port raises
  (a TypeError for arguments, the port's ValueError or OSError for values it checks).

The stand-ins are Python, the port is C, and MicroPython has no `/` in a def: a stand-in may
also accept by keyword an argument the port takes only by position. The firmware's own calls
are held to the port by tests/test_firmware_api_static.py, which knows the difference.
"""

import ast
import json
import re
from pathlib import Path

import pytest
from helpers.micropython import run_micropython

from kinhbac.emulator import esp32_api
from kinhbac.emulator.flash import FlashImage

STANDINS = Path(esp32_api.__file__).with_name("standins")
MODULES = ("machine", "network", "esp32", "socket")

# Port names a stand-in does not have: no emulated hardware behind them, or nothing uses them
# yet. A name listed here that a stand-in has fails the test, so the list stays true.
NOT_EMULATED = {
    "machine": {
        # peripherals the emulator has no model of
        "SPI", "SoftSPI", "UART", "PWM", "Timer", "TouchPad", "DAC", "ADCBlock", "I2S",
        "SDCard", "mem8", "mem16", "mem32", "bitstream", "dht_readinto", "time_pulse_us",
    },
    "machine.Pin": {"board", "WAKE_LOW", "WAKE_HIGH", "DRIVE_0", "DRIVE_1", "DRIVE_2",
                    "DRIVE_3"},
    "machine.I2C": {"start", "stop", "readinto", "write", "writevto"},
    "machine.SoftI2C": {"start", "stop", "readinto", "write", "writevto"},
    "machine.ADC": {"block"},
    "network": {
        "country", "ipconfig", "phy_mode", "LAN", "PPP", "MODE_11B", "MODE_11G", "MODE_11N",
        "MODE_LR", "AUTH_OPEN", "AUTH_WEP", "AUTH_WPA_PSK", "AUTH_WPA2_PSK", "AUTH_WPA_WPA2_PSK",
        "AUTH_WPA2_ENTERPRISE", "AUTH_WPA3_PSK", "AUTH_WPA2_WPA3_PSK", "AUTH_WAPI_PSK",
        "AUTH_OWE", "AUTH_WPA3_ENT_192", "AUTH_WPA3_EXT_PSK", "AUTH_WPA3_EXT_PSK_MIXED_MODE",
        "AUTH_MAX", "PHY_LAN8710", "PHY_LAN8720", "PHY_IP101", "PHY_RTL8201", "PHY_DP83848",
        "PHY_KSZ8041", "PHY_KSZ8081", "PHY_KSZ8851SNL", "PHY_DM9051", "PHY_W5500",
        "ETH_INITIALIZED", "ETH_STARTED", "ETH_STOPPED", "ETH_CONNECTED", "ETH_DISCONNECTED",
        "ETH_GOT_IP",
    },
    "network.WLAN": {
        "ipconfig", "SEC_OPEN", "SEC_WEP", "SEC_WPA", "SEC_WPA2", "SEC_WPA_WPA2",
        "SEC_WPA2_ENT", "SEC_WPA3", "SEC_WPA2_WPA3", "SEC_WAPI", "SEC_OWE",
    },
    "esp32": {
        "wake_on_touch", "wake_on_ext0", "wake_on_ext1", "wake_on_ulp", "gpio_deep_sleep_hold",
        "raw_temperature", "idf_heap_info", "NVS", "RMT", "ULP", "WAKEUP_ALL_LOW",
        "WAKEUP_ANY_HIGH", "HEAP_DATA", "HEAP_EXEC",
    },
    # The host's socket module has no such option.
    "socket": {"SO_BINDTODEVICE"},
}

# Constants whose value must be the host's: the stand-in socket hands them to the host's
# sockets (Linux numbers, where lwIP on an ESP32 has its own).
HOST_VALUES = {"socket.SOL_SOCKET", "socket.SO_REUSEADDR", "socket.SO_BROADCAST",
               "socket.IP_ADD_MEMBERSHIP", "socket.TCP_NODELAY"}

# An object of each stand-in class, made while the fake hardware answers every call.
INSTANCES = {
    "machine.Pin": "machine.Pin(4)",
    "machine.Signal": "machine.Signal(machine.Pin(4))",
    "machine.I2C": "machine.I2C(0, scl=machine.Pin(22), sda=machine.Pin(21))",
    "machine.SoftI2C": "machine.SoftI2C(machine.Pin(22), machine.Pin(21))",
    "machine.ADC": "machine.ADC(machine.Pin(34))",
    "machine.WDT": "machine.WDT(timeout=5000)",
    "machine.RTC": "machine.RTC()",
    "network.WLAN": "network.WLAN(network.STA_IF)",
    "esp32.Partition": "esp32.Partition('vfs')",
    "socket.socket": "socket.socket()",
}

# Runs in the micropython binary with the stand-ins on its path. The hardware link answers
# zeros while objects are made, then raises Reached: a probe that gets that far was accepted.
HARNESS = r"""
import sys, json
spec = json.load(open(sys.argv[1]))
import _hw

class Reached(Exception):
    pass

mode = ["zeros"]

def fake_call(op, a=0, payload=b""):
    if mode[0] == "raise":
        raise Reached()
    return memoryview(bytearray(64))

_hw.call = fake_call
_hw.set_irq = lambda *args: None
_hw.link_up = True  # so that socket.getaddrinfo asks the (fake) access point
import _flash
_flash.open_image()
import machine, network, esp32, socket

def kind(v):
    if isinstance(v, type):
        return "class"
    if isinstance(v, (bool, int, float, str, bytes)):
        return "constant"
    if type(v) is type(sys):
        return "module"
    if callable(v):
        return "function"
    return "object"

def describe(obj):
    out = {}
    for n in dir(obj):
        if n.startswith("__"):
            continue
        try:
            v = getattr(obj, n)
        except AttributeError:
            continue
        k = kind(v)
        out[n] = [k, v if k == "constant" and not isinstance(v, bytes) else None]
    return out

env = {"machine": machine, "network": network, "esp32": esp32, "socket": socket}
result = {"names": {}, "instances": {}, "probes": {}}
for m in spec["modules"]:
    mod = sys.modules[m]
    result["names"][m] = describe(mod)
    for n, (k, _) in result["names"][m].items():
        if k == "class":
            result["names"][m + "." + n] = describe(getattr(mod, n))
instances = {}
for name, code in spec["instances"].items():
    try:
        instances[name] = eval(code, env)
        result["instances"][name] = describe(instances[name])
    except Exception as e:
        result["instances"][name] = repr(e)
env["I"] = instances
mode[0] = "raise"
for pid, code in spec["probes"].items():
    try:
        eval(code, env)
        result["probes"][pid] = ["ok", ""]
    except Reached:
        result["probes"][pid] = ["reached", ""]
    except Exception as e:
        result["probes"][pid] = [type(e).__name__, str(e)]
with open(sys.argv[2], "w") as f:
    json.dump(result, f)
"""

_BINDING = re.compile(r"positional argument|keyword argument|argument required|takes \d+ "
                      r"positional|doesn't take keyword|extra (keyword|positional)|missing")


# ----- the stand-ins as source -----

def _py_sig(fn: ast.FunctionDef, method: bool) -> dict:
    a = fn.args
    positional = a.args[1:] if method else a.args
    n_req = len(positional) - len(a.defaults)
    params = [{"name": p.arg, "kind": "pos_or_kw", "required": k < n_req}
              for k, p in enumerate(positional)]
    params += [{"name": p.arg, "kind": "kw_only", "required": d is None}
               for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    return {"params": params, "varargs": a.vararg is not None, "varkw": a.kwarg is not None}


def standin_source() -> dict[str, dict]:
    """qualname -> {"kind", "sig", "line"} for what each stand-in defines in Python."""
    out: dict[str, dict] = {}
    for module in MODULES:
        path = STANDINS / f"{module}.py"
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                out[f"{module}.{node.name}"] = {"kind": "function", "sig": _py_sig(node, False),
                                                "line": f"{path.name}:{node.lineno}"}
            elif isinstance(node, ast.ClassDef):
                cls = f"{module}.{node.name}"
                out[cls] = {"kind": "class", "line": f"{path.name}:{node.lineno}",
                            "bases": [ast.unparse(b) for b in node.bases]}
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        static = any(ast.unparse(d) == "staticmethod"
                                     for d in item.decorator_list)
                        sig = _py_sig(item, not static)
                        if item.name == "__init__":
                            out[cls]["sig"] = sig
                        else:
                            out[f"{cls}.{item.name}"] = {"kind": "function", "sig": sig,
                                                         "line": f"{path.name}:{item.lineno}"}
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
                for t in node.targets:
                    if isinstance(t, ast.Name) and f"{module}.{node.value.id}" in out:
                        out[f"{module}.{t.id}"] = dict(out[f"{module}.{node.value.id}"])
    # A subclass without its own __init__ is made as its base is.
    for name, d in out.items():
        if d["kind"] == "class" and "sig" not in d:
            module = name.split(".")[0]
            for base in d.get("bases", []):
                base_sig = out.get(f"{module}.{base}", {}).get("sig")
                if base_sig:
                    d["sig"] = base_sig
    return out


def port_entries():
    """(qualname, entry) of every function, and class with a constructor, the port has."""
    for module in MODULES:
        for name, entry in esp32_api.lookup(module)["members"].items():
            yield f"{module}.{name}", entry
            for mname, mentry in (entry.get("members") or {}).items():
                yield f"{module}.{name}.{mname}", mentry


def _positional(sig):
    return [p for p in sig["params"] if p["kind"] in ("pos_only", "pos_or_kw")]


def _bounds(sig):
    pos = _positional(sig)
    return sum(1 for p in pos if p["required"]), None if sig.get("varargs") else len(pos)


def _keywords_only_the_stand_in_takes(port: dict, standin: dict) -> list[str]:
    """Keywords the stand-in takes and the port refuses, but for the stand-in's names of
    arguments the port takes by position only (a Python def cannot refuse those)."""
    port_keywords = {p["name"] for p in port["params"] if p["kind"] != "pos_only"}
    out = []
    for k, p in enumerate(standin["params"]):
        if p["name"] in port_keywords:
            continue
        if p["kind"] == "pos_or_kw" and k < len(port["params"]) and \
                port["params"][k]["kind"] == "pos_only":
            continue
        out.append(p["name"])
    return out


def signature_mismatches(port: dict, standin: dict) -> list[str]:
    """How a stand-in's Python signature takes other calls than the port's."""
    if port.get("custom"):
        return []  # the port parses its arguments itself: probed at run time instead
    problems = []
    p_min, p_max = _bounds(port)
    s_min, s_max = _bounds(standin)
    if s_min != p_min:
        problems.append(f"needs {s_min} positional arguments, the port {p_min}")
    if s_max != p_max:
        problems.append(f"takes at most {s_max} positional arguments, the port {p_max}")
    p_pos = [p["name"] for p in _positional(port)]
    s_pos = [p["name"] for p in _positional(standin)]
    s_names = {p["name"] for p in standin["params"]}
    for p in port["params"]:
        if p["kind"] == "pos_only":
            continue
        if p["name"] not in s_names and not standin["varkw"]:
            problems.append(f"refuses keyword {p['name']!r}, which the port takes")
        elif p["kind"] == "pos_or_kw" and p["name"] in s_pos and \
                s_pos.index(p["name"]) != p_pos.index(p["name"]):
            problems.append(f"has {p['name']!r} at another position than the port")
        elif p["kind"] == "kw_only" and p["name"] in s_pos:
            problems.append(f"takes {p['name']!r} by position, the port by keyword only")
    for name in _keywords_only_the_stand_in_takes(port, standin):
        problems.append(f"takes keyword {name!r}, which the port refuses")
    if standin["varkw"] and not port.get("varkw"):
        problems.append("takes any keyword (**kwargs), the port does not")
    return problems


# ----- running the stand-ins -----

def wrong_call_probes() -> dict[str, tuple[str, str]]:
    """probe code -> (what it is, the port's error): calls the port refuses by their arguments."""
    source = standin_source()
    probes = {}
    for qual, entry in port_entries():
        sig = esp32_api.signature(entry)
        if sig is None or sig.get("custom") or qual not in source:
            continue
        parts = qual.split(".")
        if entry["kind"] == "function" and len(parts) == 3:
            cls = ".".join(parts[:2])
            if cls not in INSTANCES:
                continue
            target = f"I[{cls!r}].{parts[2]}"
            if entry.get("binding") == "staticmethod":
                target = qual
        else:
            target = qual
        p_min, p_max = _bounds(sig)
        if p_max is not None:
            args = ", ".join(["None"] * (p_max + 1))
            probes[f"{target}({args})"] = (f"{qual} with {p_max + 1} positional arguments",
                                           "too_many_positional")
        base = ["None"] * p_min
        if not sig.get("varkw"):
            call = ", ".join(base + ["kinhbac_no_such_keyword=1"])
            probes[f"{target}({call})"] = (f"{qual} with an unknown keyword", "bad_keyword")
            for name in _keywords_only_the_stand_in_takes(sig, source[qual]["sig"]):
                call = ", ".join(base + [f"{name}=None"])
                probes[f"{target}({call})"] = (f"{qual} with keyword {name!r}", "bad_keyword")
        if p_min > 0:
            args = ", ".join(["None"] * (p_min - 1))
            probes[f"{target}({args})"] = (f"{qual} with {p_min - 1} positional arguments",
                                           "missing")
    return probes


# Values the port checks itself: (code, exception, message, where the table says so).
VALUE_PROBES = [
    ("machine.Pin(24)", "ValueError", "invalid pin", "machine.Pin"),
    ("machine.Pin(40)", "ValueError", "invalid pin", "machine.Pin"),
    ("machine.Pin(-1)", "ValueError", "invalid pin", "machine.Pin"),
    ("machine.Pin(34, machine.Pin.OUT)", "ValueError", "pin can only be input", "machine.Pin"),
    ("machine.Pin(39).init(machine.Pin.OPEN_DRAIN)", "ValueError", "pin can only be input",
     "machine.Pin.init"),
    ("machine.ADC(machine.Pin(5))", "ValueError", "invalid pin", "machine.ADC"),
    ("machine.ADC(machine.Pin(34), atten=4)", "ValueError", "invalid atten", "machine.ADC"),
    ("machine.ADC(machine.Pin(34)).atten(7)", "ValueError", "invalid atten", "machine.ADC"),
    ("machine.WDT(timeout=0)", "ValueError", "WDT timeout too short", "machine.WDT"),
    ("machine.WDT(id=1, timeout=5000)", "ValueError", "", "machine.WDT"),
    ("machine.RTC().memory(bytes(2049))", "ValueError", "buffer too long",
     "machine.RTC.memory"),
    ("machine.I2C(2)", "ValueError", "I2C(2) doesn't exist", "machine.I2C"),
    ("network.WLAN(5)", "ValueError", "invalid WLAN interface identifier", "network.WLAN"),
    ("network.WLAN(network.STA_IF).status('stations')", "OSError", "AP required",
     "network.WLAN.status"),
    ("network.WLAN(network.STA_IF).status('channel')", "ValueError", "unknown status param",
     "network.WLAN.status"),
    ("network.WLAN(network.STA_IF).config('colour')", "ValueError", "unknown config param",
     "network.WLAN.config"),
    ("network.WLAN(network.STA_IF).config(colour='red')", "ValueError", "unknown config param",
     "network.WLAN.config"),
    ("network.WLAN(network.STA_IF).config()", "TypeError", "can query only one param",
     "network.WLAN.config"),
    ("network.WLAN(network.STA_IF).config('mac', 'ssid')", "TypeError",
     "can query only one param", "network.WLAN.config"),
    ("network.WLAN(network.STA_IF).config('mac', hostname='x')", "TypeError",
     "either pos or kw args are allowed", "network.WLAN.config"),
    ("esp32.Partition(7)", "ValueError", "", "esp32.Partition"),
    ("esp32.Partition('no-such-label')", "OSError", "", "esp32.Partition"),
]

HARD_IRQ = "machine.Pin(4).irq(handler=lambda p: None, hard=True)"

# Calls the port takes, which must get past the stand-in's checks (to the hardware, or done).
ACCEPTED_PROBES = [
    "machine.Pin(39, machine.Pin.IN)",
    "machine.Pin(4, machine.Pin.OUT, value=1, drive=machine.Pin.DRIVE_2 if "
    "hasattr(machine.Pin, 'DRIVE_2') else 2, hold=False)",
    "machine.Pin(27, machine.Pin.IN, machine.Pin.PULL_UP).irq(lambda p: None, "
    "machine.Pin.IRQ_FALLING, None)",
    "machine.Pin(27).irq(handler=None, trigger=machine.Pin.IRQ_RISING, wake=None)",
    "machine.ADC(machine.Pin(36), atten=machine.ADC.ATTN_11DB)",
    "machine.ADC(machine.Pin(25)).init(atten=machine.ADC.ATTN_6DB)",
    "machine.WDT(timeout=1)",
    "machine.RTC().memory(bytes(2048))",
    "machine.I2C(1)",
    "machine.SoftI2C(scl=machine.Pin(22), sda=machine.Pin(21), freq=100000)",
    "network.WLAN(network.AP_IF)",
    "network.WLAN(network.STA_IF).config(hostname='node', reconnects=3)",
    "network.WLAN(network.STA_IF).config('mac')",
    "esp32.Partition(esp32.Partition.RUNNING)",
    "esp32.Partition(esp32.Partition.BOOT, 512)",
    "esp32.Partition('ota_0').get_next_update()",
    "esp32.Partition('ota_1').set_boot()",
    "esp32.Partition.find(esp32.Partition.TYPE_DATA, label='vfs')",
    "esp32.Partition.mark_app_valid_cancel_rollback()",
    "socket.getaddrinfo('gateway.local', 1883, 0, socket.SOCK_STREAM)",
]


@pytest.fixture(scope="module")
def board_run(tmp_path_factory):
    """The harness's findings: names, objects, and the outcome of every probe."""
    tmp = tmp_path_factory.mktemp("conformance")
    flash = FlashImage(tmp / "flash.bin")
    flash.create()
    probes = list(wrong_call_probes()) + [p[0] for p in VALUE_PROBES] + ACCEPTED_PROBES
    probes.append(HARD_IRQ)
    spec = {"modules": MODULES, "instances": INSTANCES,
            "probes": {str(k): code for k, code in enumerate(probes)}}
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "harness.py").write_text(HARNESS)
    done = run_micropython(tmp / "harness.py", tmp / "spec.json", tmp / "out.json", cwd=tmp,
                           env={"MICROPYPATH": str(STANDINS), "KINHBAC_FLASH": str(flash.path)})
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp / "out.json").read_text())
    result["by_code"] = {code: result["probes"][str(k)] for k, code in enumerate(probes)}
    return result


def _table_members(qual: str) -> dict:
    entry = esp32_api.lookup(qual)
    return {n: e for n, e in (entry.get("members") or {}).items() if not n.startswith("__")}


def test_stand_ins_have_the_ports_names_and_no_others(board_run):
    problems = []
    for qual, names in board_run["names"].items():
        port = _table_members(qual)
        public = {n: kv for n, kv in names.items() if not n.startswith("_") and kv[0] != "module"}
        skipped = NOT_EMULATED.get(qual, set())
        for name in sorted(set(public) - set(port)):
            problems.append(f"{qual}.{name}: the port has no such name (an emulator-only hook "
                            "starts with '_')")
        for name in sorted(set(port) - set(public) - skipped):
            problems.append(f"{qual}.{name}: on the port ({port[name]['src']}), not in the "
                            "stand-in (or list it in NOT_EMULATED)")
        for name in sorted(skipped & set(public)):
            problems.append(f"{qual}.{name}: listed in NOT_EMULATED but the stand-in has it")
        for name in sorted(set(public) & set(port)):
            kind, value = public[name]
            want = port[name]["kind"]
            if want == "exception":
                want = "class"
            if kind != want:
                problems.append(f"{qual}.{name}: a {kind} here, a {want} on the port")
            elif kind == "constant" and port[name].get("value") is not None \
                    and f"{qual}.{name}" not in HOST_VALUES and value != port[name]["value"]:
                problems.append(f"{qual}.{name} = {value!r}, on the port "
                                f"{port[name]['value']!r} ({port[name]['expr']}, "
                                f"{port[name]['src']})")
    assert not problems, "\n".join(problems)


def test_stand_in_objects_show_only_the_ports_attributes(board_run):
    problems = []
    for qual, names in board_run["instances"].items():
        assert isinstance(names, dict), f"{INSTANCES[qual]} failed: {names}"
        port = _table_members(qual)
        for name, (kind, _) in sorted(names.items()):
            if not name.startswith("_") and name not in port and kind != "module":
                problems.append(f"{INSTANCES[qual]}.{name}: the port's {qual} has no such "
                                "attribute (name it with a leading '_')")
    assert not problems, "\n".join(problems)


def test_stand_in_signatures_take_the_ports_arguments():
    source = standin_source()
    problems = []
    for qual, entry in port_entries():
        sig = esp32_api.signature(entry)
        mine = source.get(qual)
        if sig is None or mine is None or "sig" not in mine:
            continue
        for problem in signature_mismatches(sig, mine["sig"]):
            problems.append(f"{qual} ({mine['line']}) {problem}; the port: "
                            f"{esp32_api.describe(sig)} ({sig.get('src')})")
    assert not problems, "\n".join(problems)


def test_wrong_calls_raise_what_the_port_raises(board_run):
    problems = []
    for code, (what, which) in wrong_call_probes().items():
        outcome, message = board_run["by_code"][code]
        if outcome != "TypeError" or not _BINDING.search(message):
            problems.append(f"{what}: {code} gave {outcome} {message!r}, the port a TypeError")
    assert not problems, "\n".join(problems)


def test_pin_irq_refuses_hard_as_the_port_does(board_run):
    # The ESP32 port has no hard IRQ: every pin handler goes through mp_sched_schedule.
    assert "hard" not in [p["name"] for p in esp32_api.lookup("machine.Pin.irq")["sig"]["params"]]
    outcome, message = board_run["by_code"][HARD_IRQ]
    assert (outcome, message) == ("TypeError", "unexpected keyword argument 'hard'")


def test_values_the_port_refuses_are_refused_with_its_error(board_run):
    problems = []
    for code, etype, message, where in VALUE_PROBES:
        raises = [r for r in esp32_api.lookup(where).get("raises", []) if r["type"] == etype]
        said = {m for r in raises for m in (r.get("message") or "").split(" | ")}
        assert raises and (not message or message in said or
                           any(re.fullmatch(re.escape(m).replace("%d", r"-?\d+"), message)
                                               for m in said)), \
            f"the table does not say {where} raises {etype} {message!r}"
        outcome, got = board_run["by_code"][code]
        if outcome != etype or (message and got != message):
            problems.append(f"{code}: {outcome} {got!r}; the port: {etype} {message!r}")
    assert not problems, "\n".join(problems)


def test_calls_the_port_accepts_are_accepted(board_run):
    problems = []
    for code in ACCEPTED_PROBES:
        outcome, message = board_run["by_code"][code]
        if outcome not in ("ok", "reached"):
            problems.append(f"{code}: {outcome} {message!r}")
    assert not problems, "\n".join(problems)
