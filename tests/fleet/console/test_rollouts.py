"""The Rollouts pages: the list (running first, keyset pages), a rollout's live view and its
endpoint, pause/resume/cancel behind a confirmation, and the form that previews and starts one,
each with the API's own functions, roles and audit entries; tried from the attacker's side too:
viewers' forged forms, technicians and users limited to sites, no CSRF token, replays."""

import html
import re
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

from kinhbac.fleet import rollouts
from kinhbac.fleet.audit import CLI
from kinhbac.fleet.console import rollouts as console_rollouts
from kinhbac.fleet.models import (
    AuditEntry,
    Device,
    Role,
    Rollout,
    RolloutCreate,
    RolloutState,
    RolloutTarget,
    Site,
    utcnow,
)

from ..utils import bearer, make_device, make_release, make_site, make_user
from .conftest import form_token, log_in, post_form

EN = {"Accept-Language": "en"}
_LISTED = re.compile(r'<a href="/console/rollouts/([0-9a-f-]{36})">')
_NEXT = re.compile(r'<a href="([^"]+)" rel="next">')


def text(page) -> str:
    """The page's text as a person reads it (entities decoded)."""
    return html.unescape(page.text)


def post_forms(page: str) -> set[str]:
    return set(re.findall(r'<form method="post" action="([^"]+)"', page))


def as_user(browser: TestClient, session: Session, role: Role,
            sites: list[Site] | None = None) -> str:
    """Log in as a new user of `role`; the CSRF token of its forms."""
    user, _ = make_user(session, role, sites=sites or [])
    log_in(browser, user.email)
    return form_token(browser.get("/console/"))


def count(session: Session, model) -> int:
    session.expire_all()
    return session.exec(select(func.count()).select_from(model)).one()


def state_of(session: Session, rollout_id: uuid.UUID) -> RolloutState:
    session.expire_all()
    return session.get(Rollout, rollout_id).state


def start(session: Session, release_id: uuid.UUID, site: Site, **fields) -> uuid.UUID:
    """A rollout to every device of `site`, started as the CLI starts one."""
    data = RolloutCreate(release_id=release_id, target=RolloutTarget(site=site.slug), **fields)
    return rollouts.create_rollout(session, CLI, data).id


def fail(session: Session, rollout_id: uuid.UUID, wire_id: str, site: Site, state: str,
         reason: str) -> None:
    """One device's final step as its gateway reports it (the ingest's path)."""
    rollout = session.get(Rollout, rollout_id)
    refused = rollouts.apply_progress(session, [{
        "wire_id": wire_id, "site": site.slug, "release_id": rollout.release_id,
        "rollout_id": rollout_id, "state": state, "bytes": 0, "reason": reason,
        "at": utcnow(), "boot": 3}])
    session.commit()
    assert refused == []


@pytest.fixture
def city(session, box):
    """Two sites with three active devices each."""
    sites = [make_site(session, box, slug="ward7", name="Ward 7 water tower"),
             make_site(session, box, slug="badinh", name="Ba Dinh pumping station")]
    for site in sites:
        for _ in range(3):
            make_device(session, box, site)
    return sites


def devices_at(session: Session, site: Site) -> list[Device]:
    return list(session.exec(select(Device).where(Device.site_id == site.id)
                             .order_by(Device.wire_id)))


