"""The overview: each site's devices by state, its gateways' uplinks, sites needing attention
first, and nothing of a site beyond the caller's."""

import re
from datetime import timedelta

from kinhbac.fleet.models import Role

from ..utils import make_site, make_user
from .conftest import log_in
from .world import gateway_reported, make_city


def _gateway_cells(page: str, gateway: str) -> list[str]:
    """The cells of a gateway's row, as HTML: uplink, queue depth, oldest queued, dropped,
    last status."""
    row = re.search(rf'<th scope="row">{gateway}</th>(.*?)</tr>', page, re.S).group(1)
    return [cell.strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]


def _counts(page: str, site_name: str) -> list[int]:
    """The four counts (online, offline, pending, updating) in the site's device table."""
    section = page[page.index(f">{site_name}</h2>"):]
    row = re.search(r"<tbody><tr>(.*?)</tr></tbody>", section, re.S).group(1)
    return [int(n) for n in re.findall(r"<td>([\d.,]+)</td>", row)]


def test_devices_are_counted_by_state_per_site(browser, session, box, app):
    city = make_city(session, box, app)
    admin, _ = make_user(session, Role.admin)
    log_in(browser, admin.email)
    page = browser.get("/console/", headers={"Accept-Language": "en"}).text
    assert _counts(page, city.home.name) == [2, 1, 1, 1]
    assert _counts(page, city.away.name) == [1, 0, 0, 0]
    assert "gw-ward7" in page and "gw-badinh" in page


def test_sites_needing_attention_come_first(browser, session, box, app):
    city = make_city(session, box, app)
    admin, _ = make_user(session, Role.admin)
    log_in(browser, admin.email)
    page = browser.get("/console/").text
    # Ward 7 has an offline device and a pending claim: before Ba Dinh, despite the alphabet.
    assert page.index(city.home.name) < page.index(city.away.name)
    assert "Cần chú ý:" in page[page.index(city.home.name):page.index(city.away.name)]
    # Ba Dinh's gateway loses its uplink: Ba Dinh needs attention too, and leads with it.
    gateway_reported(session, city.away, "gw-badinh", "offline")
    session.commit()
    page = browser.get("/console/").text
    assert page.index(city.away.name) < page.index(city.home.name)
    assert "Mất kết nối" in page


def test_a_technician_of_one_site_sees_nothing_of_another(browser, session, box, app):
    """From the attacker's side: every name, slug and figure of the other site stays away."""
    city = make_city(session, box, app)
    technician, _ = make_user(session, Role.technician, sites=[city.home])
    log_in(browser, technician.email)
    page = browser.get("/console/", headers={"Accept-Language": "en"}).text
    assert city.home.name in page and "gw-ward7" in page
    for secret in (city.away.name, city.away.slug, "gw-badinh", "12,345", "12.345",
                   str(city.away.id)):
        assert secret not in page, secret
    assert _counts(page, city.home.name) == [2, 1, 1, 1]
    totals = re.search(r'<dl class="totals">(.*?)</dl>', page, re.S).group(1)
    assert re.findall(r"<dd>(\d+)</dd>", totals) == ["2", "1", "1", "1"]  # not the away site's
    # The user's own reach is shown: its role and its site by name.
    assert "Technician" in page and f"Sites: {city.home.name}" in page


def test_a_viewer_limited_to_a_site_without_devices_sees_an_empty_overview(browser, session,
                                                                            box, app):
    city = make_city(session, box, app)
    empty = make_site(session, box, slug="empty", name="Empty lot")
    viewer, _ = make_user(session, Role.viewer, sites=[empty])
    log_in(browser, viewer.email)
    page = browser.get("/console/", headers={"Accept-Language": "en"}).text
    assert "Empty lot" in page and "No gateway is enrolled at this site." in page
    assert city.home.name not in page and city.away.name not in page


