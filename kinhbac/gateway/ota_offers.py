"""What the gateway offers which node, the chunks it serves, and the results it records
(docs/ota.md, "How the parts talk").

- **Assignments** come from the fleet (`GET /api/gateway/ota`, right after each key listing),
  and are kept on disk like the listing, so a gateway restarted while the fleet is away still
  offers. Each assigned release is fetched into the cache once for the site, whatever the
  number of its devices, by one worker task (ota_cache.py checks it).
- **Offers.** After a node's HELLO is answered, a node with an assignment whose release is in
  the cache gets one OTA_OFFER; again at each session while the assignment lasts, unless the
  node reported a final state (confirmed, failed, rolled_back) for it.
- **Chunks.** An OTA_CHUNK_REQUEST is answered from the cache with one read of at most
  1,024 bytes (a node can ask for nothing larger: the codec refuses it), or refused by name
  (OtaRefusal: the listener answers ERROR UNSUPPORTED and the session goes on): a ref not
  offered to that node, a file index past the offer, an offset at or past the file's end.
- **Progress** goes into the queue's outbox, and from there to the broker (uplink.py):
  `offered` when a release is first offered to a device, the node's OTA_RESULT states, and
  `failed` for every device assigned a release the cache refused.
"""

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from kinhbac import mqtt_contract, wire
from kinhbac.gateway.keys import FetchError, FleetKeyStore, in_thread, write_atomically
from kinhbac.gateway.ota_cache import (
    KINDS,
    CacheFull,
    CachedRelease,
    ReleaseCache,
    ReleaseRefused,
    release_ref,
)
from kinhbac.gateway.queue import Queue

log = logging.getLogger(__name__)

FLEET_OTA_PATH = "/api/gateway/ota"
# A node repeats a final result at every session until its assignment ends: the same result is
# recorded again at most this often (a lost message is the outbox's to redeliver, not the node's).
RESULT_REPEAT_S = 60.0
# Results recorded per device a minute at most: an update is about eight; a node that sends
# more (a firmware fault, or whoever holds its key) cannot fill the outbox.
RESULTS_PER_MINUTE = 30
# Offers in a row a node leaves unanswered before it is offered no more for that rollout (and
# reported failed): a node answers every offer with an OTA_RESULT, and one whose firmware
# predates OTA refuses the frame and ends its session instead, at every HELLO, so that its
# readings would never get through.
MAX_UNANSWERED_OFFERS = 3
REFUSED_RETRY_S = 3600.0  # a refused release still assigned is fetched again after this
FINAL_STATES = (wire.OTA_CONFIRMED, wire.OTA_FAILED, wire.OTA_ROLLED_BACK)
RESULT_LOG_EVERY_S = 60.0  # results for refs this gateway does not offer: a line a minute
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class OtaRefusal(Exception):
    """A node's OTA frame this gateway does not serve; str() is the ERROR's detail."""


@dataclass(frozen=True)
class Assignment:
    """One device's current update, as the fleet lists it."""

    device: str
    rollout_id: str
    release_id: str
    kind: str
    version: str
    manifest_sha256: str

    @property
    def ref(self) -> int:
        return release_ref(self.manifest_sha256)


def parse_assignments(doc: Any) -> dict[str, Assignment]:
    """{"assignments": [...]} as the fleet answers it, by device id (hex); ValueError, KeyError
    or TypeError naming what is wrong."""
    out: dict[str, Assignment] = {}
    for row in doc["assignments"]:
        a = Assignment(str(row["device_id"]), str(row["rollout_id"]), str(row["release_id"]),
                       str(row["kind"]), str(row["version"]), str(row["manifest_sha256"]))
        if not _HEX16.match(a.device):
            raise ValueError(f"device_id {a.device!r} is not 16 hex digits")
        if not _SHA256.match(a.manifest_sha256):
            raise ValueError(f"manifest_sha256 of {a.device} is not 64 hex digits")
        if not _UUID.match(a.release_id) or not _UUID.match(a.rollout_id):
            raise ValueError(f"release_id or rollout_id of {a.device} is not a UUID")
        if a.kind not in KINDS:
            raise ValueError(f"kind {a.kind!r} of {a.device} is not bundle or image")
        if a.device in out:
            raise ValueError(f"device {a.device} is assigned twice")
        out[a.device] = a
    return out


