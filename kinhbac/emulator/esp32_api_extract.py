"""Read the ESP32 port's Python API out of MicroPython's source at a release tag.

This is how `esp32_api.json` is made (`python -m kinhbac.emulator.esp32_api regenerate`); the
tests only read the JSON. It works on a git directory of micropython/micropython and reads
what the C compiler would see for the ESP32_GENERIC board:

- a small C preprocessor: `#if`/`#ifdef`/`#elif`/`#else`, object- and function-like
  `#define`s, `#include "..."` within ports/esp32 and extmod, and the port's
  `MICROPY_..._INCLUDEFILE` macros. The global defines come from the board's sdkconfig files,
  `mpconfigboard.h`, `mpconfigport.h` and `py/mpconfig.h`, on top of the ESP-IDF and SoC
  values in `IDF_CONFIG` (the ESP-IDF tree is not part of MicroPython's);
- module and class tables (`{ MP_ROM_QSTR(MP_QSTR_name), MP_ROM_PTR(&obj) }`), the function
  objects they point to (`MP_DEFINE_CONST_FUN_OBJ_n`, `_VAR_BETWEEN`, `_KW` with its
  `allowed_args`), types (`MP_DEFINE_CONST_OBJ_TYPE` with `make_new` and `locals_dict`), and
  the `mp_raise_*` calls a function (or a helper in the same file it calls) makes;
- the frozen asyncio package (extmod/asyncio/*.py), with Python's `ast`.

Where the C does its own argument handling (e.g. `WLAN.config`), the entry says so ("custom")
and lists the names the function's `switch` knows. Every entry carries the file:line it was
read from, so a reader can check it against the source.
"""

from __future__ import annotations

import ast
import bisect
import re
import subprocess
from dataclasses import dataclass, field
from typing import Any

from kinhbac.emulator.esp32_api import describe

# ESP-IDF and SoC values the port's #if lines and constants use, for a plain ESP32 (no PSRAM).
# They live in ESP-IDF, not in MicroPython: components/soc/esp32/include/soc/soc_caps.h,
# hal/include/hal/gpio_types.h and adc_types.h, esp_hw_support/include/esp_sleep.h,
# esp_wifi/include/esp_wifi_types(_generic).h, esp_partition/include/esp_partition.h, lwIP's
# sockets.h. An identifier in an #if that is neither here nor #defined counts as 0, as in C.
IDF_CONFIG: dict[str, int] = {
    "CONFIG_IDF_TARGET_ESP32": 1,
    "CONFIG_IDF_TARGET_ARCH_XTENSA": 1,
    "CONFIG_ESP_NETIF_TCPIP_LWIP": 1,
    "CONFIG_ETH_USE_ESP32_EMAC": 1,
    "CONFIG_FREERTOS_UNICORE": 0,
    "SOC_ADC_PERIPH_NUM": 2,
    "SOC_ADC_RTC_MIN_BITWIDTH": 9,
    "SOC_ADC_RTC_MAX_BITWIDTH": 12,
    "SOC_DAC_SUPPORTED": 1,
    "SOC_I2S_SUPPORTED": 1,
    "SOC_PCNT_SUPPORTED": 1,
    "SOC_RMT_SUPPORTED": 1,
    "SOC_TOUCH_SENSOR_SUPPORTED": 1,
    "SOC_ULP_SUPPORTED": 1,
    "SOC_PM_SUPPORT_EXT0_WAKEUP": 1,
    "SOC_PM_SUPPORT_EXT1_WAKEUP": 1,
    "SOC_SDMMC_HOST_SUPPORTED": 1,
    "SOC_TEMP_SENSOR_SUPPORTED": 0,
    "SOC_GPIO_SUPPORT_HOLD_SINGLE_IO_IN_DSLP": 0,
    "SOC_USB_OTG_SUPPORTED": 0,
    "SOC_USB_SERIAL_JTAG_SUPPORTED": 0,
    "SOC_TOUCH_VERSION_1": 1,
    "SOC_LEDC_SUPPORT_APB_CLOCK": 1,
    "SOC_LEDC_SUPPORT_REF_TICK": 1,
    "SOC_UART_SUPPORT_APB_CLK": 1,
    "SOC_UART_SUPPORT_REF_TICK": 1,
    "CONFIG_LWIP_IPV6": 1,  # ESP-IDF's Kconfig default
    "SOC_I2C_NUM": 2,
    "SOC_UART_NUM": 3,
    "SOC_UART_HP_NUM": 3,
    "SOC_TIMER_GROUPS": 2,
    "SOC_TIMER_GROUP_TIMERS_PER_GROUP": 2,
    "SOC_LEDC_SUPPORT_HS_MODE": 1,
    "SOC_SPI_PERIPH_NUM": 3,
    # Constants the port exposes as MP_ROM_INT(<ESP-IDF name>).
    "GPIO_MODE_INPUT": 1,  # GPIO_MODE_DEF_INPUT = BIT0
    "GPIO_MODE_OUTPUT": 2,
    "GPIO_MODE_OUTPUT_OD": 6,
    "GPIO_MODE_INPUT_OUTPUT": 3,
    "GPIO_MODE_INPUT_OUTPUT_OD": 7,  # BIT0 | BIT1 | BIT2
    "GPIO_MODE_DEF_OUTPUT": 2,
    "GPIO_INTR_POSEDGE": 1,
    "GPIO_INTR_NEGEDGE": 2,
    "GPIO_INTR_ANYEDGE": 3,
    "GPIO_INTR_LOW_LEVEL": 4,
    "GPIO_INTR_HIGH_LEVEL": 5,
    "GPIO_DRIVE_CAP_0": 0,
    "GPIO_DRIVE_CAP_1": 1,
    "GPIO_DRIVE_CAP_2": 2,
    "GPIO_DRIVE_CAP_3": 3,
    "ESP_SLEEP_WAKEUP_EXT0": 2,
    "ESP_SLEEP_WAKEUP_EXT1": 3,
    "ESP_SLEEP_WAKEUP_TIMER": 4,
    "ESP_SLEEP_WAKEUP_TOUCHPAD": 5,
    "ESP_SLEEP_WAKEUP_ULP": 6,
    "ADC_ATTEN_DB_0": 0,
    "ADC_ATTEN_DB_2_5": 1,
    "ADC_ATTEN_DB_6": 2,
    "ADC_ATTEN_DB_11": 3,
    "ADC_ATTEN_DB_12": 3,
    "WIFI_IF_STA": 0,
    "WIFI_IF_AP": 1,
    "WIFI_PS_NONE": 0,
    "WIFI_PS_MIN_MODEM": 1,
    "WIFI_PS_MAX_MODEM": 2,
    "WIFI_REASON_BEACON_TIMEOUT": 200,
    "WIFI_REASON_NO_AP_FOUND": 201,
    "WIFI_REASON_AUTH_FAIL": 202,
    "WIFI_REASON_ASSOC_FAIL": 203,
    "WIFI_REASON_HANDSHAKE_TIMEOUT": 204,
    "WIFI_REASON_NO_AP_FOUND_W_COMPATIBLE_SECURITY": 210,
    "WIFI_REASON_NO_AP_FOUND_IN_AUTHMODE_THRESHOLD": 211,
    "WIFI_REASON_NO_AP_FOUND_IN_RSSI_THRESHOLD": 212,
    "ESP_PARTITION_TYPE_APP": 0,
    "ESP_PARTITION_TYPE_DATA": 1,
    "AF_INET": 2,
    "AF_INET6": 10,
    "SOCK_STREAM": 1,
    "SOCK_DGRAM": 2,
    "SOCK_RAW": 3,
    "IPPROTO_IP": 0,
    "IPPROTO_TCP": 6,
    "IPPROTO_UDP": 17,
    "SOL_SOCKET": 0xFFF,
    "SO_REUSEADDR": 0x0004,
    "SO_BROADCAST": 0x0020,
}

