"""The lock files: what each one holds, how to write them again, and a check that they still
satisfy pyproject.toml.

    python requirements/locks.py compile [--uv PATH]   # `make lock`: uv resolves, with hashes
    python requirements/locks.py compile --upgrade     # `make lock-upgrade`: newest in range
    python requirements/locks.py check                 # part of `make install`; exit 1 on drift

Each lock is resolved once for every platform (uv's --universal: CI's x86_64 and a Raspberry
Pi's aarch64 in one file) for the oldest Python that pyproject.toml allows, and carries the
hash of every file PyPI has for each pin, so that `pip install --require-hashes` takes exactly
these files or nothing. The build backend (setuptools) is locked too: the project itself is
installed with --no-build-isolation, so that nothing unhashed is fetched to build it.

`check` needs `packaging` (installed from dev.lock) and no network.
"""

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parent / "pyproject.toml"
PYTHON = "3.11"  # the oldest pyproject.toml's requires-python allows; the lock is universal above
# Lock file -> the extras of pyproject.toml it installs. The gateway's is constrained by the
# dev lock, so that a Pi runs the versions CI tested.
LOCKS = {
    "dev.lock": ("all", "test"),  # everything `make test` and `make demo` use
    "gateway.lock": ("gateway",),  # a Raspberry Pi gateway (README, "Run the gateway ...")
}
CONSTRAINED_BY = {"gateway.lock": "dev.lock"}
BUILD_IN = HERE / "build.in"  # [build-system] requires, written from pyproject.toml
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def write_build_in(project: dict) -> None:
    lines = ["# Written by requirements/locks.py from pyproject.toml's [build-system] requires."]
    BUILD_IN.write_text("\n".join(lines + project["build-system"]["requires"]) + "\n")


def compile_locks(uv: str, *, upgrade: bool = False) -> None:
    """Write every lock file again. Pins already there stay where pyproject.toml still allows
    them; with `upgrade`, every pin moves to the newest version within its range."""
    write_build_in(_pyproject())
    for lock, extras in LOCKS.items():
        command = [uv, "pip", "compile", "--quiet", "--universal", "--generate-hashes",
                   "--python-version", PYTHON, "--custom-compile-command", "make lock",
                   "pyproject.toml", "requirements/build.in", "-o", f"requirements/{lock}"]
        for extra in extras:
            command += ["--extra", extra]
        if lock in CONSTRAINED_BY:
            command += ["--constraint", f"requirements/{CONSTRAINED_BY[lock]}"]
        if upgrade:
            command.append("--upgrade")
        subprocess.run(command, check=True, cwd=HERE.parent)


def pins(lock: Path) -> dict[str, tuple[str, bool]]:
    """Canonical name -> (pinned version, has at least one hash)."""
    found: dict[str, tuple[str, bool]] = {}
    current = None
    for line in lock.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            current = _canonical(match[1])
            found[current] = (match[2], False)
        elif current and line.strip().startswith("--hash=sha256:"):
            found[current] = (found[current][0], True)
        elif not line.startswith(" "):
            current = None
    return found


def requirements(project: dict, extras: tuple[str, ...]) -> list[str]:
    """The project's requirements with these extras, its own `kinhbac[...]` ones expanded."""
    from packaging.requirements import Requirement

    name = _canonical(project["project"]["name"])
    optional = project["project"].get("optional-dependencies", {})
    wanted, seen, result = list(extras), set(), list(project["project"]["dependencies"])
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional[extra]:
            requirement = Requirement(text)
            if _canonical(requirement.name) == name:
                wanted.extend(requirement.extras)
            else:
                result.append(text)
    return result + list(project["build-system"]["requires"])


def problems() -> list[str]:
    """Why the lock files no longer fit pyproject.toml (empty when they do)."""
    from packaging.requirements import Requirement

    project = _pyproject()
    found: list[str] = []
    expected_build_in = project["build-system"]["requires"]
    build_in = [line for line in BUILD_IN.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    if build_in != expected_build_in:
        found.append(f"requirements/build.in says {build_in}, pyproject.toml's [build-system] "
                     f"{expected_build_in}")
    locked = {lock: pins(HERE / lock) for lock in LOCKS}
    for lock, extras in LOCKS.items():
        for text in requirements(project, extras):
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate():
                continue
            pin = locked[lock].get(_canonical(requirement.name))
            if pin is None:
                found.append(f"requirements/{lock} has no {requirement.name} (pyproject.toml: "
                             f"{text})")
            elif not requirement.specifier.contains(pin[0], prereleases=True):
                found.append(f"requirements/{lock} pins {requirement.name}=={pin[0]}, outside "
                             f"pyproject.toml's {text}")
        found += [f"requirements/{lock}: {name} has no hash"
                  for name, (_, hashed) in locked[lock].items() if not hashed]
    for lock, base in CONSTRAINED_BY.items():
        for name, (version, _) in locked[lock].items():
            other = locked[base].get(name)
            if other and other[0] != version:
                found.append(f"requirements/{lock} pins {name}=={version}, "
                             f"requirements/{base} {other[0]}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_parser = commands.add_parser("compile", help="write the lock files again (uv)")
    compile_parser.add_argument("--uv", default="uv", help="the uv binary")
    compile_parser.add_argument("--upgrade", action="store_true",
                                help="move every pin to the newest version allowed")
    commands.add_parser("check", help="exit 1 when a lock file no longer fits pyproject.toml")
    args = parser.parse_args(argv)
    if args.command == "compile":
        compile_locks(args.uv, upgrade=args.upgrade)
        return 0
    found = problems()
    for problem in found:
        print(problem, file=sys.stderr)
    if found:
        print("pyproject.toml changed since the lock files were written: run `make lock`",
              file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
