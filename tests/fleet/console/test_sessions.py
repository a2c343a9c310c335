"""Logging in and out of the console: the API's password check and limits, a session that is a
login token in an HttpOnly cookie, and a logout that ends it for good."""

from http.cookies import SimpleCookie

from fastapi.testclient import TestClient
from sqlmodel import select

from kinhbac.fleet import accounts
from kinhbac.fleet.audit import CLI
from kinhbac.fleet.console import csrf, sessions
from kinhbac.fleet.models import ApiToken, AuditEntry, ConsoleSession, Role, UserUpdate

from ..utils import make_user
from .conftest import ORIGIN, form_token, log_in, post_form


def _session_cookie(response) -> SimpleCookie:
    jar = SimpleCookie()
    for header in response.headers.get_list("set-cookie"):
        jar.load(header)
    return jar


def test_login_sets_an_httponly_samesite_cookie_with_a_lifetime_and_opens_the_overview(
        browser, session):
    user, _ = make_user(session, Role.viewer)
    answer = log_in(browser, user.email)
    assert answer.status_code == 303 and answer.headers["location"] == "/console/"
    cookie = _session_cookie(answer)[sessions.COOKIE]
    assert cookie["httponly"] is True
    assert cookie["samesite"].lower() == "lax"
    assert cookie["path"] == "/console"
    assert cookie["expires"]  # ends with its login token, KINHBAC_LOGIN_TOKEN_HOURS
    assert not cookie["secure"]  # plain HTTP and no setting: a Secure cookie would be dropped
    page = browser.get("/console/")
    assert page.status_code == 200
    assert user.email in page.text


def test_the_cookie_is_secure_over_https(app, session):
    user, _ = make_user(session, Role.viewer)
    with TestClient(app, base_url="https://testserver") as https:
        page = https.get("/console/login")
        answer = https.post("/console/login", data={
            "username": user.email, "password": "correct horse battery",
            "csrf_token": form_token(page)}, headers={"Origin": "https://testserver"},
            follow_redirects=False)
    assert answer.status_code == 303
    assert _session_cookie(answer)[sessions.COOKIE]["secure"] is True


def test_the_cookie_is_secure_over_http_when_the_setting_says_so(browser, session, app,
                                                                  monkeypatch):
    """Behind a TLS proxy that does not say X-Forwarded-Proto, the setting marks them."""
    monkeypatch.setattr(app.state.settings, "console_secure_cookie", True)
    user, _ = make_user(session, Role.viewer)
    page = browser.get("/console/login")
    assert _session_cookie(page)[csrf.LOGIN_COOKIE]["secure"] is True
    token = form_token(page)
    # The client keeps Secure cookies from plain HTTP, as a browser would: sent by hand here.
    answer = browser.post("/console/login", data={
        "username": user.email, "password": "correct horse battery", "csrf_token": token},
        headers={"Origin": ORIGIN, "Cookie": f"{csrf.LOGIN_COOKIE}={token}"},
        follow_redirects=False)
    assert answer.status_code == 303
    assert _session_cookie(answer)[sessions.COOKIE]["secure"] is True


def test_logout_deletes_the_session_and_its_cookie_no_longer_opens_a_page(browser, session):
    user, _ = make_user(session, Role.technician)
    log_in(browser, user.email)
    cookie = browser.cookies.get(sessions.COOKIE, path="/console")
    page = browser.get("/console/")
    answer = post_form(browser, "/console/logout", {"csrf_token": form_token(page)})
    assert answer.status_code == 303 and answer.headers["location"] == "/console/login"
    assert _session_cookie(answer)[sessions.COOKIE].value == ""
    session.expire_all()
    assert session.exec(select(ConsoleSession)).all() == []
    assert session.exec(select(ApiToken).where(ApiToken.kind == "login")).all() == []
    assert session.exec(select(AuditEntry).where(
        AuditEntry.action == "api_token.logout")).first() is not None
    # The old cookie, sent again (a copy kept by an attacker), is no session.
    browser.cookies.clear()
    browser.cookies.set(sessions.COOKIE, cookie, path="/console")
    again = browser.get("/console/", follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"] == "/console/login"


def test_a_wrong_password_gets_the_same_message_as_an_unknown_user(browser, session):
    user, _ = make_user(session, Role.admin)
    wrong = log_in(browser, user.email, "not the password")
    unknown = log_in(browser, "nobody@example.org", "not the password")
    assert wrong.status_code == unknown.status_code == 401
    assert sessions.COOKIE not in browser.cookies
    message = "Sai email hoặc mật khẩu."  # Vietnamese: no Accept-Language
    assert message in wrong.text and message in unknown.text
    assert wrong.text.replace(user.email, "") == unknown.text.replace("nobody@example.org", "")
    failures = session.exec(select(AuditEntry).where(
        AuditEntry.action == "user.login_failed")).all()
    assert len(failures) == 2  # audited as the API's failed logins are


def test_a_deactivated_user_cannot_log_in_and_its_open_session_ends(browser, session):
    user, _ = make_user(session, Role.technician)
    log_in(browser, user.email)
    user.is_active = False
    session.add(user)
    session.commit()
    assert browser.get("/console/", follow_redirects=False).status_code == 303
    browser.cookies.clear()
    assert log_in(browser, user.email).status_code == 401


def test_login_failures_count_against_the_apis_limits(browser, session, app):
    user, _ = make_user(session, Role.viewer)
    for _ in range(app.state.settings.login_failures_per_account):
        assert log_in(browser, user.email, "guess").status_code == 401
    # The right password now too is refused, by the console and by the API alike.
    limited = log_in(browser, user.email)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    api = browser.post("/api/auth/login", data={"username": user.email,
                                                "password": "correct horse battery"})
    assert api.status_code == 429


def test_an_api_token_in_the_cookie_is_not_a_console_session(browser, session):
    _, token = make_user(session, Role.admin)
    browser.cookies.set(sessions.COOKIE, token, path="/console")
    answer = browser.get("/console/", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/console/login"


def test_without_a_session_the_overview_sends_to_the_login_page(browser):
    answer = browser.get("/console/", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/console/login"
    # The login page itself is open to anyone.
    assert browser.get("/console/login").status_code == 200


def test_a_new_password_ends_the_console_session(browser, session):
    """A stolen cookie dies with the old password, as the API's tokens do."""
    user, _ = make_user(session, Role.viewer)
    log_in(browser, user.email)
    assert browser.get("/console/", follow_redirects=False).status_code == 200
    accounts.update_user(session, CLI, user.id, UserUpdate(password="another long password"))
    assert browser.get("/console/", follow_redirects=False).status_code == 303
    assert session.exec(select(ConsoleSession)).all() == []


def test_a_login_form_with_a_field_left_out_is_a_failed_login_page(browser):
    token = form_token(browser.get("/console/login"))
    answer = post_form(browser, "/console/login", {"csrf_token": token})
    assert answer.status_code == 401 and "Sai email hoặc mật khẩu." in answer.text
