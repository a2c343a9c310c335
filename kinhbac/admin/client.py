"""The fleet's release API as the admin's commands use it: over HTTP, with an admin's token.

Every refusal becomes an AdminToolError whose message says what to do next, with the API's own
detail (which names the field, the file, the release) kept in it.
"""

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Self

import httpx

from kinhbac.admin.errors import AdminToolError, FleetRefused, FleetUnreachable
from kinhbac.device import FLEET_TOKEN_ENV, FLEET_URL_ENV

# The technician's client reads refusals the same way.
from kinhbac.device.fleet_client import refusal_detail
from kinhbac.fleet_client_setup import checked_fleet_address, fleet_http, read_pages

TIMEOUT_S = 15.0  # a listing or a release: longer and the admin should know
UPLOAD_TIMEOUT_S = 120.0  # per read or write of an upload: 2 MiB over a slow office uplink
PAGE_SIZE = 500  # the API's largest page


@dataclass(frozen=True)
class Subject:
    """What a request is about, for the words of its refusals: `things` ("releases"), whose
    token they need, the command that lists them, and what a refused change leaves behind."""

    things: str
    needs: str
    listing: str
    refused_change: str


RELEASES = Subject("releases", "releases need an admin's token", "`kinhbac release list`",
                   "nothing was stored")
ROLLOUTS = Subject("rollouts", "starting or changing a rollout needs an admin's token, reading "
                   "one an admin's or a viewer's (not limited to sites)",
                   "`kinhbac rollout list`", "nothing was changed")
# A release looked up to start a rollout: refused in the rollouts' words, listed by release.
ROLLOUT_RELEASES = Subject("releases", ROLLOUTS.needs, "`kinhbac release list`",
                           "nothing was changed")
ROLLOUT_ID_MIN_PREFIX = 8  # hex digits of a short id, as git's short hashes


@dataclass(frozen=True)
class LocalFile:
    """A file to upload: where it is here, and (a bundle's) where it goes on the board."""

    source: Path
    board_path: str | None
    size: int


class _Counted:
    """A file httpx reads to send, telling `progress` how many bytes went."""

    def __init__(self, file: BinaryIO, progress: Callable[[int], None]) -> None:
        self._file = file
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._progress(len(data))
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:  # httpx takes the length from it, for Content-Length
        return self._file.fileno()