# ESP-IDF release each MicroPython tag names first in ports/esp32/README.md as the one to use.
IDF_VERSION = {"v1.22.0": (5, 0, 4), "v1.24.1": (5, 2, 2), "v1.26.0": (5, 4, 2)}
DEFAULT_IDF_VERSION = (5, 2, 2)

BOARD_DIR = "ports/esp32/boards/ESP32_GENERIC"
SDKCONFIGS = ("ports/esp32/boards/sdkconfig.base", "ports/esp32/boards/sdkconfig.ble")

# Modules the firmware and the stand-ins use: (name, file holding the globals table, table).
C_MODULES = (
    ("machine", "extmod/modmachine.c", "machine_module_globals_table"),
    ("network", "extmod/modnetwork.c", "mp_module_network_globals_table"),
    ("esp32", "ports/esp32/modesp32.c", "esp32_module_globals_table"),
    ("socket", "ports/esp32/modsocket.c", "mp_module_socket_globals_table"),
    ("select", "extmod/modselect.c", "mp_module_select_globals_table"),
    ("time", "extmod/modtime.c", "mp_module_time_globals_table"),
    ("os", "extmod/modos.c", "os_module_globals_table"),
    ("micropython", "py/modmicropython.c", "mp_module_micropython_globals_table"),
    ("gc", "py/modgc.c", "mp_module_gc_globals_table"),
    ("sys", "py/modsys.c", "mp_module_sys_globals_table"),
    ("struct", "py/modstruct.c", "mp_module_struct_globals_table"),
    ("errno", "py/moderrno.c", "mp_module_errno_globals_table"),
    ("hashlib", "extmod/modhashlib.c", "mp_module_hashlib_globals_table"),
    ("binascii", "extmod/modbinascii.c", "mp_module_binascii_globals_table"),
    ("json", "extmod/modjson.c", "mp_module_json_globals_table"),
    ("random", "extmod/modrandom.c", "mp_module_random_globals_table"),
)
PY_PACKAGES = (("asyncio", "extmod/asyncio"),)

# Classes reached other than as a module attribute: the value a factory function returns.
RETURNS = {
    "select.poll": ("select", "poll", "mp_type_poll"),
}

# Where argument errors come from, to quote them with their line.
ARG_ERRORS = {
    # mp_arg_parse_all (C functions with an allowed_args table)
    "extra_keyword": ("TypeError", "extra keyword arguments given", "py/argcheck.c"),
    "extra_positional": ("TypeError", "extra positional arguments given", "py/argcheck.c"),
    "required": ("TypeError", "'%q' argument required", "py/argcheck.c"),
    # mp_arg_check_num_sig (MP_DEFINE_CONST_FUN_OBJ_n / _VAR / _VAR_BETWEEN, make_new)
    "no_keywords": ("TypeError", "function doesn't take keyword arguments", "py/argcheck.c"),
    "takes_n": ("TypeError", "function takes %d positional arguments but %d were given",
                "py/argcheck.c"),
    "missing_n": ("TypeError", "function missing %d required positional arguments",
                  "py/argcheck.c"),
    "at_most": ("TypeError", "function expected at most %d arguments, got %d", "py/argcheck.c"),
    # Python functions (asyncio), MICROPY_ERROR_REPORTING_NORMAL
    "py_unexpected_keyword": ("TypeError", "unexpected keyword argument '%q'", "py/bc.c"),
    "py_takes_n": ("TypeError", "function takes %d positional arguments but %d were given",
                   "py/bc.c"),
    "py_missing": ("TypeError", "function missing required positional argument #%d", "py/bc.c"),
}


# ----- reading the repository -----

class Repo:
    """Files of one tag of a bare git directory."""

    def __init__(self, git_dir: str, tag: str):
        self.git_dir = git_dir
        self.tag = tag
        self._files: dict[str, str | None] = {}
        self._greps: dict[str, list[str]] = {}
        r = subprocess.run(["git", "-C", git_dir, "ls-tree", "-r", "--name-only", tag],
                           capture_output=True, text=True, check=True)
        self.paths = set(r.stdout.splitlines())

    def read(self, path: str) -> str | None:
        if path not in self.paths:
            return None
        if path not in self._files:
            r = subprocess.run(["git", "-C", self.git_dir, "show", f"{self.tag}:{path}"],
                               capture_output=True, text=True)
            self._files[path] = r.stdout if r.returncode == 0 else None
        return self._files[path]

    def exists(self, path: str) -> bool:
        return path in self.paths

    def grep(self, word: str) -> list[str]:
        if word not in self._greps:
            r = subprocess.run(
                ["git", "-C", self.git_dir, "grep", "-l", "-w", word, self.tag, "--",
                 "ports/esp32/*.c", "ports/esp32/*.h", "extmod/*.c", "extmod/*.h", "py/*.c",
                 "shared/*.c", "drivers/dht/*.c"],
                capture_output=True, text=True)
            prefix = self.tag + ":"
            self._greps[word] = [line[len(prefix):] for line in r.stdout.splitlines()
                                 if line.startswith(prefix)]
        return self._greps[word]

    def listdir(self, folder: str) -> list[str]:
        r = subprocess.run(["git", "-C", self.git_dir, "ls-tree", "--name-only",
                            f"{self.tag}:{folder}"], capture_output=True, text=True)
        return r.stdout.split()


