"""The lock files (requirements/*.lock) against pyproject.toml: `make install` runs the same
check, so a dependency changed without `make lock` stops the install, here and in CI."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def check(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(tree / "requirements" / "locks.py"), "check"],
                          check=False, capture_output=True, text=True, timeout=60)


def copy_with_pyproject(tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    shutil.copytree(REPO / "requirements", tmp_path / "requirements")
    text = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(edit(text))
    return tmp_path


def test_the_lock_files_hold_every_dependency_within_its_range() -> None:
    result = check(REPO)
    assert result.returncode == 0, result.stderr


def test_a_dependency_added_without_relocking_stops_the_install(tmp_path: Path) -> None:
    tree = copy_with_pyproject(tmp_path, lambda text: text.replace(
        '"apsw>=3.46,<4",', '"apsw>=3.46,<4", "tenacity>=9",', 1))
    result = check(tree)
    assert result.returncode == 1
    assert "requirements/gateway.lock has no tenacity" in result.stderr
    assert "run `make lock`" in result.stderr


def test_a_range_raised_past_the_pin_stops_the_install(tmp_path: Path) -> None:
    tree = copy_with_pyproject(tmp_path, lambda text: text.replace(
        '"pytest>=8,<10",', '"pytest>=99",', 1))
    result = check(tree)
    assert result.returncode == 1
    assert "requirements/dev.lock pins pytest==" in result.stderr
    assert "outside pyproject.toml's pytest>=99" in result.stderr


def test_a_changed_build_backend_range_stops_the_install(tmp_path: Path) -> None:
    tree = copy_with_pyproject(tmp_path, lambda text: text.replace(
        '"setuptools>=68,<90"', '"setuptools>=68,<80"', 1))
    result = check(tree)
    assert result.returncode == 1
    assert "requirements/build.in" in result.stderr
