"""The Devices pages: the list (search, filters, keyset pages) and a device's page, both cut
to the caller's sites as the API cuts them, with nothing of another site to find by guessing."""

import re
import uuid
from datetime import timedelta

import pytest
from sqlmodel import Session, select

from kinhbac.fleet.console import devices
from kinhbac.fleet.models import (
    Device,
    DeviceStatus,
    RecentReading,
    Rollout,
    RolloutDeviceState,
    RolloutEvent,
    RolloutEventSource,
    RolloutTargetKind,
    Role,
    Site,
    utcnow,
)

from ..utils import make_device, make_release, make_site, make_user
from .conftest import log_in
from .world import heard, make_city

EN = {"Accept-Language": "en"}
_LISTED = re.compile(r'<a href="/console/devices/([0-9a-f-]{36})"><code>([0-9a-f]{16})</code>')
_NEXT = re.compile(r'<a href="([^"]+)" rel="next">')


def listed(page: str) -> list[str]:
    """The wire ids of the list's rows, in order."""
    return [wire_id for _, wire_id in _LISTED.findall(page)]


def logged_in(browser, session: Session, role: Role, sites: list[Site] | None = None) -> None:
    user, _ = make_user(session, role, sites=sites or [])
    log_in(browser, user.email)


def seen(session: Session, wire_id: str, ago: timedelta) -> None:
    """The registry's last-seen time, as the ingest writes it with a status."""
    row = session.exec(select(Device).where(Device.wire_id == wire_id)).one()
    row.last_seen_at = utcnow() - ago
    session.add(row)
    session.commit()


def test_the_list_shows_every_device_with_its_state_in_words_beside_the_colour(
        browser, session, box, app):
    city = make_city(session, box, app)
    logged_in(browser, session, Role.admin)
    page = browser.get("/console/devices", headers=EN)
    assert page.status_code == 200 and "<title>Devices ·" in page.text
    assert len(listed(page.text)) == 6  # Ward 7's five and Ba Dinh's one
    for state, word in (("online", "Online"), ("offline", "Offline"),
                        ("pending", "Pending approval"), ("updating", "Updating")):
        assert f'<span class="state state-{state}">{word}</span>' in page.text
    assert city.home.name in page.text and city.away.name in page.text
    assert "Devices matching: 6" in page.text
    assert '<a href="/console/devices">Devices</a>' in page.text  # in the navigation


def test_filters_by_site_tag_state_firmware_and_silence_combine(browser, session, box):
    north = make_site(session, box, slug="north", name="North")
    south = make_site(session, box, slug="south", name="South")
    pump = make_device(session, box, north, tags=["pump"], firmware_version="1.2.0")
    valve = make_device(session, box, north, tags=["valve"], firmware_version="1.1.0")
    far = make_device(session, box, south, tags=["pump"], firmware_version="1.2.0")
    heard(session, valve.wire_id, north)
    session.commit()
    seen(session, pump.wire_id, timedelta(hours=2))
    seen(session, valve.wire_id, timedelta(minutes=1))
    logged_in(browser, session, Role.viewer)

    def wire_ids(query: str) -> set[str]:
        page = browser.get("/console/devices?" + query, headers=EN)
        assert page.status_code == 200, page.text
        return set(listed(page.text))

    assert wire_ids("site=north") == {pump.wire_id, valve.wire_id}
    assert wire_ids("tag=pump") == {pump.wire_id, far.wire_id}
    assert wire_ids("tag=pump&site=south") == {far.wire_id}
    assert wire_ids("firmware=1.1.0") == {valve.wire_id}
    assert wire_ids("state=online") == {valve.wire_id}
    assert wire_ids("state=offline&site=north") == {pump.wire_id}
    assert wire_ids("silent=1h") == {pump.wire_id, far.wire_id}  # two hours, and never
    assert wire_ids("silent=1d") == {far.wire_id}
    assert wire_ids("silent=never") == {far.wire_id}
    assert wire_ids("tag=no-such-tag") == set()
    # The form shows the filters back, so the page is the link to share.
    page = browser.get("/console/devices?site=north&tag=pump&state=offline", headers=EN).text
    assert '<option value="north" selected>' in page and 'value="pump"' in page
    assert '<option value="offline" selected>' in page