def strip_comments(text: str) -> str:
    """C comments replaced by spaces, newlines kept (so line numbers stay right)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


# ----- a small C preprocessor -----

@dataclass
class Line:
    path: str
    no: int
    text: str

    @property
    def src(self) -> str:
        return f"{self.path}:{self.no}"


@dataclass
class Macro:
    params: list[str] | None
    body: str
    lines: list[Line]  # the #define's physical lines, for tables built from macros


_TOKEN = re.compile(r"\s*(0[xX][0-9a-fA-F]+[uUlL]*|\d+[uUlL]*|[A-Za-z_]\w*|&&|\|\||<<|>>|"
                    r"<=|>=|==|!=|\"(?:\\.|[^\"])*\"|'(?:\\.|[^'])*'|\S)")


def tokens(text: str) -> list[str]:
    out = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            break
        out.append(m.group(1))
        pos = m.end()
    return out


class CondError(Exception):
    pass


class Preprocessor:
    """Active lines of a translation unit for the ESP32_GENERIC build."""

    def __init__(self, repo: Repo, defines: dict[str, Macro] | None = None):
        self.repo = repo
        self.defines: dict[str, Macro] = dict(defines or {})
        self.assumed_zero: set[str] = set()
        self.unreadable: list[str] = []

    # -- macros --

    def define(self, name: str, body: str, params: list[str] | None = None,
               lines: list[Line] | None = None):
        self.defines[name] = Macro(params, body, lines or [])

    def expand(self, toks: list[str], hide: frozenset = frozenset()) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(toks):
            t = toks[i]
            m = self.defines.get(t)
            if m is None or t in hide:
                out.append(t)
                i += 1
                continue
            if m.params is None:
                out.extend(self.expand(tokens(m.body), hide | {t}))
                i += 1
                continue
            if i + 1 >= len(toks) or toks[i + 1] != "(":
                out.append(t)
                i += 1
                continue
            args, j = _call_args(toks, i + 1)
            body = tokens(m.body)
            subst = dict(zip(m.params, args))
            replaced: list[str] = []
            for b in body:
                replaced.extend(subst.get(b, [b]))
            out.extend(self.expand(replaced, hide | {t}))
            i = j
        return out

    def evaluate(self, expr: str) -> int:
        toks = tokens(expr)
        # `defined X` and `defined(X)` before expansion, as the standard says.
        pre: list[str] = []
        i = 0
        while i < len(toks):
            if toks[i] == "defined":
                if i + 1 < len(toks) and toks[i + 1] == "(":
                    name, i = toks[i + 2], i + 4
                else:
                    name, i = toks[i + 1], i + 2
                pre.append("1" if name in self.defines else "0")
            else:
                pre.append(toks[i])
                i += 1
        expanded = self.expand(pre)
        final = []
        for t in expanded:
            if re.match(r"[A-Za-z_]\w*$", t):
                self.assumed_zero.add(t)
                final.append("0")
            else:
                final.append(t)
        return _CExpr(final).parse()

    # -- directives --

    def process(self, path: str, out: list[Line] | None = None, depth: int = 0) -> list[Line]:
        """The active lines of `path` (and of what it includes), with their origin."""
        out = [] if out is None else out
        text = self.repo.read(path)
        if text is None or depth > 12:
            return out
        raw = strip_comments(text).split("\n")
        stack: list[list[bool]] = []  # [active here, some branch taken, parent active]
        active = True
        i = 0
        while i < len(raw):
            no = i + 1
            line = raw[i]
            phys = [Line(path, no, line)]
            while line.endswith("\\") and i + 1 < len(raw):
                i += 1
                phys.append(Line(path, i + 1, raw[i]))
                line = line[:-1] + "\n" + raw[i]
            i += 1
            stripped = line.strip()
            if not stripped.startswith("#"):
                if active:
                    out.extend(phys)
                continue
            m = re.match(r"#\s*(\w+)\s*(.*)", stripped, re.S)
            if not m:
                continue
            word, rest = m.group(1), m.group(2).strip()
            if word in ("if", "ifdef", "ifndef"):
                if not active:
                    stack.append([False, True, False])
                    continue
                if word == "ifdef":
                    cond = rest.split()[0] in self.defines
                elif word == "ifndef":
                    cond = rest.split()[0] not in self.defines
                else:
                    cond = self._cond(rest, path, no)
                stack.append([cond, cond, True])
                active = cond
            elif word == "elif":
                top = stack[-1]
                if top[2] and not top[1]:
                    cond = self._cond(rest, path, no)
                    top[0] = cond
                    top[1] = cond
                else:
                    top[0] = False
                active = top[0]
            elif word == "else":
                top = stack[-1]
                top[0] = top[2] and not top[1]
                top[1] = True
                active = top[0]
            elif word == "endif":
                stack.pop()
                active = stack[-1][0] if stack else True
            elif not active:
                continue
            elif word == "define":
                dm = re.match(r"(\w+)(\([^)]*\))?\s*(.*)", rest, re.S)
                if dm:
                    params = None
                    if dm.group(2):
                        params = [p.strip() for p in dm.group(2)[1:-1].split(",") if p.strip()]
                    body_lines = [Line(ln.path, ln.no, ln.text.rstrip("\\")) for ln in phys]
                    self.define(dm.group(1), dm.group(3).replace("\n", " "), params, body_lines)
            elif word == "undef":
                self.defines.pop(rest.split()[0], None)
            elif word == "include":
                target = self._include_target(rest, path)
                if target:
                    self.process(target, out, depth + 1)
        return out

    def _cond(self, expr: str, path: str, no: int) -> bool:
        try:
            return bool(self.evaluate(expr))
        except (CondError, IndexError) as e:
            # Taken as false, as an unknown name would be; reported with the table.
            self.unreadable.append(f"{path}:{no}: #if {expr.strip()!r}: {e}")
            return False

    def _include_target(self, rest: str, here: str) -> str | None:
        if rest.startswith("<"):
            return None
        if rest.startswith('"'):
            name = rest[1:rest.index('"', 1)]
            from_macro = False
        else:
            toks = self.expand(tokens(rest))
            if not toks or not toks[0].startswith('"'):
                return None
            name = toks[0][1:-1]
            from_macro = True
        here_dir = here.rsplit("/", 1)[0]
        for candidate in (f"{here_dir}/{name}", f"ports/esp32/{name}", f"{BOARD_DIR}/{name}",
                          name):
            if not self.repo.exists(candidate):
                continue
            # py/ and shared/ headers hold declarations only; the config is read up front.
            if not from_macro and candidate.startswith(("py/", "shared/", "lib/")):
                return None
            return candidate
        return None


def _call_args(toks: list[str], open_at: int) -> tuple[list[list[str]], int]:
    """Arguments of a macro call whose '(' is at open_at; returns (args, index after ')')."""
    depth = 0
    args: list[list[str]] = [[]]
    i = open_at
    while i < len(toks):
        t = toks[i]
        if t == "(":
            depth += 1
            if depth > 1:
                args[-1].append(t)
        elif t == ")":
            depth -= 1
            if depth == 0:
                return ([a for a in args if a] if args != [[]] else []), i + 1
            args[-1].append(t)
        elif t == "," and depth == 1:
            args.append([])
        else:
            args[-1].append(t)
        i += 1
    raise CondError("unbalanced macro call")


class _CExpr:
    """Pratt parser for the integer constant expressions of #if lines."""

    _BINARY = {
        "||": 1, "&&": 2, "|": 3, "^": 4, "&": 5, "==": 6, "!=": 6, "<": 7, ">": 7,
        "<=": 7, ">=": 7, "<<": 8, ">>": 8, "+": 9, "-": 9, "*": 10, "/": 10, "%": 10,
    }

    def __init__(self, toks: list[str]):
        self.toks = toks
        self.i = 0

    def parse(self) -> int:
        v = self._ternary()
        if self.i != len(self.toks):
            raise CondError(f"trailing tokens {self.toks[self.i:]}")
        return v

    def _peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _ternary(self) -> int:
        c = self._binary(0)
        if self._peek() == "?":
            self.i += 1
            a = self._ternary()
            if self._peek() != ":":
                raise CondError("bad ?:")
            self.i += 1
            b = self._ternary()
            return a if c else b
        return c

    def _binary(self, min_prec: int) -> int:
        left = self._unary()
        while True:
            op = self._peek()
            prec = self._BINARY.get(op or "")
            if prec is None or prec <= min_prec:
                return left
            self.i += 1
            right = self._binary(prec)
            left = _apply(op, left, right)

    def _unary(self) -> int:
        t = self._peek()
        if t is None:
            raise CondError("unexpected end")
        self.i += 1
        if t == "(":
            # A cast such as (uint32_t) reads as 0 here; skip casts of one word.
            v = self._ternary()
            if self._peek() != ")":
                raise CondError("missing )")
            self.i += 1
            return v
        if t == "!":
            return int(not self._unary())
        if t == "-":
            return -self._unary()
        if t == "+":
            return self._unary()
        if t == "~":
            return ~self._unary()
        m = re.match(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)[uUlL]*$", t)
        if m:
            digits = m.group(1)
            if digits[:2] in ("0x", "0X"):
                return int(digits, 16)
            return int(digits, 8) if digits.startswith("0") else int(digits)
        if t.startswith("'"):
            return ord(t[1:-1].encode().decode("unicode_escape"))
        raise CondError(f"unexpected token {t!r}")


def _apply(op: str, a: int, b: int) -> int:
    if op == "||":
        return int(bool(a) or bool(b))
    if op == "&&":
        return int(bool(a) and bool(b))
    if op in ("/", "%") and b == 0:
        raise CondError("division by zero")
    if op in ("<<", ">>") and b < 0:
        raise CondError("negative shift")
    ops = {
        "|": lambda: a | b, "^": lambda: a ^ b, "&": lambda: a & b, "==": lambda: int(a == b),
        "!=": lambda: int(a != b), "<": lambda: int(a < b), ">": lambda: int(a > b),
        "<=": lambda: int(a <= b), ">=": lambda: int(a >= b), "<<": lambda: a << b,
        ">>": lambda: a >> b, "+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
        "/": lambda: int(a / b), "%": lambda: a % b,
    }
    return ops[op]()


