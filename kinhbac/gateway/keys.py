"""Where the gateway learns device secrets. One small interface (KeyStore), two sources: a local
key file (the offline option), or the fleet service, fetched on an interval and cached on disk.

The fleet also supplies what only it can: the site's claim key (to verify CLAIM frames of
boards set up offline; during a rotation's overlap also the key it replaced, with its expiry),
the claims an admin approved, CONFIG settings for nodes, and the key release manifests are
signed with (`release_public_key`, which the OTA cache checks them with); claims are reported to
it as they come (docs/protocol.md, "Claiming an identity"). FleetKeyStore is also the gateway's
one client of the fleet: the OTA part fetches with its token and its error handling (open,
get_json)."""

import asyncio
import contextlib
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from kinhbac import wire
from kinhbac.claim_keys import fingerprint
from kinhbac.loopback import is_loopback_host

log = logging.getLogger(__name__)

FLEET_KEYS_PATH = "/api/gateway/keys"
FLEET_CLAIMS_PATH = "/api/gateway/claims"
CLAIM_PREFIX = b"kb"  # a claiming node's device id is "kb" and its MAC
MAX_CLAIMS_KEPT = 10_000  # answers remembered per (device, nonce); a site has far fewer boards
MAX_REPORTS_WAITING = 64  # claim reports queued for the one worker; more wait for a later claim
MAX_ANSWER_BYTES = 32 * 1024 * 1024  # ~250,000 devices: far beyond a site, short of an OOM
MAX_TIMEOUT_S = 10.0  # a fetch never takes longer, so a hung fleet cannot stall the schedule
JITTER = 0.1  # fetch up to 10 % early: a city's gateways restarted together spread out
REPORT_LOG_EVERY_S = 60.0  # "claim not reported": one line a minute at most


class KeyStore(Protocol):
    def lookup(self, device_id: bytes, key_id: int) -> wire.Key | int | None:
        """The device's key; None for an unknown device, wire.UNKNOWN_KEY for an unknown key id.
        Under wire.CLAIM_KEY_ID: the site's claim key, for any claiming device id."""

    def refresh(self) -> None:
        """Pick up changes (called periodically)."""

    def identity_for(self, device_id: bytes, nonce: bytes) -> wire.Key | None:
        """The device's own key if an admin approved exactly this claim, else None."""

    def report_claim(self, device: str, nonce: bytes, fw_version: str) -> str:
        """Pass a verified claim on to whoever decides; its standing as last heard:
        "pending", "rejected" or "refused"."""

    def node_config(self, device: str) -> dict[str, Any] | None:
        """CONFIG settings the fleet holds for the node, if any."""


class KeyFileError(Exception):
    pass


@dataclass
class ClaimKey:
    """One claim key the site takes CLAIM frames under, ready to verify with."""

    signer: wire.Signer
    fingerprint: str  # names it to the fleet (kinhbac/claim_keys.py)
    expires: float | None = None  # POSIX time it is refused from; None: the current key


@dataclass
class Listing:
    """A key listing, parsed: what the gateway looks frames up in."""

    keys: dict[bytes, wire.Key]
    doc: dict[str, Any]  # the listing in a canonical form: what the cache file holds
    claim_key: ClaimKey | None = None
    claims: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)  # -> (nonce, key id)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # device hex -> settings
    previous_claim_key: ClaimKey | None = None  # during a rotation's overlap only
    # The key release manifests are signed with (base64 of its raw 32 bytes), None until the
    # fleet's first release: the OTA cache checks every manifest with it.
    release_public_key: str | None = None


def _claim_key(value: Any, name: str) -> bytes:
    if not isinstance(value, str) or len(value) < 16:
        raise ValueError(f"{name} must be a string of 16 characters or more")
    return value.encode()


def _expiry(value: Any) -> datetime:
    """An ISO 8601 time with its zone (the fleet's answers), as an aware datetime."""
    if not isinstance(value, str):
        raise TypeError("expires_at must be an ISO 8601 time")
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        raise ValueError(f"expires_at {value!r} has no time zone")
    return when


