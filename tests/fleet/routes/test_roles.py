"""Every route, called by every kind of caller, answers as its role table says; and a caller
limited to sites answers as its role at its own sites and finds nothing at another.

ROUTES is the one table: a route missing from it (or listed but gone) fails
test_every_route_is_in_the_role_table, so a new route cannot ship without saying who may call it
and what it does at a site the caller is not limited to (`at_site`).
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import func, select

from kinhbac.fleet import rollouts
from kinhbac.fleet.audit import CLI
from kinhbac.fleet.models import AuditEntry, RolloutCreate, RolloutTarget

from ..utils import KIT, PASSWORD, World, bearer, make_callers, make_world, random_mac

ADMIN, TECHNICIAN, VIEWER, GATEWAY = "admin", "technician", "viewer", "gateway"
NO_TOKEN, WRONG_TOKEN = "no token", "wrong token"
# Callers limited to the world's two sites, and the role each has (utils.make_callers): a
# technician and a viewer limited as users, and a technician whose user reaches the other site
# too but whose token does not.
SITE_TECHNICIAN, SITE_VIEWER, SITE_TOKEN = "site technician", "site viewer", "site token technician"
LIMITED = {SITE_TECHNICIAN: TECHNICIAN, SITE_VIEWER: VIEWER, SITE_TOKEN: TECHNICIAN}
CALLERS = (ADMIN, TECHNICIAN, VIEWER, *LIMITED, GATEWAY, NO_TOKEN, WRONG_TOKEN)
USERS = frozenset({ADMIN, TECHNICIAN, VIEWER})
STAFF = frozenset({ADMIN, TECHNICIAN})
ANYONE = frozenset(CALLERS)  # public: no token needed, a token changes nothing
# Rollouts are read by admins and viewers, and only by those not limited to sites.
ROLLOUT_READERS = frozenset({ADMIN, VIEWER})

# What a route does for a caller limited to sites, aimed at another site.
OBJECT = "object"  # a record there: 404, as a missing one
LIST = "list"  # lists only the rows at the caller's sites (`listed`), and counts only those
PLACE = "place"  # puts a record there: 422, as an unknown site


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    allowed: frozenset[str]
    ok: int
    request: Callable[[World], dict[str, Any]] = field(default=lambda w: {})
    # Path ids other than the world's usual ones (e.g. a device awaiting approval).
    ids: Callable[[World], dict[str, Any]] = field(default=lambda w: {})
    at_site: str | None = None  # None: the route is about no site
    # LIST: the ids of the rows at the world's sites, and of those at the other site.
    listed: Callable[[World], tuple[set[uuid.UUID], set[uuid.UUID]]] | None = None
    # City-wide only: a caller limited to sites gets 403 whatever its role.
    city_wide: bool = False
    # The world has a rollout (of its device) in this state, for {rollout_id}.
    rollout: str | None = None

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
    Route("GET", "/api/sites", USERS, 200, at_site=LIST, listed=lambda w: (
        {w.site.id, w.callers.site.id}, {w.other.site.id})),
    Route("GET", "/api/sites/{site_id}", USERS, 200, at_site=OBJECT),
    Route("PATCH", "/api/sites/{site_id}", frozenset({ADMIN}), 200,
          lambda w: {"json": {"gateway_port": 7879}}, at_site=OBJECT),
    Route("GET", "/api/sites/{site_id}/profile", STAFF, 200, at_site=OBJECT),
    Route("POST", "/api/sites/{site_id}/claim-key/rotate", frozenset({ADMIN}), 200,
          at_site=OBJECT),
    Route("POST", "/api/gateways", frozenset({ADMIN}), 201,
          lambda w: {"json": {"name": "gw2", "site_id": str(w.site.id)}}, at_site=PLACE),
    Route("GET", "/api/gateways", USERS, 200, at_site=LIST, listed=lambda w: (
        {w.gateway.id}, {w.other.gateway.id})),
    Route("GET", "/api/gateways/{gateway_id}", USERS, 200, at_site=OBJECT),
    Route("POST", "/api/gateways/{gateway_id}/token", frozenset({ADMIN}), 200, at_site=OBJECT),
    Route("DELETE", "/api/gateways/{gateway_id}", frozenset({ADMIN}), 204, at_site=OBJECT),
    Route("POST", "/api/devices", STAFF, 201,
          lambda w: {"json": {"mac": random_mac(), "site_id": str(w.site.id)}}, at_site=PLACE),
    Route("POST", "/api/devices/bulk", STAFF, 201,
          lambda w: {"content": f"mac,site\n{random_mac()},{w.site.slug}\n",
                     "headers": {"Content-Type": "text/csv"}}, at_site=PLACE),
    Route("GET", "/api/devices", USERS, 200, at_site=LIST, listed=lambda w: (
        {w.device.id, w.pending_device_id}, {w.other.device.id, w.other.pending_device_id})),
    Route("GET", "/api/devices/{device_id}", USERS, 200, at_site=OBJECT),
    Route("GET", "/api/devices/{device_id}/readings", USERS, 200, at_site=OBJECT),
    Route("PATCH", "/api/devices/{device_id}", STAFF, 200,
          lambda w: {"json": {"tags": ["north"]}}, at_site=OBJECT),
    Route("POST", "/api/devices/{device_id}/reprovision", STAFF, 200, at_site=OBJECT),
    Route("POST", "/api/devices/{device_id}/revoke", STAFF, 200, at_site=OBJECT),
    Route("DELETE", "/api/devices/{device_id}", STAFF, 204, at_site=OBJECT),
    Route("POST", "/api/devices/{device_id}/approve", frozenset({ADMIN}), 200,
          ids=lambda w: {"device_id": w.pending_device_id}, at_site=OBJECT),
    Route("POST", "/api/devices/{device_id}/reject", frozenset({ADMIN}), 200,
          ids=lambda w: {"device_id": w.pending_device_id}, at_site=OBJECT),
    Route("PUT", "/api/devices/{device_id}/config", STAFF, 200,
          lambda w: {"json": {"settings": {"interval_ms": 5000}}}, at_site=OBJECT),
    Route("GET", "/api/gateway/keys", frozenset({GATEWAY}), 200),
    Route("POST", "/api/gateway/claims", frozenset({GATEWAY}), 200,
          lambda w: {"json": {"device_id": "6b62" + random_mac().replace(":", ""),
                              "nonce": "00" * 16, "fw_version": "0.1.0"}}),
    Route("POST", "/api/releases", frozenset({ADMIN}), 201, lambda w: {
        "data": {"kind": "bundle", "version": f"1.{uuid.uuid4().int % 10**6}"},
        "files": [("file", ("/lib/node/app.mpy", b"app"))]}),
    Route("GET", "/api/releases", frozenset({ADMIN}), 200),
    Route("GET", "/api/releases/{release_id}", frozenset({ADMIN}), 200),
    Route("GET", "/api/gateway/releases/{release_id}", frozenset({GATEWAY}), 200),
    Route("GET", "/api/gateway/releases/{release_id}/files/{index}", frozenset({GATEWAY}), 200),
    Route("GET", "/api/gateway/ota", frozenset({GATEWAY}), 200),
    Route("POST", "/api/rollouts", frozenset({ADMIN}), 201, lambda w: {"json": {
        "release_id": str(w.release_id), "target": {"devices": [w.device.wire_id]}}}),
    Route("GET", "/api/rollouts", ROLLOUT_READERS, 200, city_wide=True),
    Route("GET", "/api/rollouts/{rollout_id}", ROLLOUT_READERS, 200, city_wide=True,
          rollout="running"),
    Route("GET", "/api/rollouts/{rollout_id}/devices", ROLLOUT_READERS, 200, city_wide=True,
          rollout="running"),
    Route("GET", "/api/rollouts/{rollout_id}/events", ROLLOUT_READERS, 200, city_wide=True,
          rollout="running"),
    Route("POST", "/api/rollouts/{rollout_id}/pause", frozenset({ADMIN}), 200,
          rollout="running"),
    Route("POST", "/api/rollouts/{rollout_id}/resume", frozenset({ADMIN}), 200,
          rollout="paused"),
    Route("POST", "/api/rollouts/{rollout_id}/cancel", frozenset({ADMIN}), 200,
          rollout="running"),
    Route("GET", "/api/audit", frozenset({ADMIN}), 200),
    Route("GET", "/api/health", ANYONE, 200),
]
ID_NAMES = ("user_id", "token_id", "site_id", "gateway_id", "device_id", "release_id",
            "rollout_id")


def allowed(route: Route, caller: str) -> bool:
    """Whether the route's role table lets the caller in (a limited caller: as its role)."""
    if route.city_wide and caller in LIMITED:
        return False
    return caller in route.allowed or LIMITED.get(caller) in route.allowed


