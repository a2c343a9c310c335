"""The Pending page: the devices awaiting approval at the caller's sites, with their claims, and
the approval and rejection as the API's routes do them (same functions, same roles, same audit),
tried from the attacker's side too: forged forms, another site, replays, hostile stored text."""

import re
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

from kinhbac.fleet import provisioning
from kinhbac.fleet.audit import CLI
from kinhbac.fleet.console import pending
from kinhbac.fleet.models import AuditEntry, ClaimCreate, Device, DeviceState, Role, Site

from ..utils import a_claim, bearer, make_gateway, make_site, make_user, random_mac
from .conftest import form_token, log_in, post_form

EN = {"Accept-Language": "en"}
_LISTED = re.compile(r'<a href="/console/devices/([0-9a-f-]{36})"><code>([0-9a-f]{16})</code>')
_NEXT = re.compile(r'<a href="([^"]+)" rel="next">')


def listed(page: str) -> list[str]:
    return [wire_id for _, wire_id in _LISTED.findall(page)]


def post_forms(page: str) -> set[str]:
    return set(re.findall(r'<form method="post" action="([^"]+)"', page))


def claimed(client: TestClient, gateway_token: str, mac: str | None = None,
            nonce: str | None = None) -> dict:
    """A node's claim as its gateway reports it, through the gateway API."""
    claim = a_claim(mac, nonce)
    answer = client.post("/api/gateway/claims", json=claim, headers=bearer(gateway_token))
    assert answer.status_code == 200, answer.text
    return claim


def device_of(session: Session, claim: dict) -> Device:
    session.expire_all()
    return session.exec(select(Device).where(Device.wire_id == claim["device_id"])).one()


def audit_count(session: Session) -> int:
    return session.exec(select(func.count()).select_from(AuditEntry)).one()


def as_user(browser: TestClient, session: Session, role: Role,
            sites: list[Site] | None = None) -> str:
    """Log in as a new user of `role`; the CSRF token of its forms."""
    user, _ = make_user(session, role, sites=sites or [])
    log_in(browser, user.email)
    return form_token(browser.get("/console/"))


@pytest.fixture
def ward(session, box):
    """A site with a gateway, and the gateway's token."""
    site = make_site(session, box, slug="ward7", name="Ward 7 water tower")
    gateway, token = make_gateway(session, site, "gw-ward7")
    return site, gateway, token


def test_the_list_shows_each_claim_with_its_nonces_gateway_and_times(browser, session, ward):
    site, _, token = ward
    first = claimed(browser, token)
    # The same board claiming with another nonce: refused, and kept for the admin who decides.
    intruder_nonce = "f" * 32
    answer = browser.post("/api/gateway/claims", json=a_claim(
        first["device_id"][4:], intruder_nonce), headers=bearer(token))
    assert answer.json()["state"] == "refused"
    as_user(browser, session, Role.viewer)
    page = browser.get("/console/pending", headers=EN)
    assert page.status_code == 200 and "<title>Pending devices ·" in page.text
    assert listed(page.text) == [first["device_id"]]
    device = device_of(session, first)
    assert device.mac in page.text and site.name in page.text and "gw-ward7" in page.text
    assert first["nonce"] in page.text and intruder_nonce in page.text
    assert "refused, another nonce, site or claim key:" in page.text
    assert "Devices waiting for approval: 1" in page.text
    assert "Pending (1)" in page.text  # the navigation's count
    vietnamese = browser.get("/console/pending").text
    assert "<title>Thiết bị chờ phê duyệt ·" in vietnamese and "Chờ duyệt (1)" in vietnamese


