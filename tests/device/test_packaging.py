"""A technician installs kinhbac from a wheel: the wheel must carry the node's firmware files,
and kinhbac.firmware must find them there as it finds them in a checkout."""

import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from setuptools import find_namespace_packages

from kinhbac.firmware import FIRMWARE_DIR, REPO, firmware_files, firmware_version


def test_every_package_under_kinhbac_is_listed_for_the_wheel():
    # pyproject.toml lists its packages (to map kinhbac._firmware to firmware/): a package
    # added under kinhbac/ and not listed there would be missing from every installed copy.
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set(find_namespace_packages(where=str(REPO), include=["kinhbac*"]))
    # Folders of package data (the console's templates, catalogues) hold no Python: not
    # packages, shipped by package-data instead (checked with the wheel below).
    found = {name for name in found if "__pycache__" not in name
             and any((REPO / name.replace(".", "/")).glob("*.py"))}
    firmware = {"kinhbac._firmware"} | {
        "kinhbac._firmware." + name
        for name in find_namespace_packages(where=str(REPO / "firmware"))
        if "__pycache__" not in name
    }
    assert set(declared["packages"]) == found | firmware
    assert declared["package-dir"] == {"kinhbac._firmware": "firmware"}


def test_an_installed_wheel_carries_the_firmware_and_finds_it(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    [wheel] = wheels.glob("kinhbac-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in FIRMWARE_DIR.rglob("*.py"):
        assert f"kinhbac/_firmware/{source.relative_to(FIRMWARE_DIR)}" in names, source
    # The fleet console's templates, stylesheet and catalogues are package data, not modules.
    console = REPO / "kinhbac" / "fleet" / "console"
    for folder, pattern in (("templates", "*.html"), ("static", "*"),
                            ("locale", "*/LC_MESSAGES/*.po")):
        for source in (console / folder).glob(pattern):
            assert f"{source.relative_to(REPO)}" in names, source

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    probe = (
        "import json\n"
        "from kinhbac.firmware import FIRMWARE_DIR, firmware_files, firmware_version\n"
        "files = firmware_files(compiled=False)\n"
        "print(json.dumps({'dir': str(FIRMWARE_DIR), 'version': firmware_version(),\n"
        "                  'files': {p: d.decode() for p, d in files.items()}}))\n"
    )
    # From another folder, with the installed copy first on the path: the checkout is not
    # where it looks.
    done = subprocess.run([sys.executable, "-c", probe], check=False, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    installed = json.loads(done.stdout)
    assert Path(installed["dir"]) == site / "kinhbac" / "_firmware"
    assert installed["version"] == firmware_version()
    assert installed["files"] == {p: d.decode() for p, d in firmware_files(compiled=False).items()}