def test_the_list_shows_running_then_paused_then_the_rest_in_keyset_pages(
        browser, session, box, app, monkeypatch):
    release = make_release(session, app, version="0.3.0")
    made = []
    for n in range(4):
        site = make_site(session, box, slug=f"site{n}")
        make_device(session, box, site)
        made.append(start(session, release.id, site))
    rollouts.cancel(session, CLI, made[0])  # oldest: cancelled
    rollouts.pause(session, CLI, made[1])
    as_user(browser, session, Role.viewer)  # city-wide: reads them, as GET /api/rollouts
    page = browser.get("/console/rollouts", headers=EN)
    assert page.status_code == 200 and "<title>Rollouts ·" in page.text
    expected = [str(made[3]), str(made[2]), str(made[1]), str(made[0])]
    assert _LISTED.findall(page.text) == expected
    assert "Running" in page.text and "Paused" in page.text and "Cancelled" in page.text
    assert "0 of 1" in page.text and "Rollouts: 4" in page.text
    assert "/console/rollouts/new" not in page.text  # a viewer cannot start one
    assert '<li><a href="/console/rollouts">Rollouts</a></li>' in page.text  # navigation
    # One a page: every rollout once, in the same order, by following "Next page".
    monkeypatch.setattr(console_rollouts, "PAGE_SIZE", 1)
    seen, url = [], "/console/rollouts"
    while url:
        page = browser.get(html.unescape(url), headers=EN)
        seen += _LISTED.findall(page.text)
        found = _NEXT.search(page.text)
        url = found.group(1) if found else None
    assert seen == expected
    damaged = browser.get("/console/rollouts?after=1_2_zz", headers=EN)
    assert damaged.status_code == 400 and "This page link is damaged" in damaged.text
    vietnamese = browser.get("/console/rollouts")
    assert "<title>Triển khai ·" in vietnamese.text and "Đang chạy" in vietnamese.text


def test_the_live_view_shows_waves_failures_and_counts_and_its_endpoint_the_same(
        browser, session, app, city):
    home, _ = city
    release = make_release(session, app, version="0.4.0")
    rollout_id = start(session, release.id, home, waves=[50, 100], failure_threshold=5)
    first_wave = [d for d in rollouts.list_devices(session, rollout_id, state=None, wave=0,
                                                   limit=10, offset=0).items]
    assert len(first_wave) == 2  # ceil(50% of 3)
    fail(session, rollout_id, first_wave[0].device_id, home, "rolled_back",
         "import failed: RuntimeError: <b>boom</b>")
    as_user(browser, session, Role.admin)
    page = browser.get(f"/console/rollouts/{rollout_id}", headers=EN)
    assert page.status_code == 200
    assert "<title>Rollout of bundle 0.4.0 ·" in page.text
    shown = text(page)
    # The rules ran: one of the wave's two failed, past 5%, so it paused itself, saying why.
    assert "Paused" in shown and "wave 1 of 2 (50% of the target): 1 of its 2 devices failed" \
        in shown
    assert first_wave[0].device_id in shown and "Rolled back" in shown
    assert "import failed: RuntimeError: <b>boom</b>" in shown  # as text, never as markup
    assert "<b>boom</b>" not in page.text
    assert "0 of 3 confirmed" in shown and "Failures" in shown
    assert 'data-wave-size="0">2<' in page.text and 'data-wave-size="1">1<' in page.text
    assert "not started" in shown  # the second wave
    assert "2 confirmed" in shown and "1 failed" in shown  # 95% of 2 to advance, >5% pauses
    # Works without the script: a refresh link; the script is ours, from the console.
    assert f'<a href="/console/rollouts/{rollout_id}">Refresh</a>' in page.text
    assert '<script src="/console/static/rollout_live.js" defer></script>' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert browser.get("/console/static/rollout_live.js").status_code == 200
    # The live endpoint: the page's live part, the same figures.
    live = browser.get(f"/console/rollouts/{rollout_id}/live", headers=EN)
    assert live.status_code == 200 and "<html" not in live.text
    assert 'id="live"' in page.text and live.text.strip() in page.text
    # A change shows on the next poll, without loading the page again.
    rollouts.cancel(session, CLI, rollout_id)
    again = html.unescape(browser.get(f"/console/rollouts/{rollout_id}/live",
                                      headers=EN).text)
    assert "Cancelled" in again and 'data-final="yes"' in again


