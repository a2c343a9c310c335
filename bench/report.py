"""What every benchmark's section of RESULTS.md shares: the machine's basic rows, and writing
the section between its markers."""

import os
import platform
import re
import subprocess
from pathlib import Path


def command_output(argv: list[str]) -> str:
    """The command's stdout, or "" when it cannot run (the description says "unknown")."""
    try:
        return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_rows() -> list[tuple[str, str]]:
    """CPU, cores, RAM, OS and Python, as each benchmark's "Machine" table starts."""
    model = re.search(r"^Model name:\s*(.+)$", command_output(["lscpu"]), re.MULTILINE)
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    return [
        ("CPU", model[1].strip() if model else platform.processor() or "unknown"),
        ("Cores", f"{os.cpu_count()} logical"),
        ("RAM", f"{int(mem[1]) / 1024 / 1024:.1f} GiB" if mem else "unknown"),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
    ]


def machine_table(rows: list[tuple[str, str]]) -> list[str]:
    """The "## Machine" part of a section, as lines: what its figures were measured on."""
    return ["## Machine", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def section_head(begin: str, title: str, command: str,
                 machine: list[tuple[str, str]]) -> list[str]:
    """A section's first lines: its marker, its title, how to reproduce it, the machine."""
    return [begin, f"# {title}", "",
            f"Written by `{command}`; reproduce with `make bench` (all benchmarks) or that "
            "command.", "", *machine_table(machine)]


def replace_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the section between `begin` and `end` in `path`, keeping the rest; append it
    when the file has none yet."""
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + section
    path.write_text(new)