def _canonical(assignments: dict[str, Assignment]) -> dict[str, Any]:
    return {"assignments": [
        {"device_id": a.device, "rollout_id": a.rollout_id, "release_id": a.release_id,
         "kind": a.kind, "version": a.version, "manifest_sha256": a.manifest_sha256}
        for _, a in sorted(assignments.items())]}


class OtaOffers:
    """The gateway's OTA service: load(), then run() (the fetch worker) as a task, update()
    after each key listing, and the listener's calls: offer(), chunk(), record_result()."""

    def __init__(self, *, cache: ReleaseCache, queue: Queue, site: str, gateway: str,
                 fleet: FleetKeyStore | None, assignments_file: Path | None,
                 registry: CollectorRegistry | None = None) -> None:
        self.cache = cache
        self.queue = queue
        self.site = site
        self.gateway = gateway
        self.fleet = fleet
        self.assignments_file = assignments_file
        self.assignments: dict[str, Assignment] = {}
        self._cached_doc: dict[str, Any] | None = None
        self._wake = asyncio.Event()
        self._refused: dict[str, tuple[str, float]] = {}  # sha -> (reason, monotonic time)
        # Manifests checked whose files wait for room (CacheFull): not fetched again meanwhile.
        self._checked: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._refusal_reported: set[tuple[str, str, str]] = set()  # (device, rollout, sha)
        self._offered: set[tuple[str, str, str]] = set()  # (device, rollout, sha)
        self._final: dict[str, tuple[str, str]] = {}  # device -> (rollout, sha) it finished
        # Each device's last assignment that ended (paused, cancelled, replaced): a node offered
        # it goes on and reports what it did (it rolls back, say, after the rollout paused),
        # and the fleet applies that to the rollout. One per device, in memory.
        self._ended: dict[str, Assignment] = {}
        self._last_result: dict[str, tuple[tuple, float]] = {}  # device -> (result, monotonic)
        self._recorded: dict[str, list[float]] = {}  # device -> [minute's start, results in it]
        self._unanswered: dict[str, int] = {}  # device -> offers in a row without an answer
        # Devices that have answered an offer of their current assignment once: their firmware
        # speaks OTA, so a session that ends before its answer (a node short of heap while it
        # downloads) is not taken for a firmware without OTA.
        self._answered: set[tuple[str, str, str]] = set()  # (device, rollout, sha)
        self._failing: dict[str, str] = {}  # what failed last, per fetch, for the log
        self._result_logged = -RESULT_LOG_EVERY_S
        registry = registry if registry is not None else CollectorRegistry()
        self.chunks_served = Counter("kinhbac_gateway_ota_chunks_served", "OTA_CHUNK frames "
                                     "sent to nodes", registry=registry)
        self.releases = Counter("kinhbac_gateway_ota_releases", "Releases fetched into the OTA "
                                "cache (cached) or refused by its checks (refused)", ["outcome"],
                                registry=registry)
        self.fetch_failures = Counter("kinhbac_gateway_ota_fetch_failures", "Failed fetches "
                                      "of OTA assignments or releases from the fleet, by kind",
                                      ["kind"], registry=registry)

    # ----- start-up and the fleet -----

    def load(self) -> None:
        """The cache and the last assignments on disk (blocking, at start-up)."""
        self.cache.load()
        if self.assignments_file is None:
            return
        try:
            self.assignments = parse_assignments(json.loads(self.assignments_file.read_text()))
            self._cached_doc = _canonical(self.assignments)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.error("cached OTA assignments %s unusable, waiting for the fleet: %s",
                      self.assignments_file, exc)
            return
        log.info("OTA assignments from the cache %s: %d devices", self.assignments_file,
                 len(self.assignments))
        self._wake.set()

    async def update(self) -> None:
        """Fetch the assignments (off the event loop) and apply them; the worker then fetches
        what they need. The last good ones stay while the fleet fails (logged once)."""
        if self.fleet is None:
            return
        try:
            assignments = await in_thread(self._fetch_assignments, "fleet-ota")
        except FetchError as exc:
            self._fetch_failed("assignments", exc)
            return
        self._fetch_ok("assignments")
        self.apply(assignments)

    def _fetch_assignments(self) -> dict[str, Assignment]:
        assert self.fleet is not None
        doc = self.fleet.get_json(FLEET_OTA_PATH)
        try:
            assignments = parse_assignments(doc)
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError("invalid", f"the fleet's {FLEET_OTA_PATH} answer is not a list "
                             f"of assignments: {exc!r}") from None
        canonical = _canonical(assignments)
        if canonical != self._cached_doc and self.assignments_file is not None:
            try:  # an SD card: written only when it changed
                write_atomically(self.assignments_file, json.dumps(canonical, indent=1))
                self._cached_doc = canonical
            except OSError as exc:
                log.error("cannot cache the OTA assignments in %s: %s", self.assignments_file,
                          exc)
        return assignments

    def apply(self, assignments: dict[str, Assignment]) -> None:
        """New assignments: offers follow them from each node's next HELLO or READINGS on."""
        old = self.assignments
        self.assignments = assignments
        for device, was in old.items():
            if assignments.get(device) != was:
                self._ended[device] = was
        if assignments != old:
            releases = sorted({f"{a.kind} {a.version}" for a in assignments.values()})
            ended = [d for d in old if d not in assignments or old[d] != assignments[d]]
            log.info("OTA assignments: %d devices (%s); ended or changed for %d", len(assignments),
                     ", ".join(releases) or "none", len(ended))
        # What is kept per device follows the assignments, so it stays bounded by them.
        for table in (self._final, self._last_result, self._recorded, self._unanswered):
            for device in [d for d in table if d not in assignments]:
                del table[device]
        current = {(a.device, a.rollout_id, a.manifest_sha256) for a in assignments.values()}
        self._offered &= current
        self._answered &= current
        self._refusal_reported &= current
        shas = {a.manifest_sha256 for a in assignments.values()}
        for sha in [s for s in self._checked if s not in shas]:
            del self._checked[sha]
        for sha in [s for s in self._refused if s not in shas]:
            del self._refused[sha]  # assigned again later: fetched and checked again
        self._wake.set()

    async def run(self) -> None:
        """The fetch worker: one release at a time, whenever the assignments change."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._fetch_needed()

    async def _fetch_needed(self) -> None:
        needed: dict[str, Assignment] = {}
        for a in self.assignments.values():
            needed.setdefault(a.manifest_sha256, a)
        evicted = self.cache.trim(needed)
        await in_thread(lambda: self.cache.drop_incoming(needed, evicted), "ota-cache")
        for sha, a in needed.items():
            if self.cache.get(sha) is not None:
                continue
            refused = self._refused.get(sha)
            if refused is not None and time.monotonic() - refused[1] < REFUSED_RETRY_S:
                self._report_refusal(sha, refused[0])  # to devices assigned it since
                continue
            if self.fleet is None:
                continue
            await self._fetch_release(a)

    async def _fetch_release(self, a: Assignment) -> None:
        assert self.fleet is not None
        fleet, sha = self.fleet, a.manifest_sha256
        what = f"release {a.kind} {a.version} ({a.release_id})"
        try:
            checked = self._checked.get(sha)
            if checked is None:
                checked = await in_thread(lambda: self.cache.fetch_manifest(
                    fleet, a.release_id, sha, fleet.release_public_key), "ota-cache")
                self._checked[sha] = checked
            doc, manifest = checked
            size = sum(f["size"] for f in manifest["files"])
            evicted = self.cache.make_room(sha, size, {x.manifest_sha256
                                                       for x in self.assignments.values()})
            release = await in_thread(lambda: self.cache.fetch_files(
                fleet, doc, manifest, sha, evicted), "ota-cache")
        except ReleaseRefused as exc:
            self._checked.pop(sha, None)
            self.releases.labels("refused").inc()
            self._refused[sha] = (str(exc), time.monotonic())
            log.error("%s refused, never offered: %s", what, exc)
            await in_thread(lambda: self.cache.drop_refused(sha), "ota-cache")
            self._report_refusal(sha, str(exc))
            return
        except CacheFull as exc:
            self._fetch_failed(what, FetchError("cache_full", f"the OTA cache is full: {exc}; "
                                                "waiting for an assignment to end"))
            return
        except FetchError as exc:
            self._fetch_failed(what, exc)
            return
        except OSError as exc:  # the gateway's own disk
            self._fetch_failed(what, FetchError("storage", f"cannot write the OTA cache: "
                                                f"{exc}"))
            return
        self._fetch_ok(what)
        self._checked.pop(sha, None)
        self.cache.install(release)
        self.releases.labels("cached").inc()
        log.info("cached %s: %d files, %d bytes, ref %08x; offered to its devices at their next "
                 "HELLO", what, len(release.files), release.size, release.ref)

    def _report_refusal(self, sha: str, reason: str) -> None:
        """`failed` with the reason, once, for each device assigned a refused release."""
        for a in self.assignments.values():
            key = (a.device, a.rollout_id, sha)
            if a.manifest_sha256 == sha and key not in self._refusal_reported:
                self._refusal_reported.add(key)
                self._progress(a, "failed", reason=f"gateway refused the release: {reason}")

    def _fetch_failed(self, what: str, exc: FetchError) -> None:
        self.fetch_failures.labels(exc.kind).inc()
        if self._failing.get(what) != str(exc):  # once per streak, and when it changes
            self._failing[what] = str(exc)
            log.warning("OTA: %s: %s; trying again after the next key listing", what, exc)

    def _fetch_ok(self, what: str) -> None:
        if self._failing.pop(what, None) is not None:
            log.info("OTA: %s from the fleet again", what)

    # ----- the listener's calls (event loop) -----

    def due(self, device: str) -> int | None:
        """The ref of the release the node is to be offered now, if any (no side effect)."""
        a = self.assignments.get(device)
        if a is None or self._final.get(device) == (a.rollout_id, a.manifest_sha256) \
                or self.cache.get(a.manifest_sha256) is None:
            return None
        return a.ref

    def offer(self, device: str, key: wire.Key, boot: int, counter: int) -> bytes | None:
        """The OTA_OFFER for the node, if one is due (the listener sends it after an ACK)."""
        if self.due(device) is None:
            return None
        a = self.assignments[device]
        release = self.cache.get(a.manifest_sha256)
        assert release is not None
        if (device, a.rollout_id, a.manifest_sha256) not in self._answered:  # else never counted
            unanswered = self._unanswered.get(device, 0)
            if unanswered >= MAX_UNANSWERED_OFFERS:
                self._final[device] = (a.rollout_id, a.manifest_sha256)
                why = (f"the node left {unanswered} offers in a row unanswered (firmware "
                       "without OTA?): no longer offered")
                log.warning("node %s: release %s %s: %s", device, a.kind, a.version, why)
                self._progress(a, "failed", reason=why, boot=boot)
                return None
            self._unanswered[device] = unanswered + 1
        try:
            frame = wire.encode_ota_offer(key, boot, counter, release.ref, release.wire_kind,
                                          release.version, release.offer_files())
        except wire.FrameError as exc:  # the fleet refuses such releases at upload
            log.error("release %s cannot be offered in one frame: %s", a.release_id, exc)
            return None
        self.cache.mark_offered(release)
        first = (device, a.rollout_id, a.manifest_sha256)
        if first not in self._offered:
            self._offered.add(first)
            self._progress(a, "offered", boot=boot)
            log.info("offered release %s %s (ref %08x) to %s", release.kind, release.version,
                     release.ref, device)
        return frame

    def chunk(self, device: str, key: wire.Key, msg: wire.OtaMessage) -> bytes:
        """The OTA_CHUNK answering a node's request; OtaRefusal naming what is wrong."""
        ref, index, offset = msg.ref, msg.file_index, msg.offset  # type: ignore[attr-defined]
        release = self._offered_release(device, ref)
        if index >= len(release.files):
            raise OtaRefusal(f"file index {index} is past the offer's {len(release.files)} "
                             "files")
        size = release.files[index].size
        if offset >= size:
            raise OtaRefusal(f"offset {offset} is at or past the end of file {index} "
                             f"({size} bytes)")
        length = min(msg.length, size - offset)  # type: ignore[attr-defined]
        self._answer_from(device)
        try:
            data = self.cache.read(release, index, offset, length)
        except OSError as exc:
            log.error("cannot read release %s file %d from the cache: %s", release.release_id,
                      index, exc)
            raise OtaRefusal(f"file {index} of release ref {ref:08x} cannot be read") from None
        self.chunks_served.inc()
        return wire.encode_ota_chunk(key, msg.boot, wire.downlink_counter(msg.counter, 0), ref,
                                     index, offset, data)

    def _offered_release(self, device: str, ref: int) -> CachedRelease:
        a = self.assignments.get(device)
        release = self.cache.get(a.manifest_sha256) if a is not None else None
        if a is None or a.ref != ref or release is None \
                or self._final.get(device) == (a.rollout_id, a.manifest_sha256):
            raise OtaRefusal(f"release ref {ref:08x} is not offered to this node")
        return release

    def record_result(self, device: str, msg: wire.OtaMessage) -> None:
        """A node's OTA_RESULT: progress upstream (unanswered)."""
        ref, state = msg.ref, msg.state  # type: ignore[attr-defined]
        done, reason = msg.bytes_done, msg.reason  # type: ignore[attr-defined]
        a = self.assignments.get(device)
        if a is None or a.ref != ref:
            a = self._ended.get(device)  # a release it was offered before its rollout paused
        name = wire.OTA_STATE_NAMES.get(state)
        if a is None or a.ref != ref or name is None:
            now = time.monotonic()
            if now - self._result_logged >= RESULT_LOG_EVERY_S:
                self._result_logged = now
                log.warning("node %s reports %s for release ref %08x (%r), which this gateway "
                            "neither offers it nor offered it last: not recorded", device,
                            name or f"state {state}", ref, reason)
            return
        self._answer_from(device)
        if state in FINAL_STATES:
            self._final[device] = (a.rollout_id, a.manifest_sha256)
        result = (a.rollout_id, ref, state, done, reason)
        last = self._last_result.get(device)
        now = time.monotonic()
        if last is not None and last[0] == result and now - last[1] < RESULT_REPEAT_S:
            return
        window = self._recorded.setdefault(device, [now, 0])
        if now - window[0] >= 60.0:
            window[:] = [now, 0]
        window[1] += 1
        if window[1] > RESULTS_PER_MINUTE:
            if window[1] == RESULTS_PER_MINUTE + 1:
                log.warning("node %s sent more than %d update results within a minute: the "
                            "rest of this minute's are not recorded", device, RESULTS_PER_MINUTE)
            return
        self._last_result[device] = (result, now)
        log.info("node %s: release %s %s %s (%d bytes)%s", device, a.kind, a.version, name,
                 done, f": {reason}" if reason else "")
        self._progress(a, name, bytes_so_far=done, reason=reason, boot=msg.boot)

    def _answer_from(self, device: str) -> None:
        """The node answered an offer (a result or a chunk request)."""
        self._unanswered.pop(device, None)
        a = self.assignments.get(device)
        if a is not None:
            self._answered.add((device, a.rollout_id, a.manifest_sha256))

    def _progress(self, a: Assignment, state: str, *, bytes_so_far: int = 0,
                  reason: str = "", boot: int | None = None) -> None:
        payload = mqtt_contract.ota_progress_payload(
            device=a.device, site=self.site, gateway=self.gateway, release_id=a.release_id,
            rollout_id=a.rollout_id, version=a.version, state=state,
            ts_ms=int(time.time() * 1000), bytes_so_far=bytes_so_far, reason=reason, boot=boot)
        self.queue.send_later(a.device, mqtt_contract.OTA, payload)
