"""Pages and actions are gated by role as the API's routes are: the next pages declare theirs
with pages.require(...), and a role they do not allow gets a 403 page, never the page."""

from collections.abc import Iterator

import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient

from kinhbac.fleet.app import create_app
from kinhbac.fleet.console import pages
from kinhbac.fleet.models import Role

from ..utils import make_user
from .conftest import form_token, log_in, post_form


@pytest.fixture
def console_with_an_admin_page(app: FastAPI, session) -> Iterator[TestClient]:
    """Another instance of the service on the same database, with an admins-only page and
    action made the way the next session's pages will be."""
    other = create_app(app.state.settings, prepare=False)
    router = pages.console_router("/admin-only")
    Admin = pages.require(Role.admin)

    @router.get("")
    def page(user=Depends(Admin)) -> PlainTextResponse:
        return PlainTextResponse("the admins' page")

    @router.post("")
    def action(user=Depends(Admin)) -> PlainTextResponse:
        return PlainTextResponse("done")

    other.include_router(router)
    with TestClient(other) as client:
        yield client
    other.state.engine.dispose()


@pytest.mark.parametrize("role", [Role.technician, Role.viewer])
def test_a_role_the_page_does_not_allow_gets_a_403_page(console_with_an_admin_page, session,
                                                        role):
    browser = console_with_an_admin_page
    user, _ = make_user(session, role)
    log_in(browser, user.email)
    token = form_token(browser.get("/console/"))
    for answer in (browser.get("/console/admin-only"),
                   post_form(browser, "/console/admin-only", {"csrf_token": token})):
        assert answer.status_code == 403
        assert "Vai trò của bạn không được phép" in answer.text
        assert "the admins' page" not in answer.text and "done" not in answer.text


def test_an_admin_gets_the_page_and_the_action_only_with_the_forms_token(
        console_with_an_admin_page, session):
    browser = console_with_an_admin_page
    admin, _ = make_user(session, Role.admin)
    log_in(browser, admin.email)
    assert browser.get("/console/admin-only").text == "the admins' page"
    assert post_form(browser, "/console/admin-only", {}).status_code == 403
    token = form_token(browser.get("/console/"))
    assert post_form(browser, "/console/admin-only", {"csrf_token": token}).text == "done"
    assert browser.post("/console/admin-only", data={"csrf_token": token},
                        headers={"Origin": "https://evil.example"}).status_code == 403


def test_without_a_session_the_page_sends_to_the_login_page(console_with_an_admin_page):
    answer = console_with_an_admin_page.get("/console/admin-only", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/console/login"
