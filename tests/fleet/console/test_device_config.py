"""Editing a device's CONFIG from its page: staff only, at their sites only, through the API's
own model and set_node_config (same refusals, same audit entry), tried from the attacker's side
too: a viewer's forged form, another site's device, no CSRF token."""

import json
import re
import uuid

import pytest
from sqlmodel import Session, func, select

from kinhbac.firmware import FIRMWARE_DIR
from kinhbac.fleet.console import device_config
from kinhbac.fleet.models import NODE_SETTINGS, AuditEntry, Device, Role, Site

from ..utils import KIT, bearer, make_device, make_site, make_user
from .conftest import form_token, log_in, post_form

EN = {"Accept-Language": "en"}
FORM_ACTION = re.compile(r'<form method="post" action="/console/devices/([0-9a-f-]{36})/config')


@pytest.fixture
def sites(session, box) -> tuple[Site, Site]:
    return (make_site(session, box, slug="ward7", name="Ward 7 water tower"),
            make_site(session, box, slug="badinh", name="Ba Dinh pumping station"))


def as_user(browser, session: Session, role: Role, sites: list[Site] | None = None) -> str:
    """Log in as a new user of `role`; the CSRF token of its forms."""
    user, _ = make_user(session, role, sites=sites or [])
    log_in(browser, user.email)
    return form_token(browser.get("/console/"))


def stored(session: Session, device_id: uuid.UUID) -> Device:
    session.expire_all()
    return session.get(Device, device_id)


def audit_count(session: Session) -> int:
    return session.exec(select(func.count()).select_from(AuditEntry)).one()


def config_form(**fields: str) -> dict[str, str]:
    """Every field of the form, empty unless given, as a browser sends it."""
    return dict.fromkeys(device_config.FIELDS, "") | fields


def edit(browser, device_id, token: str | None, **fields: str):
    data = config_form(**fields)
    if token is not None:
        data["csrf_token"] = token
    return post_form(browser, f"/console/devices/{device_id}/config", data)


def set_by_api(client, token: str, device_id, settings: dict):
    return client.put(f"/api/devices/{device_id}/config", json={"settings": settings},
                      headers=bearer(token))


def test_the_form_offers_exactly_the_settings_a_node_takes_remotely():
    # The fleet's list (what the API accepts) and the node's (what a CONFIG may change).
    node_source = (FIRMWARE_DIR / "node" / "config.py").read_text()
    remote = re.search(r"REMOTE = \(([^)]*)\)", node_source)
    assert remote
    assert set(device_config.FIELDS) == set(NODE_SETTINGS) == set(
        re.findall(r'"(\w+)"', remote.group(1)))
    interval = next(s for s in device_config.NUMBER_SETTINGS if s.name == "interval_ms")
    assert (interval.unit, interval.default, interval.low, interval.high) == (
        "ms", 60000, 1, 86400000)  # the node's DEFAULTS and range, as docs/firmware.md says


def test_staff_see_each_setting_labelled_with_its_unit_default_and_range(
        browser, session, box, sites):
    home, _ = sites
    device = make_device(session, box, home)
    assert set_by_api(browser, make_user(session, Role.admin)[1], device.id,
                      {"interval_ms": 5000, "sensors": KIT}).status_code == 200
    as_user(browser, session, Role.technician, [home])
    page = browser.get(f"/console/devices/{device.id}", headers=EN)
    assert page.status_code == 200
    assert FORM_ACTION.findall(page.text) == [str(device.id)]
    for name in device_config.FIELDS:
        assert f'<label for="setting-{name}">' in page.text
        assert f'id="setting-{name}" name="{name}"' in page.text
    assert ('<label for="setting-interval_ms">Sampling period (<code>interval_ms</code>)'
            '</label>') in page.text
    assert "The node's default: 60,000; it accepts 1 to 86,400,000." in page.text
    assert 'min="1" max="86400000"' in page.text
    # The stored settings fill the form: the number, and the table as indented JSON.
    assert 'name="interval_ms" type="number"' in page.text and 'value="5000"' in page.text
    assert "&#34;name&#34;: &#34;temperature&#34;" in page.text
    # ... and the table of what is stored reads with its unit.
    assert "<td>5,000 ms</td>" in page.text
    vietnamese = browser.get(f"/console/devices/{device.id}").text
    assert "Sửa thiết lập" in vietnamese and "Chu kỳ đo" in vietnamese
    assert "Mặc định của thiết bị: 60.000; thiết bị chấp nhận từ 1 đến 86.400.000." in vietnamese


