"""The console in a real browser (Debian's headless Chromium) driving emulated boards that run
the real firmware (issue 14): the fleet service with its MQTT ingest, a private Mosquitto, the
gateway as a process fetching keys and update assignments from the fleet, and ESP32 boards on
the micropython binary, as tests/test_ota_rollout.py runs them (tests/helpers/ota.py); the
fleet on the database the other browser tests use (conftest.fleet_backend).

What the browser does here, an admin does in the control room: approves a board that claimed
with its site's claim key, uploads a release through the Releases page (its upload script
sending the file and showing the progress), starts a rollout from the form after its preview,
pauses and resumes it through their confirmation pages, and watches the rollout's live view
(its polling script) reach the end, and a bad release pause its rollout by itself, without
reloading the page. Every page reached is checked by Pages.check (title, labels, axe-core) and
photographed.

Booting boards costs most of the time, so the module shares one site (a gateway, two boards)
and its tests are the steps of one story, in this file's order: the board approved first is
one the rollouts then update, the release uploaded in the browser is the one rolled out.
Run the file, not one of its tests alone.
"""

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fleet.backends import empty_database
from helpers.fleet import wait_until
from helpers.ota import (
    ADMIN,
    NODE_SETTINGS,
    RAISES_AT_IMPORT,
    SITE,
    CountingFleet,
    OtaSite,
    base_firmware,
    counting_fleet,
    firmware_variant,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from kinhbac import wire
from kinhbac.broker import LocalBroker
from kinhbac.emulator import esp32_image, launcher
from kinhbac.emulator.site import Emulator
from kinhbac.firmware import config_file

from .conftest import Pages, fleet_backend, leave_page

IMAGE_VERSION = "0.2.0"  # uploaded in the browser, then rolled out to both boards
BAD_VERSION = "0.3.0"  # raises at import: rolled back, and its rollout pauses itself
CLAIM_RETRY_MS = 500  # as tests/test_gateway_fleet_keys.py: a pending board asks again soon
# The page's own marker of one document: a reload or a navigation starts a window without it.
SAME_DOCUMENT = "window.kinhbacSameDocument"
LIVE_STATE = "return document.querySelector('#live .live').dataset.state"


@dataclass(frozen=True)
class FleetAt:
    """What Pages needs of a fleet: where it serves the console."""
    url: str


@dataclass
class Story:
    """The one site the module's steps share, and what each step leaves for the next."""
    site: OtaSite
    registered: launcher.Node  # flashed with the identity the fleet issued
    claiming: launcher.Node  # flashed with the site's claim key only
    release: dict = field(default_factory=dict)  # the image the browser uploaded (the API's)

    @property
    def fleet(self) -> CountingFleet:
        return self.site.fleet

    def device(self, wire_id: str) -> dict:
        """The fleet's device record of a wire id, by its MAC; {} if there is none yet."""
        mac = ":".join(wire_id[i:i + 2] for i in range(4, 16, 2))
        found = self.fleet.call("GET", "/api/devices", self.site.admin,
                                params={"mac": mac})["items"]
        return found[0] if found else {}

    def audit(self, action: str, entity_id: str) -> list[dict]:
        return self.fleet.call("GET", "/api/audit", self.site.admin,
                               params={"action": action, "entity_id": entity_id})["items"]


def add_claiming_board(site: OtaSite) -> launcher.Node:
    """A board set up as a technician does offline (docs/technician.md): the site profile's
    WiFi, gateway and sensor kit, and its claim key instead of an identity; off. Its wire id is
    "kb" and its MAC, as the firmware makes it."""
    profile = site.fleet.call("GET", f"/api/sites/{site.site_id}/profile", site.technician)
    board = site.emulator.add_board()
    node = launcher.wired_node(board, wire.Key(b"kb" + board.mac, 1, bytes(16)), bytes(16))
    board.write_files(base_firmware() | config_file({
        "claim_key": profile["claim_key"],
        "wifi": {"ssid": site.emulator.access_point.ssid,
                 "password": site.emulator.access_point.password},
        "gateway": {"host": "127.0.0.1", "port": site.gateway.port},
        "sensors": profile["sensor_kit"],
        "claim_retry_ms": CLAIM_RETRY_MS,
        **NODE_SETTINGS,  # the OTA tests' settings, its 10 s trial among them
    }))
    return node


# ----- one site for the module: broker, fleet, gateway, two boards -----


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("boards")


@pytest.fixture(scope="module")
def broker(workdir: Path) -> Iterator[LocalBroker]:
    with LocalBroker(workdir / "broker") as b:
        yield b


@pytest.fixture(scope="module")
def emulator(workdir: Path) -> Iterator[Emulator]:
    """The module's boards; named as tests/conftest.py's, whose report hook then shows what
    each board printed last when a step fails."""
    with Emulator(workdir / "site") as emu:
        yield emu


@pytest.fixture(scope="module")
def story(workdir: Path, broker: LocalBroker, emulator: Emulator) -> Iterator[Story]:
    """The site set up through the API (helpers/ota.py), its gateway started, the registered
    board and the claiming one powered on; the fleet on the browser tests' database."""
    patches = pytest.MonkeyPatch()
    with empty_database(fleet_backend(), workdir) as url, \
            counting_fleet(workdir / "fleet", broker.port, patches, url) as fleet:
        site = OtaSite(workdir, fleet, emulator, broker.port)
        try:
            [registered] = site.add_nodes(1)
            claiming = add_claiming_board(site)
            site.start(nodes=[registered])
            claiming.board.power_on()
            yield Story(site=site, registered=registered, claiming=claiming)
        finally:
            site.close()
    patches.undo()


@pytest.fixture
def console(driver, story: Story, axe_source: str, request: pytest.FixtureRequest) -> Pages:
    """The browser, logged in to the story's fleet as its admin, in English: the first time
    chosen in the header (the browser asks for Vietnamese), then kept on the user."""
    pages = Pages(driver, FleetAt(story.fleet.url), axe_source, request.node.name)
    pages.log_in(ADMIN[0], lang="en", password=ADMIN[1])
    if driver.find_element(By.TAG_NAME, "html").get_attribute("lang") != "en":
        Select(driver.find_element(By.ID, "locale")).select_by_value("en")
        _submit(pages, "form[action='/console/locale'] button")
    assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
    pages.check("overview")
    return pages


def _submit(pages: Pages, selector: str) -> None:
    button = pages.driver.find_element(By.CSS_SELECTOR, selector)
    leave_page(pages.driver, button.click, f"the page after {selector}")


def _live_state(pages: Pages) -> str:
    return pages.driver.execute_script(LIVE_STATE)


def _watch_live(pages: Pages, state: str, timeout: float, story: Story,
                rollout_id: str) -> float:
    """Wait for the rollout page's live part to show `state`, the page never reloaded: the
    marker set on this document's window is still there. Seconds waited."""
    pages.driver.execute_script(f"{SAME_DOCUMENT} = true")
    started = time.monotonic()
    while _live_state(pages) != state:
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"the live view did not show {state} within {timeout} s: it shows "
                f"{_live_state(pages)}; the fleet says {story.site.rollout(rollout_id)['state']}"
                f"\n{story.site.diagnosis(rollout_id, story.site.states(rollout_id))}")
        time.sleep(0.5)
    assert pages.driver.execute_script(f"return {SAME_DOCUMENT} === true"), \
        "the page was reloaded: the live view must change by itself"
    return time.monotonic() - started