def expected_status(route: Route, caller: str) -> int:
    if allowed(route, caller):
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


def test_every_route_with_an_id_of_a_site_gateway_or_device_says_what_it_does_elsewhere():
    for route in ROUTES:
        if any(f"{{{name}}}" in route.path for name in ("site_id", "gateway_id", "device_id")):
            assert route.at_site == OBJECT, route.key
        assert (route.listed is not None) == (route.at_site == LIST), route.key


def _headers(tokens: dict[str, str], caller: str) -> dict[str, str]:
    if caller == NO_TOKEN:
        return {}
    if caller == WRONG_TOKEN:
        return bearer("kbt_not-a-token-the-fleet-issued")
    return bearer(tokens[caller])


def _ids(world: World) -> dict[str, Any]:
    return {"user_id": world.callers.viewer.id, "token_id": world.spare_token_id,
            "site_id": world.site.id, "gateway_id": world.gateway.id,
            "device_id": world.device.id, "release_id": world.release_id, "index": 0}


def _rollout(session, world: World, state: str) -> uuid.UUID:
    """A rollout of the world's release to its device, in `state`."""
    started = rollouts.create_rollout(session, CLI, RolloutCreate(
        release_id=world.release_id, target=RolloutTarget(devices=[world.device.wire_id])))
    if state == "paused":
        rollouts.pause(session, CLI, started.id)
    return started.id