def global_defines(repo: Repo) -> Preprocessor:
    """The defines every ESP32_GENERIC translation unit starts with."""
    pp = Preprocessor(repo)
    major, minor, patch = IDF_VERSION.get(repo.tag, DEFAULT_IDF_VERSION)
    pp.define("ESP_IDF_VERSION_VAL", "(((major) << 16) | ((minor) << 8) | (patch))",
              ["major", "minor", "patch"])
    pp.define("ESP_IDF_VERSION", f"ESP_IDF_VERSION_VAL({major}, {minor}, {patch})")
    pp.define("ESP_IDF_VERSION_MAJOR", str(major))
    pp.define("ESP_IDF_VERSION_MINOR", str(minor))
    for name, value in IDF_CONFIG.items():
        pp.define(name, str(value))
    for path in SDKCONFIGS:
        for line in (repo.read(path) or "").splitlines():
            m = re.match(r"(CONFIG_\w+)=(.*)$", line.strip())
            if not m:
                continue
            value = m.group(2).strip()
            if value == "y":
                pp.define(m.group(1), "1")
            elif value == "n":
                pp.defines.pop(m.group(1), None)
            elif re.match(r"-?\d+$|0x[0-9a-fA-F]+$", value):
                pp.define(m.group(1), value)
    pp.process(f"{BOARD_DIR}/mpconfigboard.h")
    pp.process("ports/esp32/mpconfigport.h")
    pp.process("py/mpconfig.h")
    pp.define("NO_QSTR", "1")
    return pp


# ----- translation units and what they define -----

@dataclass
class Unit:
    """One preprocessed .c file: its active text and where each character came from."""

    path: str
    lines: list[Line]
    pp: Preprocessor
    text: str = ""
    starts: list[int] = field(default_factory=list)

    def __post_init__(self):
        pos = 0
        parts = []
        for ln in self.lines:
            self.starts.append(pos)
            parts.append(ln.text)
            pos += len(ln.text) + 1
        self.text = "\n".join(parts)

    def src_at(self, pos: int) -> str:
        return self.line_at(pos).src

    def line_at(self, pos: int) -> Line:
        return self.lines[max(bisect.bisect_right(self.starts, pos) - 1, 0)]


class Source:
    """Finds definitions across the port's translation units."""

    def __init__(self, repo: Repo):
        self.repo = repo
        self.base = global_defines(repo)
        self.units: dict[str, Unit] = {}

    def unit(self, path: str) -> Unit:
        if path not in self.units:
            pp = Preprocessor(self.repo, self.base.defines)
            lines = pp.process(path)
            self.units[path] = Unit(path, lines, pp)
        return self.units[path]

    def find(self, pattern: str, word: str,
             prefer: Unit | None = None) -> tuple[Unit, re.Match] | None:
        """The first active match of `pattern` in `prefer` or any file that mentions `word`."""
        rx = re.compile(pattern, re.M | re.S)
        if prefer is not None:
            m = rx.search(prefer.text)
            if m:
                return prefer, m
        for path in self.repo.grep(word):
            if path.endswith(".c"):
                u = self.unit(path)
                m = rx.search(u.text)
                if m:
                    return u, m
        return None

    def function(self, name: str,
                 prefer: Unit | None = None) -> tuple[Unit, int, str, str, int] | None:
        """(unit, position, parameter list, body, body position) of the C function `name`."""
        found = self.find(rf"^[A-Za-z_][\w \t\*]*\b{re.escape(name)}\s*\(([^;{{]*?)\)\s*\{{",
                          name, prefer)
        if not found:
            return None
        u, m = found
        start = m.end() - 1
        depth = 0
        for j in range(start, len(u.text)):
            if u.text[j] == "{":
                depth += 1
            elif u.text[j] == "}":
                depth -= 1
                if depth == 0:
                    return u, m.start(), m.group(1), u.text[start:j + 1], start
        return None


# ----- tables -----

_ENTRY = re.compile(r"\{\s*MP_ROM_QSTR\(MP_QSTR_(\w+)\)\s*,\s*(.*?)\s*\}\s*,?")


@dataclass
class Entry:
    name: str
    value: str
    line: Line


def table_entries(unit: Unit, table: str) -> tuple[list[Entry], str]:
    """The entries of a `{ MP_ROM_QSTR(...), ... }` table, with macros and includes expanded."""
    m = re.search(rf"\b{re.escape(table)}\s*\[\s*\]\s*=\s*\{{", unit.text)
    if not m:
        raise LookupError(f"{table} not found in {unit.path}")
    entries: list[Entry] = []
    start_line = unit.line_at(m.start())
    i0 = unit.lines.index(start_line)
    for ln in unit.lines[i0 + 1:]:
        if re.match(r"\s*\}\s*;", ln.text):
            break
        _entries_from_line(unit.pp, ln, entries, set())
    return entries, start_line.src


def _entries_from_line(pp: Preprocessor, ln: Line, out: list[Entry], seen: set[str]):
    found = False
    for em in _ENTRY.finditer(ln.text):
        out.append(Entry(em.group(1), em.group(2), ln))
        found = True
    if found:
        return
    xs = re.findall(r"\bX\((\w+)\)", ln.text)
    if xs and "define" not in ln.text:
        # An X-macro list (errno): each X(NAME) is { MP_QSTR_NAME, MP_ROM_INT(MP_NAME) }.
        for name in xs:
            out.append(Entry(name, f"MP_ROM_INT(MP_{name})", ln))
        return
    for word in re.findall(r"[A-Za-z_]\w*", ln.text):
        macro = pp.defines.get(word)
        if macro is None or macro.params is not None or word in seen:
            continue
        if macro.lines:
            for body_line in macro.lines:
                text = body_line.text
                if body_line is macro.lines[0]:
                    text = re.sub(rf"^\s*#\s*define\s+{word}\b", "", text)
                _entries_from_line(pp, Line(body_line.path, body_line.no, text), out,
                                   seen | {word})


# ----- objects -----

_FUN = re.compile(r"MP_DEFINE_CONST_FUN_OBJ_(0|1|2|3|VAR|VAR_BETWEEN|KW)\s*\(\s*{sym}\s*,"
                  r"\s*([^;]*?)\)\s*;")