# ----- the steps, in order -----


def test_an_admin_approves_a_board_that_claimed_and_it_comes_online_with_readings(
        console, story):
    wire_id = story.claiming.device
    wait_until(lambda: story.device(wire_id).get("state") == "pending", 60,
               "the claiming board pending in the fleet")
    device_id = story.device(wire_id)["id"]

    console.open("/console/pending", "pending")
    row = console.driver.find_element(By.XPATH, f"//table[@class='pending']//tr[th//code"
                                                f"[text()='{wire_id}']]")
    assert "Test site" in row.text and "gw1" in row.text  # its site, and who reported it
    _submit(console, f"form[action='/console/pending/{device_id}/approve'] button")
    assert console.driver.current_url.startswith(story.fleet.url + "/console/pending?done=")
    done = console.driver.find_element(By.CSS_SELECTOR, "main [role=status]")
    assert wire_id in done.text and "approved" in done.text
    console.check("pending-approved")
    assert console.driver.find_elements(By.XPATH, f"//code[text()='{wire_id}']") == []
    [entry] = story.audit("device.approve", device_id)
    assert entry["actor"] == ADMIN[0] and entry["after"]["state"] == "active", entry

    # The gateway gives the board its identity at its next refresh; the board then speaks as
    # itself: online, its readings in the fleet.
    wait_until(lambda: story.device(wire_id)["online"], 60, "the approved board online")
    wait_until(lambda: story.fleet.call("GET", f"/api/devices/{device_id}/readings",
                                        story.site.admin), 30, "its readings in the fleet")
    console.open(f"/console/devices/{device_id}", "device-approved")
    assert console.driver.find_elements(By.CSS_SELECTOR, "main .state.state-online")
    assert console.driver.find_elements(By.CSS_SELECTOR, "figure svg[role=img] polyline")
    story.site.nodes.append(story.claiming)
    story.site.device_ids[wire_id] = device_id


