"""The Sites pages: the caller's sites, a site's profile, gateways and devices by state (the
overview's own figures), the Reveal of its secrets (the API's profile read, roles and audit
entry) and the claim-key rotation behind a confirmation (the API's function, default and audit);
tried from the attacker's side too: another site's id, a viewer's forged forms, no CSRF token,
secrets left in a page or a cache."""

import html
import re
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

from kinhbac.fleet import sites
from kinhbac.fleet.audit import CLI
from kinhbac.fleet.models import AuditEntry, ClaimKeyRotation, Role, Site, SiteUpdate

from ..utils import bearer, make_site, make_user
from .conftest import form_token, log_in, post_form
from .world import City, gateway_reported, make_city

EN = {"Accept-Language": "en"}
_LISTED = re.compile(r'<th scope="row"><a href="/console/sites/([0-9a-f-]{36})">')


def text(page) -> str:
    """The page's text as a person reads it (entities decoded)."""
    return html.unescape(page.text)


def post_forms(page: str) -> set[str]:
    return set(re.findall(r'<form method="post" action="([^"]+)"', page))


def audit_count(session: Session) -> int:
    session.expire_all()
    return session.exec(select(func.count()).select_from(AuditEntry)).one()


def entries(session: Session, action: str, site: Site) -> list[AuditEntry]:
    session.expire_all()
    return list(session.exec(select(AuditEntry).where(
        AuditEntry.action == action, AuditEntry.entity_id == str(site.id))
        .order_by(AuditEntry.at)).all())


def secrets_of(session: Session, box, site: Site) -> tuple[str, str]:
    session.expire_all()
    profile = sites.site_profile(box, session.get(Site, site.id))
    return profile.wifi_password, profile.claim_key


def as_user(browser: TestClient, session: Session, role: Role,
            sites: list[Site] | None = None) -> str:
    """Log in as a new user of `role`; the CSRF token of its forms."""
    user, _ = make_user(session, role, sites=sites or [])
    log_in(browser, user.email)
    return form_token(browser.get("/console/"))


@pytest.fixture
def city(app, session, box) -> City:
    """fleet.console.world's city, its sites given WiFi passwords of their own."""
    city = make_city(session, box, app)
    for site, password in ((city.home, "ward7-wifi-secret"), (city.away, "badinh-wifi-secret")):
        sites.update_site(session, box, CLI, site.id, SiteUpdate(wifi_password=password))
    return city


def test_the_list_shows_the_callers_sites_with_gateways_and_counts(browser, session, city):
    as_user(browser, session, Role.viewer)
    page = browser.get("/console/sites", headers=EN)
    assert page.status_code == 200 and "<title>Sites ·" in page.text
    assert '<a href="/console/sites">Sites</a>' in page.text  # in the navigation
    # By name, as people look for them; each a link to its page.
    assert _LISTED.findall(page.text) == [str(city.away.id), str(city.home.id)]
    row = text(page)[text(page).index("Ward 7 water tower"):]
    # make_city: 2 online, 1 offline, 1 pending, 1 updating; its one gateway connected.
    assert re.match(r"Ward 7 water tower</a></th>\s*<td><code>ward7</code></td>\s*"
                    r'<td class="uplink-online">1 of 1</td>\s*'
                    r"<td>2</td><td>1</td>\s*<td>1</td><td>1</td>", row), row[:400]
    assert "<title>Địa điểm ·" in browser.get("/console/sites").text


def test_a_site_page_shows_its_profile_gateways_and_counts_as_the_overview_does(
        browser, session, box, city):
    gateway_reported(session, city.home, "gw-ward7", "offline", queue_depth=1234,
                     oldest_queued_ago=timedelta(minutes=25))
    session.commit()
    as_user(browser, session, Role.viewer)
    page = browser.get(f"/console/sites/{city.home.id}", headers=EN)
    assert page.status_code == 200 and "<title>Site Ward 7 water tower ·" in page.text
    shown = text(page)
    for fact in ("ward7", str(city.home.id), "kinhbac-field", "10.0.0.2:7878", '"kind"'):
        assert fact in shown, fact
    assert "Claim key last rotated</dt><dd>never" in shown
    # The gateway, its uplink and its queue as the overview reads them (its own code).
    overview = text(browser.get("/console/", headers=EN))
    gateways = shown[shown.index("<caption>Gateways at"):shown.index("</table>", shown.index(
        "<caption>Gateways at"))]
    assert gateways in overview
    assert f'<a href="/console/sites/{city.home.id}">The page of Ward 7 water tower</a>' \
        in overview
    assert "gw-ward7" in gateways and "Disconnected" in gateways and "1,234" in gateways
    assert 'class="queue-stale">25 minutes' in gateways
    # Counts by state, each a link to the device list filtered the same way.
    for state, count in (("online", 2), ("offline", 1), ("pending", 1), ("updating", 1)):
        link = f'/console/devices?site=ward7&amp;state={state}">'
        assert re.search(re.escape(link) + r"[^<]+</a></th><td>" + str(count) + "</td>",
                         page.text), state
        listed = browser.get(html.unescape(link[:-2]), headers=EN)
        assert listed.status_code == 200 and f"Devices matching: {count}" in text(listed)
    # No secret of it reaches a page that was not asked to reveal them.
    wifi, claim_key = secrets_of(session, box, city.home)
    assert wifi not in page.text and claim_key not in page.text
    assert "Reveal the WiFi password" not in page.text  # a viewer may not