def test_a_viewer_sees_no_buttons_and_its_forged_forms_change_nothing(
        browser, session, app, city):
    home, away = city
    release = make_release(session, app, version="0.5.0")
    rollout_id = start(session, release.id, home)
    token = as_user(browser, session, Role.viewer)
    page = browser.get(f"/console/rollouts/{rollout_id}", headers=EN)
    assert page.status_code == 200 and post_forms(page.text) == {"/console/locale",
                                                                 "/console/logout"}
    assert f"/console/rollouts/{rollout_id}/pause" not in page.text
    assert "Only an administrator can pause, resume or cancel a rollout." in page.text
    audits, made = count(session, AuditEntry), count(session, Rollout)
    for action in ("pause", "cancel"):
        assert browser.get(f"/console/rollouts/{rollout_id}/{action}").status_code == 403
        forged = post_form(browser, f"/console/rollouts/{rollout_id}/{action}",
                           {"csrf_token": token})
        assert forged.status_code == 403, action
        assert "Vai trò của bạn không được phép xem trang này" in text(forged)  # vi first
    assert browser.get("/console/rollouts/new").status_code == 403
    forged = post_form(browser, "/console/rollouts/new", {
        "csrf_token": token, "do": "create", "release_id": str(release.id), "target": "site",
        "site": away.slug, "waves": "100"})
    assert forged.status_code == 403
    assert state_of(session, rollout_id) == RolloutState.running
    assert (count(session, AuditEntry), count(session, Rollout)) == (audits, made)


@pytest.mark.parametrize("role", [Role.technician, Role.viewer])
def test_callers_limited_to_a_site_see_no_rollout_and_cannot_start_one(
        browser, session, app, city, role):
    home, away = city
    release = make_release(session, app, version="0.6.0")
    theirs = start(session, release.id, away)
    token = as_user(browser, session, role, sites=[home])
    overview = browser.get("/console/", headers=EN)
    assert 'href="/console/rollouts"' not in overview.text  # no link to a refusal
    # As the API refuses every /api/rollouts route to a caller limited to sites (a rollout's
    # devices span sites), nothing of any rollout: not the list, not the page, not /live.
    for path in ("/console/rollouts", f"/console/rollouts/{theirs}",
                 f"/console/rollouts/{theirs}/live", f"/console/rollouts/{uuid.uuid4()}/live"):
        answer = browser.get(path, headers=EN)
        assert answer.status_code == 403, path
        assert "0.6.0" not in answer.text and str(theirs) not in answer.text.replace(path, "")
    # Listing the other site's devices by id: refused before anything is looked up.
    made, audits = count(session, Rollout), count(session, AuditEntry)
    wire_ids = " ".join(d.wire_id for d in devices_at(session, away))
    for do in ("preview", "create"):
        answer = post_form(browser, "/console/rollouts/new", {
            "csrf_token": token, "do": do, "release_id": str(release.id),
            "target": "devices", "devices": wire_ids, "waves": "100"})
        assert answer.status_code == 403, do
        assert "0.6.0" not in answer.text
    assert (count(session, Rollout), count(session, AuditEntry)) == (made, audits)


def test_a_technician_city_wide_is_refused_as_the_api_refuses_it(browser, session, app, city):
    home, _ = city
    rollout_id = start(session, make_release(session, app).id, home)
    user, api_token = make_user(session, Role.technician)
    assert browser.get(f"/api/rollouts/{rollout_id}", headers=bearer(api_token)).status_code \
        == 403
    log_in(browser, user.email)
    assert browser.get(f"/console/rollouts/{rollout_id}").status_code == 403
    assert browser.get(f"/console/rollouts/{rollout_id}/live").status_code == 403


def test_an_unknown_rollout_and_an_id_that_is_none_read_the_same(browser, session):
    as_user(browser, session, Role.admin)
    answers = [browser.get(path, headers=EN) for path in (
        f"/console/rollouts/{uuid.uuid4()}", "/console/rollouts/not-an-id",
        f"/console/rollouts/{uuid.uuid4()}/live", f"/console/rollouts/{uuid.uuid4()}/pause")]
    assert {a.status_code for a in answers} == {404}
    assert all("There is no rollout with this id." in a.text for a in answers)