# Records, in the tab's sessionStorage (kept across the navigation the upload ends with), each
# change the upload script makes to the progress bar: shown, its value, its words.
_RECORD_PROGRESS = """
const progress = document.getElementById('progress');
const bar = document.getElementById('progress-bar');
const words = document.getElementById('progress-percent');
sessionStorage.setItem('kinhbacProgress', '[]');
new MutationObserver(() => {
  const seen = JSON.parse(sessionStorage.getItem('kinhbacProgress'));
  seen.push({shown: !progress.hidden, value: bar.value, words: words.textContent});
  sessionStorage.setItem('kinhbacProgress', JSON.stringify(seen));
}).observe(progress, {attributes: true, childList: true, characterData: true, subtree: true});
"""


def _fill_upload(pages: Pages, kind: str, version: str, path: Path) -> None:
    """The plain form: a kind, a version, one file chosen through the file input."""
    driver = pages.driver
    driver.find_element(By.ID, f"kind-{kind}").click()
    version_field = driver.find_element(By.ID, "version")
    version_field.clear()
    version_field.send_keys(version)
    driver.find_element(By.ID, "file").send_keys(str(path))


def test_a_release_uploaded_through_the_releases_page_with_its_progress_shown(
        console, story, workdir):
    image = esp32_image.app_image(IMAGE_VERSION, size=48 * 1024, seed=14)
    image_file = workdir / "micropython.bin"
    image_file.write_bytes(image)
    empty_file = workdir / "empty.bin"
    empty_file.write_bytes(b"")
    driver = console.driver

    console.open("/console/releases", "releases")
    _submit(console, "main a[href='/console/releases/new']")
    console.check("release-new")
    assert driver.find_element(By.ID, "dropzone").is_displayed()  # only the script shows it

    # Refused (an empty image): the script puts the answer's content in place of the form, on
    # the same page, and enhances the new form.
    _fill_upload(console, "image", IMAGE_VERSION, empty_file)
    driver.execute_script(f"{SAME_DOCUMENT} = true")
    driver.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "main div.error[role=alert]"), 15,
               "the refusal shown")
    assert driver.execute_script(f"return {SAME_DOCUMENT} === true"), "the page was replaced"
    assert driver.find_element(By.CSS_SELECTOR, "main div.error[role=alert]").text == \
        "The image is empty."
    assert driver.find_element(By.ID, "kind-image").is_selected()  # what was typed is kept
    assert driver.find_element(By.ID, "version").get_attribute("value") == IMAGE_VERSION
    assert driver.find_element(By.ID, "dropzone").is_displayed()  # the new form enhanced
    console.check("release-refused")
    assert story.fleet.call("GET", "/api/releases", story.site.admin)["items"] == []

    # Accepted: the progress bar shown and filled, then the new release's page.
    _fill_upload(console, "image", IMAGE_VERSION, image_file)
    driver.execute_script(_RECORD_PROGRESS)
    _submit(console, "#upload-form button[type=submit]")
    progress = json.loads(driver.execute_script(
        "return sessionStorage.getItem('kinhbacProgress')"))
    assert progress and progress[0]["shown"], progress
    assert progress[-1]["value"] == 100 and progress[-1]["words"] == "100 %", progress
    [release] = story.fleet.call("GET", "/api/releases", story.site.admin)["items"]
    assert driver.current_url == f"{story.fleet.url}/console/releases/{release['id']}"
    console.check("release")
    assert (release["kind"], release["version"], release["size"]) == \
        ("image", IMAGE_VERSION, len(image))
    # The bytes the browser sent are the file's, whole.
    [stored] = release["files"]
    assert stored["sha256"] == hashlib.sha256(image).hexdigest()
    [entry] = story.audit("release.upload", release["id"])
    assert entry["actor"] == ADMIN[0], entry
    story.release = release


