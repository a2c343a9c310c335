"""`make demo`: the fleet with its console and two sites run, the printed admin login opens the
console, whose overview shows both sites with their boards online, and Ctrl-C leaves nothing
running."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

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


# Boards need WiFi association and the gateways their keys from the fleet before anything
# shows; on a loaded two-core machine that has taken over a minute.
START_TIMEOUT_S = 180
SITE_BOARDS = {"bac-ninh-water": lambda boards: boards - boards // 2,
               "bac-ninh-air": lambda boards: boards // 2}
_LOGIN = re.compile(r"Console: (http://127\.0\.0\.1:\d+)/console\n"
                    r"\s*e-mail:\s+(\S+)\n\s*password:\s+(\S+)\n")
_CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


class _Output:
    """The demo's output, read as it comes (a full pipe would stall the demo)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (found := pattern.search(self.text())):
            assert self.proc.poll() is None, f"the demo stopped:\n{self.text()}"
            assert time.monotonic() < deadline, f"not within {timeout} s:\n{self.text()}"
            time.sleep(0.2)
        return found


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(1)


def _site_online(page: str, slug: str) -> int | None:
    """The overview's count of online devices at `slug`, None when the site is not listed."""
    section = re.search(rf'id="site-{slug}".*?<tbody><tr>\s*<td>(\d+)</td>(.*?)</section>',
                        page, re.DOTALL)
    return int(section.group(1)) if section else None


def _gateway_reports(page: str, slug: str) -> bool:
    """The site's gateway is connected and its queue depth is reported (a number)."""
    section = re.search(rf'id="site-{slug}"(.*?)</section>', page, re.DOTALL)
    return bool(section and re.search(r'class="uplink-online">[^<]*</td>\s*<td>\d+</td>',
                                      section.group(1)))


def _check_the_console(url: str, email: str, password: str, boards: int) -> None:
    """Log in through the console's form; its overview lists both sites, every board online and
    each gateway connected with its queue depth; the fleet holds readings from every board."""
    with httpx.Client(base_url=url, timeout=30) as browser:
        page = browser.get("/console/login")
        token = _CSRF_FIELD.search(page.text)
        assert token, page.text
        answer = browser.post("/console/login", data={
            "username": email, "password": password, "csrf_token": token.group(1)},
            headers={"Origin": url}, follow_redirects=False)
        assert answer.status_code == 303, answer.text

        def overview_shows_everything() -> bool:
            page = browser.get("/console/")
            assert page.status_code == 200, page.text
            return all(_site_online(page.text, slug) == count(boards)
                       and _gateway_reports(page.text, slug)
                       for slug, count in SITE_BOARDS.items())

        _wait_until(overview_shows_everything, START_TIMEOUT_S,
                    "both sites with every board online on the console's overview")

    with httpx.Client(base_url=url, timeout=30) as api:
        login = api.post("/api/auth/login", data={"username": email, "password": password})
        assert login.status_code == 200, login.text
        api.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
        devices = api.get("/api/devices").json()["items"]
        assert len(devices) == boards, devices

        def readings_from_every_board() -> bool:
            return all(len(api.get(f"/api/devices/{d['id']}/readings").json()) >= 20
                       for d in devices)

        _wait_until(readings_from_every_board, 60, "readings from every board in the fleet")


def _demo_until_ctrl_c(args: list[str], cwd: Path, boards: int) -> None:
    """Run `kinhbac demo` in `cwd`, log in to its console with the login it prints, check that
    both sites show their boards online, and that Ctrl-C stops it cleanly."""
    proc = subprocess.Popen(
        [str(_installed_script()), "demo", *args],
        cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, COLUMNS="200"),
    )
    output = _Output(proc)
    try:
        url, email, password = output.wait_for(_LOGIN, START_TIMEOUT_S).groups()
        _check_the_console(url, email, password, boards)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        output.thread.join(10)
    out = output.text()
    try:  # the fleet ran in the demo's process; its port is free again
        httpx.get(f"{url}/console/login", timeout=5)
        raise AssertionError(f"the fleet still answers on {url}")
    except httpx.ConnectError:
        pass
    assert proc.returncode == 0, out
    assert "Broker: mosquitto" in out or "Broker: embedded amqtt" in out
    assert "Fleet: database SQLite in " in out
    assert f"{boards} boards" in out
    assert "uplink connected" in out
    published = [int(n) for n in re.findall(r"(\d+) readings published", out)]
    assert published and max(published) > 4 * boards, out[-2000:]
    assert "nothing left running" in out


def _assert_ran_in(workdir: Path, boards: int) -> None:
    """The boards' flash images are in `workdir`, and nothing is left running there."""
    for i in range(boards):
        assert (workdir / "boards" / f"board-{i}" / "flash.bin").exists()
    _assert_nothing_left_in(workdir)


def _assert_nothing_left_in(workdir: Path) -> None:
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


def test_a_demo_that_cannot_start_says_what_to_do_in_one_line_and_leaves_nothing_running(
        tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["--fleet-port", str(port)], {}, f"port 127.0.0.1:{port} for the fleet is taken"
             " (Address already in use): pass another --fleet-port, or 0 for any free port"),
            ([], {"KINHBAC_MICROPYTHON": str(tmp_path / "missing")},
             f"KINHBAC_MICROPYTHON={tmp_path / 'missing'} is not an executable file"),
        ]
        for i, (args, env, why) in enumerate(cases):
            workdir = tmp_path / f"demo-{i}"
            done = subprocess.run(
                [str(_installed_script()), "demo", "--workdir", str(workdir), *args],
                capture_output=True, text=True, timeout=120,
                env=dict(os.environ, COLUMNS="200", **env),
            )
            assert done.returncode == 2, done
            assert done.stderr == f"The demo could not start: {why}\n", done.stderr
            assert "Traceback" not in done.stdout, done.stdout
            _assert_nothing_left_in(workdir)