def test_pause_resume_and_cancel_from_the_console_are_audited_as_through_the_api(
        browser, session, app, city):
    home, away = city
    release = make_release(session, app, version="0.7.0")
    ours, theirs = start(session, release.id, home), start(session, release.id, away)
    admin, api_token = make_user(session, Role.admin)
    log_in(browser, admin.email)
    for action, after in (("pause", RolloutState.paused), ("resume", RolloutState.running),
                          ("cancel", RolloutState.cancelled)):
        page = browser.get(f"/console/rollouts/{ours}", headers=EN)
        assert f'action="/console/rollouts/{ours}/{action}"' in page.text, action
        # The button opens a confirmation; only its form acts.
        confirm = browser.get(f"/console/rollouts/{ours}/{action}", headers=EN)
        assert confirm.status_code == 200 and state_of(session, ours) != after
        assert post_forms(confirm.text) >= {f"/console/rollouts/{ours}/{action}"}
        answer = post_form(browser, f"/console/rollouts/{ours}/{action}",
                           {"csrf_token": form_token(confirm)})
        assert answer.status_code == 303, answer.text
        assert answer.headers["location"] == f"/console/rollouts/{ours}?done={action}"
        assert state_of(session, ours) == after
        api = browser.post(f"/api/rollouts/{theirs}/{action}", headers=bearer(api_token))
        assert api.status_code == 200, api.text
        entries = [session.exec(select(AuditEntry).where(
            AuditEntry.action == f"rollout.{action}", AuditEntry.entity_id == str(r))).one()
            for r in (ours, theirs)]
        console, through_api = entries
        assert (console.actor_kind, console.actor_id, console.actor, console.entity) == (
            through_api.actor_kind, through_api.actor_id, through_api.actor,
            through_api.entity) == ("user", admin.id, admin.email, "rollout")
        assert console.before == through_api.before and console.after == through_api.after
    done = browser.get(f"/console/rollouts/{ours}?done=cancel", headers=EN)
    assert "The rollout was cancelled" in done.text
    # A message no longer true is not shown: a kept link to "paused" of a cancelled rollout.
    stale = browser.get(f"/console/rollouts/{ours}?done=pause", headers=EN)
    assert stale.status_code == 200 and "The rollout was paused" not in stale.text
    assert 'role="status"' not in stale.text and "Cancelled" in stale.text
    # Nothing from the URL reaches the page but known codes.
    assert "<script>" not in browser.get(
        f"/console/rollouts/{ours}?done=<script>", headers=EN).text.replace(
        '<script src="/console/static/rollout_live.js" defer></script>', "")


def test_a_refused_transition_says_why_in_the_users_language_and_changes_nothing(
        browser, session, app, city):
    home, _ = city
    rollout_id = start(session, make_release(session, app).id, home)
    rollouts.cancel(session, CLI, rollout_id)
    token = as_user(browser, session, Role.admin)
    page = browser.get(f"/console/rollouts/{rollout_id}", headers=EN)
    assert f"/console/rollouts/{rollout_id}/resume" not in page.text  # no button for it
    audits = count(session, AuditEntry)
    for action, words in (("resume", "Only a paused rollout can be resumed"),
                          ("pause", "Only a running rollout can be paused"),
                          ("cancel", "Only a running or paused rollout can be cancelled")):
        answer = browser.post(f"/console/rollouts/{rollout_id}/{action}",
                              data={"csrf_token": token},
                              headers={"Origin": "http://testserver", **EN},
                              follow_redirects=False)
        assert answer.status_code == 409, action
        assert f"{words}, and this one is: Cancelled. Nothing was changed." in answer.text
        # A stale confirmation page too: the rollout as it is, and why not.
        stale = browser.get(f"/console/rollouts/{rollout_id}/{action}", headers=EN)
        assert stale.status_code == 409 and words in stale.text
    vietnamese = post_form(browser, f"/console/rollouts/{rollout_id}/resume",
                           {"csrf_token": token})
    assert vietnamese.status_code == 409
    assert "Chỉ có thể tiếp tục một đợt triển khai đang tạm dừng" in vietnamese.text
    assert "Đã hủy" in vietnamese.text
    assert state_of(session, rollout_id) == RolloutState.cancelled
    assert count(session, AuditEntry) == audits