def parse_keys(doc: Any) -> Listing:
    """A listing {"devices": [{"device_id", "key_id", "secret"}]} (hex), with the fleet's
    optional "claim_key", "previous_claim_key" ({"claim_key", "expires_at"}), "claims" and
    "configs". ValueError, KeyError or TypeError (or wire.FrameError) if malformed."""
    keys: dict[bytes, wire.Key] = {}
    rows: dict[bytes, dict[str, Any]] = {}
    for row in doc["devices"]:
        device_id = bytes.fromhex(row["device_id"])
        secret = bytes.fromhex(row["secret"])
        key_id = int(row["key_id"])
        keys[device_id] = wire.Key(device_id, key_id, secret)
        rows[device_id] = {"device_id": device_id.hex(), "key_id": key_id, "secret": secret.hex()}
    claim_key = doc.get("claim_key")
    current = None
    if claim_key is not None:
        secret = _claim_key(claim_key, "claim_key")
        current = ClaimKey(wire.Signer(secret), fingerprint(secret))
    previous_doc = doc.get("previous_claim_key")
    previous = None
    if previous_doc is not None:
        secret = _claim_key(previous_doc["claim_key"], "previous_claim_key.claim_key")
        expires_at = _expiry(previous_doc["expires_at"])
        previous = ClaimKey(wire.Signer(secret), fingerprint(secret), expires_at.timestamp())
        previous_doc = {"claim_key": previous_doc["claim_key"],
                        "expires_at": expires_at.isoformat()}
    claims = {}
    for row in doc.get("claims", []):
        nonce = bytes.fromhex(row["nonce"])
        if len(nonce) != wire.CLAIM_NONCE_SIZE:
            raise ValueError(f"claim nonce of {row['device_id']} is not 16 bytes")
        claims[bytes.fromhex(row["device_id"])] = (nonce, int(row["key_id"]))
    configs = {}
    for row in doc.get("configs", []):
        if not isinstance(row["settings"], dict):
            raise TypeError(f"settings of {row['device_id']} are not an object")
        configs[bytes.fromhex(row["device_id"]).hex()] = row["settings"]
    canonical = {
        "devices": [rows[d] for d in sorted(rows)],
        "claim_key": claim_key,
        "claims": [{"device_id": d.hex(), "nonce": n.hex(), "key_id": k}
                   for d, (n, k) in sorted(claims.items())],
        "configs": [{"device_id": d, "settings": configs[d]} for d in sorted(configs)],
    }
    if previous_doc is not None:  # absent otherwise: a listing from before rotation, unchanged
        canonical["previous_claim_key"] = previous_doc
    release_key = doc.get("release_public_key")
    if release_key is not None:
        if not isinstance(release_key, str) or len(release_key) != 44:
            raise ValueError("release_public_key must be base64 of a 32-byte Ed25519 key")
        canonical["release_public_key"] = release_key  # absent otherwise, as before releases
    return Listing(keys, canonical, current, claims, configs, previous, release_key)


class _ClaimSigner:
    """The claim key for one claiming device's frame: verifies its CLAIM under the site's
    current claim key or, during a rotation's overlap, the previous one (a second HMAC only
    when the first fails), and signs the answer under whichever verified its last CLAIM, the
    one key that board holds. The keys are the listing's at lookup, so a refresh between the
    frame and its answer changes nothing."""

    __slots__ = ("_table", "_device_id", "_current", "_previous")

    def __init__(self, table: "_KeyTable", device_id: bytes, current: ClaimKey,
                 previous: ClaimKey | None) -> None:
        self._table = table
        self._device_id = device_id
        self._current = current
        self._previous = previous

    def verify(self, data: Any, tag: Any) -> bool:
        if self._current.signer.verify(data, tag):
            self._table._on_previous.pop(self._device_id, None)
            return True
        if self._previous is not None and self._previous.signer.verify(data, tag):
            self._table._mark_previous(self._device_id)
            return True
        return False

    def mac(self, data: Any) -> bytes:
        return self._key().signer.mac(data)

    def _key(self) -> ClaimKey:
        on_previous = self._device_id in self._table._on_previous
        return self._previous if on_previous and self._previous is not None else self._current


class _ClaimKey(wire.Key):
    """A wire.Key under the claim key id whose signer is a _ClaimSigner: no key schedule per
    frame (the listing's signers are made once per listing)."""

    def __init__(self, device_id: bytes, signer: _ClaimSigner) -> None:
        self.device_id = device_id
        self.key_id = wire.CLAIM_KEY_ID
        self.signer = signer  # type: ignore[assignment]


