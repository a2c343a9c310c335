"""The overview's counts kept a few seconds (kinhbac/fleet/console/site_counts.py): every
site's counted at once, each visit showing only its caller's sites, said when they were taken,
counted anew once older than their age, and counted once however many visits come together."""

import re
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi import FastAPI

from sqlmodel import Session, select

from kinhbac.fleet.console import overview
from kinhbac.fleet.console.site_counts import SiteCounts
from kinhbac.fleet.models import Device, Role

from ..utils import make_device, make_user
from .conftest import form_token, log_in, post_form
from .test_overview import _counts
from .world import make_city

EN = {"Accept-Language": "en"}
AWAY_OFFLINE = 13  # never heard devices at the away site: a figure the home site has not


@pytest.fixture
def counts_kept_a_second(app: FastAPI) -> Iterator[SiteCounts]:
    """The app's kept counts for one second instead of the setting's 15: a test can wait."""
    kept_before = app.state.site_counts
    app.state.site_counts = overview.kept_counts(1.0)
    yield app.state.site_counts
    app.state.site_counts = kept_before


def _totals(page: str) -> list[str]:
    totals = re.search(r'<dl class="totals">(.*?)</dl>', page, re.S).group(1)
    return re.findall(r"<dd>([\d.,]+)</dd>", totals)


def test_a_technician_never_sees_another_sites_figures_through_the_kept_counts(
        browser, session, box, app):
    """From the attacker's side: an admin's visit has just counted every site, the away
    site's thirteen offline devices among them; the home site's technician, reading those kept
    counts, sees its own site's figures and nothing of the other's, on the overview and on
    the Sites list."""
    city = make_city(session, box, app)
    for _ in range(AWAY_OFFLINE):
        make_device(session, box, city.away)
    admin, _ = make_user(session, Role.admin)
    technician, _ = make_user(session, Role.technician, sites=[city.home])
    log_in(browser, admin.email)
    page = browser.get("/console/", headers=EN).text
    assert _counts(page, city.away.name) == [1, AWAY_OFFLINE, 0, 0]
    assert _totals(page) == ["3", str(1 + AWAY_OFFLINE), "1", "1"]
    browser.cookies.clear()
    log_in(browser, technician.email)
    for path in ("/console/", "/console/sites"):
        page = browser.get(path, headers=EN).text
        assert "Devices counted at" in page
        for secret in (city.away.name, city.away.slug, str(city.away.id), "gw-badinh",
                       f">{AWAY_OFFLINE}<", f">{1 + AWAY_OFFLINE}<"):
            assert secret not in page, (path, secret)
    page = browser.get("/console/", headers=EN).text
    assert _counts(page, city.home.name) == [2, 1, 1, 1]
    assert _totals(page) == ["2", "1", "1", "1"]


def test_the_kept_counts_are_every_sites_not_the_first_visitors(browser, session, box, app):
    """The technician's visit counts first, yet the admin after it sees the away site's."""
    city = make_city(session, box, app)
    technician, _ = make_user(session, Role.technician, sites=[city.home])
    admin, _ = make_user(session, Role.admin)
    log_in(browser, technician.email)
    assert _totals(browser.get("/console/", headers=EN).text) == ["2", "1", "1", "1"]
    browser.cookies.clear()
    log_in(browser, admin.email)
    page = browser.get("/console/", headers=EN).text
    assert _counts(page, city.away.name) == [1, 0, 0, 0]
    assert _totals(page) == ["3", "1", "1", "1"]


def test_an_approved_device_is_counted_once_the_counts_are_older_than_their_age(
        browser, session, box, app, counts_kept_a_second):
    """Approving a device (and any change) shows on the overview within the counts' age,
    which the page says; a site's own page counts on each visit and shows it at once."""
    city = make_city(session, box, app)
    admin, _ = make_user(session, Role.admin)
    log_in(browser, admin.email)
    assert _counts(browser.get("/console/", headers=EN).text, city.home.name) == [2, 1, 1, 1]
    pending = session.exec(select(Device).where(Device.site_id == city.home.id,
                                                Device.state == "pending")).one()
    page = browser.get("/console/pending", headers=EN)
    answer = post_form(browser, f"/console/pending/{pending.id}/approve",
                       {"csrf_token": form_token(page)})
    assert answer.status_code == 303
    page = browser.get("/console/", headers=EN).text
    assert _counts(page, city.home.name) == [2, 1, 1, 1]  # the counts kept, as they say
    assert "counted again when someone looks after 1 seconds" in page
    site_page = browser.get(f"/console/sites/{city.home.id}", headers=EN).text
    assert "Devices counted at" not in site_page  # counted now
    time.sleep(1.1)
    # Approved and never heard since: offline, no longer pending.
    assert _counts(browser.get("/console/", headers=EN).text, city.home.name) == [2, 2, 0, 1]


def test_visits_arriving_together_cost_one_count(session, box, app):
    city = make_city(session, box, app)
    counted = []

    def count_slowly(counting: Session, now):
        counted.append(now)
        time.sleep(0.3)  # long enough for every other visit to arrive while it runs
        return overview.count_by_site(counting, now)

    kept = SiteCounts(count_slowly, max_age_s=60)
    start = threading.Barrier(20)
    results = []

    def visit() -> None:
        with Session(app.state.engine) as own:
            start.wait()
            results.append(kept.get(own))

    visitors = [threading.Thread(target=visit) for _ in range(20)]
    for visitor in visitors:
        visitor.start()
    for visitor in visitors:
        visitor.join()
    assert len(counted) == 1
    assert len(results) == 20 and all(r is results[0] for r in results)
    assert results[0].by_site[city.home.id] == {"online": 2, "offline": 1, "pending": 1,
                                               "updating": 1}
    kept.clear()
    kept.get(session)
    assert len(counted) == 2
