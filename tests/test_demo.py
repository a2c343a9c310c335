"""`make demo`: the whole site runs, shows readings, and Ctrl-C leaves nothing running."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _processes_under(path: str) -> list[str]:
    """Processes whose command line names `path`, or that run in a folder under it."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if path in cmdline or cwd == path or cwd.startswith(path + "/"):
            found.append(f"{pid} in {cwd}: {cmdline}")
    return found


def _installed_script() -> Path:
    """The venv's `kinhbac` script, checked to import this checkout."""
    # The script imports the installed package, not a clone's copy: check that it is this
    # checkout, so that the code under test is the one being edited.
    script = Path(sys.executable).with_name("kinhbac")
    assert script.exists(), f"no {script}: install this checkout (make install)"
    imported = subprocess.run(
        [sys.executable, "-P", "-c", "import kinhbac; print(kinhbac.__file__)"],
        cwd="/", capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert Path(imported).resolve().is_relative_to(REPO), f"{script} runs {imported}"
    return script


def _demo_until_ctrl_c(args: list[str], cwd: Path, boards: int) -> None:
    """Run `kinhbac demo` in `cwd`, check that readings flow and that Ctrl-C stops it cleanly."""
    proc = subprocess.Popen(
        [str(_installed_script()), "demo", *args],
        cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, COLUMNS="200"),
    )
    time.sleep(15)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Broker: mosquitto" in out or "Broker: embedded amqtt" in out
    assert f"{boards} boards" in out
    assert "uplink connected" in out
    published = [int(n) for n in re.findall(r"(\d+) readings published", out)]
    assert published and max(published) > 4 * boards, out[-2000:]
    assert "nothing left running" in out


def _assert_ran_in(workdir: Path, boards: int) -> None:
    """The boards' flash images are in `workdir`, and nothing is left running there."""
    for i in range(boards):
        assert (workdir / "boards" / f"board-{i}" / "flash.bin").exists()
    time.sleep(0.5)
    assert _processes_under(str(workdir)) == []


def test_make_demo_on_a_fresh_clone_shows_readings_and_ctrl_c_leaves_nothing_running(tmp_path):
    # `make demo` runs `.venv/bin/kinhbac demo` with no arguments in the folder of a fresh
    # clone, so the demo's default work folder (run/demo) is relative to it. A clone, so that
    # the run leaves no files in this checkout.
    clone = tmp_path / "kinhbac"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    _demo_until_ctrl_c([], cwd=clone, boards=5)
    _assert_ran_in(clone / "run" / "demo", boards=5)


def test_demo_with_a_relative_workdir_from_another_folder_runs_there(tmp_path):
    # The flash tool runs in the emulator's stand-ins folder and each board in its own folder:
    # a relative --workdir must name the folder under the caller's current one, not theirs.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _demo_until_ctrl_c(["--boards", "2", "--workdir", "site/demo"], cwd=elsewhere, boards=2)
    _assert_ran_in(elsewhere / "site" / "demo", boards=2)
