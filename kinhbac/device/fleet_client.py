"""The fleet's REST API as the technician's tools use it: over HTTP, with a bearer token.

Every refusal becomes a FleetError whose message says what to do next; the API's own detail
(which names the field, the device, the conflict) is kept in it.
"""

import os
import re
import uuid
from collections.abc import Iterator
from typing import Any, Self

import httpx

from kinhbac.device import FLEET_TOKEN_ENV as TOKEN_ENV
from kinhbac.device import FLEET_URL_ENV as URL_ENV
from kinhbac.device.errors import (
    FleetAuthError,
    FleetConflict,
    FleetError,
    FleetNotFound,
    FleetUnreachable,
)

# Shared with the admin's client; PLAINTEXT_ENV stays importable from here for this client's users.
from kinhbac.fleet_client_setup import (
    PLAINTEXT_ENV,  # noqa: F401
    checked_fleet_address,
    fleet_http,
    read_pages,
)

TIMEOUT_S = 15.0  # a site's uplink can be slow; longer than this and the technician should know
PAGE_SIZE = 500  # the API's largest page
_MAC = re.compile(r"^(?:[0-9a-fA-F]{2}[:-]){5}[0-9a-fA-F]{2}$|^[0-9a-fA-F]{12}$")
_WIRE_ID = re.compile(r"^[0-9a-fA-F]{16}$")


def refusal_detail(answer: httpx.Response) -> str:
    """The API's explanation of a refusal, as one line."""
    try:
        detail = answer.json().get("detail")
    except (ValueError, AttributeError):
        return answer.text.strip()[:300] or answer.reason_phrase
    if isinstance(detail, list):  # FastAPI's 422: [{"loc": [...], "msg": ...}]
        parts = []
        for item in detail:
            loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
            parts.append(f"{'.'.join(loc)}: {item.get('msg')}" if loc else str(item.get("msg")))
        return "; ".join(parts)
    return str(detail)


