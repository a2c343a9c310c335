"""Cross-site request forgery: every unsafe request of the console must come from one of its own
pages, twice over.

1. Its Origin (or, without one, its Referer) is the console's own origin. The console's pages
   send `Referrer-Policy: same-origin`: under the API's `no-referrer` a browser sends
   `Origin: null` with every form post, and the check could not tell a page of ours.
2. Its form carries the session's CSRF token (a hidden field). Before there is a session (the
   login form), the token is a random value in a short-lived cookie that the form repeats.

A request that fails either is refused with 403 and a page that says what to do.
"""

import secrets
from urllib.parse import urlsplit

from fastapi import Request, Response

from kinhbac.fleet.console.sessions import COOKIE_PATH, SAMESITE, secure
from kinhbac.fleet.settings import Settings

FIELD = "csrf_token"  # the hidden field of every form
LOGIN_COOKIE = "kinhbac_login_csrf"
LOGIN_COOKIE_S = 3600  # an open login page stays usable for an hour
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class CsrfRefused(Exception):
    """An unsafe request that did not come from a console page; `reason` says which check."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "origin" or "token": the refusal page explains each


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def check_origin(request: Request) -> None:
    """CsrfRefused unless the request's Origin, or else its Referer, is the console's own."""
    ours = f"{request.url.scheme}://{request.url.netloc}".lower()
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        claimed = _origin_of(origin)
    else:
        referer = request.headers.get("referer")
        claimed = _origin_of(referer) if referer else None
    if claimed != ours:
        raise CsrfRefused("origin")


def check_token(expected: str | None, given: str | None) -> None:
    """CsrfRefused unless the form's token is the expected one (compared in constant time)."""
    if not expected or not given or not secrets.compare_digest(expected.encode(),
                                                               given.encode()):
        raise CsrfRefused("token")


def check(request: Request, expected: str | None, given: str | None) -> None:
    """Both checks, for an unsafe request; a safe one passes."""
    if request.method not in UNSAFE:
        return
    check_origin(request)
    check_token(expected, given)


def login_token(request: Request) -> str:
    """The login form's token: the browser's, if it has one, else a new one."""
    return request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)


def set_login_cookie(response: Response, request: Request, settings: Settings,
                     token: str) -> None:
    response.set_cookie(LOGIN_COOKIE, token, path=COOKIE_PATH, max_age=LOGIN_COOKIE_S,
                        httponly=True, samesite=SAMESITE, secure=secure(request, settings))