class _KeyTable:
    """The lookup both stores share: one key per device, and the site's claim key if any (and
    during a rotation's overlap the previous one, until its expiry by this gateway's clock)."""

    _listing: Listing

    def __init__(self) -> None:
        # The wall clock, not the monotonic one: the previous claim key's expiry is a date,
        # and a gateway that cannot reach the fleet must stop taking that key on time itself.
        self._clock: Callable[[], float] = time.time
        # Claiming devices whose last CLAIM verified under the previous claim key (only
        # authenticated frames add one, and at most MAX_CLAIMS_KEPT are remembered).
        self._on_previous: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._listing.keys)

    def _previous_claim_key(self) -> ClaimKey | None:
        previous = self._listing.previous_claim_key
        if previous is None or previous.expires is None or self._clock() >= previous.expires:
            return None
        return previous

    def _mark_previous(self, device_id: bytes) -> None:
        self._on_previous[device_id] = None
        self._on_previous.move_to_end(device_id)
        while len(self._on_previous) > MAX_CLAIMS_KEPT:
            self._on_previous.popitem(last=False)

    def claim_key_fingerprint(self, device_id: bytes) -> str | None:
        """The fingerprint of the claim key that verified the device's last CLAIM."""
        previous = self._previous_claim_key() if device_id in self._on_previous else None
        key = previous or self._listing.claim_key
        return key.fingerprint if key is not None else None

    def lookup(self, device_id: bytes, key_id: int) -> wire.Key | int | None:
        if key_id == wire.CLAIM_KEY_ID:
            # The site's claim key, for a board that has no identity yet (or one an admin just
            # approved, which asks again for it): never for a device with a key of its own.
            claim_key = self._listing.claim_key
            registered = (device_id in self._listing.keys
                          and device_id not in self._listing.claims)
            if claim_key is None or registered or not device_id.startswith(CLAIM_PREFIX):
                return None if device_id not in self._listing.keys else wire.UNKNOWN_KEY
            return _ClaimKey(device_id, _ClaimSigner(self, device_id, claim_key,
                                                     self._previous_claim_key()))
        key = self._listing.keys.get(device_id)
        if key is None:
            return None
        return key if key.key_id == key_id else wire.UNKNOWN_KEY

    def identity_for(self, device_id: bytes, nonce: bytes) -> wire.Key | None:
        approved = self._listing.claims.get(device_id)
        key = self._listing.keys.get(device_id)
        if approved is None or key is None or approved != (nonce, key.key_id):
            return None
        return key

    def report_claim(self, device: str, nonce: bytes, fw_version: str) -> str:
        return "pending"  # no one to report to: the claim waits

    def node_config(self, device: str) -> dict[str, Any] | None:
        return self._listing.configs.get(device)


_EMPTY = Listing({}, {"devices": []})


class FileKeyStore(_KeyTable):
    """Keys from a JSON file: {"devices": [{"device_id", "key_id", "secret"}]}, hex encoded
    (the fleet's optional fields are taken too: its cache file has this format).

    The file is read again when it changes; a broken file keeps the keys already loaded.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._listing = _EMPTY
        self._mtime: float | None = None
        self._load()

    def _load(self) -> None:
        try:
            stat = self.path.stat()
            listing = parse_keys(json.loads(self.path.read_text()))
        except FileNotFoundError as exc:
            raise KeyFileError(f"key file {self.path} does not exist") from exc
        except (ValueError, KeyError, TypeError, RecursionError, wire.FrameError) as exc:
            raise KeyFileError(f"key file {self.path} is not valid: {exc!r}") from exc
        self._listing = listing
        self._mtime = stat.st_mtime

    def refresh(self) -> None:
        try:
            if self.path.stat().st_mtime == self._mtime:
                return
            self._load()
            log.info("reloaded %d device keys from %s", len(self), self.path)
        except (OSError, KeyFileError) as exc:
            log.error("keeping the keys already loaded: %s", exc)


class FetchError(Exception):
    """One failed fetch from the fleet; `kind` labels the metric, the message is for the log;
    `retry_after` (seconds) when the fleet said when to ask again."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would resend the Authorization header to wherever a redirect points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None  # the 3xx is then raised as an HTTPError