def test_an_admin_approves_with_the_apis_function_and_its_audit_entry(browser, session, ward):
    _, _, token = ward
    by_console, by_api = claimed(browser, token), claimed(browser, token)
    admin, api_token = make_user(session, Role.admin)
    log_in(browser, admin.email)
    page = browser.get("/console/pending", headers=EN)
    device = device_of(session, by_console)
    assert f"/console/pending/{device.id}/approve" in post_forms(page.text)
    answer = post_form(browser, f"/console/pending/{device.id}/approve",
                       {"csrf_token": form_token(page)})
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/console/pending?done=approved&device={device.id}"
    back = browser.get(answer.headers["location"], headers=EN)
    assert f"Device {device.wire_id} was approved" in back.text
    assert listed(back.text) == [by_api["device_id"]]
    device = device_of(session, by_console)
    assert device.state == DeviceState.active and device.key_id == 1
    # The API's approval of the other device writes the same entry, field for field.
    other = device_of(session, by_api)
    assert browser.post(f"/api/devices/{other.id}/approve",
                        headers=bearer(api_token)).status_code == 200
    ours, theirs = (session.exec(select(AuditEntry).where(
        AuditEntry.action == "device.approve", AuditEntry.entity_id == str(d.id))).one()
        for d in (device, other))
    assert (ours.actor_kind, ours.actor_id, ours.actor, ours.entity) == (
        theirs.actor_kind, theirs.actor_id, theirs.actor, theirs.entity) == (
        "user", admin.id, admin.email, "device")
    assert ours.before["state"] == "pending" and ours.after["state"] == "active"
    assert set(ours.before) == set(theirs.before) and set(ours.after) == set(theirs.after)


def test_a_replayed_approval_says_so_and_changes_nothing(browser, session, ward):
    _, _, token = ward
    claim = claimed(browser, token)
    csrf = as_user(browser, session, Role.admin)
    device = device_of(session, claim)
    path = f"/console/pending/{device.id}/approve"
    assert post_form(browser, path, {"csrf_token": csrf}).status_code == 303
    approved, entries = device_of(session, claim), audit_count(session)
    again = browser.post(path, data={"csrf_token": csrf}, follow_redirects=False,
                         headers={"Origin": "http://testserver", **EN})
    assert again.status_code == 409
    assert (f"Device {device.wire_id} is no longer waiting for approval "
            "(it is now: Approved, active)") in again.text
    assert "nothing was changed" in again.text
    after = device_of(session, claim)
    assert (after.state, after.key_id, after.updated_at) == (
        approved.state, approved.key_id, approved.updated_at)
    assert audit_count(session) == entries


def test_rejecting_asks_for_confirmation_then_rejects_as_the_api_does(browser, session, ward):
    _, _, token = ward
    claim = claimed(browser, token)
    admin, _ = make_user(session, Role.admin)
    log_in(browser, admin.email)
    device = device_of(session, claim)
    page = browser.get("/console/pending", headers=EN).text
    # The list only leads to the question: no form there rejects.
    assert f"/console/pending/{device.id}/reject" not in post_forms(page)
    assert f'<form method="get" action="/console/pending/{device.id}/reject"' in page
    assert device_of(session, claim).state == DeviceState.pending
    question = browser.get(f"/console/pending/{device.id}/reject", headers=EN)
    assert question.status_code == 200 and f"Reject device {device.wire_id}" in question.text
    assert post_forms(question.text) >= {f"/console/pending/{device.id}/reject"}
    answer = post_form(browser, f"/console/pending/{device.id}/reject",
                       {"csrf_token": form_token(question)})
    assert answer.status_code == 303
    assert f"Device {device.wire_id} was rejected" in browser.get(
        answer.headers["location"], headers=EN).text
    assert device_of(session, claim).state == DeviceState.rejected
    entry = session.exec(select(AuditEntry).where(AuditEntry.action == "device.reject")).one()
    assert (entry.actor, entry.entity_id) == (admin.email, str(device.id))
    # Asking again about a device already decided gets the list and why, not the question.
    again = browser.get(f"/console/pending/{device.id}/reject", headers=EN)
    assert again.status_code == 409 and "it is now: Rejected" in again.text


@pytest.mark.parametrize("action", ["approve", "reject"])
@pytest.mark.parametrize("role", [Role.viewer, Role.technician])
def test_a_role_the_api_refuses_sees_no_buttons_and_its_forged_post_changes_nothing(
        browser, session, ward, role, action):
    """Approving and rejecting are the API's admins' (routes/devices.py): a technician of the
    device's own site is refused as a viewer is, even with a valid form token."""
    site, _, token = ward
    claim = claimed(browser, token)
    csrf = as_user(browser, session, role, sites=[site])
    page = browser.get("/console/pending", headers=EN)
    assert listed(page.text) == [claim["device_id"]]
    assert post_forms(page.text) == {"/console/locale", "/console/logout"}
    assert "/reject" not in page.text
    assert "Only an administrator can approve or reject a device." in page.text
    device, entries = device_of(session, claim), audit_count(session)
    answer = post_form(browser, f"/console/pending/{device.id}/{action}", {"csrf_token": csrf})
    assert answer.status_code == 403 and "Vai trò của bạn không được phép" in answer.text
    assert browser.get(f"/console/pending/{device.id}/reject").status_code == 403
    assert device_of(session, claim).state == DeviceState.pending
    assert audit_count(session) == entries


