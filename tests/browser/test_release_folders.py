"""A bundle uploaded from the console as the firmware's folder, in a real browser: the admin
picks the folder (a webkitdirectory input), upload.js lists where each file goes, sends them by
their paths inside the folder with a progress bar, and the release's page lists them at their
board paths. Every page is checked by Pages.check (title, labels, axe-core) and photographed.

Unlike the other browser tests this one adds to the shared world: a release of its own version,
which no other test uploads."""

import re

from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By

from helpers.fleet import wait_until

from .conftest import Pages

VERSION = "7.3.1"
# Large enough that the throttled upload below takes seconds, so its progress can be watched;
# a bundle file, so within what the boards' filesystem takes.
MAIN_PY = ("# " + "-" * 77 + "\n") * 3200 + "import node\n"  # 256 KB
UPLOAD_BYTES_PER_S = 64 * 1024
RELEASE_PAGE = re.compile(r"/console/releases/[0-9a-f-]{36}")


def _firmware(root) -> None:
    """A firmware folder laid out as the board's filesystem, with what a developer's folder
    also holds (a cache, a hidden file), which the script leaves out as the CLI does."""
    (root / "lib" / "node").mkdir(parents=True)
    (root / "main.py").write_text(MAIN_PY)
    (root / "lib" / "node" / "x.py").write_text("X = 1\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\xa7\r\r\n")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")


def _progress(pages: Pages) -> tuple[bool, str] | None:
    """The progress bar's shown state and percentage; None while the next page loads."""
    try:
        return tuple(pages.driver.execute_script(
            "const bar = document.getElementById('progress');"
            "return bar ? [!bar.hidden, document.getElementById('progress-percent').textContent]"
            " : null;") or ()) or None
    except WebDriverException:  # asked in the middle of the navigation
        return None


def test_an_admin_uploads_the_firmwares_folder_and_its_files_reach_their_board_paths(
        pages, world, tmp_path):
    firmware = tmp_path / "app"
    _firmware(firmware)
    driver = pages.driver
    pages.log_in(world.admin, lang="en")
    pages.open("/console/releases/new", "upload-form")
    picker = driver.find_element(By.ID, "tree")
    assert picker.is_displayed()  # shown by the script

    driver.find_element(By.ID, "version").send_keys(VERSION)
    picker.send_keys(str(firmware))  # chromedriver picks a folder given its path

    # Before anything is sent, the page says where each file goes and what was left out.
    def listed() -> list[str]:
        return [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#tree-paths li")]

    wait_until(lambda: listed() == ["/lib/node/x.py", "/main.py"], 10, "the folder's paths")
    left_out = driver.find_element(By.ID, "tree-left-out").text
    assert "/.DS_Store" in left_out and "/__pycache__/main.cpython-311.pyc" in left_out
    pages.check("upload-folder-chosen")

    # A slow uplink, as from a site office: the bar has time to move.
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": -1,
        "uploadThroughput": UPLOAD_BYTES_PER_S})
    driver.execute_script("window.kinhbacOldPage = true")
    driver.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    seen: set[str] = set()  # the percentages shown while it was sent

    def arrived() -> bool:
        state = _progress(pages)
        if state is not None and state[0]:
            seen.add(state[1])
        try:
            return bool(RELEASE_PAGE.fullmatch(driver.current_url.removeprefix(world.url))) \
                and driver.execute_script(
                    "return !window.kinhbacOldPage && document.readyState === 'complete'")
        except WebDriverException:  # asked in the middle of the navigation: ask again
            return False

    wait_until(arrived, 30, "the release's page")
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    partway = {p for p in seen if p.endswith(" %") and 0 < int(p.removesuffix(" %")) < 100}
    assert partway, f"the progress bar never showed the upload under way: {seen}"

    pages.check("release")
    assert driver.find_element(By.TAG_NAME, "h1").text.endswith(VERSION)
    paths = [cell.text for cell in driver.find_elements(
        By.CSS_SELECTOR, "table th[scope=row] code")]
    assert paths == ["/lib/node/x.py", "/main.py"]
