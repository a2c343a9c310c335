"""The console in a real browser (Debian's headless Chromium) against a running fleet service:
logging in and out in both languages, the device list, a device's chart and settings, what each
role sees; every page visited is checked by Pages.check (title, labels, axe-core) and photographed."""

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select


from .conftest import Pages, leave_page


def _heading(pages: Pages) -> str:
    return pages.driver.find_element(By.TAG_NAME, "h1").text


def _listed(pages: Pages) -> list[str]:
    """The wire ids of the device list's rows, in order."""
    return [cell.text for cell in pages.driver.find_elements(
        By.CSS_SELECTOR, "table.devices tbody th[scope=row] code")]


def _submit(pages: Pages, selector: str) -> None:
    """Click a form's button and wait for the page it leads to."""
    button = pages.driver.find_element(By.CSS_SELECTOR, selector)
    leave_page(pages.driver, button.click, f"the page after {selector}")


def test_logging_in_in_vietnamese_then_switching_to_english_and_logging_out(pages, world):
    pages.log_in(world.speaker, lang="vi")
    assert pages.driver.current_url == world.url + "/console/"
    assert _heading(pages) == "Tổng quan"
    assert pages.driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "vi"
    pages.check("overview-vi")
    Select(pages.driver.find_element(By.ID, "locale")).select_by_value("en")
    _submit(pages, "form[action='/console/locale'] button")
    assert _heading(pages) == "Overview"
    assert pages.driver.title.startswith("Overview ·")
    pages.check("overview-en")
    _submit(pages, "form[action='/console/logout'] button")
    assert pages.driver.current_url.split("?")[0] == world.url + "/console/login"
    pages.check("logged-out")
    # The session is gone, not only the page: the overview sends the browser back to log in.
    pages.driver.get(world.url + "/console/")
    assert pages.driver.current_url.split("?")[0] == world.url + "/console/login"


def test_logging_in_in_english_shows_the_overview_of_both_sites(pages, world):
    pages.log_in(world.admin, lang="en")
    assert _heading(pages) == "Overview"  # the admin's own choice, kept on the user
    pages.check("overview")
    text = pages.driver.find_element(By.TAG_NAME, "main").text
    assert world.home.name in text and world.away.name in text


def test_the_devices_list_filters_by_site_and_state_and_leads_to_a_device_chart(pages, world):
    pages.log_in(world.admin, lang="en")
    pages.open("/console/devices", "devices")
    everything = _listed(pages)
    assert len(everything) == 6  # make_city: five at Ward 7, one at Ba Dinh
    Select(pages.driver.find_element(By.ID, "site")).select_by_value(world.away.slug)
    _submit(pages, "form.filters button[type=submit]")
    pages.check("devices-away")
    assert len(_listed(pages)) == 1
    Select(pages.driver.find_element(By.ID, "site")).select_by_value(world.home.slug)
    Select(pages.driver.find_element(By.ID, "state")).select_by_value("offline")
    _submit(pages, "form.filters button[type=submit]")
    pages.check("devices-home-offline")
    offline = _listed(pages)
    assert len(offline) == 1 and set(offline) < set(everything)
    # The filters are in the URL, so the list can be shared as a link.
    assert f"site={world.home.slug}" in pages.driver.current_url
    assert "state=offline" in pages.driver.current_url

    # A filter that cannot be used: the page again, with what is wrong announced.
    pages.open("/console/devices?state=asleep", "devices-bad-filter")
    alert = pages.driver.find_element(By.CSS_SELECTOR, "[role=alert]")
    assert "Unknown state" in alert.text and _listed(pages) == []

    pages.open(f"/console/devices?site={world.home.slug}", "devices-home")
    link = pages.driver.find_element(By.LINK_TEXT, world.charted_wire_id)
    leave_page(pages.driver, link.click, "the device page")
    assert pages.driver.current_url == f"{world.url}/console/devices/{world.charted_id}"
    pages.check("device")
    charts = pages.driver.find_elements(By.CSS_SELECTOR, "figure svg[role=img]")
    assert len(charts) == 2  # level and temperature
    for chart in charts:
        lines = chart.find_elements(By.TAG_NAME, "polyline")
        assert len(lines) == 1
        points = lines[0].get_attribute("points").split()
        assert len(points) >= 3, points
        # Drawn, not only in the markup: the browser laid the line out with a size.
        assert lines[0].rect["width"] > 0


def test_an_admin_opens_a_site_from_the_sites_list_and_reveals_its_secrets(pages, world):
    pages.log_in(world.admin, lang="en")
    link = pages.driver.find_element(By.CSS_SELECTOR, "nav a[href='/console/sites']")
    leave_page(pages.driver, link.click, "the sites list")
    pages.check("sites")
    leave_page(pages.driver, pages.driver.find_element(By.LINK_TEXT, world.home.name).click,
               "the site's page")
    pages.check("site")
    assert _heading(pages) == f"Site {world.home.name}"
    assert not pages.driver.find_elements(By.CSS_SELECTOR, ".secrets")
    _submit(pages, "form[action$='/reveal'] button")
    pages.check("site-revealed")
    revealed = pages.driver.find_element(By.CSS_SELECTOR, ".secrets").text
    assert "Claim key" in revealed and "WiFi password" in revealed