class AdminClient:
    """A session with one fleet service. Use as a context manager, or call close()."""

    def __init__(self, url: str | None, token: str | None, *, timeout: float = TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = checked_fleet_address(
            url, token, error=AdminToolError, in_clear="an admin's token",
            token_hint="an admin's API token, kbt_...: POST /api/tokens makes one")
        self._http = fleet_http(self.url, token, timeout=timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ----- requests

    def _request(self, method: str, path: str, *, uploading: bool = False,
                 about: Subject = RELEASES, unsure: str | None = None, **kwargs: Any) -> Any:
        """The answer's JSON; a refusal or no answer raises. `unsure`: what to do when a
        change may or may not have been made (its answer lost)."""
        after_loss = f": {unsure}" if unsure else ": check the network and try again"
        try:
            answer = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise FleetUnreachable(
                f"cannot reach the fleet at {self.url} ({exc}): check the address "
                f"(--fleet-url or {FLEET_URL_ENV}) and the network", maybe_done=False) from exc
        except httpx.TimeoutException as exc:
            raise FleetUnreachable(
                f"the fleet at {self.url} did not answer in time ({exc.__class__.__name__})"
                + (": the release may or may not be stored; `kinhbac release list` tells"
                   if uploading else after_loss),
                maybe_done=True) from exc
        except httpx.TransportError as exc:
            raise FleetUnreachable(
                f"the connection to the fleet at {self.url} failed ({exc or type(exc).__name__})"
                + (": the fleet may have refused the upload before it was sent whole (too "
                   "large?); `kinhbac release list` tells whether it is stored"
                   if uploading else after_loss),
                maybe_done=True) from exc
        if answer.is_success:
            return answer.json() if answer.content else None
        raise _refusal(answer, self.url, about)

    # ----- releases

    def releases(self, *, kind: str | None = None, version: str | None = None,
                 limit: int | None = None, about: Subject = RELEASES) -> list[dict[str, Any]]:
        """Releases, newest first."""
        params = {k: v for k, v in (("kind", kind), ("version", version)) if v is not None}
        return list(self._pages_of(about, "/api/releases", params, limit))

    def release(self, release_id: str, *, about: Subject = RELEASES) -> dict[str, Any]:
        """One release with its files, manifest and signature."""
        return self._request("GET", f"/api/releases/{release_id}", about=about)

    def find_release(self, ref: str, kind: str | None = None, *,
                     about: Subject = RELEASES) -> dict[str, Any]:
        """A release by its id, or by its version (and kind, when both kinds have it).
        `about`: what the release is looked up for, in the words of a refusal."""
        try:
            uuid.UUID(ref)
        except ValueError:
            pass
        else:
            return self.release(ref, about=about)
        found = self.releases(kind=kind, version=ref, about=about)
        if not found:
            raise AdminToolError(f"no {kind or 'release'} {ref} in the fleet: `kinhbac release "
                                 "list` lists them")
        if len(found) > 1:
            raise AdminToolError(f"both a bundle and an image have version {ref}: give --kind")
        return self.release(found[0]["id"], about=about)

    def upload_release(self, kind: str, version: str, files: list[LocalFile],
                       progress: Callable[[int], None] = lambda sent: None) -> dict[str, Any]:
        """Upload a release, its files streamed from disk; the fleet's answer (the release
        with its manifest and signature)."""
        opened: list[BinaryIO] = []
        try:
            parts = []
            for local in files:
                file = local.source.open("rb")
                opened.append(file)
                parts.append(("file", (local.board_path or local.source.name,
                                       _Counted(file, progress), "application/octet-stream")))
            return self._request(
                "POST", "/api/releases", uploading=True,
                data={"kind": kind, "version": version}, files=parts,
                timeout=httpx.Timeout(UPLOAD_TIMEOUT_S))
        finally:
            for file in opened:
                file.close()


    # ----- rollouts

    def create_rollout(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start a rollout; the fleet's answer is its detail."""
        return self._request("POST", "/api/rollouts", json=body, about=ROLLOUTS,
                             unsure="the rollout may or may not have been created; "
                             "`kinhbac rollout list` tells")

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """A rollout's detail: its release, target, state, waves and counts."""
        return self._request("GET", f"/api/rollouts/{rollout_id}", about=ROLLOUTS)

    def rollouts(self, *, state: str | None = None,
                 limit: int | None = None) -> list[dict[str, Any]]:
        params = {"state": state} if state else {}
        return list(self._pages_of(ROLLOUTS, "/api/rollouts", params, limit))

    def rollout_devices(self, rollout_id: str, *, state: str | None = None,
                        wave: int | None = None, limit: int | None = None
                        ) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("state", state), ("wave", wave)) if v is not None}
        return list(self._pages_of(ROLLOUTS, f"/api/rollouts/{rollout_id}/devices", params,
                                   limit))

    def rollout_events(self, rollout_id: str, *, device: str | None = None,
                       limit: int | None = None) -> list[dict[str, Any]]:
        params = {"device": device} if device else {}
        return list(self._pages_of(ROLLOUTS, f"/api/rollouts/{rollout_id}/events", params,
                                   limit))

    def change_rollout(self, rollout_id: str, action: str) -> dict[str, Any]:
        """pause, resume or cancel; the fleet's answer is the rollout's detail after it."""
        assert action in ("pause", "resume", "cancel")
        return self._request("POST", f"/api/rollouts/{rollout_id}/{action}", about=ROLLOUTS,
                             unsure=f"the {action} may or may not have been done; "
                             f"`kinhbac rollout status {rollout_id[:8]}` tells")

    def find_rollout(self, ref: str) -> dict[str, Any]:
        """A rollout by its id or a unique prefix of it (ROLLOUT_ID_MIN_PREFIX hex digits at
        least, dashes optional), as git takes short hashes."""
        ref = ref.strip().lower()
        try:
            full = uuid.UUID(ref)
        except ValueError:
            pass
        else:
            return self.rollout(str(full))
        digits = ref.replace("-", "")
        if len(digits) < ROLLOUT_ID_MIN_PREFIX or any(c not in "0123456789abcdef"
                                                      for c in digits):
            raise AdminToolError(
                f"{ref!r} names no rollout: give its id or the first {ROLLOUT_ID_MIN_PREFIX} "
                "hex digits of it at least, as `kinhbac rollout list` shows them")
        found = [r for r in self.rollouts() if r["id"].replace("-", "").startswith(digits)]
        if not found:
            raise AdminToolError(f"no rollout's id starts with {ref}: `kinhbac rollout list` "
                                 "lists them")
        if len(found) > 1:
            raise AdminToolError(f"{ref} starts {len(found)} rollouts' ids ("
                                 + ", ".join(r["id"] for r in found[:5])
                                 + "): give more of it")
        return self.rollout(found[0]["id"])

    def _pages_of(self, about: Subject, path: str, params: dict[str, Any],
                  limit: int | None) -> Iterator[dict]:
        def request(method: str, page_path: str, **kwargs: Any) -> Any:
            return self._request(method, page_path, about=about, **kwargs)

        return read_pages(request, path, params, limit, PAGE_SIZE)


def _refusal(answer: httpx.Response, url: str, about: Subject) -> AdminToolError:
    detail = refusal_detail(answer)
    code = answer.status_code
    if code == 401:
        return FleetRefused(
            f"the fleet refused the token ({detail}): log in again or ask for a new API token, "
            f"and give it with --token or {FLEET_TOKEN_ENV}", status=code)
    if code == 403:
        return FleetRefused(f"the fleet refused this ({detail}): {about.needs}", status=code)
    if code == 404:
        return FleetRefused(f"not found in the fleet: {detail}; {about.listing} lists "
                            f"the {about.things}", status=code)
    if code == 409:
        return FleetRefused(f"the fleet refused: {detail}", status=code)
    if code == 413:
        return FleetRefused(
            f"the upload is larger than the fleet takes ({detail}): an image must fit the OTA "
            "slot and a bundle the boards' filesystem; if this one does, the fleet's operator "
            "raises KINHBAC_RELEASE_MAX_UPLOAD_BYTES (and the reverse proxy's body limit)",
            status=code)
    if code == 422:
        return FleetRefused(f"the fleet refused the {about.things[:-1]} ({detail}); "
                            f"{about.refused_change}", status=code)
    if code in (301, 302, 303, 307, 308):
        return FleetRefused(
            f"the fleet at {url} redirects to {answer.headers.get('location')}: give that "
            "address with --fleet-url (redirects are not followed, they would carry the token "
            "elsewhere)", status=code)
    if code == 503:
        return FleetRefused(f"the fleet cannot do this now: {detail}", status=code)
    if code >= 500:
        return FleetRefused(f"the fleet failed ({code}: {detail}): try again; if it goes on, "
                            "tell the fleet's operator", status=code)
    return FleetRefused(f"the fleet refused the request ({code}): {detail}", status=code)
