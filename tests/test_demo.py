"""`make demo`: the whole site runs, shows readings, and Ctrl-C leaves nothing running."""

import os
import re
import signal
import subprocess
import sys
import time


def _processes_under(path: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if path in cmdline:
            found.append(cmdline)
    return found


def test_demo_shows_readings_and_ctrl_c_leaves_nothing_running(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kinhbac.cli", "demo", "--boards", "2", "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, COLUMNS="200"),
    )
    time.sleep(15)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Broker: mosquitto" in out or "Broker: embedded amqtt" in out
    assert "uplink connected" in out
    published = [int(n) for n in re.findall(r"(\d+) readings published", out)]
    assert published and max(published) > 20, out[-2000:]
    assert "nothing left running" in out
    time.sleep(0.5)
    assert _processes_under(str(workdir)) == []