def test_an_admins_edit_is_the_apis_change_with_the_same_audit_entry(
        browser, session, box, sites):
    home, _ = sites
    by_console, by_api = make_device(session, box, home), make_device(session, box, home)
    admin, api_token = make_user(session, Role.admin)
    log_in(browser, admin.email)
    token = form_token(browser.get(f"/console/devices/{by_console.id}"))
    kit = json.dumps(KIT, indent=2)
    answer = edit(browser, by_console.id, token, interval_ms="5000", log_level=" 3 ",
                  sensors=kit)
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/console/devices/{by_console.id}?done=config#config"
    expected = {"interval_ms": 5000, "log_level": 3, "sensors": KIT}
    assert stored(session, by_console.id).node_config == expected
    # The page says so, and shows what its gateway will send on the node's next connection.
    back = browser.get(answer.headers["location"], headers=EN)
    assert ("The settings were saved. The node's gateway sends them on the node's next "
            "connection.") in back.text
    assert "Settings stored for the node: its gateway sends them" in back.text
    assert "<td>5,000 ms</td>" in back.text and "<td>3</td>" in back.text
    # Only the console's own codes make a message: nothing from the address reaches the page.
    forged = browser.get(f"/console/devices/{by_console.id}?done=saved", headers=EN)
    assert forged.status_code == 200 and 'class="done"' not in forged.text
    # The API reads what the console stored, and its own change writes the same entry.
    assert browser.get(f"/api/devices/{by_console.id}", headers=bearer(api_token)).json()[
        "node_config"] == expected
    assert set_by_api(browser, api_token, by_api.id, expected).status_code == 200
    ours, theirs = (session.exec(select(AuditEntry).where(
        AuditEntry.action == "device.config", AuditEntry.entity_id == str(d.id))).one()
        for d in (by_console, by_api))
    assert (ours.actor_kind, ours.actor_id, ours.actor, ours.entity) == (
        theirs.actor_kind, theirs.actor_id, theirs.actor, theirs.entity) == (
        "user", admin.id, admin.email, "device")
    assert set(ours.before) == set(theirs.before) and set(ours.after) == set(theirs.after)
    assert ours.before["node_config"] is None and theirs.before["node_config"] is None
    assert ours.after["node_config"] == theirs.after["node_config"] == expected


def test_an_empty_field_unsets_its_setting_and_an_empty_form_clears_them_all(
        browser, session, box, sites):
    home, _ = sites
    device = make_device(session, box, home)
    token = as_user(browser, session, Role.technician, [home])
    assert edit(browser, device.id, token, interval_ms="5000", log_level="3").status_code == 303
    assert edit(browser, device.id, token, interval_ms="5000").status_code == 303
    assert stored(session, device.id).node_config == {"interval_ms": 5000}
    # As `{"settings": {}}` through the API: nothing stored, nothing more to deliver.
    assert edit(browser, device.id, token).status_code == 303
    assert stored(session, device.id).node_config is None
    page = browser.get(f"/console/devices/{device.id}", headers=EN)
    assert "No settings: the node runs with its own defaults." in page.text


def big_kit(count: int) -> list[dict]:
    """`count` ADC sensors with long names: 13 of them and eight large numbers pass one by one
    but not together in a CONFIG frame; 15 alone do not fit."""
    return [{"name": f"sensor-{i:02}-" + "x" * 18, "unit": "u" * 16, "kind": "adc",
             "pin": 32 + i % 8} for i in range(count)]


LARGE_NUMBERS = {name: "86400000" for name in device_config.FIELDS if name != "sensors"}


@pytest.mark.parametrize(("fields", "accepted"), [
    ({"batch_max": "500"}, True),  # beyond what the node takes: the API stores it too
    ({"interval_ms": "+7"}, True),
    ({"batch_max": "-1"}, False),
    ({"interval_ms": "1.5"}, False),
    ({"interval_ms": "sixty"}, False),
    ({"sensors": "[]"}, True),  # no sensors at all: a setting, not an unset one
    ({"sensors": '[{"name": "t", "kind": "adc"}]'}, False),
    ({"sensors": '{"name": "t"}'}, False),
    ({"sensors": json.dumps(big_kit(15))}, False),
    ({"sensors": json.dumps(big_kit(13))} | LARGE_NUMBERS, False),
], ids=["over-node-range", "plus-sign", "negative", "decimal", "words", "empty-table", "no-pin",
        "not-a-list", "table-too-big", "together-too-big"])
def test_the_console_refuses_exactly_what_the_api_refuses(browser, session, box, sites, fields,
                                                          accepted):
    home, _ = sites
    by_console, by_api = make_device(session, box, home), make_device(session, box, home)
    admin, api_token = make_user(session, Role.admin)
    log_in(browser, admin.email)
    token = form_token(browser.get("/console/"))
    answer = edit(browser, by_console.id, token, **fields)
    settings = {name: json.loads(text) if name == "sensors" else (
        int(text) if re.fullmatch(r"[+-]?\d+", text) else text) for name, text in fields.items()}
    api = set_by_api(browser, api_token, by_api.id, settings)
    assert (answer.status_code, api.status_code) == ((303, 200) if accepted else (422, 422))
    assert stored(session, by_console.id).node_config == stored(session, by_api.id).node_config
    assert (stored(session, by_console.id).node_config is not None) == accepted