def test_a_form_without_the_csrf_token_or_from_another_site_is_refused(
        browser, session, app, city):
    home, _ = city
    release = make_release(session, app)
    rollout_id = start(session, release.id, home)
    token = as_user(browser, session, Role.admin)
    made, audits = count(session, Rollout), count(session, AuditEntry)
    assert post_form(browser, f"/console/rollouts/{rollout_id}/cancel", {}).status_code == 403
    assert post_form(browser, f"/console/rollouts/{rollout_id}/pause",
                     {"csrf_token": token}, origin="https://evil.example").status_code == 403
    rollouts.cancel(session, CLI, rollout_id)  # its devices free for a new one
    assert post_form(browser, "/console/rollouts/new", {
        "do": "create", "release_id": str(release.id), "target": "site", "site": home.slug,
        "waves": "100"}).status_code == 403
    assert count(session, Rollout) == made
    assert count(session, AuditEntry) == audits + 1  # the CLI's cancel, and nothing else


def test_the_preview_shows_the_wave_sizes_that_create_then_produces(
        browser, session, box, app):
    site = make_site(session, box, slug="ward9")
    for _ in range(23):
        make_device(session, box, site)
    release = make_release(session, app, version="0.8.0")
    admin, _ = make_user(session, Role.admin)
    log_in(browser, admin.email)
    page = browser.get("/console/rollouts/new", headers=EN)
    assert page.status_code == 200 and "<title>Start a rollout ·" in page.text
    for field in ("release_id", "site", "tag", "devices", "waves", "success_threshold",
                  "failure_threshold", "deadline_h", "allow_downgrade"):
        assert f'<label for="{field}">' in page.text, field
    form = {"csrf_token": form_token(page), "release_id": str(release.id), "target": "site",
            "site": site.slug, "tag": "", "devices": "", "waves": "1, 10, 50, 100",
            "success_threshold": "90", "failure_threshold": "10", "deadline_h": "1.5"}
    preview = post_form(browser, "/console/rollouts/new", {**form, "do": "preview"})
    assert preview.status_code == 200, text(preview)
    sizes = [int(n) for n in re.findall(r'data-preview-size="\d+">(\d+)<', preview.text)]
    assert sizes == [1, 2, 9, 11]  # ends at ceil(1%), ceil(10%), ceil(50%), 100% of 23
    assert count(session, Rollout) == 0  # a preview starts nothing
    assert 'value="1, 10, 50, 100"' in preview.text  # the form comes back as sent
    created = post_form(browser, "/console/rollouts/new", {**form, "do": "create"})
    assert created.status_code == 303, text(created)
    rollout = session.exec(select(Rollout)).one()
    assert created.headers["location"] == f"/console/rollouts/{rollout.id}?done=created"
    detail = rollouts.detail(session, rollout)
    assert [w.size for w in detail.waves] == sizes
    assert (detail.success_threshold, detail.failure_threshold, detail.device_deadline_s) == (
        90, 10, 5400)
    entry = session.exec(select(AuditEntry).where(AuditEntry.action == "rollout.create")).one()
    assert (entry.actor_kind, entry.actor_id, entry.actor) == ("user", admin.id, admin.email)
    live = browser.get(created.headers["location"], headers=EN)
    assert "The rollout was started" in live.text