def test_search_finds_a_device_by_mac_written_any_way_by_wire_id_or_by_id(browser, session,
                                                                          box):
    site = make_site(session, box)
    wanted = make_device(session, box, site, mac="24:0a:c4:12:34:56")
    other = make_device(session, box, site, mac="24:0a:c4:99:88:77")
    logged_in(browser, session, Role.viewer)

    def found(q: str) -> set[str]:
        page = browser.get("/console/devices", params={"q": q})
        assert page.status_code == 200, page.text
        return set(listed(page.text))

    for q in ("24:0a:c4:12:34:56", "24-0A-C4-12-34-56", "240ac4123456", "c4:12:34",
              "12:34:5", wanted.wire_id, str(wanted.id), str(wanted.id)[:8],
              str(wanted.id).replace("-", "")[10:20].upper()):
        assert found(q) == {wanted.wire_id}, q
    assert found("24:0a:c4") == {wanted.wire_id, other.wire_id}
    assert found("ab:cd:ef:01") == set()


def test_keyset_pages_give_every_device_exactly_once_while_devices_are_added(
        browser, session, box):
    site = make_site(session, box)
    before = {make_device(session, box, site).wire_id for _ in range(2 * devices.PAGE_SIZE + 7)}
    logged_in(browser, session, Role.admin)
    page = browser.get("/console/devices").text
    shown = listed(page)
    assert len(shown) == devices.PAGE_SIZE and shown == sorted(shown)
    # Devices registered between two pages: one sorting before the page already read, one
    # after everything; an OFFSET would show a row twice, or skip one, for the first.
    first = make_device(session, box, site, mac="02:00:00:00:00:01")
    last = make_device(session, box, site, mac="fe:ff:ff:ff:ff:ff")
    pages = 1
    while next_link := _NEXT.search(page):
        url = next_link.group(1).replace("&amp;", "&")
        assert "offset" not in url and f"after={shown[-1]}" in url
        page = browser.get(url).text
        shown += listed(page)
        pages += 1
    assert pages == 3
    assert len(shown) == len(set(shown)), "a device shown twice"
    assert before <= set(shown), "a device never shown"
    assert last.wire_id in shown and first.wire_id not in shown  # behind the cursor: next time
    assert shown == sorted(shown)


def test_pages_keep_their_filters(browser, session, box):
    north = make_site(session, box, slug="north", name="North")
    south = make_site(session, box, slug="south", name="South")
    for _ in range(devices.PAGE_SIZE + 1):
        make_device(session, box, north, tags=["pump"])
    make_device(session, box, south, tags=["pump"])
    logged_in(browser, session, Role.admin)
    page = browser.get("/console/devices?tag=pump&site=north").text
    url = _NEXT.search(page).group(1).replace("&amp;", "&")
    assert "tag=pump" in url and "site=north" in url
    second = browser.get(url, headers=EN).text
    assert len(listed(second)) == 1 and _NEXT.search(second) is None
    assert '<a href="/console/devices?site=north&amp;tag=pump">First page</a>' in second


def test_a_technician_of_one_site_finds_nothing_of_another_by_list_filter_search_or_id(
        browser, session, box, app):
    city = make_city(session, box, app)
    away = session.exec(select(Device).where(Device.site_id == city.away.id)).one()
    away.set_tags(["badinh-only"])
    away.firmware_version = "9.8.7-badinh"
    session.add(away)
    session.commit()
    logged_in(browser, session, Role.technician, sites=[city.home])
    page = browser.get("/console/devices", headers=EN)
    assert len(listed(page.text)) == 5 and away.wire_id not in page.text
    # Not even as a suggestion in the filter form.
    for secret in (city.away.name, city.away.slug, away.mac, str(away.id), "badinh-only",
                   "9.8.7-badinh"):
        assert secret not in page.text, secret
    for query in ("tag=badinh-only", "firmware=9.8.7-badinh"):
        page = browser.get("/console/devices?" + query, headers=EN)
        assert page.status_code == 200 and listed(page.text) == [], query
    # Another site's slug reads exactly as a slug that does not exist.
    guessed = browser.get(f"/console/devices?site={city.away.slug}", headers=EN)
    unknown = browser.get("/console/devices?site=no-such-site", headers=EN)
    assert guessed.status_code == unknown.status_code == 400
    assert "Unknown site" in guessed.text and away.wire_id not in guessed.text
    assert guessed.text.replace(city.away.slug, "?") == unknown.text.replace("no-such-site", "?")
    # Searching for its MAC, wire id or id finds nothing.
    for q in (away.mac, away.wire_id, str(away.id)):
        assert listed(browser.get("/console/devices", params={"q": q}).text) == [], q
    # Its page is the page of a device that does not exist.
    theirs = browser.get(f"/console/devices/{away.id}", headers=EN)
    nobody = browser.get(f"/console/devices/{uuid.uuid4()}", headers=EN)
    assert theirs.status_code == nobody.status_code == 404
    assert theirs.text == nobody.text and away.wire_id not in theirs.text
    assert browser.get("/console/devices/not-an-id", headers=EN).text == nobody.text