def test_a_rollout_started_from_the_form_paused_resumed_and_watched_live_to_the_end(
        console, story):
    assert story.release, "runs after the upload step: run the whole file"
    driver = console.driver
    console.open("/console/rollouts/new", "rollout-new")
    Select(driver.find_element(By.ID, "release_id")).select_by_value(story.release["id"])
    driver.find_element(By.ID, "target-site").click()
    Select(driver.find_element(By.ID, "site")).select_by_value(SITE)
    waves = driver.find_element(By.ID, "waves")
    waves.clear()
    waves.send_keys("50,100")
    _submit(console, "button[name=do][value=preview]")
    console.check("rollout-preview")
    sizes = [cell.text for cell in driver.find_elements(By.CSS_SELECTOR, "[data-preview-size]")]
    assert sizes == ["1", "1"]  # the two boards: the registered one and the approved one
    assert story.fleet.call("GET", "/api/rollouts", story.site.admin)["items"] == []

    _submit(console, "button[name=do][value=create]")  # the form kept what was chosen
    [rollout] = story.fleet.call("GET", "/api/rollouts", story.site.admin)["items"]
    rollout_id = rollout["id"]
    assert driver.current_url == f"{story.fleet.url}/console/rollouts/{rollout_id}?done=created"
    console.check("rollout-created")
    assert _live_state(console) == "running"

    for action, then in (("pause", "paused"), ("resume", "running")):
        _submit(console, f"form[action='/console/rollouts/{rollout_id}/{action}'] button")
        console.check(f"rollout-{action}-confirm")
        _submit(console, f"main form[method=post][action='/console/rollouts/{rollout_id}/"
                         f"{action}'] button")
        assert driver.current_url.endswith(f"/console/rollouts/{rollout_id}?done={action}")
        assert _live_state(console) == then
        assert story.site.rollout(rollout_id)["state"] == then
        console.check(f"rollout-{then}")
        [entry] = story.audit(f"rollout.{action}", rollout_id)
        assert entry["actor"] == ADMIN[0], entry

    took = _watch_live(console, "completed", 240, story, rollout_id)
    print(f"the rollout completed {took:.1f} s after it was resumed")
    console.check("rollout-completed")
    counts = {cell.get_attribute("data-count"): cell.text
              for cell in driver.find_elements(By.CSS_SELECTOR, "#live [data-count]")}
    assert counts == {"confirmed": "2"}, counts
    assert driver.execute_script("return document.querySelector('#live [data-final]')"
                                 " !== null")
    assert set(story.site.states(rollout_id).values()) == {"confirmed"}


def test_a_bad_release_pauses_its_rollout_and_the_live_view_shows_why(console, story, workdir):
    assert len(story.site.nodes) == 2, "runs after the approval step: run the whole file"
    # Through the API: a bundle's files lie in two board folders (/lib and /lib/node), which
    # the upload form's one board folder cannot name.
    release = story.site.upload("bundle", BAD_VERSION,
                                firmware_variant(workdir, BAD_VERSION, RAISES_AT_IMPORT))
    rollout = story.site.start_rollout(release, [50, 100])
    console.open(f"/console/rollouts/{rollout['id']}", "rollout-bad")
    assert _live_state(console) == "running"

    took = _watch_live(console, "paused", 240, story, rollout["id"])
    print(f"the bad release paused its rollout {took:.1f} s after its page was opened")
    console.check("rollout-bad-paused")
    facts = console.driver.find_element(By.CSS_SELECTOR, "#live dl.facts").text
    assert "wave 1 of 2" in facts and "failure threshold" in facts, facts
    failures = console.driver.find_elements(By.CSS_SELECTOR, "#live table.failures tbody tr")
    assert len(failures) == 1, [row.text for row in failures]
    assert "Rolled back" in failures[0].text
    assert "RuntimeError" in failures[0].text and "broken at import" in failures[0].text
    # Resuming is offered, with its confirmation; the second wave has not started.
    assert console.driver.find_elements(
        By.CSS_SELECTOR, f"#live form[action='/console/rollouts/{rollout['id']}/resume']")
    assert story.site.rollout(rollout["id"])["waves"][1]["started_at"] is None
