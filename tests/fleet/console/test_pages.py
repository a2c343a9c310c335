"""What every console page says about itself: the API's hygiene headers, a policy that lets it
load only the console's own files, and every asset served by the fleet itself."""

import re

from kinhbac.fleet.console import i18n
from kinhbac.fleet.models import Role

from ..utils import make_user
from .conftest import log_in


def test_pages_forbid_caching_framing_and_anything_from_elsewhere(browser, session):
    user, _ = make_user(session, Role.viewer)
    login_page = browser.get("/console/login")
    log_in(browser, user.email)
    for page in (login_page, browser.get("/console/")):
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["x-content-type-options"] == "nosniff"
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "style-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy and "form-action 'self'" in policy
        assert page.headers["referrer-policy"] == "same-origin"


def test_every_asset_a_template_names_is_the_consoles_own_and_is_served(browser):
    for template in i18n.TEMPLATE_DIR.glob("*.html"):
        text = template.read_text()
        assert "//" not in re.sub(r"<!--.*?-->", "", text, flags=re.S), template.name
    css = browser.get("/console/static/console.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_every_form_field_has_a_label(browser, session):
    user, _ = make_user(session, Role.admin)
    pages = [browser.get("/console/login").text]
    log_in(browser, user.email)
    pages.append(browser.get("/console/").text)
    pages.append(browser.get("/console/rollouts/new").text)
    for page in pages:
        labelled = set(re.findall(r'<label for="([^"]+)"', page))
        for field in re.findall(r"<(?:input|select|textarea)\b[^>]*>", page):
            if 'type="hidden"' in field:
                continue
            found = re.search(r'id="([^"]+)"', field)
            assert found and found.group(1) in labelled, field


def test_a_nul_in_a_console_address_gets_a_page_in_the_browsers_language_not_json(browser,
                                                                                session):
    """The app refuses a NUL in any query before a route runs (every database alike); on the
    console that refusal is a page a person can read, with the API's JSON kept for the API."""
    user, _ = make_user(session, Role.viewer)
    log_in(browser, user.email)
    for path in ("/console/devices?q=ab%00cd", "/console/audit?actor%00=x", "/console?x=%00"):
        page = browser.get(path, headers={"Accept-Language": "vi"}, follow_redirects=False)
        assert page.status_code == 422, path
        assert page.headers["content-type"].startswith("text/html"), path
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        assert "ký tự NUL (mã 0)" in page.text and "<title>" in page.text
    english = browser.get("/console/devices?q=%00", headers={"Accept-Language": "en"})
    assert "The address holds a NUL character (code 0)" in english.text
    api = browser.get("/api/devices?mac=%00")
    assert api.status_code == 422 and api.headers["content-type"] == "application/json"
    # A path that only starts like the console's is the API's app, answered as JSON.
    assert browser.get("/consoles?x=%00").headers["content-type"] == "application/json"
