"""Every route, called by every kind of caller, answers as its role table says.

ROUTES is the one table: a route missing from it (or listed but gone) fails
test_every_route_is_in_the_role_table, so a new route cannot ship without saying who may call it.
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import func, select

from kinhbac.fleet.models import AuditEntry

from ..utils import KIT, PASSWORD, World, bearer, make_callers, make_world, random_mac

ADMIN, TECHNICIAN, VIEWER, GATEWAY = "admin", "technician", "viewer", "gateway"
NO_TOKEN, WRONG_TOKEN = "no token", "wrong token"
CALLERS = (ADMIN, TECHNICIAN, VIEWER, GATEWAY, NO_TOKEN, WRONG_TOKEN)
USERS = frozenset({ADMIN, TECHNICIAN, VIEWER})
STAFF = frozenset({ADMIN, TECHNICIAN})
ANYONE = frozenset(CALLERS)  # public: no token needed, a token changes nothing


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    allowed: frozenset[str]
    ok: int
    request: Callable[[World], dict[str, Any]] = field(default=lambda w: {})
    # Path ids other than the world's usual ones (e.g. a device awaiting approval).
    ids: Callable[[World], dict[str, Any]] = field(default=lambda w: {})

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


ROUTES = [
    Route("POST", "/api/auth/login", ANYONE, 200,
          lambda w: {"data": {"username": w.callers.admin.email, "password": PASSWORD}}),
    Route("GET", "/api/auth/me", USERS, 200),
    Route("POST", "/api/auth/logout", USERS, 204),
    Route("POST", "/api/users", frozenset({ADMIN}), 201,
          lambda w: {"json": {"email": "new@example.org", "password": "long enough!",
                              "role": "viewer"}}),
    Route("GET", "/api/users", frozenset({ADMIN}), 200),
    Route("GET", "/api/users/{user_id}", frozenset({ADMIN}), 200),
    Route("PATCH", "/api/users/{user_id}", frozenset({ADMIN}), 200,
          lambda w: {"json": {"full_name": "Lan Nguyen"}}),
    Route("POST", "/api/tokens", frozenset({ADMIN}), 201,
          lambda w: {"json": {"user_id": str(w.callers.viewer.id), "name": "survey script"}}),
    Route("GET", "/api/tokens", frozenset({ADMIN}), 200),
    Route("DELETE", "/api/tokens/{token_id}", frozenset({ADMIN}), 204),
    Route("POST", "/api/sites", frozenset({ADMIN}), 201,
          lambda w: {"json": {"name": "Old quarter", "slug": "old-quarter", "sensor_kit": KIT}}),
    Route("GET", "/api/sites", USERS, 200),
    Route("GET", "/api/sites/{site_id}", USERS, 200),
    Route("PATCH", "/api/sites/{site_id}", frozenset({ADMIN}), 200,
          lambda w: {"json": {"gateway_port": 7879}}),
    Route("GET", "/api/sites/{site_id}/profile", STAFF, 200),
    Route("POST", "/api/sites/{site_id}/claim-key/rotate", frozenset({ADMIN}), 200),
    Route("POST", "/api/gateways", frozenset({ADMIN}), 201,
          lambda w: {"json": {"name": "gw2", "site_id": str(w.site.id)}}),
    Route("GET", "/api/gateways", USERS, 200),
    Route("GET", "/api/gateways/{gateway_id}", USERS, 200),
    Route("POST", "/api/gateways/{gateway_id}/token", frozenset({ADMIN}), 200),
    Route("DELETE", "/api/gateways/{gateway_id}", frozenset({ADMIN}), 204),
    Route("POST", "/api/devices", STAFF, 201,
          lambda w: {"json": {"mac": random_mac(), "site_id": str(w.site.id)}}),
    Route("POST", "/api/devices/bulk", STAFF, 201,
          lambda w: {"content": f"mac,site\n{random_mac()},{w.site.slug}\n",
                     "headers": {"Content-Type": "text/csv"}}),
    Route("GET", "/api/devices", USERS, 200),
    Route("GET", "/api/devices/{device_id}", USERS, 200),
    Route("GET", "/api/devices/{device_id}/readings", USERS, 200),
    Route("PATCH", "/api/devices/{device_id}", STAFF, 200,
          lambda w: {"json": {"tags": ["north"]}}),
    Route("POST", "/api/devices/{device_id}/reprovision", STAFF, 200),
    Route("POST", "/api/devices/{device_id}/revoke", STAFF, 200),
    Route("DELETE", "/api/devices/{device_id}", STAFF, 204),
    Route("POST", "/api/devices/{device_id}/approve", frozenset({ADMIN}), 200,
          ids=lambda w: {"device_id": w.pending_device_id}),
    Route("POST", "/api/devices/{device_id}/reject", frozenset({ADMIN}), 200,
          ids=lambda w: {"device_id": w.pending_device_id}),
    Route("PUT", "/api/devices/{device_id}/config", STAFF, 200,
          lambda w: {"json": {"settings": {"interval_ms": 5000}}}),
    Route("GET", "/api/gateway/keys", frozenset({GATEWAY}), 200),
    Route("POST", "/api/gateway/claims", frozenset({GATEWAY}), 200,
          lambda w: {"json": {"device_id": "6b62" + random_mac().replace(":", ""),
                              "nonce": "00" * 16, "fw_version": "0.1.0"}}),
    Route("GET", "/api/audit", frozenset({ADMIN}), 200),
    Route("GET", "/api/health", ANYONE, 200),
]


def expected_status(route: Route, caller: str) -> int:
    if caller in route.allowed:
        return route.ok
    if caller in (NO_TOKEN, WRONG_TOKEN):
        return 401
    return 403


def test_every_route_is_in_the_role_table(app):
    served = {
        f"{method.upper()} {path}"
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    listed = [route.key for route in ROUTES]
    assert len(listed) == len(set(listed)), "a route is listed twice"
    assert served - set(listed) == set(), "routes without an entry in ROUTES"
    assert set(listed) - served == set(), "ROUTES lists routes the app does not serve"


def _headers(tokens: dict[str, str], caller: str) -> dict[str, str]:
    if caller == NO_TOKEN:
        return {}
    if caller == WRONG_TOKEN:
        return bearer("kbt_not-a-token-the-fleet-issued")
    return bearer(tokens[caller])


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.key)
def test_route_answers_each_caller_as_its_role_table_says(client: TestClient, session, box,
                                                           route: Route, caller: str):
    expected = expected_status(route, caller)
    if caller in route.allowed:
        world = make_world(session, box)
        tokens = world.callers.tokens
        ids = {"user_id": world.callers.viewer.id, "token_id": world.spare_token_id,
               "site_id": world.site.id, "gateway_id": world.gateway.id,
               "device_id": world.device.id} | route.ids(world)
        request = route.request(world)
    else:
        # Refused before anything is looked up: the callers suffice, and any ids will do.
        tokens = {} if caller in (NO_TOKEN, WRONG_TOKEN) else make_callers(session, box).tokens
        ids = {name: uuid.uuid4() for name in
               ("user_id", "token_id", "site_id", "gateway_id", "device_id")}
        request = {}

    headers = _headers(tokens, caller) | request.pop("headers", {})
    response = client.request(route.method, route.path.format(**ids), headers=headers, **request)

    assert response.status_code == expected, response.text
    if expected == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
    if expected == 403:
        assert response.json()["detail"].startswith("only ")
    if expected in (401, 403):
        assert session.exec(select(func.count()).select_from(AuditEntry)).one() == 0