def test_refused_values_come_back_with_the_input_kept_and_each_field_named(
        browser, session, box, sites):
    home, _ = sites
    device = make_device(session, box, home)
    token = as_user(browser, session, Role.admin)
    entries = audit_count(session)
    answer = edit(browser, device.id, token, interval_ms="5000", batch_max="-1",
                  log_level="loud", sensors='[{"name": "t", "kind": "adc"}')
    assert answer.status_code == 422
    assert stored(session, device.id).node_config is None and audit_count(session) == entries
    # In Vietnamese (the user's language, as nothing else was chosen), each field named.
    page = answer.text
    assert "Các thiết lập chưa được lưu:" in page
    assert ("Số đo tối đa mỗi khung (<code>batch_max</code>): phải là số nguyên từ 0 trở lên."
            in page)
    assert "Mức ghi nhật ký (<code>log_level</code>): phải là số nguyên từ 0 trở lên." in page
    assert ("Bảng cảm biến (JSON) (<code>sensors</code>): không phải JSON hợp lệ (dòng 1, "
            "cột 30).") in page
    assert 'id="setting-batch_max" name="batch_max"' in page
    assert re.search(r'name="batch_max"[^>]*value="-1"[^>]*aria-invalid="true"', page)
    assert re.search(r'name="interval_ms"[^>]*value="5000"', page)  # kept, though not in error
    assert "[{&#34;name&#34;: &#34;t&#34;, &#34;kind&#34;: &#34;adc&#34;}</textarea>" in page
    # The model's own reason, where the refusal is its own: the sensor table's rules.
    answer = post_form(browser, f"/console/devices/{device.id}/config",
                       config_form(sensors='[{"name": "t", "kind": "adc"}]') | {
                           "csrf_token": token})
    assert answer.status_code == 422
    assert ("hệ thống từ chối bảng cảm biến: sensor 0 (t): an adc entry needs a pin"
            in answer.text)
    assert stored(session, device.id).node_config is None and audit_count(session) == entries
    # A paste gone wrong: the console's own limit (no node takes a number that long).
    answer = edit(browser, device.id, token, interval_ms="1" * 21)
    assert answer.status_code == 422
    assert "Chu kỳ đo (<code>interval_ms</code>): dài hơn 20 ký tự." in answer.text
    # What only the settings together break (a CONFIG frame's size): said of them all.
    answer = post_form(browser, f"/console/devices/{device.id}/config",
                       config_form(sensors=json.dumps(big_kit(13))) | LARGE_NUMBERS | {
                           "csrf_token": token})
    assert answer.status_code == 422
    assert "hệ thống từ chối các thiết lập khi gộp lại: the settings take 1352 bytes as JSON; " \
        "a CONFIG frame carries 1300 at most" in answer.text
    assert stored(session, device.id).node_config is None and audit_count(session) == entries


def test_a_viewer_sees_no_form_and_a_forged_one_is_refused_and_changes_nothing(
        browser, session, box, sites):
    home, _ = sites
    device = make_device(session, box, home)
    token = as_user(browser, session, Role.viewer, [home])
    page = browser.get(f"/console/devices/{device.id}", headers=EN)
    assert page.status_code == 200 and "Configuration (CONFIG)" in page.text
    assert not FORM_ACTION.findall(page.text) and "Edit settings" not in page.text
    entries = audit_count(session)
    answer = edit(browser, device.id, token, interval_ms="5000")
    assert answer.status_code == 403
    assert "Vai trò của bạn không được phép" in answer.text
    assert stored(session, device.id).node_config is None and audit_count(session) == entries


def test_another_sites_device_is_not_found_as_a_missing_one_and_changes_nothing(
        browser, session, box, sites):
    home, away = sites
    theirs = make_device(session, box, away)
    token = as_user(browser, session, Role.technician, [home])
    entries = audit_count(session)
    answers = [edit(browser, wanted, token, interval_ms="5000")
               for wanted in (theirs.id, uuid.uuid4(), "not-an-id")]
    assert [a.status_code for a in answers] == [404, 404, 404]
    assert answers[0].text == answers[1].text == answers[2].text
    assert stored(session, theirs.id).node_config is None and audit_count(session) == entries
    # Their page has no form for the technician to find either.
    assert browser.get(f"/console/devices/{theirs.id}").status_code == 404


def test_a_form_without_the_csrf_token_or_with_a_wrong_one_is_refused(
        browser, session, box, sites):
    home, _ = sites
    device = make_device(session, box, home)
    token = as_user(browser, session, Role.admin)
    entries = audit_count(session)
    for given in (None, "", token[:-2] + "xx"):
        answer = edit(browser, device.id, given, interval_ms="5000")
        assert answer.status_code == 403
    # And from another site's page (a cross-site form): refused by its origin.
    answer = browser.post(f"/console/devices/{device.id}/config",
                          data=config_form(interval_ms="5000") | {"csrf_token": token},
                          headers={"Origin": "https://evil.example"}, follow_redirects=False)
    assert answer.status_code == 403
    assert stored(session, device.id).node_config is None and audit_count(session) == entries
    assert edit(browser, device.id, token, interval_ms="5000").status_code == 303
