"""Where the gateway learns device secrets. One small interface (KeyStore), two sources: a local
key file (the offline option), or the fleet service, fetched on an interval and cached on disk."""

import asyncio
import contextlib
import http.client
import json
import logging
import os
import random
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from kinhbac import wire

log = logging.getLogger(__name__)

FLEET_KEYS_PATH = "/api/gateway/keys"
MAX_ANSWER_BYTES = 32 * 1024 * 1024  # ~250,000 devices: far beyond a site, short of an OOM
MAX_TIMEOUT_S = 10.0  # a fetch never takes longer, so a hung fleet cannot stall the schedule
JITTER = 0.1  # fetch up to 10 % early: a city's gateways restarted together spread out


class KeyStore(Protocol):
    def lookup(self, device_id: bytes, key_id: int) -> wire.Key | int | None:
        """The device's key; None for an unknown device, wire.UNKNOWN_KEY for an unknown key id."""

    def refresh(self) -> None:
        """Pick up changes (called periodically)."""


class KeyFileError(Exception):
    pass


def parse_keys(doc: Any) -> tuple[dict[bytes, wire.Key], list[dict[str, Any]]]:
    """The keys of a listing {"devices": [{"device_id", "key_id", "secret"}]} (hex), and its rows
    in a canonical form. ValueError, KeyError or TypeError (or wire.FrameError) if malformed."""
    keys: dict[bytes, wire.Key] = {}
    rows: dict[bytes, dict[str, Any]] = {}
    for row in doc["devices"]:
        device_id = bytes.fromhex(row["device_id"])
        secret = bytes.fromhex(row["secret"])
        key_id = int(row["key_id"])
        keys[device_id] = wire.Key(device_id, key_id, secret)
        rows[device_id] = {"device_id": device_id.hex(), "key_id": key_id, "secret": secret.hex()}
    return keys, [rows[d] for d in sorted(rows)]


class _KeyTable:
    """The lookup both stores share: one key per device."""

    _keys: dict[bytes, wire.Key]

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, device_id: bytes, key_id: int) -> wire.Key | int | None:
        key = self._keys.get(device_id)
        if key is None:
            return None
        return key if key.key_id == key_id else wire.UNKNOWN_KEY


