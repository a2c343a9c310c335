"""The Audit log page: the API's log (admins only, its order and filters) with filters in the
URL, keyset pages, times where the users are, and stored text shown as text."""

import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import Session

from kinhbac.fleet import audit
from kinhbac.fleet.audit import Actor
from kinhbac.fleet.console import audit_log
from kinhbac.fleet.models import Role, utcnow

from ..utils import bearer, make_device, make_gateway, make_site, make_user
from .conftest import log_in

EN = {"Accept-Language": "en"}
_ROW = re.compile(r'<tr>\s*<td><time datetime="([^"]+)">')
_NEXT = re.compile(r'<a href="([^"]+)" rel="next">')
ALICE = Actor("user", "alice@example.org", uuid.uuid4())


def entry(session: Session, action: str, entity: str = "user", entity_id: object = None, *,
          at: datetime | None = None, actor: Actor = ALICE, before: dict | None = None,
          after: dict | None = None) -> None:
    written = audit.record(session, actor, action, entity, entity_id or uuid.uuid4(),
                           before=before, after=after)
    if at is not None:
        written.at = at
    session.commit()


def times(page: str) -> list[str]:
    """The entries' times (ISO), in the order shown."""
    return _ROW.findall(page)


def admin_in(browser, session: Session) -> str:
    admin, token = make_user(session, Role.admin)
    log_in(browser, admin.email)
    return token


def test_an_admin_reads_the_log_newest_first_with_who_what_where_and_the_change(
        browser, session, box):
    site = make_site(session, box, slug="ward7", name="Ward 7 water tower")
    device = make_device(session, box, site)
    entry(session, "device.update", "device", device.id, at=utcnow() - timedelta(hours=1),
          before={"tags": []}, after={"tags": ["pump"]})
    entry(session, "site.update", "site", site.id, before={"name": "Ward 7"},
          after={"name": "Ward 7 water tower"})
    admin_in(browser, session)
    page = browser.get("/console/audit", headers=EN)
    assert page.status_code == 200 and "<title>Audit log ·" in page.text
    assert '<a href="/console/audit">Audit log</a>' in page.text  # in the navigation
    shown = times(page.text)
    assert shown == sorted(shown, reverse=True) and len(shown) >= 2
    body = page.text.split("<tbody>")[1]
    assert body.index("site.update") < body.index("device.update")  # newest first
    assert "alice@example.org" in body and "Ward 7 water tower" in body
    assert f'<a href="/console/devices/{device.id}"><code>{device.id}</code></a>' in body
    assert "<code>tags</code>: [], now [&#34;pump&#34;]" in body
    assert "<code>name</code>: Ward 7, now Ward 7 water tower" in body


@pytest.mark.parametrize("role", [Role.technician, Role.viewer])
def test_the_log_is_the_admins_as_in_the_api(browser, session, box, role):
    """GET /api/audit is admins' only (routes/audit.py); a city-wide technician or viewer is
    refused the page too, and is not offered it."""
    entry(session, "site.update", "site", uuid.uuid4(), actor=Actor("user", "secret-actor"))
    user, token = make_user(session, role)
    assert browser.get("/api/audit", headers=bearer(token)).status_code == 403
    log_in(browser, user.email)
    page = browser.get("/console/audit", headers=EN)
    assert page.status_code == 403 and "secret-actor" not in page.text
    assert "Your role does not allow this page or action." in page.text
    assert "/console/audit" not in browser.get("/console/", headers=EN).text