def test_an_unknown_site_and_an_address_that_is_no_id_get_the_not_found_page(browser, session):
    as_user(browser, session, Role.admin)
    for path in (f"/console/sites/{uuid.uuid4()}", "/console/sites/ward7"):
        page = browser.get(path, headers=EN)
        assert page.status_code == 404, path
        assert "There is no site with this id among the sites you can see." in page.text


@pytest.mark.parametrize("role", [Role.technician, Role.viewer])
def test_a_user_limited_to_one_site_never_sees_the_other(browser, session, box, city, role):
    csrf = as_user(browser, session, role, sites=[city.home])
    page = browser.get("/console/sites", headers=EN)
    assert _LISTED.findall(page.text) == [str(city.home.id)]
    assert city.away.name not in page.text
    # The same sites as the API lists for a user limited alike.
    _, token = make_user(session, role, sites=[city.home])
    listed = browser.get("/api/sites", headers=bearer(token)).json()["items"]
    assert [s["id"] for s in listed] == [str(city.home.id)]
    # Its page answers exactly as a site that does not exist, for reading and for acting.
    missing = browser.get(f"/console/sites/{uuid.uuid4()}", headers=EN)
    other = browser.get(f"/console/sites/{city.away.id}", headers=EN)
    assert other.status_code == missing.status_code == 404
    assert other.text == missing.text
    entries_before = audit_count(session)
    wifi, claim_key = secrets_of(session, box, city.away)
    for action in ("reveal", "rotate"):
        path = f"/console/sites/{city.away.id}/{action}"
        answer = post_form(browser, path, {"csrf_token": csrf, "overlap_hours": "0"})
        unknown = post_form(browser, f"/console/sites/{uuid.uuid4()}/{action}",
                            {"csrf_token": csrf, "overlap_hours": "0"})
        # A technician may reveal (its own sites'): another's is "not found", as a missing one.
        # A viewer may do neither, and rotating is the admins': refused before any lookup.
        expected = 404 if (role, action) == (Role.technician, "reveal") else 403
        assert answer.status_code == unknown.status_code == expected, action
        assert answer.text == unknown.text
        assert wifi not in answer.text and claim_key not in answer.text
    assert secrets_of(session, box, city.away) == (wifi, claim_key)
    assert audit_count(session) == entries_before


def test_a_technician_reveals_its_sites_secrets_once_with_the_apis_audit_entry(
        browser, session, box, city):
    technician, token = make_user(session, Role.technician, sites=[city.home])
    log_in(browser, technician.email)
    page = browser.get(f"/console/sites/{city.home.id}", headers=EN)
    reveal = f"/console/sites/{city.home.id}/reveal"
    assert reveal in post_forms(page.text)
    assert f"/console/sites/{city.home.id}/rotate" not in page.text  # admins only
    wifi, claim_key = secrets_of(session, box, city.home)
    assert wifi not in page.text and claim_key not in page.text
    assert entries(session, "site.profile_read", city.home) == []

    answer = post_form(browser, reveal, {"csrf_token": form_token(page)})
    assert answer.status_code == 200
    assert wifi in answer.text and claim_key in answer.text
    profile = browser.get(f"/api/sites/{city.home.id}/profile", headers=bearer(token)).json()
    assert profile["claim_key_fingerprint"] in answer.text
    # Never kept: not by a proxy, not by the browser's cache or history.
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["pragma"] == "no-cache"
    # The page the browser comes back to holds them no more.
    again = browser.get(f"/console/sites/{city.home.id}", headers=EN)
    assert wifi not in again.text and claim_key not in again.text

    ours, theirs = entries(session, "site.profile_read", city.home)
    fields = ("actor_kind", "actor_id", "actor", "action", "entity", "entity_id", "before",
              "after")
    assert [getattr(ours, f) for f in fields] == [getattr(theirs, f) for f in fields] == [
        "user", technician.id, technician.email, "site.profile_read", "site",
        str(city.home.id), None, None]