def _post_forms(page: str) -> set[str]:
    return set(re.findall(r'<form method="post" action="([^"]+)"', page))


def test_a_viewer_sees_the_devices_but_no_staff_controls(browser, session, box, app):
    city = make_city(session, box, app)
    device = session.exec(select(Device).where(Device.site_id == city.away.id)).one()
    logged_in(browser, session, Role.viewer)
    for url in ("/console/devices", f"/console/devices/{device.id}"):
        page = browser.get(url, headers=EN)
        assert page.status_code == 200 and device.wire_id in page.text
        # Only the header's own forms (language, log out): nothing that changes a device.
        assert _post_forms(page.text) == {"/console/locale", "/console/logout"}, url


def _readings(session: Session, wire_id: str, sensor: str, unit: str,
              values: list[float | None], *, first_seq: int = 0) -> None:
    now = utcnow()
    for index, value in enumerate(values):
        session.add(RecentReading(wire_id=wire_id, boot=3, seq=first_seq + index,
                                  sensor=sensor, unit=unit, value=value,
                                  ts=now - timedelta(minutes=len(values) - index),
                                  pre_sync=False))
    session.commit()


def _charts(page: str) -> dict[str, list[tuple[float, float]]]:
    """Each chart's caption and its polyline's points."""
    found = re.findall(r'<figcaption id="chart-\d+">([^<]+)</figcaption>.*?'
                       r'<polyline points="([^"]*)"', page, re.S)
    return {caption: [tuple(float(n) for n in point.split(","))
                      for point in points.split()] for caption, points in found}