def _split_args(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += c
    if cur.strip():
        parts.append(cur.strip())
    return parts


class Reader:
    """Turns table entries into the JSON shapes of esp32_api.json."""

    def __init__(self, repo: Repo):
        self.repo = repo
        self.src = Source(repo)
        self.warnings: list[str] = []
        self.arg_errors = self._arg_errors()

    def _arg_errors(self) -> dict[str, dict]:
        out = {}
        for key, (etype, message, path) in ARG_ERRORS.items():
            text = self.repo.read(path) or ""
            no = next((k + 1 for k, line in enumerate(text.splitlines())
                       if f'"{message}"' in line), None)
            out[key] = {"type": etype, "message": message,
                        "src": f"{path}:{no}" if no else path}
        return out

    def _int(self, unit: Unit, expr: str) -> int | None:
        try:
            value = unit.pp.evaluate(expr)
        except (CondError, IndexError, ZeroDivisionError):
            value = None
        names = set(re.findall(r"\b[A-Za-z_]\w*", expr))
        unresolved = [n for n in names if n not in unit.pp.defines and n not in IDF_CONFIG]
        if unresolved:
            # An enum member of the port's own source?
            env = {}
            for n in unresolved:
                v = self._enum_value(unit, n)
                if v is None:
                    return None
                env[n] = v
            pp = Preprocessor(self.repo, unit.pp.defines)
            for n, v in env.items():
                pp.define(n, str(v))
            try:
                return pp.evaluate(expr)
            except (CondError, IndexError, ZeroDivisionError):
                return None
        return value

    def _enum_value(self, unit: Unit, name: str) -> int | None:
        found = self.src.find(rf"enum\s*\w*\s*\{{[^}}]*\b{re.escape(name)}\b[^}}]*\}}", name, unit)
        if not found:
            return None
        u, m = found
        body = m.group(0)[m.group(0).index("{") + 1:-1]
        value = -1
        for item in _split_args(body):
            if not item:
                continue
            if "=" in item:
                key, expr = item.split("=", 1)
                v = self._int(u, expr.strip())
                if v is None:
                    return None
                value = v
            else:
                key = item
                value += 1
            if key.strip() == name:
                return value
        return None

    # -- members --

    def members(self, unit: Unit, table: str, owner: str, detail: bool) -> tuple[dict, str]:
        entries, src = table_entries(unit, table)
        out: dict[str, Any] = {}
        for e in entries:
            if e.name.startswith("__") and e.name not in ("__init__", "__call__"):
                continue
            if e.name in out:
                continue
            out[e.name] = self.member(unit, e, f"{owner}.{e.name}", detail)
        return out, src

    def member(self, unit: Unit, e: Entry, qualname: str, detail: bool) -> dict:
        v = e.value
        m = re.match(r"MP_ROM_INT\((.*)\)$", v)
        if m:
            expr = m.group(1).strip()
            return {"kind": "constant", "src": e.line.src, "expr": expr,
                    "value": self._int(unit, expr)}
        if v in ("MP_ROM_TRUE", "MP_ROM_FALSE", "MP_ROM_NONE"):
            return {"kind": "constant", "src": e.line.src, "expr": v,
                    "value": {"MP_ROM_TRUE": True, "MP_ROM_FALSE": False}.get(v)}
        m = re.match(r"MP_ROM_QSTR\(MP_QSTR_(\w*)\)$", v)
        if m:
            return {"kind": "constant", "src": e.line.src, "expr": v, "value": m.group(1)}
        m = re.match(r"MP_ROM_PTR\(\s*&\s*(\w+)\s*\)$", v)
        if not m:
            return {"kind": "object", "src": e.line.src, "expr": v}
        return self.obj(unit, m.group(1), e.line.src, qualname, detail)

    def obj(self, unit: Unit, sym: str, src: str, qualname: str, detail: bool) -> dict:
        # Function objects (maybe wrapped as static or class methods).
        wrapped = self.src.find(
            rf"MP_DEFINE_CONST_(STATICMETHOD|CLASSMETHOD)_OBJ\s*\(\s*{sym}\s*,\s*"
            r"MP_ROM_PTR\(\s*&\s*(\w+)\s*\)\s*\)", sym, unit)
        binding = None
        if wrapped:
            binding = wrapped[1].group(1).lower()
            sym = wrapped[1].group(2)
        fun = self.src.find(_FUN.pattern.replace("{sym}", re.escape(sym)), sym, unit)
        if fun:
            u, fm = fun
            info = {"kind": "function", "src": src}
            if binding:
                info["binding"] = binding
            info.update(self.fun_sig(u, fm, qualname, binding))
            info["sig"] = _named(info.get("sig"), qualname)
            return info
        typ = self.src.find(rf"MP_DEFINE_CONST_OBJ_TYPE\s*\(\s*{sym}\s*,(.*?)\)\s*;", sym, unit)
        if typ:
            return self.type_info(typ[0], typ[1], src, qualname, detail)
        if sym.startswith("mp_type_"):
            return {"kind": "exception" if sym.endswith(("Error", "Exception")) else "class",
                    "src": src, "builtin": sym[len("mp_type_"):]}
        mod = self.src.find(rf"const\s+mp_obj_module_t\s+{sym}\b", sym, unit)
        if mod:
            return {"kind": "module", "src": src}
        return {"kind": "object", "src": src, "expr": f"&{sym}"}

    # -- signatures --

    def fun_sig(self, u: Unit, fm: re.Match, qualname: str, binding: str | None) -> dict:
        kind = fm.group(1)
        args = _split_args(fm.group(2))
        fn_name = args[-1]
        method = "." in qualname.split(".", 1)[1] and binding != "staticmethod"
        skip = 1 if method else 0  # self (or cls) is not the caller's to pass
        macro = f"MP_DEFINE_CONST_FUN_OBJ_{kind}"
        def_src = u.src_at(fm.start())
        fn = self.src.function(fn_name, u)
        raises = self.raises(fn[0], fn[3], fn[4]) if fn else []
        if kind in "0123":
            n = int(kind)
            names = _c_param_names(fn[2]) if fn else []
            params = [{"name": names[k] if k < len(names) else f"arg{k}", "kind": "pos_only",
                       "required": True} for k in range(skip, n)]
            sig = {"via": macro, "src": def_src, "params": params, "varargs": False,
                   "varkw": False}
        elif kind in ("VAR", "VAR_BETWEEN"):
            lo = self._int(u, args[0])
            hi = None
            if kind == "VAR_BETWEEN" and "MP_OBJ_FUN_ARGS_MAX" not in args[1]:
                hi = self._int(u, args[1])
                if hi is None:
                    return {"sig": None, "unresolved": f"bounds of {macro} at {def_src}"}
            if lo is None:
                return {"sig": None, "unresolved": f"bounds of {macro} at {def_src}"}
            top = hi if hi is not None else lo
            params = [{"name": f"arg{k}", "kind": "pos_only", "required": k < lo}
                      for k in range(skip, top)]
            sig = {"via": macro, "src": def_src, "params": params, "varargs": hi is None,
                   "varkw": False}
        else:  # KW
            lo = self._int(u, args[0]) or 0
            if not fn:
                return {"sig": None, "unresolved": f"{fn_name} not found"}
            sig = self.kw_sig(fn[0], fn[3], skip, lo, qualname, body_pos=fn[4])
            sig["src"] = sig.get("src") or def_src
        sig.update(self.call_errors(sig))
        out = {"sig": sig}
        if raises:
            out["raises"] = raises
        return out

    def kw_sig(self, u: Unit, body: str, skip: int, lo: int, qualname: str,
               leading: list[dict] | None = None, body_pos: int = 0) -> dict:
        """Signature of a C function taking (n_args, args, kw_args), self excluded."""
        leading = list(leading or [])
        parse = re.search(r"mp_arg_parse_all(_kw_array)?\s*\((.*?)\)\s*;", body, re.S)
        allowed = None
        if parse:
            pargs = _split_args(parse.group(2))
            # (n_pos, pos | n_kw, kw | args, n_allowed, allowed, out): the table is 5th.
            table = pargs[4] if len(pargs) >= 6 else "allowed_args"
            rx = re.compile(rf"mp_arg_t\s+{re.escape(table)}\s*\[\s*\]\s*=\s*\{{(.*?)\}}\s*;",
                            re.S)
            allowed = rx.search(body)
            if allowed is None:
                # A table shared by several functions, maybe in another file (mpirq.c).
                found = self.src.find(rx.pattern, table, u)
                if found is not None:
                    u, allowed = found
                    body_pos = 0
        if allowed and parse:
            # `n_args - 1` skips self; `n_args - n_args_required` (json.dump) skips the
            # function's own positional minimum.
            offset = _offset(pargs[0]) if re.search(r"-\s*\d|^[^-]*$", pargs[0]) else lo
            params = leading + [{"name": f"arg{k}", "kind": "pos_only", "required": True}
                                for k in range(skip, offset)]
            params += _allowed_params(allowed.group(1))
            return {"via": "mp_arg_parse_all", "src": u.src_at(body_pos + allowed.start()),
                    "params": params, "varargs": False, "varkw": False}
        # A helper does the parsing: follow the call that passes kw_args on.
        for cm in re.finditer(r"\b(\w+)\s*\(([^;]*?\b(?:&?kw_args|&kw|kw_args)\b[^;]*?)\)\s*;",
                              body, re.S):
            callee = cm.group(1)
            if callee.startswith("mp_map_") or callee == "mp_arg_parse_all":
                continue
            cargs = _split_args(cm.group(2))
            n_expr = next((a for a in cargs if "n_args" in a or "n_pos" in a), None)
            if n_expr is None:
                continue
            helper = self.src.function(callee, u)
            if not helper:
                continue
            offset = _offset(n_expr)
            inner = self.kw_sig(helper[0], helper[3], 0, lo, qualname, body_pos=helper[4])
            if inner.get("custom"):
                continue
            params = leading + [{"name": f"arg{k}", "kind": "pos_only", "required": True}
                                for k in range(skip, offset)]
            inner["params"] = params + inner["params"]
            return inner
        # Its own parsing (a switch over keyword names).
        known = sorted(set(re.findall(r"case\s+MP_QSTR_(\w+)\s*:", body)))
        return {"via": "custom", "custom": True, "src": u.src_at(body_pos),
                "params": leading, "varargs": True, "varkw": True, "known_names": known}

    def make_new_sig(self, u: Unit, fn_name: str, qualname: str) -> dict | None:
        fn = self.src.function(fn_name, u)
        if not fn:
            self.warnings.append(f"{qualname}: make_new {fn_name} not found")
            return None
        fu, _, _, body, body_pos = fn
        check = re.search(r"mp_arg_check_num\s*\(\s*\w+\s*,\s*\w+\s*,\s*([^,]+),\s*([^,]+),"
                          r"\s*(\w+)\s*\)", body)
        if check:
            lo = self._int(fu, check.group(1))
            hi_expr = check.group(2).strip()
            hi = None if "MP_OBJ_FUN_ARGS_MAX" in hi_expr else self._int(fu, hi_expr)
            takes_kw = check.group(3) == "true"
            if not takes_kw or not re.search(r"kw_args|n_kw\s*\)|args\s*\+\s*n_args", body):
                src = fu.src_at(body_pos + check.start())
                top = hi if hi is not None else lo
                sig = {"via": "mp_arg_check_num", "src": src, "params": [
                    {"name": f"arg{k}", "kind": "pos_only", "required": k < lo}
                    for k in range(top)], "varargs": hi is None, "varkw": takes_kw}
                if takes_kw:
                    sig["custom"] = True
            else:
                leading = [{"name": f"arg{k}", "kind": "pos_only", "required": True}
                           for k in range(lo)]
                sig = self.kw_sig(fu, body, 0, lo, qualname, body_pos=body_pos)
                if sig.get("custom"):
                    sig["params"] = leading
                else:
                    # The helper saw args + lo: its allowed_args follow the leading ones.
                    rest = [p for p in sig["params"][lo:]]
                    sig["params"] = leading + rest
        else:
            sig = self.kw_sig(fu, body, 0, 0, qualname, body_pos=body_pos)
        sig.update(self.call_errors(sig))
        raises = self.raises(fu, body, body_pos)
        if raises:
            sig["raises"] = raises
        return sig

    def call_errors(self, sig: dict) -> dict:
        """Which of ARG_ERRORS a wrong call raises (keys into the table's "arg_errors")."""
        return {"errors": call_error_keys(sig)} if call_error_keys(sig) else {}

    def raises(self, u: Unit, body: str, body_pos: int, depth: int = 0,
               seen: set | None = None) -> list[dict]:
        """The exceptions a C function raises itself or through helpers it calls."""
        seen = set() if seen is None else seen
        out: list[dict] = []
        rx = re.compile(r"mp_raise_(ValueError|TypeError|OSError|NotImplementedError|"
                        r"msg_varg|msg)\s*\((.*?)\)\s*;", re.S)
        for m in rx.finditer(body):
            kind, args = m.group(1), m.group(2)
            etype = kind
            if kind.startswith("msg"):
                tm = re.match(r"\s*&mp_type_(\w+)", args)
                etype = tm.group(1) if tm else "Exception"
            messages = re.findall(r'MP_ERROR_TEXT\("((?:\\.|[^"])*)"\)', args)
            item = {"type": etype, "src": u.src_at(body_pos + m.start())}
            if messages:
                item["message"] = " | ".join(messages)
            elif etype == "OSError":
                item["errno"] = args.strip()
            out.append(item)
        if depth < 2:
            for cm in re.finditer(r"\b([a-z_][a-z0-9_]*)\s*\(", body):
                name = cm.group(1)
                # Helpers of this file only (mp_machine_* ones included); not ESP-IDF's.
                if name in seen or name.startswith(("esp_", "gpio_", "adc", "rtc_")):
                    continue
                seen.add(name)
                fn = self.src.function(name, u) if re.search(
                    rf"^[A-Za-z_][\w \t\*]*\b{name}\s*\(", u.text, re.M) else None
                if fn and fn[0] is u:
                    out.extend(self.raises(u, fn[3], fn[4], depth + 1, seen))
        unique = []
        for item in out:
            if item not in unique:
                unique.append(item)
        return unique

    # -- types --

    def type_info(self, u: Unit, tm: re.Match, src: str, qualname: str, detail: bool) -> dict:
        # Slots may come from macros (e.g. ESP32_PARTITION_GET_BUFFER in v1.26).
        parts = _split_args(" ".join(u.pp.expand(tokens(tm.group(1)))))
        info: dict[str, Any] = {"kind": "class", "src": src,
                                "defined": u.src_at(tm.start())}
        slots = dict(zip(parts[2::2], parts[3::2]))
        if "parent" in slots:
            info["parent"] = slots["parent"].lstrip("&")
        make_new = slots.get("make_new")
        if make_new:
            make_new = " ".join(u.pp.expand(tokens(make_new)))
            call = self.make_new_sig(u, make_new, qualname)
            if call and "raises" in call:
                info["raises"] = call.pop("raises")
            info["call"] = _named(call, qualname)
        else:
            info["call"] = None
            info["not_callable"] = True
        if "call" in slots:
            fn = self.src.function(slots["call"], u)
            if fn:
                body = fn[3]
                check = re.search(r"mp_arg_check_num\s*\(\s*\w+\s*,\s*\w+\s*,\s*(\d+)\s*,"
                                  r"\s*(\d+)\s*,\s*(\w+)\s*\)", body)
                if check:
                    lo, hi = int(check.group(1)), int(check.group(2))
                    sig = {"via": "mp_arg_check_num",
                           "src": fn[0].src_at(fn[4] + check.start()),
                           "params": [{"name": f"arg{k}", "kind": "pos_only",
                                       "required": k < lo} for k in range(hi)],
                           "varargs": False, "varkw": False}
                    sig.update(self.call_errors(sig))
                    info["instance_call"] = sig
        if detail and "locals_dict" in slots:
            dict_sym = slots["locals_dict"].lstrip("&").strip()
            found = self.src.find(rf"MP_DEFINE_CONST_DICT\s*\(\s*{dict_sym}\s*,\s*(\w+)\s*\)",
                                  dict_sym, u)
            if found:
                du, dm = found
                members, table_src = self.members(du, dm.group(1), qualname, False)
                info["members"] = members
                info["table"] = table_src
        elif detail:
            info["members"] = {}
        return info


# Names for arguments the C code takes by position only (it has no names for them), from the
# MicroPython documentation; only for readability of the table and of the checker's messages.
POSITIONAL_NAMES = {
    "machine.Pin": ["id"],
    "machine.Pin.value": ["x"],
    "machine.Signal": ["pin_obj"],
    "machine.Signal.value": ["x"],
    "machine.ADC": ["pin"],
    "machine.ADC.atten": ["atten"],
    "machine.ADC.width": ["bits"],
    "machine.RTC.datetime": ["datetimetuple"],
    "machine.RTC.memory": ["data"],
    "machine.freq": ["hz"],
    "machine.deepsleep": ["time_ms"],
    "machine.lightsleep": ["time_ms"],
    "machine.sleep": ["time_ms"],
    "machine.soft_reset": ["retval"],
    "machine.enable_irq": ["state"],
    "network.WLAN": ["interface_id"],
    "network.WLAN.active": ["is_active"],
    "network.WLAN.status": ["param"],
    "network.WLAN.connect": ["ssid", "key"],
    "network.WLAN.config": ["param"],
    "network.WLAN.ifconfig": ["config"],
    "network.hostname": ["name"],
    "network.country": ["code"],
    "esp32.Partition": ["id", "block_size"],
    "esp32.Partition.readblocks": ["block_num", "buf", "offset"],
    "esp32.Partition.writeblocks": ["block_num", "buf", "offset"],
    "esp32.Partition.ioctl": ["cmd", "arg"],
    "socket.socket": ["af", "type", "proto"],
    "socket.getaddrinfo": ["host", "port", "af", "type", "proto", "flags"],
    "time.sleep": ["seconds"],
    "time.sleep_ms": ["ms"],
    "time.sleep_us": ["us"],
    "time.ticks_diff": ["ticks1", "ticks2"],
    "time.ticks_add": ["ticks", "delta"],
    "time.localtime": ["secs"],
    "time.gmtime": ["secs"],
    "os.listdir": ["dir"],
    "os.ilistdir": ["dir"],
    "os.stat": ["path"],
    "os.urandom": ["n"],
    "struct.pack": ["fmt", "v"],
    "struct.pack_into": ["fmt", "buffer", "offset", "v"],
    "struct.unpack": ["fmt", "data"],
    "struct.unpack_from": ["fmt", "data", "offset"],
    "struct.calcsize": ["fmt"],
    "binascii.hexlify": ["data", "sep"],
    "binascii.unhexlify": ["data"],
    "json.dump": ["obj", "stream", "separators"],
    "json.dumps": ["obj", "separators"],
    "gc.threshold": ["amount"],
    "sys.exit": ["retval"],
    "sys.print_exception": ["exc", "file"],
    "random.getrandbits": ["n"],
    "hashlib.sha256": ["data"],
    "micropython.const": ["expr"],
    "micropython.schedule": ["func", "arg"],
}


def _named(sig: dict | None, qualname: str) -> dict | None:
    names = POSITIONAL_NAMES.get(qualname)
    if not sig or not names:
        return sig
    k = 0
    for p in sig["params"]:
        if p["kind"] == "pos_only":
            if k < len(names):
                p["name"] = names[k]
            k += 1
    return sig


def call_error_keys(sig: dict) -> dict:
    via = sig.get("via") or ""
    if via == "mp_arg_parse_all":
        return {"bad_keyword": "extra_keyword", "too_many_positional": "extra_positional",
                "missing": "required"}
    if via == "python":
        return {"bad_keyword": "py_unexpected_keyword", "too_many_positional": "py_takes_n",
                "missing": "py_missing"}
    if via.startswith("MP_DEFINE_CONST_FUN_OBJ_") and via[-1] in "0123":
        return {"bad_keyword": "no_keywords", "too_many_positional": "takes_n",
                "missing": "takes_n"}
    if via in ("MP_DEFINE_CONST_FUN_OBJ_VAR", "MP_DEFINE_CONST_FUN_OBJ_VAR_BETWEEN",
               "mp_arg_check_num"):
        return {"bad_keyword": "no_keywords" if not sig.get("varkw") else "extra_keyword",
                "too_many_positional": "at_most", "missing": "missing_n"}
    return {}


def _offset(n_expr: str) -> int:
    m = re.search(r"-\s*(\d+)", n_expr)
    return int(m.group(1)) if m else 0


def _c_param_names(params: str) -> list[str]:
    names = []
    for p in _split_args(params):
        m = re.search(r"(\w+)\s*$", p)
        name = m.group(1) if m else "arg"
        names.append(re.sub(r"_(in|obj)$", "", name))
    return names


def _allowed_params(text: str) -> list[dict]:
    params = []
    for m in re.finditer(r"\{\s*MP_QSTR_(\w*)\s*,\s*([^,{}]+?)\s*,", text):
        name, flags = m.group(1), m.group(2)
        kw_only = "MP_ARG_KW_ONLY" in flags
        params.append({
            "name": name or f"arg{len(params)}",
            # An empty qstr can never match a keyword: the argument is positional only.
            "kind": "kw_only" if kw_only else ("pos_or_kw" if name else "pos_only"),
            "required": "MP_ARG_REQUIRED" in flags,
        })
    return params


# ----- asyncio (Python) -----

def python_package(repo: Repo, folder: str, name: str) -> dict:
    files = {f[:-3]: repo.read(f"{folder}/{f}") for f in repo.listdir(folder)
             if f.endswith(".py")}
    init = ast.parse(files.get("__init__", ""))
    members: dict[str, Any] = {}
    lazy: dict[str, str] = {}
    star: list[str] = []
    for node in init.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.names[0].name == "*":
            star.append(node.module or "")
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_attrs" for t in node.targets):
            lazy = ast.literal_eval(node.value)
    for mod in star:
        members.update(_py_module_members(repo, folder, mod, files))
    for attr, mod in lazy.items():
        found = _py_module_members(repo, folder, mod, files).get(attr)
        if found:
            found = dict(found)
            found["lazy"] = True
            members[attr] = found
    return {"kind": "module", "implemented_in": "python", "src": f"{folder}/__init__.py",
            "members": members}


def _py_module_members(repo: Repo, folder: str, mod: str, files: dict) -> dict:
    text = files.get(mod)
    if text is None:
        return {}
    path = f"{folder}/{mod}.py"
    tree = ast.parse(text)
    out: dict[str, Any] = {}
    for node in _flat(tree.body):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            inner = _py_module_members(repo, folder, node.module or "", files)
            for alias in node.names:
                name = alias.asname or alias.name
                if alias.name in inner and not name.startswith("_") and name not in out:
                    out[name] = inner[alias.name]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not node.name.startswith("_"):
                out[node.name] = {"kind": "function", "src": f"{path}:{node.lineno}",
                                  "sig": _py_sig(node, f"{path}:{node.lineno}", False),
                                  "coroutine": isinstance(node, ast.AsyncFunctionDef)
                                  or _is_generator(node)}
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            out[node.name] = _py_class(node, path)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name) and not t.id.startswith("_"):
                    src = f"{path}:{node.lineno}"
                    if isinstance(node.value, ast.Name) and node.value.id in out:
                        out[t.id] = dict(out[node.value.id], src=src, alias_of=node.value.id)
                    else:
                        out[t.id] = {"kind": "object", "src": src}
    return out