def test_names_are_shown_as_text_never_as_markup(browser, session, box):
    make_site(session, box, slug="odd", name='<script>alert("x")</script> & Co')
    admin, _ = make_user(session, Role.admin, email="<b>admin</b>@example.org")
    log_in(browser, admin.email)
    page = browser.get("/console/").text
    assert "<script>alert" not in page and "<b>admin" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; Co" in page


def test_a_gateways_queue_depth_and_the_age_of_its_oldest_reading_are_shown(
        browser, session, box, app):
    city = make_city(session, box, app)
    gateway_reported(session, city.home, "gw-ward7", "online", queue_depth=4321,
                     oldest_queued_ago=timedelta(minutes=3, seconds=5))
    session.commit()
    admin, _ = make_user(session, Role.admin)
    log_in(browser, admin.email)
    page = browser.get("/console/", headers={"Accept-Language": "en"}).text
    assert _gateway_cells(page, "gw-ward7")[1:3] == ["4,321", "3 minutes"]
    # A gateway before the figures: not reported, not an empty queue.
    assert _gateway_cells(page, "gw-badinh")[1:3] == ["not reported", "not reported"]
    # Drained: nothing waits, so there is no age to show.
    gateway_reported(session, city.away, "gw-badinh", "online", queue_depth=0)
    session.commit()
    page = browser.get("/console/").text  # Vietnamese: the browser asks for neither
    assert _gateway_cells(page, "gw-badinh")[1:3] == ["0", "không có gì chờ gửi"]
    assert _gateway_cells(page, "gw-ward7")[1:3] == ["4.321", "3 phút"]
    # Three minutes is no reason for attention; only Ward 7's devices are.
    assert "hàng đợi" not in page and "queue-stale" not in page


def test_a_reading_held_on_a_gateway_past_ten_minutes_puts_its_site_first_saying_why(
        browser, session, box, app):
    city = make_city(session, box, app)
    admin, _ = make_user(session, Role.admin)
    log_in(browser, admin.email)
    # Ba Dinh needs no attention yet: Ward 7 (offline and pending devices) leads.
    gateway_reported(session, city.away, "gw-badinh", "online", queue_depth=50,
                     oldest_queued_ago=timedelta(minutes=9, seconds=50))
    session.commit()
    page = browser.get("/console/", headers={"Accept-Language": "en"}).text
    assert page.index(city.home.name) < page.index(city.away.name)
    assert "queue-stale" not in page
    # Its oldest reading has now waited 25 minutes, its uplink still says connected (a gateway
    # that cannot keep up): Ba Dinh needs attention, before Ward 7's offline devices.
    gateway_reported(session, city.away, "gw-badinh", "online", queue_depth=90_000,
                     oldest_queued_ago=timedelta(minutes=25))
    session.commit()
    page = browser.get("/console/", headers={"Accept-Language": "en"}).text
    away = page[page.index(f">{city.away.name}</h2>"):]
    assert page.index(city.away.name) < page.index(city.home.name)
    assert "readings have waited in a gateway's queue for over 10 minutes" in \
        away[:away.index("</p>")]
    assert '<td class="queue-stale">25 minutes</td>' in away
    page = browser.get("/console/").text
    assert "có số đo đã chờ trong hàng đợi của gateway hơn 10 phút" in page
    # A disconnected gateway's site still leads the one whose queue is ageing.
    gateway_reported(session, city.home, "gw-ward7", "offline")
    session.commit()
    page = browser.get("/console/").text
    assert page.index(city.home.name) < page.index(city.away.name)


def test_a_gateway_clock_ahead_of_the_fleets_shows_no_negative_age(browser, session, box, app):
    city = make_city(session, box, app)
    gateway_reported(session, city.home, "gw-ward7", "online", queue_depth=10,
                     oldest_queued_ago=-timedelta(hours=1))
    session.commit()
    admin, _ = make_user(session, Role.admin)
    log_in(browser, admin.email)
    page = browser.get("/console/", headers={"Accept-Language": "en"}).text
    assert _gateway_cells(page, "gw-ward7")[1:3] == ["10", "0 seconds"]