def test_a_viewers_forged_reveal_and_rotation_are_refused_and_change_and_record_nothing(
        browser, session, box, city):
    csrf = as_user(browser, session, Role.viewer)
    page = browser.get(f"/console/sites/{city.home.id}", headers=EN)
    assert post_forms(page.text) == {"/console/locale", "/console/logout"}
    assert "Only administrators and technicians can reveal them." in page.text
    before, entries_before = secrets_of(session, box, city.home), audit_count(session)
    for action in ("reveal", "rotate"):
        answer = post_form(browser, f"/console/sites/{city.home.id}/{action}",
                           {"csrf_token": csrf, "overlap_hours": "0"})
        assert answer.status_code == 403, action
        assert "Vai trò của bạn không được phép" in answer.text
        assert before[0] not in answer.text and before[1] not in answer.text
    assert browser.get(f"/console/sites/{city.home.id}/rotate").status_code == 403
    assert secrets_of(session, box, city.home) == before
    assert audit_count(session) == entries_before


def test_a_technician_may_not_rotate_as_the_api_refuses_it(browser, session, box, city):
    csrf = as_user(browser, session, Role.technician, sites=[city.home])
    before, entries_before = secrets_of(session, box, city.home), audit_count(session)
    answer = post_form(browser, f"/console/sites/{city.home.id}/rotate",
                       {"csrf_token": csrf, "overlap_hours": "1"})
    assert answer.status_code == 403
    assert secrets_of(session, box, city.home) == before
    assert audit_count(session) == entries_before


def test_forms_without_the_token_or_from_elsewhere_are_refused(browser, session, box, city):
    csrf = as_user(browser, session, Role.admin)
    before, entries_before = secrets_of(session, box, city.home), audit_count(session)
    for action in ("reveal", "rotate"):
        path = f"/console/sites/{city.home.id}/{action}"
        for data, origin in (({}, "http://testserver"),
                             ({"csrf_token": "forged"}, "http://testserver"),
                             ({"csrf_token": csrf}, "https://evil.example")):
            answer = post_form(browser, path, data | {"overlap_hours": "0"}, origin=origin)
            assert answer.status_code == 403, (action, data, origin)
            assert before[0] not in answer.text and before[1] not in answer.text
    assert secrets_of(session, box, city.home) == before
    assert audit_count(session) == entries_before


def test_an_admin_rotates_behind_a_confirmation_as_the_api_does(browser, session, box, city,
                                                                 app):
    admin, token = make_user(session, Role.admin)
    log_in(browser, admin.email)
    old_key = secrets_of(session, box, city.home)[1]
    page = browser.get(f"/console/sites/{city.home.id}", headers=EN)
    rotate = f"/console/sites/{city.home.id}/rotate"
    # The site's page only leads to the question: no form there rotates.
    assert rotate not in post_forms(page.text)
    assert f'<form method="get" action="{rotate}"' in page.text
    question = browser.get(rotate, headers=EN)
    default = app.state.settings.claim_key_overlap_hours
    assert question.status_code == 200 and rotate in post_forms(question.text)
    assert f'name="overlap_hours" type="number" min="0" max="720" step="any" ' \
           f'value="{default:g}"' in question.text
    assert secrets_of(session, box, city.home)[1] == old_key  # asking changed nothing

    answer = post_form(browser, rotate, {"csrf_token": form_token(question),
                                         "overlap_hours": "6"})
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/console/sites/{city.home.id}?done=rotated"
    new_key = secrets_of(session, box, city.home)[1]
    assert new_key != old_key
    done = text(browser.get(answer.headers["location"], headers=EN))
    assert "The claim key was rotated." in done and "claims under the old key are taken until" \
        in done
    assert new_key not in done and old_key not in done
    session.expire_all()
    rotated = session.get(Site, city.home.id)
    assert rotated.previous_claim_key_expires_at - rotated.claim_key_rotated_at == \
        timedelta(hours=6)

    # The API's rotation of the other site writes the same entry, field for field.
    assert browser.post(f"/api/sites/{city.away.id}/claim-key/rotate", json={"overlap_hours": 6},
                        headers=bearer(token)).status_code == 200
    [ours], [theirs] = (entries(session, "site.rotate_claim_key", s)
                        for s in (city.home, city.away))
    assert (ours.actor_kind, ours.actor_id, ours.actor, ours.entity) == (
        theirs.actor_kind, theirs.actor_id, theirs.actor, theirs.entity) == (
        "user", admin.id, admin.email, "site")
    assert set(ours.before) == set(theirs.before) and set(ours.after) == set(theirs.after)
    assert ours.after["overlap_hours"] == theirs.after["overlap_hours"] == 6
    assert ours.before["claim_key_rotated_at"] is None
    assert ours.after["claim_key_rotated_at"] is not None