def _flat(body: list[ast.stmt]) -> list[ast.stmt]:
    """Top-level statements, with those of try blocks (optional imports) spliced in."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.Try):
            out.extend(_flat(node.body))
            for handler in node.handlers:
                out.extend(_flat(handler.body))
        else:
            out.append(node)
    return out


def _is_generator(fn: ast.AST) -> bool:
    return any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in ast.walk(fn))


def _py_class(node: ast.ClassDef, path: str) -> dict:
    bases = [ast.unparse(b) for b in node.bases]
    exc = any(b in ("Exception", "BaseException") or b.endswith("Error") for b in bases)
    info: dict[str, Any] = {"kind": "exception" if exc else "class",
                            "src": f"{path}:{node.lineno}", "bases": bases}
    members: dict[str, Any] = {}
    call = None
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            decorators = [ast.unparse(d) for d in item.decorator_list]
            static = "staticmethod" in decorators
            src = f"{path}:{item.lineno}"
            if item.name == "__init__":
                call = _py_sig(item, src, True)
            elif not item.name.startswith("_") or item.name in ("__aenter__", "__aexit__",
                                                                 "__await__", "__aiter__",
                                                                 "__anext__"):
                members[item.name] = {"kind": "function", "src": src,
                                      "sig": _py_sig(item, src, not static),
                                      "coroutine": isinstance(item, ast.AsyncFunctionDef)
                                      or _is_generator(item)}
        elif isinstance(item, ast.Assign):
            for t in item.targets:
                if isinstance(t, ast.Name) and not t.id.startswith("_"):
                    src = f"{path}:{item.lineno}"
                    if isinstance(item.value, ast.Name) and item.value.id in members:
                        members[t.id] = dict(members[item.value.id], src=src,
                                             alias_of=item.value.id)
                    else:
                        members[t.id] = {"kind": "object", "src": src}
    if call is None:
        call = {"via": "python", "src": f"{path}:{node.lineno}", "params": [],
                "varargs": exc, "varkw": False}
        call["errors"] = call_error_keys(call)
    info["call"] = call
    info["members"] = members
    return info


def _py_sig(fn: ast.FunctionDef | ast.AsyncFunctionDef, src: str, method: bool) -> dict:
    a = fn.args
    positional = list(a.posonlyargs) + list(a.args)
    n_defaults = len(a.defaults)
    params = []
    for k, arg in enumerate(positional):
        required = k < len(positional) - n_defaults
        params.append({"name": arg.arg, "kind": "pos_only" if arg in a.posonlyargs
                       else "pos_or_kw", "required": required})
    if method and params:
        params = params[1:]
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        params.append({"name": arg.arg, "kind": "kw_only", "required": default is None})
    sig = {"via": "python", "src": src, "params": params, "varargs": a.vararg is not None,
           "varkw": a.kwarg is not None}
    sig["errors"] = call_error_keys(sig)
    return sig


# ----- the whole table -----

DETAIL_MODULES = {"machine", "network", "esp32", "socket", "select", "hashlib"}


def read_api(git_dir: str, tag: str) -> dict:
    """The table for one tag (without the comparison with other tags)."""
    repo = Repo(git_dir, tag)
    reader = Reader(repo)
    modules: dict[str, Any] = {}
    for name, path, table in C_MODULES:
        unit = reader.src.unit(path)
        try:
            members, src = reader.members(unit, table, name, name in DETAIL_MODULES)
        except LookupError as e:
            reader.warnings.append(str(e))
            continue
        # Classes of the modules the firmware uses: read their methods too.
        for mname, m in members.items():
            if m["kind"] == "class" and name in DETAIL_MODULES and "members" not in m:
                m["members"] = {}
        modules[name] = {"kind": "module", "implemented_in": "C", "src": src,
                         "members": members}
    for qual, (mod, fname, type_sym) in RETURNS.items():
        fn = modules.get(mod, {}).get("members", {}).get(fname)
        if fn is None:
            continue
        typ = reader.src.find(rf"MP_DEFINE_CONST_OBJ_TYPE\s*\(\s*{type_sym}\s*,(.*?)\)\s*;",
                              type_sym)
        if typ:
            cls = reader.type_info(typ[0], typ[1], fn["src"], qual, True)
            fn["returns"] = cls
    for name, folder in PY_PACKAGES:
        modules[name] = python_package(repo, folder, name)
    assumed = set(reader.src.base.assumed_zero)
    unreadable = list(reader.src.base.unreadable)
    for u in reader.src.units.values():
        assumed |= u.pp.assumed_zero
        unreadable += [w for w in u.pp.unreadable if w not in unreadable]
    reader.warnings += [f"taken as false: {w}" for w in unreadable]
    assumed_config = sorted(n for n in assumed if n.startswith(("CONFIG_", "SOC_", "ESP_")))
    return {"tag": tag, "modules": modules, "arg_errors": reader.arg_errors,
            "warnings": reader.warnings, "assumed_zero": assumed_config}


# ----- comparing releases -----

def _sig_shape(sig: dict | None):
    if not sig:
        return None
    return (tuple((p["name"] if p["kind"] != "pos_only" else "", p["kind"], p["required"])
                  for p in sig["params"]), bool(sig.get("varargs")), bool(sig.get("varkw")),
            tuple(sig.get("known_names") or ()))


def compare(base: dict, other: dict, tag: str) -> list[str]:
    """Marks base entries that differ in `other` (entry["differs"][tag]); returns the names
    `other` has and base lacks, in the modules and classes base describes."""
    added: list[str] = []

    def walk(a: dict, b: dict, path: str):
        am, bm = a.get("members") or {}, b.get("members")
        if bm is None:
            return
        for name, x in am.items():
            qual = f"{path}.{name}"
            y = bm.get(name)
            note = None
            if y is None:
                note = "absent"
            elif x["kind"] != y["kind"]:
                note = f"a {y['kind']}, not a {x['kind']}"
            elif x["kind"] == "function" and _sig_shape(x.get("sig")) != _sig_shape(y.get("sig")):
                note = f"takes {describe(y.get('sig'))} (here {describe(x.get('sig'))})"
            elif x["kind"] in ("class", "exception") and \
                    _sig_shape(x.get("call")) != _sig_shape(y.get("call")):
                note = f"constructed with {describe(y.get('call'))} " \
                       f"(here {describe(x.get('call'))})"
            elif x["kind"] == "constant" and x.get("value") is not None and \
                    y.get("value") is not None and x["value"] != y["value"]:
                note = f"= {y['value']!r} (here {x['value']!r})"
            if note:
                x.setdefault("differs", {})[tag] = note
            if y is not None and x["kind"] in ("class", "exception", "module"):
                walk(x, y, qual)
        for name in bm:
            if name not in am:
                added.append(f"{path}.{name}")

    for mod, entry in base["modules"].items():
        if mod in other["modules"]:
            walk(entry, other["modules"][mod], mod)
    return added


def build_table(git_dir: str, tag: str, compare_tags: list[str]) -> dict:
    """The whole esp32_api.json: `tag` read in full, compared with `compare_tags`."""
    base = read_api(git_dir, tag)
    table = {
        "about": "The MicroPython ESP32 port's API (ESP32_GENERIC board) as its C and Python "
                 "source defines it, for the modules the firmware and the emulator's stand-ins "
                 "use. Made by `python -m kinhbac.emulator.esp32_api regenerate`; see "
                 "docs/emulator.md, 'The ESP32 port's API as data'.",
        "tag": tag,
        "idf_version": "v%d.%d.%d" % IDF_VERSION.get(tag, DEFAULT_IDF_VERSION),
        "compared_with": {},
        "arg_errors": base["arg_errors"],
        "assumed_zero": base["assumed_zero"],
        "warnings": base["warnings"],
        "modules": base["modules"],
    }
    for other_tag in compare_tags:
        other = read_api(git_dir, other_tag)
        added = compare(table, other, other_tag)
        table["compared_with"][other_tag] = {
            "idf_version": "v%d.%d.%d" % IDF_VERSION.get(other_tag, DEFAULT_IDF_VERSION),
            "only_there": added,
        }
    return table