def _audit_entries(session) -> int:
    return session.exec(select(func.count()).select_from(AuditEntry)).one()


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.key)
def test_route_answers_each_caller_as_its_role_table_says(client: TestClient, session, box,
                                                           route: Route, caller: str):
    expected = expected_status(route, caller)
    if allowed(route, caller):
        world = make_world(session, box, client.app)
        tokens = world.callers.tokens
        ids = _ids(world) | route.ids(world)
        if route.rollout is not None:
            ids["rollout_id"] = _rollout(session, world, route.rollout)
        request = route.request(world)
    else:
        # Refused before anything is looked up: the callers suffice, and any ids will do.
        tokens = {} if caller in (NO_TOKEN, WRONG_TOKEN) else make_callers(session, box).tokens
        ids = {name: uuid.uuid4() for name in ID_NAMES} | {"index": 0}
        request = {}

    headers = _headers(tokens, caller) | request.pop("headers", {})
    response = client.request(route.method, route.path.format(**ids), headers=headers, **request)

    assert response.status_code == expected, response.text
    if expected == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
    if expected == 403:
        assert response.json()["detail"].startswith("only ")
    if expected in (401, 403):
        assert _audit_entries(session) == 0
    if route.listed is not None and expected == 200:
        # A limited caller lists its sites' rows only, and counts only those; others, all.
        here, elsewhere = route.listed(world)
        shown = here if caller in LIMITED else here | elsewhere
        page = response.json()
        assert {uuid.UUID(item["id"]) for item in page["items"]} == shown
        assert page["total"] == len(shown)


@pytest.mark.parametrize("caller", LIMITED)
@pytest.mark.parametrize("route", [route for route in ROUTES if route.at_site in (OBJECT, PLACE)],
                         ids=lambda route: route.key)
def test_route_finds_nothing_for_a_site_limited_caller_at_another_site(
        client: TestClient, session, box, route: Route, caller: str):
    world = make_world(session, box)
    elsewhere = world.other
    assert elsewhere is not None
    ids = _ids(elsewhere) | route.ids(elsewhere)
    request = route.request(elsewhere)
    headers = _headers(world.callers.tokens, caller) | request.pop("headers", {})
    entries = _audit_entries(session)

    response = client.request(route.method, route.path.format(**ids), headers=headers, **request)

    if not allowed(route, caller):
        assert response.status_code == 403, response.text  # the role is checked first
    elif route.at_site == OBJECT:
        assert response.status_code == 404, response.text
        # In the words of a record that does not exist: nothing tells the two apart.
        missing = {name: uuid.uuid4() for name in ID_NAMES}
        answer = client.request(route.method, route.path.format(**(ids | missing)),
                                headers=headers, **route.request(elsewhere))
        assert answer.status_code == 404
        assert response.text.replace(str(ids[_id_in(route)]), "?") == \
            answer.text.replace(str(missing[_id_in(route)]), "?")
    else:
        assert response.status_code == 422, response.text
    assert _audit_entries(session) == entries  # nothing changed


def _id_in(route: Route) -> str:
    return next(name for name in ID_NAMES if f"{{{name}}}" in route.path)