def test_filters_by_actor_action_site_and_days_combine(browser, session, box):
    site = make_site(session, box, slug="ward7", name="Ward 7")
    other = make_site(session, box, slug="badinh", name="Ba Dinh")
    gateway, _ = make_gateway(session, site, "gw-ward7")
    device = make_device(session, box, site)
    bob = Actor("user", "bob@example.org", uuid.uuid4())
    # 2026-12-01 23:30 in Hanoi is 16:30 UTC that day; 2026-12-02 00:30 in Hanoi is 17:30 UTC
    # on the 1st: the days are the users' days, not UTC's.
    late_first = datetime(2026, 12, 1, 16, 30, tzinfo=UTC)
    early_second = datetime(2026, 12, 1, 17, 30, tzinfo=UTC)
    entry(session, "site.update", "site", site.id, at=late_first)
    entry(session, "gateway.enrol", "gateway", gateway.id, at=early_second, actor=bob)
    entry(session, "device.update", "device", device.id, at=early_second, actor=bob)
    entry(session, "site.update", "site", other.id, at=early_second)
    admin_in(browser, session)

    def found(query: str) -> int:
        page = browser.get("/console/audit?" + query, headers=EN)
        assert page.status_code == 200, page.text
        return len(times(page.text))

    assert found("actor=bob@example.org") == 2
    assert found("actor=bob") == 0  # exact, as the log's filters are
    assert found("action=site.update") == 2
    # The site, its gateway, its device (before their creation entries, written today).
    assert found("site=ward7&to=2026-12-02") == 3
    assert found("site=badinh&to=2026-12-02") == 1
    assert found("site=ward7&actor=bob@example.org&action=device.update") == 1
    assert found("from=2026-12-02") >= 3 and found("to=2026-12-01") == 1
    assert found("from=2026-12-02&to=2026-12-02&site=ward7") == 2
    page = browser.get("/console/audit?site=ward7&action=site.update", headers=EN).text
    assert '<option value="ward7" selected>' in page and 'value="site.update"' in page


def test_the_console_and_the_api_count_the_same_entries_for_an_action(browser, session):
    for _ in range(3):
        entry(session, "device.approve", "device")
    entry(session, "device.reject", "device")
    token = admin_in(browser, session)
    api = browser.get("/api/audit?action=device.approve", headers=bearer(token)).json()
    page = browser.get("/console/audit?action=device.approve", headers=EN).text
    assert api["total"] == 3 and "Entries matching: 3" in page


@pytest.mark.parametrize(("query", "message"), [
    ("from=2026-13-01", "The first day is not a date"),
    ("to=yesterday", "The last day is not a date"),
    ("from=2026-12-05&to=2026-12-01", "The first day is after the last day."),
    ("site=no-such-site", "Unknown site"),
    ("after=123", "This page link is damaged"),
    ("actor=" + "a" * 400, "The actor is longer than 320 characters"),
])
def test_a_bad_filter_gets_the_page_with_what_is_wrong_as_html(browser, session, query,
                                                               message):
    entry(session, "site.update")
    admin_in(browser, session)
    page = browser.get("/console/audit?" + query, headers=EN)
    assert page.status_code == 400 and page.headers["content-type"].startswith("text/html")
    assert message in page.text and times(page.text) == []


def test_keyset_pages_give_every_entry_once_while_entries_are_written(browser, session):
    start = utcnow() - timedelta(days=1)
    for n in range(2 * audit_log.PAGE_SIZE + 3):
        entry(session, "site.update", at=start + timedelta(seconds=n // 2))  # pairs share a time
    admin_in(browser, session)  # its login is an entry too
    page = browser.get("/console/audit?action=site.update").text
    seen = re.findall(r"<code>([0-9a-f-]{36})</code>", page)
    pages = 1
    entry(session, "site.update")  # newer than everything read: not on the next pages
    while found := _NEXT.search(page):
        url = found.group(1).replace("&amp;", "&")
        assert "action=site.update" in url and "offset" not in url
        page = browser.get(url).text
        seen += re.findall(r"<code>([0-9a-f-]{36})</code>", page)
        pages += 1
    assert pages == 3
    assert len(seen) == len(set(seen)) == 2 * audit_log.PAGE_SIZE + 3


def test_stored_html_is_shown_as_text(browser, session):
    entry(session, "site.update", actor=Actor("user", "<b>mallory</b>@example.org"),
          after={"name": "<script>alert(1)</script>"})
    admin_in(browser, session)
    page = browser.get("/console/audit", headers=EN).text
    assert "<script>alert(1)" not in page and "<b>mallory" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;mallory&lt;/b&gt;@example.org" in page


def test_the_page_speaks_vietnamese_first(browser, session):
    entry(session, "site.update")
    admin_in(browser, session)
    page = browser.get("/console/audit").text
    assert "<title>Nhật ký kiểm toán ·" in page and "Người thực hiện" in page
    bad = browser.get("/console/audit?from=x")
    assert bad.status_code == 400 and "Ngày bắt đầu không phải là một ngày hợp lệ" in bad.text