def test_an_empty_overlap_takes_the_fleets_default_as_the_api_does(browser, session, box, city,
                                                                   app):
    csrf = as_user(browser, session, Role.admin)
    answer = post_form(browser, f"/console/sites/{city.home.id}/rotate",
                       {"csrf_token": csrf, "overlap_hours": " "})
    assert answer.status_code == 303
    [entry] = entries(session, "site.rotate_claim_key", city.home)
    assert entry.after["overlap_hours"] == app.state.settings.claim_key_overlap_hours
    # 0 ends the old key at once: no overlap, and the page says so.
    post_form(browser, f"/console/sites/{city.away.id}/rotate",
              {"csrf_token": csrf, "overlap_hours": "0"})
    session.expire_all()
    assert session.get(Site, city.away.id).previous_claim_key_expires_at is None
    done = text(browser.get(f"/console/sites/{city.away.id}?done=rotated", headers=EN))
    assert "claims under the old key are refused from now on" in done


@pytest.mark.parametrize("overlap", ["-1", "721", "soon", "nan", "inf", "1e9"])
def test_an_overlap_the_api_refuses_gets_the_form_back_and_changes_nothing(
        browser, session, box, city, overlap):
    csrf = as_user(browser, session, Role.admin)
    before, entries_before = secrets_of(session, box, city.home), audit_count(session)
    answer = post_form(browser, f"/console/sites/{city.home.id}/rotate",
                       {"csrf_token": csrf, "overlap_hours": overlap})
    assert answer.status_code == 422
    assert 'role="alert"' in answer.text
    assert "Thời gian chuyển tiếp phải là một số giờ từ 0 đến 720" in answer.text
    assert f'value="{overlap}"' in answer.text  # what was typed is kept
    assert secrets_of(session, box, city.home) == before
    assert audit_count(session) == entries_before


def test_a_rotation_made_meanwhile_is_said_and_the_second_changes_nothing(
        browser, session, box, city, monkeypatch):
    """Two admins confirm at once: the other's rotation commits after this one read the site
    and before it writes. The fleet's compare-and-set refuses this one (the API's 409), and the
    form says so in the user's language; the other's key stands."""
    csrf = as_user(browser, session, Role.admin)
    read_site = sites.get_or_404
    raced: list[str] = []

    def read_then_overtaken(db: Session, model, wanted, what):
        record = read_site(db, model, wanted, what)
        if model is Site and not raced:
            raced.append("other admin")
            with Session(db.get_bind()) as other:
                sites.rotate_claim_key(other, box, CLI, wanted, ClaimKeyRotation(),
                                       default_overlap_hours=1)
        return record

    monkeypatch.setattr(sites, "get_or_404", read_then_overtaken)
    answer = post_form(browser, f"/console/sites/{city.home.id}/rotate",
                       {"csrf_token": csrf, "overlap_hours": "1"})
    assert raced and answer.status_code == 409
    assert "đã có người khác đổi khóa đăng ký này" in answer.text
    assert 'value="1"' in answer.text
    [entry] = entries(session, "site.rotate_claim_key", city.home)
    assert entry.actor == "cli"  # the other's only


def test_stored_html_is_shown_as_text(browser, session, box):
    site = make_site(session, box, slug="hostile", name='<script>alert("x")</script>',
                     wifi_ssid="<b>ssid</b>")
    as_user(browser, session, Role.admin)
    for path in ("/console/sites", f"/console/sites/{site.id}",
                 f"/console/sites/{site.id}/rotate"):
        page = browser.get(path, headers=EN).text
        assert "<script>alert" not in page and "&lt;script&gt;alert" in page, path
        assert "<b>ssid</b>" not in page
    page = browser.get(f"/console/sites/{site.id}?done=<b>pwned</b>", headers=EN).text
    assert "pwned" not in page and "was rotated" not in page


def test_without_a_session_the_pages_and_forms_lead_to_the_login_and_reveal_nothing(
        browser, session, box, city):
    wifi, claim_key = secrets_of(session, box, city.home)
    entries_before = audit_count(session)
    for answer in (browser.get("/console/sites", follow_redirects=False),
                   browser.get(f"/console/sites/{city.home.id}", follow_redirects=False),
                   post_form(browser, f"/console/sites/{city.home.id}/reveal", {}),
                   post_form(browser, f"/console/sites/{city.home.id}/rotate",
                             {"overlap_hours": "0"})):
        assert answer.status_code == 303 and answer.headers["location"] == "/console/login"
        assert wifi not in answer.text and claim_key not in answer.text
    assert secrets_of(session, box, city.home) == (wifi, claim_key)
    assert audit_count(session) == entries_before