class FleetKeyStore(_KeyTable):
    """Keys of this gateway's site from the fleet service (GET /api/gateway/keys with the
    gateway's token): update() once at start-up, then run() every `refresh_s`.

    The request runs on a thread of its own; the new keys replace the old ones on the event loop,
    between two frames. A device missing from an answer (revoked) is refused from then on. When
    the fleet is unreachable or answers an error, the last good keys stay (logged once per
    streak of failures). Each good answer that changes something is written atomically to
    `cache_file`, which a gateway starting without the fleet loads.
    """

    def __init__(
        self,
        *,
        url: str,
        token: str,
        cache_file: Path,
        refresh_s: float = 60.0,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.base_url = url.rstrip("/")
        self.url = self.base_url + FLEET_KEYS_PATH
        self._token = token
        self.cache_file = Path(cache_file)
        self.refresh_s = refresh_s
        self.timeout_s = min(MAX_TIMEOUT_S, max(2.0, refresh_s))
        self.on_failure = on_failure
        self._opener = urllib.request.build_opener(_RefuseRedirects())
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
            # Only when allow_plaintext_fleet says so (the settings refuse it otherwise).
            log.warning("fleet_url is plain http: the gateway token and the device secrets "
                        "cross the network unencrypted (allow_plaintext_fleet)")
        self.claims_url = url.rstrip("/") + FLEET_CLAIMS_PATH
        self._listing = _EMPTY
        self._cached_doc: dict[str, Any] | None = None
        # (device hex, nonce, claim key fingerprint) -> [standing as last heard, monotonic
        # time last reported]
        self._claims: dict[tuple[str, bytes, str | None], list[Any]] = {}
        self._reports: set[asyncio.Task] = set()
        self._report_worker = asyncio.Semaphore(1)
        self._reports_held_until = 0.0  # monotonic; the fleet answered 429 until then
        self._report_logged_at: float | None = None
        self._reports_unlogged = 0
        self._failing: str | None = None  # the failure last logged, while failures go on
        self._failures = 0
        self._fetched = False
        self._cache_error_logged = False
        self._load_cache()

    def _load_cache(self) -> None:
        try:
            self._listing = parse_keys(json.loads(self.cache_file.read_text()))
            self._cached_doc = self._listing.doc
        except FileNotFoundError:
            log.info("no cached device keys yet (%s): waiting for the fleet", self.cache_file)
        except (OSError, ValueError, KeyError, TypeError, RecursionError,
                wire.FrameError) as exc:
            log.error("cached device keys %s unusable, waiting for the fleet: %s",
                      self.cache_file, exc)
        else:
            log.info("device keys from the cache %s: %d", self.cache_file, len(self))

    def refresh(self) -> None:
        """Nothing: run() refreshes on its own schedule."""

    async def run(self, then: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Fetch every refresh_s (a little early, jittered) until cancelled, and after each
        good listing await `then()` (the OTA assignments: same interval, same schedule); the
        start-up fetch is update()'s, awaited before the listener opens."""
        while True:
            await asyncio.sleep(self.refresh_s * (1 - JITTER * random.random()))
            if await self.update() and then is not None:
                await then()

    async def update(self) -> bool:
        """One fetch off the event loop; applies the answer if good. True if it was."""
        try:
            listing = await in_thread(self._fetch_and_cache)
        except FetchError as exc:
            self._failed(exc)
            return False
        self._apply(listing)
        return True

    @property
    def release_public_key(self) -> str | None:
        """The key release manifests are signed with, from the last listing (None before the
        fleet's first release)."""
        return self._listing.release_public_key

    def open(self, path: str, headers: dict[str, str] | None = None) -> Any:
        """GET `path` of the fleet with the gateway's token (blocking): the open answer, to read
        and close (a `with` block); FetchError says what went wrong. For the OTA cache, which
        streams release files to disk instead of reading them whole."""
        request = urllib.request.Request(self.base_url + path, headers=headers or {})
        request.add_header("Authorization", f"Bearer {self._token}")
        try:
            return self._opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raise _http_failure(exc) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError("unreachable", f"the fleet is unreachable: {reason}") from None

    def _request(self, request: urllib.request.Request) -> bytes:
        """Send a request with the gateway's token (blocking); FetchError says what went wrong."""
        request.add_header("Authorization", f"Bearer {self._token}")
        request.add_header("Accept", "application/json")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as answer:
                body = answer.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise _http_failure(exc) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError("unreachable", f"the fleet is unreachable: {reason}") from None
        if len(body) > MAX_ANSWER_BYTES:
            raise FetchError("invalid", f"the fleet's answer is over {MAX_ANSWER_BYTES} bytes")
        return body

    def get_json(self, path: str) -> Any:
        """GET `path` of the fleet with the gateway's token, as JSON (blocking); FetchError
        says what went wrong."""
        body = self._request(urllib.request.Request(self.base_url + path))
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise FetchError("invalid", f"the fleet's answer to {path} is not JSON: "
                             f"{exc!r}") from None

    def fetch(self) -> Listing:
        """GET the listing (blocking); FetchError says what went wrong."""
        body = self._request(urllib.request.Request(self.url))
        try:
            return parse_keys(json.loads(body))
        except (ValueError, KeyError, TypeError, RecursionError, wire.FrameError) as exc:
            raise FetchError("invalid", f"the fleet's answer is not a key listing: "
                             f"{exc!r}") from None

    def _fetch_and_cache(self) -> Listing:
        listing = self.fetch()
        if listing.doc != self._cached_doc:  # an SD card: write only what changed
            try:
                write_atomically(self.cache_file, json.dumps(listing.doc, indent=1))
            except OSError as exc:
                if not self._cache_error_logged:
                    log.error("cannot cache the device keys in %s: %s", self.cache_file, exc)
                    self._cache_error_logged = True
            else:
                self._cached_doc = listing.doc
                self._cache_error_logged = False
        return listing

    def _failed(self, exc: FetchError) -> None:
        self._failures += 1
        if self.on_failure is not None:
            self.on_failure(exc.kind)
        if str(exc) != self._failing:  # once per streak, and again if the problem changes
            log.error("device keys from %s: %s; keeping the %d already known, retrying every "
                      "%g s", self.url, exc, len(self), self.refresh_s)
            self._failing = str(exc)

    def _apply(self, listing: Listing) -> None:
        if self._failing is not None:
            log.info("device keys from the fleet again, after %d failed fetches",
                     self._failures)
        self._failing, self._failures = None, 0
        old, keys = self._listing.keys, listing.keys
        old_claim_key = self._listing.claim_key
        self._listing = listing
        added = [d for d in keys if d not in old]
        gone = [d for d in old if d not in keys]
        rekeyed = [d for d in keys if d in old and old[d].key_id != keys[d].key_id]
        if added or gone or rekeyed or not self._fetched:
            log.info("device keys from the fleet: %d; added %s, withdrawn %s, re-keyed %s",
                     len(keys), _ids(added), _ids(gone), _ids(rekeyed))
        if old_claim_key is not None \
                and old_claim_key.fingerprint != _fingerprint(listing.claim_key):
            previous = listing.previous_claim_key
            until = ("the previous one is taken until "
                     + datetime.fromtimestamp(previous.expires, UTC).isoformat()
                     if previous is not None and previous.expires is not None
                     else "the previous one is no longer taken")
            log.warning("the site's claim key was rotated (now %s): %s",
                        _fingerprint(listing.claim_key), until)
        self._fetched = True

    # ----- claims -----

    def report_claim(self, device: str, nonce: bytes, fw_version: str) -> str:
        """The claim's standing as last heard from the fleet ("pending" until heard); the claim
        is reported again at most once per refresh interval, off the event loop, naming the
        claim key that verified it. An answer "approved" fetches the keys at once, so the
        node's next claim gets its identity. While the fleet limits reports (429) none is
        sent: the claims stay "pending" and are reported with a later claim."""
        key_fingerprint = self.claim_key_fingerprint(bytes.fromhex(device))
        entry = self._claims.get((device, nonce, key_fingerprint))
        now = time.monotonic()
        if entry is None:
            if len(self._claims) >= MAX_CLAIMS_KEPT:
                self._claims.clear()  # forgetting only costs a report more
            entry = self._claims[(device, nonce, key_fingerprint)] = ["pending", -self.refresh_s]
        if now - entry[1] >= self.refresh_s and len(self._reports) < MAX_REPORTS_WAITING \
                and now >= self._reports_held_until:
            entry[1] = now
            # The loop keeps only a weak reference to a task: hold it until it is done.
            task = asyncio.get_running_loop().create_task(
                self._report(device, nonce, fw_version, key_fingerprint, entry))
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)
        return entry[0]

    async def _report(self, device: str, nonce: bytes, fw_version: str,
                      key_fingerprint: str | None, entry: list[Any]) -> None:
        body = json.dumps({"device_id": device, "nonce": nonce.hex(),
                           "fw_version": fw_version[:64] or None,
                           "claim_key_fingerprint": key_fingerprint}).encode()
        request = urllib.request.Request(self.claims_url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            async with self._report_worker:  # one request at a time: one thread, not one each
                if time.monotonic() < self._reports_held_until:
                    entry[1] = -self.refresh_s  # queued before the 429: with a later claim
                    return
                answer = json.loads(await in_thread(lambda: self._request(request)))
            state = answer["state"]
        except FetchError as exc:
            entry[1] = -self.refresh_s  # report it again with the node's next claim
            self._report_failed(device, exc)
            return
        except (ValueError, KeyError, TypeError) as exc:
            log.error("the fleet's answer to a claim of %s is not understood: %r", device, exc)
            return
        if state != entry[0]:
            log.info("claim of %s (nonce %s...): %s, %s", device, nonce.hex()[:8], state,
                     answer.get("detail", ""))
        entry[0] = state
        if state == "approved" and self.identity_for(bytes.fromhex(device), nonce) is None:
            await self.update()

    def _report_failed(self, device: str, exc: FetchError) -> None:
        """A claim report that did not get through: it goes again with the node's next claim.
        After a 429 no report is sent until Retry-After. Logged at most once a minute (a flood
        of claims at the site would otherwise flood the log too)."""
        now = time.monotonic()
        held = ""
        if exc.kind == "rate_limited":
            hold_s = exc.retry_after or REPORT_LOG_EVERY_S
            self._reports_held_until = now + hold_s
            held = f"; holding claim reports for {hold_s:g} s"
        if self._report_logged_at is not None \
                and now - self._report_logged_at < REPORT_LOG_EVERY_S:
            self._reports_unlogged += 1
            return
        more = (f" ({self._reports_unlogged} more failed reports since the last line)"
                if self._reports_unlogged else "")
        log.warning("claim of %s not reported: %s%s; it stays pending and is reported with a "
                    "later claim%s", device, exc, held, more)
        self._report_logged_at, self._reports_unlogged = now, 0


def _http_failure(exc: urllib.error.HTTPError) -> FetchError:
    """An HTTP error answer from the fleet, as the FetchError that names it."""
    if exc.code == 429:
        return _rate_limited(exc)
    exc.close()
    if exc.code in (401, 403):
        return FetchError("refused", f"the fleet refused this gateway's token (HTTP "
                          f"{exc.code}): check fleet_token")
    return FetchError("http_error", f"the fleet answered HTTP {exc.code}")


def _rate_limited(exc: urllib.error.HTTPError) -> FetchError:
    """A 429 from the fleet, with its Retry-After (seconds; 60 if absent or not a number) and
    the limit its detail names."""
    try:
        retry_after = max(1.0, float(exc.headers.get("Retry-After", "")))
    except ValueError:
        retry_after = REPORT_LOG_EVERY_S
    try:
        detail = str(json.loads(exc.read(4096))["detail"])[:300]
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
        detail = "no detail"
    finally:
        exc.close()
    return FetchError("rate_limited", f"the fleet answered HTTP 429: {detail}", retry_after)


def _fingerprint(key: ClaimKey | None) -> str:
    return key.fingerprint if key is not None else "none"


def _ids(device_ids: list[bytes], most: int = 5) -> str:
    shown = ",".join(wire.device_hex(d) for d in device_ids[:most])
    more = f" and {len(device_ids) - most} more" if len(device_ids) > most else ""
    return f"{len(device_ids)} ({shown}{more})" if device_ids else "0"


def write_atomically(path: Path, text: str) -> None:
    """Write, fsync, rename: after a power cut the file is the old one or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover keeps its own mode through O_TRUNC
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # secrets
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def in_thread(work: Callable[[], Any], name: str = "fleet-keys") -> Any:
    """work() on a daemon thread of its own: unlike the default executor's, it cannot hold up
    the gateway's exit while a request to a silent fleet waits for its timeout."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():
            return  # cancelled meanwhile
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def target() -> None:
        result, error = None, None
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001 - whatever it is, the awaiting task gets it
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is closed: the gateway stopped while this ran

    threading.Thread(target=target, name=name, daemon=True).start()
    return await done