def test_refusals_are_shown_on_the_form_with_the_fleets_reason(browser, session, box, app):
    site = make_site(session, box, slug="ward9")
    short = make_device(session, box, site)
    make_device(session, box, site)
    record = session.get(Device, short.id)
    record.free_flash_bytes, record.free_flash_at = 12_288, utcnow()
    session.add(record)
    session.commit()
    release = make_release(session, app, version="0.9.0",
                           files={"/lib/node/app.mpy": bytes(10_000), "/lib/wire.mpy": b"w"})
    token = as_user(browser, session, Role.admin)
    base = {"csrf_token": token, "release_id": str(release.id), "target": "site",
            "site": site.slug, "waves": "50,100", "success_threshold": "95",
            "failure_threshold": "5", "deadline_h": "24"}
    for do in ("preview", "create"):
        answer = browser.post("/console/rollouts/new", data={**base, "do": do},
                              headers={"Origin": "http://testserver", **EN},
                              follow_redirects=False)
        assert answer.status_code == 422, do
        shown = text(answer)
        assert "The fleet refused this, and nothing was started:" in shown
        assert f"{short.wire_id} (12,288 bytes free)" in shown and "min_free_bytes" in shown
        assert 'value="50,100"' in answer.text
    for changes, words in (({"waves": "50,10"}, "Waves: "),
                           ({"deadline_h": "soon"}, "not a number of hours"),
                           ({"target": "devices", "devices": "nothex"}, "not a wire id"),
                           ({"target": "tag", "tag": ""}, "Tag: "),
                           ({"success_threshold": "0"}, "Success threshold: ")):
        answer = browser.post("/console/rollouts/new", data={**base, **changes,
                                                             "do": "create"},
                              headers={"Origin": "http://testserver", **EN},
                              follow_redirects=False)
        assert answer.status_code == 422, changes
        assert words in text(answer), (changes, text(answer))
    assert count(session, Rollout) == 0


def test_a_device_in_another_live_rollout_is_refused_with_409(browser, session, app, city):
    home, _ = city
    first = start(session, make_release(session, app, version="1.1.0").id, home)
    other = make_release(session, app, version="1.2.0")
    token = as_user(browser, session, Role.admin)
    answer = browser.post("/console/rollouts/new", data={
        "csrf_token": token, "do": "preview", "release_id": str(other.id), "target": "site",
        "site": home.slug, "waves": "100", "success_threshold": "95",
        "failure_threshold": "5", "deadline_h": "24"},
        headers={"Origin": "http://testserver", **EN}, follow_redirects=False)
    assert answer.status_code == 409
    assert f"3 of the target's devices are in rollout {first} (running) already" in text(answer)
    assert count(session, Rollout) == 1


def test_the_live_view_lists_the_newest_failures_of_every_kind_and_no_other_device(
        session, app, city, monkeypatch):
    """One query for the devices in any failure state, newest first, cut at FAILURES_SHOWN;
    the count beside it is the rollout's total."""
    home, _ = city
    release = make_release(session, app, version="0.5.0")
    rollout_id = start(session, release.id, home, waves=[100], failure_threshold=100)
    wave = rollouts.list_devices(session, rollout_id, state=None, wave=0, limit=10,
                                 offset=0).items
    assert len(wave) == 3
    # Gateways report failed and rolled back; the fleet itself times devices out.
    for device, state in zip(wave, ["failed", "rolled_back", "failed"]):
        fail(session, rollout_id, device.device_id, home, state, f"{state} on purpose")
    view = console_rollouts.live_view(session, rollout_id)
    assert [d.device_id for d in view.failures] == [d.device_id for d in reversed(wave)]
    assert {d.state.value for d in view.failures} == {"failed", "rolled_back"}
    assert view.failures_total == 3
    monkeypatch.setattr(console_rollouts, "FAILURES_SHOWN", 2)
    cut = console_rollouts.live_view(session, rollout_id)
    assert [d.device_id for d in cut.failures] == [wave[2].device_id, wave[1].device_id]
    assert cut.failures_total == 3
