"""Console fixtures: the fleet's app and client (tests/fleet/conftest.py), with the browser's
cookies cleared around each test, and a way in through the login form."""

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from ..utils import PASSWORD

ORIGIN = "http://testserver"  # the TestClient's own origin
_CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def browser(client: TestClient) -> Iterator[TestClient]:
    """The shared client as one browser: no cookies from another test, none left for the next."""
    client.cookies.clear()
    yield client
    client.cookies.clear()


def form_token(page: Response) -> str:
    """The CSRF token of the first form on `page`."""
    found = _CSRF_FIELD.search(page.text)
    assert found, page.text
    return found.group(1)


def log_in(browser: TestClient, email: str, password: str = PASSWORD, *,
           headers: dict[str, str] | None = None) -> Response:
    """Open the login page and send its form, as a browser would (no redirect followed)."""
    page = browser.get("/console/login", headers=headers)
    return browser.post("/console/login", data={
        "username": email, "password": password, "csrf_token": form_token(page)},
        headers={"Origin": ORIGIN, **(headers or {})}, follow_redirects=False)


def post_form(browser: TestClient, path: str, data: dict[str, str], *,
              origin: str | None = ORIGIN) -> Response:
    headers = {"Origin": origin} if origin else {}
    return browser.post(path, data=data, headers=headers, follow_redirects=False)