class FleetClient:
    """A session with one fleet service. Use as a context manager, or call close()."""

    def __init__(self, url: str | None, token: str | None, *, timeout: float = TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = checked_fleet_address(
            url, token, error=FleetError, without_fleet="; without the fleet, flash with --offline",
            token_hint="an admin makes API tokens for technicians with POST /api/tokens",
            in_clear="the token and device secrets")
        self._http = fleet_http(self.url, token, timeout=timeout, transport=transport)

    @classmethod
    def from_env(cls, url: str | None = None, token: str | None = None) -> "FleetClient":
        """A client from explicit values, else KINHBAC_FLEET_URL and KINHBAC_FLEET_TOKEN."""
        return cls(url or os.environ.get(URL_ENV), token or os.environ.get(TOKEN_ENV))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ----- requests

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            answer = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise FleetUnreachable(
                f"cannot reach the fleet at {self.url} ({exc}): check the address "
                f"(--fleet-url or {URL_ENV}) and the network, or flash with --offline and "
                "approve the device later", maybe_done=False
            ) from exc
        except httpx.TimeoutException as exc:
            raise FleetUnreachable(
                f"the fleet at {self.url} did not answer within {self._http.timeout.read} s: "
                "check the network, or flash with --offline and approve the device later",
                maybe_done=True
            ) from exc
        except httpx.TransportError as exc:
            raise FleetUnreachable(
                f"the connection to the fleet at {self.url} failed ({exc}): check the "
                "network and try again, or flash with --offline", maybe_done=True
            ) from exc
        if answer.is_success:
            return answer.json() if answer.content else None  # a 204 has no body
        detail = refusal_detail(answer)
        code = answer.status_code
        if code == 401:
            raise FleetAuthError(
                f"the fleet refused the token ({detail}): get a new one from an admin or log "
                f"in again, and give it with --token or {TOKEN_ENV}", status=code)
        if code == 403:
            # The fleet's detail names the roles allowed ("only admin may do this; ...").
            who = "an admin's" if "only admin " in detail else "a technician's"
            raise FleetAuthError(
                f"the fleet refused this request ({detail}): it needs {who} token; ask an "
                "admin", status=code)
        if code == 404:
            raise FleetNotFound(f"not found in the fleet: {detail}", status=code)
        if code == 409:
            raise FleetConflict(f"the fleet refused: {detail}", status=code)
        if code in (301, 302, 303, 307, 308):
            raise FleetError(
                f"the fleet at {self.url} redirects to {answer.headers.get('location')}: "
                "give that address with --fleet-url (redirects are not followed, they would "
                "carry the token elsewhere)", status=code)
        if code >= 500:
            raise FleetError(
                f"the fleet failed ({code}: {detail}): try again; if it goes on, tell the "
                "fleet's admin", status=code)
        raise FleetError(f"the fleet refused the request ({code}): {detail}", status=code)

    def _pages(self, path: str, params: dict[str, Any], limit: int | None) -> Iterator[dict]:
        """Every item of a paged listing, up to `limit` (None: all)."""
        return read_pages(self._request, path, params, limit, PAGE_SIZE)

    # ----- who and where

    def me(self) -> dict[str, Any]:
        """The calling user: proves the address and the token before anything else is done."""
        return self._request("GET", "/api/auth/me")

    def sites(self) -> list[dict[str, Any]]:
        return list(self._pages("/api/sites", {}, None))

    def find_site(self, ref: str) -> dict[str, Any]:
        """A site by its slug or id."""
        for site in self.sites():
            if ref in (site["slug"], site["id"]):
                return site
        raise FleetNotFound(
            f"no site {ref!r} in the fleet: `kinhbac device sites list --remote` lists them"
        )

    def site(self, site_id: str) -> dict[str, Any]:
        """A site as any user sees it (no secrets): when it changed, when its claim key was
        rotated."""
        return self._request("GET", f"/api/sites/{site_id}")

    def site_profile(self, site_id: str) -> dict[str, Any]:
        """The site with its WiFi password and claim key (a technician's or admin's token)."""
        return self._request("GET", f"/api/sites/{site_id}/profile")

    # ----- devices

    def register_device(self, mac: str, **fields: Any) -> dict[str, Any]:
        """Register by MAC; the answer holds the device's secret, this once."""
        body = {"mac": mac} | {k: v for k, v in fields.items() if v is not None}
        return self._request("POST", "/api/devices", json=body)

    def update_device(self, device_id: str, **fields: Any) -> dict[str, Any]:
        return self._request("PATCH", f"/api/devices/{device_id}", json=fields)

    def reprovision(self, device_id: str) -> dict[str, Any]:
        """A new key id and secret (this once); the old key stops working."""
        return self._request("POST", f"/api/devices/{device_id}/reprovision")

    def revoke(self, device_id: str) -> dict[str, Any]:
        return self._request("POST", f"/api/devices/{device_id}/revoke")

    def delete_device(self, device_id: str) -> None:
        """Remove a device no gateway has heard from (FleetConflict once one has)."""
        self._request("DELETE", f"/api/devices/{device_id}")

    def decide_claim(self, device_id: str, decision: str) -> dict[str, Any]:
        """Approve or reject a pending claim (admins)."""
        assert decision in ("approve", "reject")
        return self._request("POST", f"/api/devices/{device_id}/{decision}")

    def device(self, device_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/devices/{device_id}")

    def devices(self, *, limit: int | None = None, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        return list(self._pages("/api/devices", params, limit))

    def count_devices(self, **filters: Any) -> int:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._request("GET", "/api/devices", params={**params, "limit": 1})["total"]

    def device_by_mac(self, mac: str) -> dict[str, Any] | None:
        found = self.devices(mac=mac, limit=1)
        return found[0] if found else None

    def find_device(self, ref: str) -> dict[str, Any]:
        """A device by its id, MAC or wire id (16 hex digits), as a technician reads them."""
        ref = ref.strip()
        try:
            uuid.UUID(ref)
        except ValueError:
            pass
        else:
            return self.device(ref)
        if _MAC.match(ref):
            found = self.device_by_mac(ref)
            if found is None:
                raise FleetNotFound(f"no device with MAC {ref} in the fleet")
            return found
        if _WIRE_ID.match(ref):
            # The wire id is "kb" + MAC (kinhbac/fleet/identity.py), so its MAC finds it.
            raw = bytes.fromhex(ref)
            if raw[:2] == b"kb":
                found = self.device_by_mac(raw[2:].hex(":"))
                if found is not None and found["wire_id"] == ref.lower():
                    return found
            raise FleetNotFound(f"no device with wire id {ref} in the fleet")
        raise FleetError(
            f"{ref!r} names no device: give its id (a UUID), its MAC (aa:bb:cc:dd:ee:ff) or its "
            "wire id (16 hex digits), as `kinhbac device list` shows them"
        )