def test_the_chart_draws_one_polyline_per_sensor_with_a_point_per_value(browser, session, box):
    site = make_site(session, box)
    device = make_device(session, box, site)
    neighbour = make_device(session, box, site)
    _readings(session, device.wire_id, "temperature", "C", [21.5, 23.0, None, 22.0, 24.5])
    _readings(session, device.wire_id, "level", "m", [1.0, 1.0, 1.0], first_seq=100)
    _readings(session, neighbour.wire_id, "temperature", "C", [99.25])
    logged_in(browser, session, Role.viewer)
    page = browser.get(f"/console/devices/{device.id}", headers=EN).text
    charts = _charts(page)
    assert list(charts) == ["level (m)", "temperature (C)"]
    assert page.count("<polyline") == 2
    temperature = charts["temperature (C)"]
    assert len(temperature) == 4  # the reading without a value has no point
    top, bottom = devices.CHART_INSET, devices.CHART_HEIGHT - devices.CHART_INSET
    assert temperature[-1][1] == top and temperature[0][1] == bottom  # 24.5 and 21.5
    assert [x for x, _ in temperature] == sorted(x for x, _ in temperature)
    assert [y for _, y in charts["level (m)"]] == [devices.CHART_HEIGHT / 2] * 3  # flat
    assert "max 24.5" in page and "min 21.5" in page and "99.25" not in page
    # For a screen reader: the chart is named and summed up, and every reading is in a table.
    assert 'role="img" aria-labelledby="chart-2" aria-describedby="chart-2-summary"' in page
    assert "Readings: 5, oldest first. Lowest 21.5, highest 24.5." in page
    table = page[page.index("Readings of temperature"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 6 and "no value" in table  # a header and five readings


def test_the_device_page_shows_identity_health_status_config_and_update_steps(
        browser, session, box, app):
    site = make_site(session, box, name="Ward 7 water tower")
    device = make_device(session, box, site, tags=["pump", "north"], firmware_version="1.4.2")
    now = utcnow()
    session.add(DeviceStatus(
        wire_id=device.wire_id, site=site.slug, gateway="gw-ward7", received_at=now,
        last_seen_at=now, offline_at=now + timedelta(seconds=180), firmware="1.4.2",
        boot=17, reset_cause="watchdog", drops={"queue_full": 1234},
        sensor_failures={"level": {"sensor_error": 3, "out_of_range": 5}}))
    row = session.get(Device, device.id)
    row.boot_counter, row.last_seen_at = 17, now
    row.node_config = {"interval_s": 60}
    session.add(row)
    release = make_release(session, app, version="1.5.0")
    rollout = Rollout(release_id=release.id, target_kind=RolloutTargetKind.devices,
                      target_value=[device.wire_id], waves=[100], wave_started_at=[None],
                      success_threshold=95, failure_threshold=5, device_deadline_s=86400,
                      created_by="cli")
    session.add(rollout)
    session.flush()
    session.add(RolloutEvent(rollout_id=rollout.id, device_id=device.id, at=now,
                             from_state=RolloutDeviceState.downloading,
                             to_state=RolloutDeviceState.failed, reason="flash full",
                             source=RolloutEventSource.node))
    session.commit()
    logged_in(browser, session, Role.viewer)
    page = browser.get(f"/console/devices/{device.id}", headers=EN)
    assert page.status_code == 200
    text = page.text
    assert f"<title>Device {device.wire_id} ·" in text
    for shown in (str(device.id), device.mac, "Ward 7 water tower", "north, pump", "1.4.2",
                  "<code>watchdog</code>", "queue_full", "1,234", "gw-ward7",
                  '<span class="state state-online">Online</span>', "<code>interval_s</code>",
                  "<code>60</code>", "1.5.0", "<code>failed</code>", "flash full"):
        assert shown in text, shown
    failures = text[text.index("Sensor errors since provisioning"):]
    assert re.search(r"<th scope=\"row\">level</th><td>3</td><td>5</td>", failures)
    assert "No readings received from this device yet." in text


@pytest.mark.parametrize("q", [
    "' OR 1=1 --", "%", "_", "%%__", "6b62%", "\\", "'; DROP TABLE device; --",
    '<script>alert("x")</script>', "zz\tzz", "ａｂ１２",
])
def test_hostile_search_input_matches_nothing_and_is_shown_as_text(browser, session, box, q):
    site = make_site(session, box)
    for _ in range(3):
        make_device(session, box, site)
    logged_in(browser, session, Role.admin)
    page = browser.get("/console/devices", params={"q": q})
    assert page.status_code == 200 and listed(page.text) == []
    assert "<script>alert" not in page.text
    assert len(listed(browser.get("/console/devices").text)) == 3  # and nothing was harmed


def test_a_search_too_long_gets_the_page_and_a_message(browser, session, box):
    make_device(session, box, make_site(session, box))
    logged_in(browser, session, Role.admin)
    page = browser.get("/console/devices", params={"q": "<b>" + "a" * 10_000}, headers=EN)
    assert page.status_code == 400 and page.headers["content-type"].startswith("text/html")
    assert "The search is longer than 64 characters" in page.text
    assert "<b>aaa" not in page.text and "&lt;b&gt;aaa" in page.text  # shown back, as text
    assert listed(page.text) == []


@pytest.mark.parametrize(("query", "message"), [
    ("state=asleep", "Unknown state: choose one from the list."),
    ("silent=2h", "Unknown last-seen choice: choose one from the list."),
    ("after=1%20OR%201", "This page link is damaged: start again from the first page."),
    ("tag=" + "t" * 65, "The tag is longer than 64 characters"),
    ("firmware=" + "9" * 65, "The firmware version is longer than 64 characters"),
])
def test_a_bad_filter_gets_the_page_with_what_is_wrong(browser, session, box, query, message):
    make_device(session, box, make_site(session, box))
    logged_in(browser, session, Role.viewer)
    page = browser.get("/console/devices?" + query, headers=EN)
    assert page.status_code == 400 and page.headers["content-type"].startswith("text/html")
    assert message in page.text and listed(page.text) == []
    assert '<label for="q">' in page.text  # the form is there to correct it


def test_the_pages_speak_vietnamese_first(browser, session, box):
    device = make_device(session, box, make_site(session, box))
    logged_in(browser, session, Role.viewer)
    page = browser.get("/console/devices?state=asleep").text
    assert "<title>Thiết bị ·" in page and "Trạng thái không hợp lệ" in page
    page = browser.get(f"/console/devices/{device.id}").text
    assert "Nhận dạng" in page and "Chưa nhận được số đo nào" in page


def test_the_overview_links_each_site_to_its_device_list(browser, session, box, app):
    city = make_city(session, box, app)
    logged_in(browser, session, Role.admin)
    page = browser.get("/console/", headers=EN).text
    for site in (city.home, city.away):
        link = f'<a href="/console/devices?site={site.slug}">List the devices at {site.name}</a>'
        assert link in page
    assert len(listed(browser.get(f"/console/devices?site={city.away.slug}").text)) == 1