class FileKeyStore(_KeyTable):
    """Keys from a JSON file: {"devices": [{"device_id", "key_id", "secret"}]}, hex encoded.

    The file is read again when it changes; a broken file keeps the keys already loaded.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._keys = {}
        self._mtime: float | None = None
        self._load()

    def _load(self) -> None:
        try:
            stat = self.path.stat()
            keys, _rows = parse_keys(json.loads(self.path.read_text()))
        except FileNotFoundError as exc:
            raise KeyFileError(f"key file {self.path} does not exist") from exc
        except (ValueError, KeyError, TypeError, wire.FrameError) as exc:
            raise KeyFileError(f"key file {self.path} is not valid: {exc}") from exc
        self._keys = keys
        self._mtime = stat.st_mtime

    def refresh(self) -> None:
        try:
            if self.path.stat().st_mtime == self._mtime:
                return
            self._load()
            log.info("reloaded %d device keys from %s", len(self._keys), self.path)
        except (OSError, KeyFileError) as exc:
            log.error("keeping the keys already loaded: %s", exc)


class FetchError(Exception):
    """One failed fetch from the fleet; `kind` labels the metric, the message is for the log."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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
        self.url = url.rstrip("/") + FLEET_KEYS_PATH
        self._token = token
        self.cache_file = Path(cache_file)
        self.refresh_s = refresh_s
        self.timeout_s = min(MAX_TIMEOUT_S, max(2.0, refresh_s))
        self.on_failure = on_failure
        self._opener = urllib.request.build_opener(_RefuseRedirects())
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
            log.warning("fleet_url is plain http: the gateway token and the device secrets "
                        "cross the network unencrypted")
        self._keys = {}
        self._cached_rows: list[dict[str, Any]] | None = None
        self._failing: str | None = None  # the failure last logged, while failures go on
        self._failures = 0
        self._fetched = False
        self._cache_error_logged = False
        self._load_cache()

    def _load_cache(self) -> None:
        try:
            self._keys, self._cached_rows = parse_keys(json.loads(self.cache_file.read_text()))
        except FileNotFoundError:
            log.info("no cached device keys yet (%s): waiting for the fleet", self.cache_file)
        except (OSError, ValueError, KeyError, TypeError, wire.FrameError) as exc:
            log.error("cached device keys %s unusable, waiting for the fleet: %s",
                      self.cache_file, exc)
        else:
            log.info("device keys from the cache %s: %d", self.cache_file, len(self._keys))

    def refresh(self) -> None:
        """Nothing: run() refreshes on its own schedule."""

    async def run(self) -> None:
        """Fetch every refresh_s (a little early, jittered) until cancelled; the start-up fetch
        is update()'s, awaited before the listener opens."""
        while True:
            await asyncio.sleep(self.refresh_s * (1 - JITTER * random.random()))
            await self.update()

    async def update(self) -> bool:
        """One fetch off the event loop; applies the answer if good. True if it was."""
        try:
            keys, rows = await _in_thread(self._fetch_and_cache)
        except FetchError as exc:
            self._failed(exc)
            return False
        self._apply(keys, rows)
        return True

    def fetch(self) -> tuple[dict[bytes, wire.Key], list[dict[str, Any]]]:
        """GET the listing (blocking); FetchError says what went wrong."""
        request = urllib.request.Request(self.url, headers={
            "Authorization": f"Bearer {self._token}", "Accept": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout_s) as answer:
                body = answer.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (401, 403):
                raise FetchError("refused", f"the fleet refused this gateway's token (HTTP "
                                 f"{exc.code}): check fleet_token") from None
            raise FetchError("http_error", f"the fleet answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError("unreachable", f"the fleet is unreachable: {reason}") from None
        if len(body) > MAX_ANSWER_BYTES:
            raise FetchError("invalid", f"the fleet's answer is over {MAX_ANSWER_BYTES} bytes")
        try:
            return parse_keys(json.loads(body))
        except (ValueError, KeyError, TypeError, wire.FrameError) as exc:
            raise FetchError("invalid", f"the fleet's answer is not a key listing: "
                             f"{exc!r}") from None

    def _fetch_and_cache(self) -> tuple[dict[bytes, wire.Key], list[dict[str, Any]]]:
        keys, rows = self.fetch()
        if rows != self._cached_rows:  # an SD card: write only what changed
            try:
                _write_atomically(self.cache_file, json.dumps({"devices": rows}, indent=1))
            except OSError as exc:
                if not self._cache_error_logged:
                    log.error("cannot cache the device keys in %s: %s", self.cache_file, exc)
                    self._cache_error_logged = True
            else:
                self._cached_rows = rows
                self._cache_error_logged = False
        return keys, rows

    def _failed(self, exc: FetchError) -> None:
        self._failures += 1
        if self.on_failure is not None:
            self.on_failure(exc.kind)
        if str(exc) != self._failing:  # once per streak, and again if the problem changes
            log.error("device keys from %s: %s; keeping the %d already known, retrying every "
                      "%g s", self.url, exc, len(self._keys), self.refresh_s)
            self._failing = str(exc)

    def _apply(self, keys: dict[bytes, wire.Key], rows: list[dict[str, Any]]) -> None:
        if self._failing is not None:
            log.info("device keys from the fleet again, after %d failed fetches",
                     self._failures)
        self._failing, self._failures = None, 0
        old = self._keys
        self._keys = keys
        added = [d for d in keys if d not in old]
        gone = [d for d in old if d not in keys]
        rekeyed = [d for d in keys if d in old and old[d].key_id != keys[d].key_id]
        if added or gone or rekeyed or not self._fetched:
            log.info("device keys from the fleet: %d; added %s, withdrawn %s, re-keyed %s",
                     len(keys), _ids(added), _ids(gone), _ids(rekeyed))
        self._fetched = True


def _ids(device_ids: list[bytes], most: int = 5) -> str:
    shown = ",".join(wire.device_hex(d) for d in device_ids[:most])
    more = f" and {len(device_ids) - most} more" if len(device_ids) > most else ""
    return f"{len(device_ids)} ({shown}{more})" if device_ids else "0"


def _write_atomically(path: Path, text: str) -> None:
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


async def _in_thread(work: Callable[[], Any]) -> Any:
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

    threading.Thread(target=target, name="fleet-keys", daemon=True).start()
    return await done