def test_a_technician_of_another_site_sees_none_of_its_claims_and_cannot_act(
        browser, session, box, ward):
    _, _, token = ward
    claim = claimed(browser, token)
    elsewhere = make_site(session, box, slug="badinh", name="Ba Dinh pumping station")
    csrf = as_user(browser, session, Role.technician, sites=[elsewhere])
    page = browser.get("/console/pending", headers=EN).text
    device = device_of(session, claim)
    assert listed(page) == [] and device.mac not in page and claim["nonce"] not in page
    assert "Pending (0)" in page
    for action in ("approve", "reject"):
        answer = post_form(browser, f"/console/pending/{device.id}/{action}",
                           {"csrf_token": csrf})
        assert answer.status_code == 403
    # Nor is its wire id shown back through the message of a crafted link.
    crafted = browser.get(f"/console/pending?done=approved&device={device.id}", headers=EN)
    assert device.wire_id not in crafted.text
    assert device_of(session, claim).state == DeviceState.pending


def test_an_admins_form_without_the_token_or_from_elsewhere_is_refused(browser, session, ward):
    _, _, token = ward
    claim = claimed(browser, token)
    csrf = as_user(browser, session, Role.admin)
    device, entries = device_of(session, claim), audit_count(session)
    for action in ("approve", "reject"):
        path = f"/console/pending/{device.id}/{action}"
        assert post_form(browser, path, {}).status_code == 403
        assert post_form(browser, path, {"csrf_token": "forged"}).status_code == 403
        assert post_form(browser, path, {"csrf_token": csrf},
                         origin="https://evil.example").status_code == 403
    assert device_of(session, claim).state == DeviceState.pending
    assert audit_count(session) == entries


def test_an_unknown_device_gets_the_not_found_page(browser, session):
    csrf = as_user(browser, session, Role.admin)
    for path in (f"/console/pending/{uuid.uuid4()}/approve", "/console/pending/not-an-id/approve",
                 f"/console/pending/{uuid.uuid4()}/reject"):
        assert post_form(browser, path, {"csrf_token": csrf}).status_code == 404, path
    assert browser.get(f"/console/pending/{uuid.uuid4()}/reject").status_code == 404


def test_stored_html_and_the_urls_text_are_shown_as_text(browser, session, box):
    site = make_site(session, box, slug="hostile", name='<script>alert("x")</script>')
    gateway, token = make_gateway(session, site, "gw1")
    claimed(browser, token)
    as_user(browser, session, Role.admin)
    page = browser.get("/console/pending?done=<b>pwned</b>&device=<i>x</i>", headers=EN).text
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page
    assert "pwned" not in page and "<i>x</i>" not in page
    assert "was approved" not in page and "was rejected" not in page


def test_keyset_pages_give_every_pending_device_once_newest_first(browser, session, ward):
    site, gateway, _ = ward
    for _ in range(pending.PAGE_SIZE + 5):
        provisioning.record_claim(session, gateway, CLI, ClaimCreate(
            device_id="6b62" + random_mac().replace(":", ""), nonce=uuid.uuid4().hex))
    as_user(browser, session, Role.viewer)
    page = browser.get("/console/pending").text
    shown = listed(page)
    assert len(shown) == pending.PAGE_SIZE
    # A claim arriving between two pages is newer than the first page: not on the next one.
    provisioning.record_claim(session, gateway, CLI, ClaimCreate(
        device_id="6b62" + random_mac().replace(":", ""), nonce=uuid.uuid4().hex))
    url = _NEXT.search(page).group(1)
    second = browser.get(url).text
    shown += listed(second)
    assert _NEXT.search(second) is None
    assert len(shown) == len(set(shown)) == pending.PAGE_SIZE + 5
    newest_first = list(session.exec(
        select(Device.wire_id).where(Device.state == DeviceState.pending)
        .order_by(Device.created_at.desc(), Device.id.desc())))
    assert shown == newest_first[1:]
    damaged = browser.get("/console/pending?after=nonsense", headers=EN)
    assert damaged.status_code == 400 and "This page link is damaged" in damaged.text
