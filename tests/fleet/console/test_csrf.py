"""Forged forms: a post without the session's token, with another session's, from another
origin or from nowhere, and a forged login. Each is a 403 page, and nothing changes."""

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from kinhbac.fleet.models import ApiToken, Role, User

from ..utils import make_user
from .conftest import ORIGIN, form_token, log_in, post_form

REFUSED_VI = "nên đã bị từ chối để bảo vệ tài khoản của bạn"


def _locale_of(session, user: User) -> str | None:
    session.expire_all()
    return session.get(User, user.id).locale


@pytest.fixture
def logged_in(browser, session):
    user, _ = make_user(session, Role.technician)
    log_in(browser, user.email)
    return user, form_token(browser.get("/console/"))


def test_a_form_without_the_token_is_refused_with_a_page_and_changes_nothing(
        browser, session, logged_in):
    user, _ = logged_in
    answer = post_form(browser, "/console/locale", {"locale": "en"})
    assert answer.status_code == 403
    assert answer.headers["content-type"].startswith("text/html")
    assert REFUSED_VI in answer.text
    assert _locale_of(session, user) is None
    # With the token, the same form is taken.
    token = form_token(browser.get("/console/"))
    assert post_form(browser, "/console/locale", {"locale": "en", "csrf_token": token}
                     ).status_code == 303
    assert _locale_of(session, user) == "en"


def test_another_sessions_token_is_refused(app, browser, session, logged_in):
    user, _ = logged_in
    other, _ = make_user(session, Role.admin)
    with TestClient(app) as attacker:
        log_in(attacker, other.email)
        theirs = form_token(attacker.get("/console/"))
    answer = post_form(browser, "/console/locale", {"locale": "en", "csrf_token": theirs})
    assert answer.status_code == 403
    assert _locale_of(session, user) is None


@pytest.mark.parametrize("origin", ["https://evil.example", "http://testserver.evil.example",
                                    "null"])
def test_a_post_from_another_origin_is_refused_even_with_the_token(browser, session, logged_in,
                                                                   origin):
    user, token = logged_in
    answer = post_form(browser, "/console/locale", {"locale": "en", "csrf_token": token},
                       origin=origin)
    assert answer.status_code == 403
    assert "không được gửi từ một trang của bảng điều khiển" in answer.text
    assert _locale_of(session, user) is None


def test_a_post_that_says_no_origin_is_judged_by_its_referer(browser, session, logged_in):
    user, token = logged_in
    data = {"locale": "en", "csrf_token": token}
    assert browser.post("/console/locale", data=data, follow_redirects=False).status_code == 403
    assert browser.post("/console/locale", data=data, follow_redirects=False, headers={
        "Referer": "https://evil.example/console/"}).status_code == 403
    assert _locale_of(session, user) is None
    assert browser.post("/console/locale", data=data, follow_redirects=False, headers={
        "Referer": ORIGIN + "/console/"}).status_code == 303
    assert _locale_of(session, user) == "en"


def test_a_forged_logout_does_not_end_the_session(browser, session, logged_in):
    answer = post_form(browser, "/console/logout", {}, origin="https://evil.example")
    assert answer.status_code == 403
    assert browser.get("/console/", follow_redirects=False).status_code == 200
    assert session.exec(select(ApiToken).where(ApiToken.kind == "login")).first() is not None


def test_a_login_form_without_its_token_or_from_elsewhere_is_refused(browser, session):
    """Login CSRF: a page elsewhere must not log the operator's browser into its account."""
    user, _ = make_user(session, Role.viewer)
    browser.get("/console/login")
    data = {"username": user.email, "password": "correct horse battery"}
    assert post_form(browser, "/console/login", data).status_code == 403
    token = form_token(browser.get("/console/login"))
    assert post_form(browser, "/console/login", data | {"csrf_token": token},
                     origin="https://evil.example").status_code == 403
    assert session.exec(select(ApiToken).where(ApiToken.kind == "login")).first() is None
