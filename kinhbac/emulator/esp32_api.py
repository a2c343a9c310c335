"""The ESP32 port's API as data: what exists and how it may be called, from MicroPython's source.

`esp32_api.json` beside this file holds, for the modules the firmware and the stand-ins use,
every name the ESP32 port defines (functions, classes and their methods, constants,
exceptions), each function's positional and keyword arguments, the TypeError a wrong call gets
and the errors the port raises itself, each with the file:line of the MicroPython tag it was
read from. `tests/test_esp32_api_conformance.py` holds the stand-ins to it and
`kinhbac/emulator/api_check.py` the firmware.

    python -m kinhbac.emulator.esp32_api regenerate --repo <micropython git dir>
    python -m kinhbac.emulator.esp32_api show machine.Pin.irq
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).with_name("esp32_api.json")
DEFAULT_TAG = "v1.24.1"
DEFAULT_COMPARE = ("v1.22.0", "v1.26.0")


@lru_cache(maxsize=1)
def load() -> dict[str, Any]:
    """The table (read once)."""
    return json.loads(TABLE_PATH.read_text())


def lookup(qualname: str) -> dict[str, Any] | None:
    """The entry for "module", "module.name" or "module.Class.method", or None."""
    parts = qualname.split(".")
    entry = load()["modules"].get(parts[0])
    for part in parts[1:]:
        if entry is None:
            return None
        entry = (entry.get("members") or {}).get(part)
    return entry


def signature(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The call signature of a function entry, or of a class entry's constructor."""
    if entry["kind"] == "function":
        return entry.get("sig")
    if entry["kind"] in ("class", "exception"):
        return entry.get("call")
    return None


def error(sig: dict[str, Any], which: str) -> dict[str, str] | None:
    """The error ({"type", "message", "src"}) a call gets for `which`: "bad_keyword",
    "too_many_positional" or "missing"."""
    key = (sig.get("errors") or {}).get(which)
    return load()["arg_errors"].get(key) if key else None


def call_problem(sig: dict[str, Any], n_positional: int, keywords: list[str], *,
                 star_args: bool = False, star_kwargs: bool = False) -> tuple[str, str] | None:
    """Why the port refuses a call with these arguments: (reason, which), or None if it takes it.

    `which` is "bad_keyword", "too_many_positional" or "missing" (see `error`). With *args or
    **kwargs at the call the counts are unknown, so only what is certain is reported.
    """
    params = sig["params"]
    positional = [p for p in params if p["kind"] in ("pos_only", "pos_or_kw")]
    if sig.get("custom"):
        known = sig.get("known_names") or []
        if known:
            for kw in keywords:
                if kw not in known:
                    return f"keyword {kw!r} is not one it knows ({', '.join(known)})", \
                        "bad_keyword"
        return None
    if n_positional > len(positional) and not sig.get("varargs"):
        return (f"{n_positional} positional arguments given, it takes at most "
                f"{len(positional)}", "too_many_positional")
    filled = {p["name"] for p in positional[:n_positional]}
    by_name = {p["name"]: p for p in params if p["kind"] in ("pos_or_kw", "kw_only")}
    for kw in keywords:
        if kw not in by_name:
            if sig.get("varkw"):
                continue
            pos_only = [p["name"] for p in params if p["kind"] == "pos_only"]
            if kw in pos_only:
                return f"{kw!r} can only be passed by position", "bad_keyword"
            return f"unexpected keyword argument {kw!r}", "bad_keyword"
        if kw in filled:
            return f"{kw!r} given by position and by keyword", "bad_keyword"
        filled.add(kw)
    if not (star_args or star_kwargs):
        for p in params:
            if p["required"] and p["name"] not in filled:
                return f"required argument {p['name']!r} missing", "missing"
    return None


def describe(sig: dict[str, Any] | None) -> str:
    """A signature as Python would write it, e.g. (handler=..., trigger=..., wake=...)."""
    if not sig:
        return "(not read from the source)"
    parts: list[str] = []
    params = sig["params"]
    star = False
    for k, p in enumerate(params):
        if p["kind"] == "kw_only" and not star:
            parts.append("*")
            star = True
        parts.append(p["name"] if p["required"] else p["name"] + "=...")
        last = k + 1 == len(params)
        if p["kind"] == "pos_only" and (last or params[k + 1]["kind"] != "pos_only"):
            parts.append("/")
    if sig.get("varargs"):
        parts.append("*args")
    if sig.get("varkw"):
        parts.append("**kwargs")
    return "(" + ", ".join(parts) + ")"


def dumps(value: Any, indent: str = "") -> str:
    """JSON with anything that fits on a line (a parameter, an error) kept on one line."""
    flat = json.dumps(value)
    if len(flat) + len(indent) <= 100 or not isinstance(value, (dict, list)) or not value:
        return flat
    inner = indent + " "
    if isinstance(value, list):
        items = [inner + dumps(v, inner) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    items = [f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + indent + "}"


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kinhbac.emulator.esp32_api")
    sub = parser.add_subparsers(dest="command", required=True)
    regen = sub.add_parser("regenerate", help="read the table again from MicroPython's source")
    regen.add_argument("--repo", required=True,
                       help="a git directory of micropython/micropython (bare is fine)")
    regen.add_argument("--tag", default=DEFAULT_TAG)
    regen.add_argument("--compare", nargs="*", default=list(DEFAULT_COMPARE),
                       help="other tags to note differences with")
    regen.add_argument("--out", default=str(TABLE_PATH))
    show = sub.add_parser("show", help="print an entry, e.g. machine.Pin.irq")
    show.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "regenerate":
        from kinhbac.emulator.esp32_api_extract import build_table

        table = build_table(args.repo, args.tag, args.compare)
        Path(args.out).write_text(dumps(table) + "\n")
        for warning in table["warnings"]:
            print("warning:", warning, file=sys.stderr)
        print(f"wrote {args.out}: {args.tag}, compared with {', '.join(args.compare) or 'none'}")
        return 0
    entry = lookup(args.name)
    if entry is None:
        print(f"{args.name}: not in the table", file=sys.stderr)
        return 1
    sig = signature(entry)
    if sig is not None:
        print(f"{args.name}{describe(sig)}    # {sig.get('src')}")
    print(json.dumps(entry, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