def test_a_viewer_sees_no_staff_controls(pages, world):
    pages.log_in(world.viewer, lang="en")
    for path, name in (("/console/", "overview"), ("/console/devices", "devices"),
                       (f"/console/devices/{world.charted_id}", "device"),
                       ("/console/sites", "sites")):
        pages.open(path, name)
        actions = {form.get_attribute("action").removeprefix(world.url) for form in
                   pages.driver.find_elements(By.CSS_SELECTOR, "form[method=post]")}
        # Only the header's own forms: nothing that changes a device, a site or a user.
        assert actions == {"/console/locale", "/console/logout"}, (name, actions)


def test_an_admin_edits_a_setting_and_sees_it_stored_for_the_nodes_next_connection(
        pages, world):
    pages.log_in(world.admin, lang="en")
    path = f"/console/devices/{world.away_device_id}"
    pages.open(path, "device-config")
    field = pages.driver.find_element(By.ID, "setting-interval_ms")
    # The node's range is the field's: the browser itself holds back a period of 0 ms.
    field.send_keys("0")
    assert not pages.driver.execute_script("return arguments[0].checkValidity()", field)
    field.clear()
    field.send_keys("30000")
    _submit(pages, "form.config-form button[type=submit]")
    assert pages.driver.current_url == f"{world.url}{path}?done=config#config"
    pages.check("device-config-saved")
    section = pages.driver.find_element(By.CSS_SELECTOR, "section[aria-labelledby=config]")
    assert "The settings were saved" in section.find_element(By.CSS_SELECTOR,
                                                             "[role=status]").text
    assert "30,000 ms" in section.find_element(By.TAG_NAME, "table").text
    # Emptied and saved again: nothing stored, the seeded world as the other tests expect it.
    pages.driver.find_element(By.ID, "setting-interval_ms").clear()
    _submit(pages, "form.config-form button[type=submit]")
    assert "No settings" in pages.driver.find_element(
        By.CSS_SELECTOR, "section[aria-labelledby=config]").text


def test_a_technician_of_one_site_sees_nothing_of_the_other(pages, world):
    pages.log_in(world.technician, lang="en")
    away = world.away.name
    pages.check("overview")
    assert world.home.name in pages.driver.find_element(By.TAG_NAME, "main").text
    assert away not in pages.driver.page_source
    pages.open("/console/devices", "devices")
    assert len(_listed(pages)) == 5  # Ward 7's own
    sites = [option.get_attribute("value") for option in
             Select(pages.driver.find_element(By.ID, "site")).options]
    assert sites == ["", world.home.slug]
    assert away not in pages.driver.page_source
    pages.open(f"/console/devices?site={world.away.slug}", "devices-other-site")
    assert _listed(pages) == []
    # Its device's own address gets the page any unknown address gets.
    pages.open(f"/console/devices/{world.away_device_id}", "device-other-site")
    assert _heading(pages) == "Không tìm thấy"  # "Not found": the technician's browser's language
    assert world.away_device_id not in pages.driver.find_element(By.TAG_NAME, "main").text


def test_a_wrong_password_gets_the_form_again_with_the_reason_announced(pages, world):
    pages.log_in(world.viewer, lang="en", password="not the password")
    assert pages.driver.current_url.split("?")[0] == world.url + "/console/login"
    alert = pages.driver.find_element(By.CSS_SELECTOR, "[role=alert]")
    assert alert.text == "Wrong e-mail or password."
    pages.check("login-wrong-password")
    # The e-mail is kept, so only the password needs typing again.
    assert pages.driver.find_element(By.ID, "username").get_attribute("value") == world.viewer


def test_the_page_check_fails_on_an_unlabelled_field_and_on_faint_text(pages, world):
    """The check every test leans on can fail: the overview, broken in the browser, is refused
    with the rule, its impact and the element named."""
    pages.log_in(world.admin, lang="en")
    # Through the DOM and CSSOM: the console's Content-Security-Policy blocks inline styles.
    pages.driver.execute_script("""
        const faint = document.createElement('p');
        faint.textContent = 'faint';
        faint.id = 'faint';
        faint.style.color = '#eeeeee';
        document.querySelector('main').prepend(faint);
    """)
    with pytest.raises(AssertionError) as failed:
        pages.check("broken-contrast")
    assert "color-contrast (serious)" in str(failed.value) and "#faint" in str(failed.value)
    pages.driver.execute_script("""
        const field = document.createElement('input');
        field.id = 'nameless';
        document.querySelector('main').prepend(field);
    """)
    with pytest.raises(AssertionError) as failed:
        pages.check("broken-label")
    assert "fields without a label" in str(failed.value) and 'id="nameless"' in str(failed.value)
