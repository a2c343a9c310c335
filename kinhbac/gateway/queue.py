"""The durable queue: readings on SQLite in WAL mode, committed in groups with fsync.

A row holds one frame's readings as they came on the wire (7 bytes each: sensor index, time
offset, float32 value) beside the frame's identity, base time and flags; the uplink builds the
JSON it publishes when it reads them back (telemetry.py). So a reading costs about its wire
size on disk, not the ~100 bytes of its JSON, and a frame costs one insert and one delete.

One thread owns the database. Every request (store these readings, delete those published,
fetch the next ones) goes to it through a queue; it takes everything waiting, runs the writes
in one transaction and commits once (synchronous=FULL: the WAL is fsynced), then answers. So
many nodes' frames share one fsync, and a node hears "durable" only after that fsync.

The acknowledgement invariant (docs/protocol.md): the gateway acknowledges readings of a boot
through seq s only when every reading of that boot up to s that the node sent on this
connection is stored. It is decided here, in `_write_put`:
- Each device has a high-water mark, committed with its readings. Readings at or below it are
  duplicates (acknowledged again, stored once); the mark only ever moves over readings that
  were stored in the same transaction.
- A batch carries `after`, the last reading the node sent before it on the same connection. If
  the mark is below `after`, an earlier batch was not stored (its commit failed, or it was
  refused): this one is refused too, so the mark never jumps over a refused range and the
  node's resend of that range is never mistaken for a duplicate.

Storage faults, by kind (docs/mqtt.md, "Drops"):
- An I/O error (EIO, a failed fsync) refuses the group's frames (BUSY: the nodes keep them and
  send them again) and deletes nothing. Deletes and device notes of the failed transaction are
  redone with the next one.
- A full disk (ENOSPC, or less free space than the reserve) refuses new frames the same way
  and deletes nothing acknowledged: the readings wait in the nodes' flash. Published readings
  are still deleted (the ballast file gives the room to write that).
- The disk cap (`disk_cap_bytes`) is a policy: past it the oldest frames are deleted, just
  enough to fit, counted under `disk_cap` and logged with what they held; past `max_age_s`,
  under `max_age`.

Replay windows (docs/protocol.md, "Counters and replay") are kept per (device, key id), as the
listener's ReplayGuard keeps them, in `replay_windows`: a device's own key's, the windows of
keys it had before a re-provisioning, and its CLAIM frames' (key id 0xFFFF). A frame's window is
written in the transaction that stores its readings, so an acknowledged frame's window is on
disk with it; HELLO, ERROR and CLAIM windows go with the next commit (their answers do not wait
for it). A window only moves forward, as in the guard. The table is keyed by the device id's
text, not `devices.ref`: a CLAIM comes from a board that is no device yet, and its window must
not create or touch a device's row (mark, HELLO, last seen, CONFIG sent). The listener bounds
how many claim windows are kept (`forget_window`).

The outbox (table `outbox`) holds what else goes upstream and must survive an uplink outage and
a restart: OTA progress (docs/ota.md). A message is kept with the next commit (`send_later`,
redone if that commit fails) and deleted only after the broker's PUBACK (`forget_outbox`); the
uplink publishes it in the order kept. It needs no layout change: an older gateway ignores the
table.
"""

import asyncio
import contextlib
import json
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw

from kinhbac.wire import READING_SIZE, READINGS_PRE_SYNC, READINGS_UNSYNCED

log = logging.getLogger(__name__)

_WRITES = ("put", "device", "window", "forget_window", "delete", "config_sent", "outbox",
           "forget_outbox")
# Fire-and-forget writes: a failed commit's are redone.
_REDONE = ("device", "window", "forget_window", "delete", "outbox", "forget_outbox")
# Messages waiting in the outbox at most (OTA progress: a few per device and update). Only a
# node holding its own key can make more, by repeating its results; past it the oldest go.
MAX_OUTBOX = 20_000
MAX_GROUP = 512  # requests per transaction: bounds one commit's latency under a flood
CAP_MARGIN = 0.99  # a cap deletion frees 1 % below the cap, so that it does not run per commit
# Disk space kept free beside the queue for the WAL and checkpoints: a tenth of the filesystem,
# between 64 KiB and 4 MiB. Half of it is held by a ballast file, given up when the disk fills
# anyway (other programs share an SD card), so that deleting published readings can be written.
RESERVE_MIN = 64 * 1024
RESERVE_MAX = 4 * 1024 * 1024
PAGE_CACHE_KIB = 2 * 1024  # the queue is written and read in order: little worth caching
FULL_RETRY_S = 1.0  # after a full disk, new frames are refused without a try for this long
REDO_RETRY_S = 0.5  # a failed commit's deletes are tried again after this, even when idle
# The default cap (disk_cap_bytes = 0): a quarter of the filesystem that holds the queue,
# between 64 MiB and 16 GiB. On an 8 GB SD card that is 2 GB: about 66 hours of 1,000
# readings/s at the ~9 bytes a reading of 20-reading frames costs (bench/RESULTS.md).
AUTO_CAP_SHARE = 4
AUTO_CAP_MIN = 64 * 1024 * 1024
AUTO_CAP_MAX = 16 * 1024**3
SCHEMA_VERSION = 3
SENSOR_TABLES_PER_DEVICE = 4  # past this many per device, unused sensor tables are deleted
DROP_LOG_EVERY_S = 60.0  # policy drops are logged at once, then gathered into a line a minute

SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: the uplink's cursor relies on it
    device INTEGER NOT NULL,                -- devices.ref
    boot INTEGER NOT NULL,                  -- the readings' boot
    first_seq INTEGER NOT NULL,             -- readings first_seq .. first_seq + count - 1
    count INTEGER NOT NULL,
    base_ms INTEGER NOT NULL,               -- the frame's base time and flags, as on the wire
    flags INTEGER NOT NULL,
    sensors INTEGER NOT NULL,               -- sensor_tables.ref in force when it came
    received_ms INTEGER NOT NULL,
    readings BLOB NOT NULL                  -- count x (sensor u8, offset ms u16, value f32), BE
);
CREATE TABLE IF NOT EXISTS devices (
    ref INTEGER PRIMARY KEY,                 -- what frames.device holds: a few bytes, not 16
    device TEXT NOT NULL UNIQUE,
    mark_boot INTEGER NOT NULL DEFAULT 0,    -- high-water mark of stored readings
    mark_seq INTEGER NOT NULL DEFAULT 0,
    hello TEXT,                              -- the last HELLO, as JSON
    last_seen_ms INTEGER,                    -- the last frame under its own key
    config_sent TEXT                         -- the CONFIG last delivered, as JSON
);
CREATE TABLE IF NOT EXISTS replay_windows (
    device TEXT NOT NULL,                    -- the device id (hex), with or without a row above
    key_id INTEGER NOT NULL,                 -- 65535 (0xFFFF): its CLAIM frames
    frame_boot INTEGER NOT NULL,             -- the latest (boot, counter) accepted
    frame_counter INTEGER NOT NULL,
    PRIMARY KEY (device, key_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sensor_tables (
    ref INTEGER PRIMARY KEY,
    sensors TEXT NOT NULL UNIQUE             -- JSON [[name, unit], ...] from a HELLO
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (         -- messages other than readings, e.g. OTA progress
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- publish order
    device TEXT NOT NULL,                   -- the device the message is about (its topic's)
    kind TEXT NOT NULL,                     -- which topic: "ota" (mqtt_contract.OTA)
    payload BLOB NOT NULL,                  -- as published
    created_ms INTEGER NOT NULL
);
"""


class QueueError(Exception):
    """The queue did not store the readings; nothing was acknowledged.

    `reason` says why: `io_error`, `disk_full`, `earlier_refused` (an earlier batch of this
    connection was not stored) or `failed` (anything else)."""

    def __init__(self, message: str, *, reason: str = "failed") -> None:
        super().__init__(message)
        self.reason = reason


class QueueLayoutError(Exception):
    """The queue file was written by a newer gateway: this one cannot read it safely.
    Restarting cannot fix it (exit 2, as for a configuration error)."""


class QueueFailed(Exception):
    """The queue's database thread died: nothing can be stored or published any more."""


@dataclass
class Stored:
    """One stored frame's readings, as the uplink reads them back."""

    id: int
    device: str
    boot: int
    first_seq: int
    count: int
    base_ms: int
    flags: int  # wire.READINGS_UNSYNCED, wire.READINGS_PRE_SYNC
    sensors_ref: int
    sensors: str  # JSON [[name, unit], ...]
    received_ms: int
    readings: bytes  # count x 7 bytes, as on the wire


@dataclass
class Outgoing:
    """One outbox message, as the uplink reads it back."""

    id: int
    device: str
    kind: str
    payload: bytes


@dataclass
class Batch:
    """Readings of one READINGS frame, ready to store."""

    device: str
    readings_boot: int
    first_seq: int
    count: int
    base_ms: int
    flags: int
    readings: bytes  # count x 7 bytes, as on the wire
    sensors: str  # the device's sensor table as JSON (from its HELLO), "[]" if unknown
    replay: tuple[int, int, int]  # key id, frame boot, frame counter
    # The last reading the node sent before this batch on the same connection, if any: the
    # batch is stored only if everything up to it is (the acknowledgement invariant).
    after: tuple[int, int] | None = None

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1


@dataclass
class Stats:
    depth: int = 0
    oldest_received_ms: int | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    storage_faults: dict[str, int] = field(default_factory=dict)  # failed commits, by kind
    outbox_depth: int = 0  # messages in the outbox


def default_cap(folder: Path) -> int:
    """The cap for disk_cap_bytes = 0: a quarter of the filesystem holding `folder`."""
    fs = os.statvfs(folder)
    return max(AUTO_CAP_MIN, min(AUTO_CAP_MAX, fs.f_blocks * fs.f_frsize // AUTO_CAP_SHARE))


class _Refused(Exception):
    """One request of a group cannot be taken (the others can)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Queue:
    """The gateway's queue. Its coroutines run on the event loop; the work, on its thread."""

    def __init__(
        self,
        path: Path,
        *,
        disk_cap_bytes: int,
        max_age_s: int,
        commit_window_ms: float = 0.0,
        on_commit: Callable[[float, int], None] | None = None,
        on_drop: Callable[[str, int], None] | None = None,
        on_fault: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.disk_cap_bytes = disk_cap_bytes  # 0: default_cap() of the disk, at open
        self.max_age_s = max_age_s
        self.commit_window_s = commit_window_ms / 1000
        self.on_commit = on_commit
        self.on_drop = on_drop
        self.on_fault = on_fault
        self.marks: dict[str, tuple[int, int]] = {}
        self.stats = Stats()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="queue", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: apsw.Connection | None = None
        self._reader: apsw.Connection | None = None
        self._read_pool = ThreadPoolExecutor(1, thread_name_prefix="queue-read")
        self._page_size = 4096
        self._failed: asyncio.Future | None = None
        self._device_refs: dict[str, int] = {}
        self._sensor_refs: dict[str, int] = {}
        # What a transaction's writes moved, written once per device and window before it
        # commits: a commit holds many frames of each node, and a statement per frame for
        # these cost 15 % of the write rate (bench: bench.queue_bench's fill).
        self._marked: dict[str, int] = {}  # device -> ref, whose mark and last seen to write
        self._windows: dict[tuple[str, int], tuple[int, int]] = {}  # (device, key id) -> latest
        self._redo: list[tuple[str, Any, None]] = []  # a failed commit's deletes and notes
        self._fault: str | None = None  # the storage fault in progress, if any
        self._fault_since = 0.0
        self._fault_commits = 0
        self._fault_refused = 0
        self._full_until = 0.0
        self._drops_logged: dict[str, float] = {}  # reason -> when its drops were last logged
        self._drops_unlogged: dict[str, list] = {}  # reason -> [count, {(device, boot): span}]

    # ----- life cycle -----

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._failed = self._loop.create_future()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        opened: asyncio.Future = self._loop.create_future()
        self._thread.start()
        self._requests.put(("open", None, opened))
        await opened

    async def close(self) -> None:
        # The reader first: the writer, closing last, checkpoints and removes the WAL.
        self._read_pool.shutdown(wait=True)
        if self._reader is not None:
            with contextlib.suppress(apsw.Error):
                self._reader.close()
            self._reader = None
        if self._thread.is_alive():
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            self._requests.put(("close", None, done))
            await done
            self._thread.join(5)

    async def watch(self) -> None:
        """Wait for ever; raise QueueFailed if the database thread dies (for the supervisor)."""
        assert self._failed is not None
        await asyncio.shield(self._failed)

    def _submit(self, kind: str, payload: Any = None) -> asyncio.Future:
        assert self._loop is not None
        fut: asyncio.Future = self._loop.create_future()
        self._requests.put((kind, payload, fut))
        return fut

    async def _ask(self, kind: str, payload: Any = None) -> Any:
        return await self._submit(kind, payload)

    # ----- what the gateway asks -----

    def submit(self, batch: Batch) -> asyncio.Future:
        """Queue a frame's readings for the next commit, in call order; the future gives how
        many were new (the rest: duplicates), or raises QueueError: not stored, do not ack."""
        return self._submit("put", batch)

    async def put(self, batch: Batch) -> int:
        """submit(), awaited."""
        return await self.submit(batch)

    def note_device(self, device: str, hello: dict[str, Any] | None,
                    replay: tuple[int, int, int]) -> None:
        """Remember a node's HELLO (if any) and a frame's replay window (key id, boot, counter);
        saved with the next commit."""
        self._requests.put(("device", (device, hello, replay), None))

    def note_window(self, device: str, replay: tuple[int, int, int]) -> None:
        """Remember a replay window and nothing else of the device (a CLAIM frame's); saved
        with the next commit."""
        self._requests.put(("window", (device, replay), None))

    def forget_window(self, device: str, key_id: int) -> None:
        """Delete a replay window, with the next commit."""
        self._requests.put(("forget_window", (device, key_id), None))

    async def fetch(self, after_id: int, limit: int) -> list[Stored]:
        """The oldest readings after `after_id`, read on a connection of their own so that the
        uplink never waits behind the listener's commits (WAL lets readers run alongside)."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._read_pool, self._fetch, after_id, limit)

    def forget(self, ids: list[tuple[int, int]]) -> None:
        """Delete readings the broker has acknowledged, with the next commit (and again with
        the one after if that commit fails). If a power cut loses the delete, the readings are
        published again: harmless duplicates. `ids` are (frame id, readings in it)."""
        self._requests.put(("delete", ids, None))

    def send_later(self, device: str, kind: str, payload: bytes) -> None:
        """Keep a message for the uplink in the outbox, with the next commit (redone if that
        commit fails), until the broker acknowledges it (forget_outbox)."""
        self._requests.put(("outbox", (device, kind, bytes(payload)), None))

    async def fetch_outbox(self, after_id: int, limit: int) -> list[Outgoing]:
        """The oldest outbox messages after `after_id`, in the order they were kept."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._read_pool, self._fetch_outbox, after_id,
                                                limit)

    def forget_outbox(self, ids: list[int]) -> None:
        """Delete outbox messages the broker has acknowledged, with the next commit."""
        self._requests.put(("forget_outbox", list(ids), None))

    def backlog(self) -> tuple[int, int | None]:
        """Readings waiting for the broker, and when the oldest of them was stored (Unix ms;
        None when none waits): from the figures kept in memory, so asking costs nothing."""
        depth, oldest = self.stats.depth, self.stats.oldest_received_ms
        if not depth:
            return 0, None
        # Stored while the figures were being refreshed: it came just now.
        return depth, oldest if oldest is not None else int(time.time() * 1000)

    async def maintain(self) -> Stats:
        """Apply the age limit, retry what a failed commit left, refresh the statistics."""
        return await self._ask("maintain")

    async def devices(self) -> dict[str, dict[str, Any]]:
        """What the queue remembers per device: "windows" {key id: (boot, counter)}, "hello",
        "last_seen_ms", "config_sent". A claim id that never became a device has its window
        only."""
        return await self._ask("devices")

    async def set_config_sent(self, device: str, settings: dict[str, Any]) -> None:
        await self._ask("config_sent", (device, json.dumps(settings, sort_keys=True)))

    # ----- the database thread -----

    def _answer(self, fut: asyncio.Future | None, result: Any = None,
                error: BaseException | None = None) -> None:
        if fut is None or self._loop is None:
            return

        def settle() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        self._loop.call_soon_threadsafe(settle)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug: every later request would wait for ever
            log.critical("queue thread died: %r", exc)
            if self._loop is not None and self._failed is not None:
                failed = self._failed
                error = QueueFailed(f"queue thread died: {exc!r}")

                def fail() -> None:
                    if not failed.done():
                        failed.set_exception(error)

                self._loop.call_soon_threadsafe(fail)
            raise

    def _serve(self) -> None:
        while True:
            try:
                first = self._requests.get(timeout=REDO_RETRY_S if self._redo else None)
            except queue.Empty:
                self._commit([])  # the redo list alone
                continue
            group = [first]
            if first[0] in ("put", "device") and self.commit_window_s:
                time.sleep(self.commit_window_s)  # let more frames join this commit
            while len(group) < MAX_GROUP:
                try:
                    group.append(self._requests.get_nowait())
                except queue.Empty:
                    break
            writes = [r for r in group if r[0] in _WRITES]
            others = [r for r in group if r[0] not in _WRITES]
            if writes or self._redo:
                self._commit(writes)
            for kind, payload, fut in others:
                try:
                    if kind == "close":
                        self._close()
                        self._answer(fut)
                        return
                    self._answer(fut, getattr(self, "_do_" + kind)(payload))
                except apsw.Error as exc:  # answered to the caller, never kills the thread
                    self._storage_fault(_fault_kind(exc), f"{kind}: {exc}")
                    self._answer(fut, error=QueueError(f"{kind} failed: {exc}",
                                                       reason=_fault_kind(exc)))
                except Exception as exc:  # a bug, or a queue it cannot open: the caller hears
                    self._answer(fut, error=exc)
                    raise

    def _do_open(self, _: None) -> None:
        fs = os.statvfs(self.path.parent)
        self._reserve = max(RESERVE_MIN, min(RESERVE_MAX, fs.f_blocks * fs.f_frsize // 10))
        self._ballast = self.path.parent / "ballast"
        if not self.disk_cap_bytes:
            self.disk_cap_bytes = default_cap(self.path.parent)
        # Readings and replay windows: the gateway's user only (the -wal and -shm files take
        # the database file's mode).
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        db = apsw.Connection(str(self.path))
        # Before anything writes to it (even the journal mode is in the file's header).
        version = _one(db, "PRAGMA user_version")
        if version > SCHEMA_VERSION:
            db.close()
            raise QueueLayoutError(
                f"{self.path} has queue layout {version}, written by a newer gateway; this one "
                f"reads layouts up to {SCHEMA_VERSION}. Run the newer gateway again, or move the "
                "file aside to start with an empty queue (what it holds is then not sent)")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a commit fsyncs the WAL: acked means on disk
        db.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
        # The WAL is checkpointed (and shrunk) before it outgrows a quarter of the reserve, so it
        # never holds what the disk has no room to copy back.
        self._page_size = _one(db, "PRAGMA page_size")
        db.execute(f"PRAGMA wal_autocheckpoint={max(8, self._reserve // 4 // self._page_size)}")
        db.execute(f"PRAGMA journal_size_limit={self._reserve // 4}")
        if version == 0 and _one(db, "SELECT COUNT(*) FROM sqlite_master WHERE name='frames'"):
            _convert_v1(db, self.path)
        elif version == 2:
            _convert_v2(db, self.path)
        db.execute(SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db = db
        for ref, device, mark_boot, mark_seq in db.execute(
            "SELECT ref, device, mark_boot, mark_seq FROM devices"
        ):
            self._device_refs[device] = ref
            self.marks[device] = (mark_boot, mark_seq)
        for ref, sensors in db.execute("SELECT ref, sensors FROM sensor_tables"):
            self._sensor_refs[sensors] = ref
        for name, value in db.execute("SELECT name, value FROM counters"):
            self.stats.dropped[name] = value
        self._refresh_stats(count=True)
        self._place_ballast()

    def _place_ballast(self) -> None:
        size = self._reserve // 2
        if self._ballast.exists() or self._free_bytes() < self._reserve + size:
            return
        with contextlib.suppress(OSError), open(self._ballast, "wb") as f:
            f.write(b"\0" * size)
            os.fsync(f.fileno())

    def _free_bytes(self) -> int:
        fs = os.statvfs(self.path.parent)
        return fs.f_bavail * fs.f_frsize

    def _close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(apsw.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None

    # ----- commits -----

    def _commit(self, writes: list[tuple[str, Any, asyncio.Future | None]]) -> None:
        db = self._db
        assert db is not None
        writes = self._redo + writes
        self._redo = []
        if any(w[0] == "put" for w in writes) and self._disk_full():
            writes = self._refuse_puts(writes, "disk_full")
            if not writes:
                return
        puts = sum(1 for w in writes if w[0] == "put")
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        results: list[Any] = []
        before = (dict(self.marks), dict(self._device_refs), dict(self._sensor_refs),
                  self.stats.depth, self.stats.oldest_received_ms, self.stats.outbox_depth)
        try:
            db.execute("BEGIN")
            for kind, payload, _ in writes:
                try:
                    results.append(getattr(self, "_write_" + kind)(db, payload, now_ms))
                except _Refused as refused:  # raised before the request wrote anything
                    results.append(refused)
            self._write_device_rows(db, now_ms)
            db.execute("COMMIT")
        except apsw.Error as exc:
            with contextlib.suppress(apsw.Error):
                db.execute("ROLLBACK")
            self._marked.clear()
            self._windows.clear()
            (self.marks, self._device_refs, self._sensor_refs,
             self.stats.depth, self.stats.oldest_received_ms, self.stats.outbox_depth) = before
            kind = _fault_kind(exc)
            self._storage_fault(kind, str(exc), refused=puts)
            if kind == "disk_full":
                self._full_until = time.monotonic() + FULL_RETRY_S
                self._relieve_disk(db)
            self._redo = [w for w in writes if w[0] in _REDONE]
            for name, _, fut in writes:
                if name not in _REDONE:
                    self._answer(fut, error=QueueError(f"not stored: {exc}", reason=kind))
            return
        if puts or self._fault == "io_error":  # a full disk clears only when frames fit again
            self._storage_recovered()
        new_rows = sum(r for r in results if isinstance(r, int))
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, new_rows)
        for (_, _, fut), result in zip(writes, results, strict=True):
            if isinstance(result, _Refused):
                self._answer(fut, error=QueueError(str(result), reason=result.reason))
            else:
                self._answer(fut, result)
        self._enforce_cap(db)

    def _refuse_puts(self, writes: list, reason: str) -> list:
        """Answer every put of `writes` with a refusal; the other writes go on."""
        kept = []
        for w in writes:
            if w[0] == "put":
                self._fault_refused += 1
                self._answer(w[2], error=QueueError("the disk is full", reason=reason))
            else:
                kept.append(w)
        return kept

    def _disk_full(self) -> bool:
        """True while new frames must wait: a full disk was just met, or less room is left
        than the reserve the WAL and checkpoints need."""
        if time.monotonic() < self._full_until:
            return True
        if self._ballast.exists():
            return False
        assert self._db is not None
        room = self._free_bytes() + _one(self._db, "PRAGMA freelist_count") * self._page_size
        if room >= self._reserve:
            return False
        self._storage_fault("disk_full", f"less than {self._reserve // 2} bytes free")
        self._full_until = time.monotonic() + FULL_RETRY_S
        return True

    def _storage_fault(self, kind: str, detail: str, refused: int = 0) -> None:
        """Count a failed commit; log the first of an episode once, the rest are counted."""
        self.stats.storage_faults[kind] = self.stats.storage_faults.get(kind, 0) + 1
        if self.on_fault is not None:
            self.on_fault(kind)
        self._fault_commits += 1
        self._fault_refused += refused
        if self._fault != kind:
            self._fault = kind
            self._fault_since = time.monotonic()
            what = ("an I/O error" if kind == "io_error" else
                    "the disk is full" if kind == "disk_full" else "a database error")
            log.error("queue: %s (%s): new frames are refused (BUSY; the nodes keep them) and "
                      "nothing queued is deleted until it clears; retrying", what, detail)

    def _storage_recovered(self) -> None:
        if self._fault is None:
            return
        log.info("queue: storage works again after %.1f s of %s: %d failed commits, %d "
                    "frames refused and left on their nodes", time.monotonic() - self._fault_since,
                    self._fault, self._fault_commits, self._fault_refused)
        self._fault = None
        self._fault_commits = self._fault_refused = 0

    def _device_ref(self, db: apsw.Connection, device: str) -> int:
        ref = self._device_refs.get(device)
        if ref is None:
            db.execute("INSERT INTO devices (device) VALUES (?)", (device,))
            ref = self._device_refs[device] = db.last_insert_rowid()
        return ref

    def _sensor_ref(self, db: apsw.Connection, sensors: str) -> int:
        ref = self._sensor_refs.get(sensors)
        if ref is None:
            db.execute("INSERT INTO sensor_tables (sensors) VALUES (?)", (sensors,))
            ref = self._sensor_refs[sensors] = db.last_insert_rowid()
        return ref

    def _write_put(self, db: apsw.Connection, batch: Batch, now_ms: int) -> int:
        mark = self.marks.get(batch.device, (0, 0))
        boot = batch.readings_boot
        if batch.after is not None and mark < batch.after:
            # The node sent readings up to `after` earlier on this connection and they are not
            # stored: acknowledging this batch would acknowledge them.
            raise _Refused("an earlier batch of this connection was not stored",
                           "earlier_refused")
        ref = self._device_ref(db, batch.device)
        first, count, blob = batch.first_seq, batch.count, batch.readings
        if (boot, first) <= mark:  # a resend: keep only what is above the mark
            skip = count if boot < mark[0] else min(count, mark[1] - first + 1)
            first, count = first + skip, count - skip
            blob = blob[skip * READING_SIZE:]  # offsets stay relative to the same base time
        if count:
            db.execute(
                "INSERT INTO frames (device, boot, first_seq, count, base_ms, flags, sensors, "
                "received_ms, readings) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ref, boot, first, count, batch.base_ms, batch.flags,
                 self._sensor_ref(db, batch.sensors), now_ms, blob),
            )
            mark = (boot, first + count - 1)
            self.marks[batch.device] = mark
            self.stats.depth += count
            if self.stats.oldest_received_ms is None:
                self.stats.oldest_received_ms = now_ms
        self._marked[batch.device] = ref
        self._save_window(batch.device, batch.replay)
        return count

    def _save_window(self, device: str, replay: tuple[int, int, int]) -> None:
        """A frame's replay window, written before this transaction commits."""
        key_id, boot, counter = replay
        latest = self._windows.get((device, key_id))
        if latest is None or (boot, counter) > latest:
            self._windows[(device, key_id)] = (boot, counter)

    def _write_device_rows(self, db: apsw.Connection, now_ms: int) -> None:
        """The marks and replay windows the transaction's writes moved. A window only moves
        forward, as in the listener's ReplayGuard."""
        if self._marked:
            db.executemany(
                "UPDATE devices SET mark_boot=?, mark_seq=?, last_seen_ms=? WHERE ref=?",
                [(*self.marks.get(d, (0, 0)), now_ms, ref) for d, ref in self._marked.items()])
            self._marked.clear()
        if self._windows:
            db.executemany(
                "INSERT INTO replay_windows (device, key_id, frame_boot, frame_counter) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (device, key_id) DO UPDATE SET "
                "frame_boot=excluded.frame_boot, frame_counter=excluded.frame_counter "
                "WHERE (excluded.frame_boot, excluded.frame_counter) > (frame_boot, frame_counter)",
                [(d, k, b, c) for (d, k), (b, c) in self._windows.items()])
            self._windows.clear()

    def _write_device(self, db: apsw.Connection, payload: Any, now_ms: int) -> None:
        device, hello, replay = payload
        ref = self._device_ref(db, device)
        db.execute(
            "UPDATE devices SET last_seen_ms=?, hello=COALESCE(?, hello) WHERE ref=?",
            (now_ms, json.dumps(hello) if hello is not None else None, ref),
        )
        self._save_window(device, replay)

    def _write_window(self, db: apsw.Connection, payload: Any, now_ms: int) -> None:
        device, replay = payload
        self._save_window(device, replay)

    def _write_forget_window(self, db: apsw.Connection, payload: Any, now_ms: int) -> None:
        device, key_id = payload
        self._windows.pop((device, key_id), None)  # a window noted earlier in this transaction
        db.execute("DELETE FROM replay_windows WHERE device=? AND key_id=?", payload)

    def _write_delete(self, db: apsw.Connection, ids: list[tuple[int, int]],
                      now_ms: int) -> None:
        # The readings the rows held, as deleted: a frame the disk cap dropped after the
        # uplink read it is gone already and must not be taken off the depth twice.
        gone = db.executemany("DELETE FROM frames WHERE id = ? RETURNING count",
                              [(i,) for i, _ in ids])
        self.stats.depth = max(0, self.stats.depth - sum(n for (n,) in gone))

    def _write_outbox(self, db: apsw.Connection, payload: Any, now_ms: int) -> None:
        device, kind, message = payload
        db.execute("INSERT INTO outbox (device, kind, payload, created_ms) VALUES (?, ?, ?, ?)",
                   (device, kind, message, now_ms))
        self.stats.outbox_depth += 1
        if self.stats.outbox_depth > MAX_OUTBOX:
            over = self.stats.outbox_depth - MAX_OUTBOX
            db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id "
                       "LIMIT ?)", (over,))
            self.stats.outbox_depth -= over
            self.stats.dropped["outbox_cap"] = self.stats.dropped.get("outbox_cap", 0) + over
            log.warning("outbox over %d messages: dropped the %d oldest", MAX_OUTBOX, over)

    def _write_forget_outbox(self, db: apsw.Connection, ids: list[int], now_ms: int) -> None:
        db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
        self.stats.outbox_depth = max(0, self.stats.outbox_depth - len(ids))

    def _write_config_sent(self, db: apsw.Connection, payload: Any, now_ms: int) -> None:
        device, settings = payload
        ref = self._device_ref(db, device)
        db.execute("UPDATE devices SET config_sent=? WHERE ref=?", (settings, ref))

    # ----- reads -----

    def _fetch(self, after_id: int, limit: int) -> list[Stored]:
        if self._reader is None:
            self._reader = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READONLY)
        cursor = self._reader.execute(
            "SELECT f.id, d.device, f.boot, f.first_seq, f.count, f.base_ms, f.flags, f.sensors, "
            "COALESCE(s.sensors, '[]'), f.received_ms, f.readings FROM frames f "
            "JOIN devices d ON d.ref = f.device LEFT JOIN sensor_tables s ON s.ref = f.sensors "
            "WHERE f.id > ? ORDER BY f.id LIMIT ?",
            (after_id, limit),
        )
        return [Stored(*r) for r in cursor]

    def _fetch_outbox(self, after_id: int, limit: int) -> list[Outgoing]:
        if self._reader is None:
            self._reader = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READONLY)
        cursor = self._reader.execute(
            "SELECT id, device, kind, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit))
        return [Outgoing(*r) for r in cursor]

    def _do_devices(self, _: None) -> dict[str, dict[str, Any]]:
        assert self._db is not None
        out: dict[str, dict[str, Any]] = {}
        for device, hello, last_seen, config_sent in self._db.execute(
            "SELECT device, hello, last_seen_ms, config_sent FROM devices"
        ):
            out[device] = {
                "windows": {},
                "hello": json.loads(hello) if hello else None,
                "last_seen_ms": last_seen,
                "config_sent": config_sent,
            }
        for device, key_id, frame_boot, counter in self._db.execute(
            "SELECT device, key_id, frame_boot, frame_counter FROM replay_windows"
        ):
            known = out.setdefault(device, {"windows": {}, "hello": None, "last_seen_ms": None,
                                            "config_sent": None})
            known["windows"][key_id] = (frame_boot, counter)
        return out

    def _do_maintain(self, _: None) -> Stats:
        db = self._db
        assert db is not None
        self._place_ballast()
        if self._fault is None:
            cutoff = int(time.time() * 1000) - self.max_age_s * 1000
            expired = db.execute(
                "SELECT 1 FROM frames WHERE received_ms < ? LIMIT 1", (cutoff,)
            ).fetchone()
            if expired:
                self._drop(db, "max_age", "received_ms < ?", (cutoff,))
            if len(self._sensor_refs) > SENSOR_TABLES_PER_DEVICE * len(self._device_refs) + 64:
                self._forget_sensor_tables(db)
        self._refresh_stats()
        return self.stats

    def _forget_sensor_tables(self, db: apsw.Connection) -> None:
        """Delete the sensor tables no queued frame refers to. A node that keeps changing its
        table (each HELLO may bring a new one) would otherwise grow the database and this
        process's memory without bound."""
        with db:
            db.execute("DELETE FROM sensor_tables WHERE ref NOT IN "
                       "(SELECT DISTINCT sensors FROM frames)")
        kept = {ref for (ref,) in db.execute("SELECT ref FROM sensor_tables")}
        self._sensor_refs = {t: r for t, r in self._sensor_refs.items() if r in kept}

    def _refresh_stats(self, *, count: bool = False) -> None:
        """The oldest queued frame's time and the outbox's size; the depth too with `count`
        (at open), which reads every frame: the queue can hold millions, and this runs every
        second (the gauges, the gateway's status), so otherwise the depth is the one kept as
        frames are stored, published and dropped."""
        assert self._db is not None
        if count:
            self.stats.depth = _one(self._db, "SELECT COALESCE(SUM(count), 0) FROM frames")
        # Frame ids grow in the order frames were stored, so the first by id (one step down
        # the primary key, not a scan) is the one that has waited longest.
        first = self._db.execute(
            "SELECT received_ms FROM frames ORDER BY id LIMIT 1").fetchone()
        self.stats.oldest_received_ms = None if first is None else first[0]
        if first is None:
            self.stats.depth = 0
        self.stats.outbox_depth = _one(self._db, "SELECT COUNT(*) FROM outbox")

    # ----- the disk cap -----

    def used_bytes(self) -> int:
        """Pages holding data (free pages are reused, so the file stays about the cap's size)."""
        assert self._db is not None
        pages = _one(self._db, "PRAGMA page_count")
        free = _one(self._db, "PRAGMA freelist_count")
        return (pages - free) * self._page_size

    def _enforce_cap(self, db: apsw.Connection) -> None:
        used = self.used_bytes()
        if used <= self.disk_cap_bytes:
            return
        frames = _one(db, "SELECT COUNT(*) FROM frames")
        if not frames:
            return
        per_frame = used / frames
        excess = used - self.disk_cap_bytes * CAP_MARGIN
        n = min(frames, max(1, int(excess / per_frame) + 1))
        self._drop(db, "disk_cap", "id IN (SELECT id FROM frames ORDER BY id LIMIT ?)", (n,))
        self._refresh_stats()

    def _relieve_disk(self, db: apsw.Connection) -> None:
        """After a full disk: give up the ballast and shrink the WAL, so that deleting what
        the broker has acknowledged can still be written. Nothing queued is deleted."""
        with contextlib.suppress(FileNotFoundError):
            self._ballast.unlink()
        with contextlib.suppress(apsw.Error):
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _drop(self, db: apsw.Connection, reason: str, where: str, args: tuple) -> None:
        """Delete the frames `where` selects, counting their readings under `reason` and
        logging which readings they were."""
        try:
            db.execute("BEGIN")
            ranges = db.execute(
                "SELECT d.device, f.boot, MIN(f.first_seq), MAX(f.first_seq + f.count - 1), "
                f"SUM(f.count) FROM frames f JOIN devices d ON d.ref = f.device WHERE {where} "
                "GROUP BY f.device, f.boot ORDER BY 5 DESC", args
            ).fetchall()
            deleted = sum(r[4] for r in ranges)
            db.execute(f"DELETE FROM frames WHERE {where}", args)
            total = self.stats.dropped.get(reason, 0) + deleted
            db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) "
                "DO UPDATE SET value=excluded.value",
                (reason, total),
            )
            db.execute("COMMIT")
        except apsw.Error as exc:
            with contextlib.suppress(apsw.Error):
                db.execute("ROLLBACK")
            self._storage_fault(_fault_kind(exc), f"dropping for {reason}: {exc}")
            return
        self.stats.dropped[reason] = total
        self.stats.depth = max(0, self.stats.depth - deleted)
        self._log_drop(reason, deleted, ranges)
        if self.on_drop is not None:
            self.on_drop(reason, deleted)

    def _log_drop(self, reason: str, deleted: int, ranges: list) -> None:
        """Log which readings a policy dropped: the first drop of a reason at once, later ones
        gathered into one line a minute (a full cap drops a little at many commits)."""
        pending = self._drops_unlogged.setdefault(reason, [0, {}])
        pending[0] += deleted
        for device, boot, lo, hi, _ in ranges:
            span = pending[1].get((device, boot))
            pending[1][(device, boot)] = (lo, hi) if span is None else (min(span[0], lo),
                                                                        max(span[1], hi))
        now = time.monotonic()
        if now - self._drops_logged.get(reason, -DROP_LOG_EVERY_S) < DROP_LOG_EVERY_S:
            return
        self._drops_logged[reason] = now
        count, spans = self._drops_unlogged.pop(reason)
        items = sorted(spans.items())
        shown = ", ".join(f"{d} boot {b} seq {lo}-{hi}" for (d, b), (lo, hi) in items[:8])
        more = f" and {len(items) - 8} more ranges" if len(items) > 8 else ""
        log.warning("dropped %d queued readings (%s): %s%s", count, reason, shown, more)


def _one(db: apsw.Connection, sql: str) -> Any:
    return db.execute(sql).fetchone()[0]


def _fault_kind(exc: BaseException) -> str:
    """A storage error by what it means for the readings."""
    if isinstance(exc, apsw.FullError):
        return "disk_full"
    if isinstance(exc, apsw.IOError):
        return "io_error"
    return "failed"


def _move_windows(db: apsw.Connection, table: str) -> None:
    """Copy the one replay window per device of an earlier layout's `table` to replay_windows."""
    db.execute(
        "INSERT INTO replay_windows (device, key_id, frame_boot, frame_counter) "
        f"SELECT device, key_id, frame_boot, frame_counter FROM {table} "
        "WHERE key_id IS NOT NULL AND frame_boot IS NOT NULL AND frame_counter IS NOT NULL")


def _convert_v2(db: apsw.Connection, path: Path) -> None:
    """Bring a queue of the second layout (one replay window per device, in its row) to the
    current one, in one transaction: the windows move to replay_windows."""
    devices = _one(db, "SELECT COUNT(*) FROM devices")
    log.info("%s: moving the replay windows of %d devices to their own table", path, devices)
    db.execute("BEGIN")
    db.execute(SCHEMA)
    _move_windows(db, "devices")
    for column in ("key_id", "frame_boot", "frame_counter"):
        db.execute(f"ALTER TABLE devices DROP COLUMN {column}")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    db.execute("COMMIT")


def _convert_v1(db: apsw.Connection, path: Path) -> None:
    """Bring a queue of the first layout (each frame's readings as published JSON text) to the
    current one, in one transaction, so that an upgrade loses nothing acknowledged."""
    frames = _one(db, "SELECT COUNT(*) FROM frames")
    log.info("%s: converting %d queued frames of the earlier layout", path, frames)
    db.execute("BEGIN")
    db.execute("ALTER TABLE frames RENAME TO frames_v1")
    db.execute("ALTER TABLE devices RENAME TO devices_v1")
    db.execute(SCHEMA)
    db.execute(
        "INSERT INTO devices (device, mark_boot, mark_seq, hello, last_seen_ms, config_sent) "
        "SELECT device, mark_boot, mark_seq, hello, last_seen_ms, config_sent FROM devices_v1")
    _move_windows(db, "devices_v1")
    devices = {d: ref for ref, d in db.execute("SELECT ref, device FROM devices")}
    tables: dict[str, int] = {}
    rows = db.execute("SELECT id, device, boot, first_seq, count, readings, received_ms "
                      "FROM frames_v1 ORDER BY id").fetchall()
    for frame_id, device, boot, first_seq, count, text, received_ms in rows:
        readings = json.loads(f"[{text}]")
        sensors: list[tuple[str, str]] = []
        unsynced = readings[0]["ts"] is None
        times = [r["boot_ms"] if unsynced else r["ts"] for r in readings]
        base = min(times)
        blob = bytearray()
        for r, t in zip(readings, times, strict=True):
            sensor = (r["sensor"], r["unit"])
            if sensor not in sensors:
                sensors.append(sensor)
            value = float("nan") if r["value"] is None else r["value"]
            blob += struct.pack(">BHf", sensors.index(sensor), t - base, value)
        table = json.dumps([list(x) for x in sensors], separators=(",", ":"))
        if table not in tables:
            db.execute("INSERT OR IGNORE INTO sensor_tables (sensors) VALUES (?)", (table,))
            tables[table] = _one_arg(db, "SELECT ref FROM sensor_tables WHERE sensors=?", table)
        flags = READINGS_UNSYNCED if unsynced else (
            READINGS_PRE_SYNC if readings[0]["pre_sync"] else 0)
        if device not in devices:
            db.execute("INSERT INTO devices (device) VALUES (?)", (device,))
            devices[device] = db.last_insert_rowid()
        db.execute(
            "INSERT INTO frames (id, device, boot, first_seq, count, base_ms, flags, sensors, "
            "received_ms, readings) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (frame_id, devices[device], boot, first_seq, count, base, flags, tables[table],
             received_ms, bytes(blob)))
    db.execute("DROP TABLE frames_v1")
    db.execute("DROP TABLE devices_v1")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    db.execute("COMMIT")
    log.info("%s: converted %d frames", path, len(rows))


def _one_arg(db: apsw.Connection, sql: str, arg: Any) -> Any:
    return db.execute(sql, (arg,)).fetchone()[0]
