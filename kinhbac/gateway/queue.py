"""The durable queue: readings on SQLite in WAL mode, committed in groups with fsync.

A row holds one frame's readings, already encoded as the JSON the uplink publishes: a frame
costs one insert and one delete whatever its size, and nothing is encoded twice.

One thread owns the database. Every request (store these readings, delete those published,
fetch the next ones) goes to it through a queue; it takes everything waiting, runs the writes
in one transaction and commits once (synchronous=FULL: the WAL is fsynced), then answers. So
many nodes' frames share one fsync, and a node hears "durable" only after that fsync.

Duplicates: the node resends what it has no ACK for. Readings of a device arrive in (boot, seq)
order, so the queue keeps each device's high-water mark and stores only readings above it:
a resend is acknowledged again and stored once, whether the first copy is still queued or
already published. The mark is committed with the readings.
"""

import asyncio
import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_WRITES = ("put", "device", "delete", "config_sent")
MAX_GROUP = 512  # requests per transaction: bounds one commit's latency under a flood
CAP_MARGIN = 0.9  # a cap deletion frees down to 90 % of the cap, so it does not run per commit
# Disk space kept free beside the queue for the WAL and checkpoints: a tenth of the filesystem,
# between 64 KiB and 4 MiB. Half of it is held by a ballast file, given up when the disk fills
# anyway (other programs share an SD card), so that deleting the oldest can still be written.
RESERVE_MIN = 64 * 1024
RESERVE_MAX = 4 * 1024 * 1024
PAGE_CACHE_KIB = 2 * 1024  # the queue is written and read in order: little worth caching

SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: the uplink's cursor relies on it
    device TEXT NOT NULL,
    boot INTEGER NOT NULL,                  -- the readings' boot
    first_seq INTEGER NOT NULL,             -- readings first_seq .. first_seq + count - 1
    count INTEGER NOT NULL,
    readings TEXT NOT NULL,                 -- JSON objects, comma-separated, as published
    received_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    mark_boot INTEGER NOT NULL DEFAULT 0,    -- high-water mark of stored readings
    mark_seq INTEGER NOT NULL DEFAULT 0,
    key_id INTEGER, frame_boot INTEGER, frame_counter INTEGER,   -- replay window
    hello TEXT,                              -- the last HELLO, as JSON
    last_seen_ms INTEGER,
    config_sent TEXT                         -- the CONFIG last delivered, as JSON
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class QueueError(Exception):
    """The queue could not take the readings (disk full, database failure); nothing was acked."""


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
    readings: str  # JSON objects, comma-separated
    received_ms: int


@dataclass
class Batch:
    """Readings of one READINGS frame, ready to store: each one's seq and its JSON object."""

    device: str
    readings_boot: int
    readings: list[tuple[int, str]]  # (seq, JSON object), seqs consecutive
    replay: tuple[int, int, int]  # key id, frame boot, frame counter


@dataclass
class Stats:
    depth: int = 0
    oldest_received_ms: int | None = None
    dropped: dict[str, int] = field(default_factory=dict)


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
    ) -> None:
        self.path = Path(path)
        self.disk_cap_bytes = disk_cap_bytes
        self.max_age_s = max_age_s
        self.commit_window_s = commit_window_ms / 1000
        self.on_commit = on_commit
        self.on_drop = on_drop
        self.marks: dict[str, tuple[int, int]] = {}
        self.stats = Stats()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="queue", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_pool = ThreadPoolExecutor(1, thread_name_prefix="queue-read")
        self._page_size = 4096
        self._failed: asyncio.Future | None = None

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
        if self._thread.is_alive():
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            self._requests.put(("close", None, done))
            await done
            self._thread.join(5)
        self._read_pool.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    async def watch(self) -> None:
        """Wait for ever; raise QueueFailed if the database thread dies (for the supervisor)."""
        assert self._failed is not None
        await asyncio.shield(self._failed)

    async def _ask(self, kind: str, payload: Any = None) -> Any:
        assert self._loop is not None
        fut: asyncio.Future = self._loop.create_future()
        self._requests.put((kind, payload, fut))
        return await fut

    # ----- what the gateway asks -----

    async def put(self, batch: Batch) -> int:
        """Store a frame's readings durably; returns how many were new (the rest: duplicates)."""
        return await self._ask("put", batch)

    def note_device(self, device: str, hello: dict[str, Any] | None,
                    replay: tuple[int, int, int]) -> None:
        """Remember a node's HELLO and replay window; saved with the next commit."""
        self._requests.put(("device", (device, hello, replay), None))

    async def fetch(self, after_id: int, limit: int) -> list[Stored]:
        """The oldest readings after `after_id`, read on a connection of their own so that the
        uplink never waits behind the listener's commits (WAL lets readers run alongside)."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._read_pool, self._fetch, after_id, limit)

    def forget(self, ids: list[tuple[int, int]]) -> None:
        """Delete readings the broker has acknowledged, with the next commit. Not awaited: if
        a power cut loses the delete, the readings are published again, harmless duplicates.
        `ids` are (frame id, readings in it)."""
        self._requests.put(("delete", ids, None))

    async def maintain(self) -> Stats:
        """Apply the age limit, refresh the statistics."""
        return await self._ask("maintain")

    async def devices(self) -> dict[str, dict[str, Any]]:
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
            first = self._requests.get()
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
            if writes:
                self._commit(writes)
            for kind, payload, fut in others:
                try:
                    if kind == "close":
                        self._close()
                        self._answer(fut)
                        return
                    self._answer(fut, getattr(self, "_do_" + kind)(payload))
                except Exception as exc:  # answered to the caller, never kills the thread
                    log.exception("queue %s failed", kind)
                    self._answer(fut, error=QueueError(f"{kind} failed: {exc}"))

    def _do_open(self, _: None) -> None:
        fs = os.statvfs(self.path.parent)
        self._reserve = max(RESERVE_MIN, min(RESERVE_MAX, fs.f_blocks * fs.f_frsize // 10))
        self._ballast = self.path.parent / "ballast"
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a commit fsyncs the WAL: acked means on disk
        db.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
        # The WAL is checkpointed (and shrunk) before it outgrows a quarter of the reserve, so it
        # never holds what the disk has no room to copy back.
        self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA wal_autocheckpoint={max(8, self._reserve // 4 // self._page_size)}")
        db.execute(f"PRAGMA journal_size_limit={self._reserve // 4}")
        db.executescript(SCHEMA)
        self._db = db
        for device, mark_boot, mark_seq in db.execute(
            "SELECT device, mark_boot, mark_seq FROM devices"
        ):
            self.marks[device] = (mark_boot, mark_seq)
        for name, value in db.execute("SELECT name, value FROM counters"):
            self.stats.dropped[name] = value
        self._refresh_stats()
        self._place_ballast()

    def _place_ballast(self) -> None:
        size = self._reserve // 2
        if self._ballast.exists() or self._free_bytes() < self._reserve + size:
            return
        with contextlib.suppress(OSError):
            with open(self._ballast, "wb") as f:
                f.write(b"\0" * size)
                os.fsync(f.fileno())

    def _free_bytes(self) -> int:
        fs = os.statvfs(self.path.parent)
        return fs.f_bavail * fs.f_frsize

    def _close(self) -> None:
        if self._db is not None:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None

    def _commit(self, writes: list[tuple[str, Any, asyncio.Future | None]]) -> None:
        db = self._db
        assert db is not None
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        results: list[Any] = []
        marks_before = dict(self.marks)
        try:
            db.execute("BEGIN")
            for kind, payload, _ in writes:
                results.append(getattr(self, "_write_" + kind)(db, payload, now_ms))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self.marks = marks_before
            log.error("commit failed, %d requests refused: %s", len(writes), exc)
            self._relieve_disk(db)
            for _, _, fut in writes:
                self._answer(fut, error=QueueError(str(exc)))
            return
        new_rows = sum(r for r in results if isinstance(r, int))
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, new_rows)
        for (_, _, fut), result in zip(writes, results, strict=True):
            self._answer(fut, result)
        self._enforce_cap(db)

    def _write_put(self, db: sqlite3.Connection, batch: Batch, now_ms: int) -> int:
        mark = self.marks.get(batch.device, (0, 0))
        boot = batch.readings_boot
        fresh = batch.readings
        if (boot, fresh[0][0]) <= mark:  # a resend: keep only what is above the mark
            fresh = [r for r in fresh if (boot, r[0]) > mark]
        if fresh:
            db.execute(
                "INSERT INTO frames (device, boot, first_seq, count, readings, received_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (batch.device, boot, fresh[0][0], len(fresh), ",".join(r[1] for r in fresh),
                 now_ms),
            )
            mark = (boot, fresh[-1][0])
            self.marks[batch.device] = mark
            self.stats.depth += len(fresh)
            if self.stats.oldest_received_ms is None:
                self.stats.oldest_received_ms = now_ms
        key_id, frame_boot, counter = batch.replay
        db.execute(
            "INSERT INTO devices (device, mark_boot, mark_seq, key_id, frame_boot, frame_counter,"
            " last_seen_ms) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device) DO UPDATE SET "
            "mark_boot=excluded.mark_boot, mark_seq=excluded.mark_seq, key_id=excluded.key_id, "
            "frame_boot=excluded.frame_boot, frame_counter=excluded.frame_counter, "
            "last_seen_ms=excluded.last_seen_ms",
            (batch.device, *mark, key_id, frame_boot, counter, now_ms),
        )
        return len(fresh)

    def _write_device(self, db: sqlite3.Connection, payload: Any, now_ms: int) -> None:
        device, hello, (key_id, frame_boot, counter) = payload
        mark = self.marks.get(device, (0, 0))
        db.execute(
            "INSERT INTO devices (device, mark_boot, mark_seq, key_id, frame_boot, frame_counter,"
            " hello, last_seen_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device) DO UPDATE "
            "SET key_id=excluded.key_id, frame_boot=excluded.frame_boot, "
            "frame_counter=excluded.frame_counter, last_seen_ms=excluded.last_seen_ms, "
            "hello=COALESCE(excluded.hello, devices.hello)",
            (device, *mark, key_id, frame_boot, counter,
             json.dumps(hello) if hello is not None else None, now_ms),
        )

    def _write_delete(self, db: sqlite3.Connection, ids: list[tuple[int, int]],
                      now_ms: int) -> None:
        db.executemany("DELETE FROM frames WHERE id = ?", [(i,) for i, _ in ids])
        self.stats.depth = max(0, self.stats.depth - sum(n for _, n in ids))

    def _write_config_sent(self, db: sqlite3.Connection, payload: Any, now_ms: int) -> None:
        device, settings = payload
        db.execute(
            "INSERT INTO devices (device, config_sent) VALUES (?, ?) ON CONFLICT(device) "
            "DO UPDATE SET config_sent=excluded.config_sent",
            (device, settings),
        )

    def _fetch(self, after_id: int, limit: int) -> list[Stored]:
        if self._reader is None:
            self._reader = sqlite3.connect(self.path, check_same_thread=False)
        cursor = self._reader.execute(
            "SELECT id, device, boot, first_seq, count, readings, received_ms FROM frames "
            "WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )
        return [Stored(*r) for r in cursor]

    def _do_devices(self, _: None) -> dict[str, dict[str, Any]]:
        assert self._db is not None
        out = {}
        for device, key_id, frame_boot, counter, hello, last_seen, config_sent in self._db.execute(
            "SELECT device, key_id, frame_boot, frame_counter, hello, last_seen_ms, config_sent "
            "FROM devices"
        ):
            out[device] = {
                "replay": (key_id, frame_boot, counter),
                "hello": json.loads(hello) if hello else None,
                "last_seen_ms": last_seen,
                "config_sent": config_sent,
            }
        return out

    def _do_maintain(self, _: None) -> Stats:
        db = self._db
        assert db is not None
        self._place_ballast()
        cutoff = int(time.time() * 1000) - self.max_age_s * 1000
        expired = db.execute(
            "SELECT 1 FROM frames WHERE received_ms < ? LIMIT 1", (cutoff,)
        ).fetchone()
        if expired:
            self._drop(db, "max_age", "received_ms < ?", (cutoff,))
        self._refresh_stats()
        return self.stats

    def _refresh_stats(self) -> None:
        assert self._db is not None
        depth, oldest = self._db.execute(
            "SELECT COALESCE(SUM(count), 0), MIN(received_ms) FROM frames"
        ).fetchone()
        self.stats.depth = depth
        self.stats.oldest_received_ms = oldest

    # ----- the disk cap -----

    def used_bytes(self) -> int:
        """Pages holding data (free pages are reused, so the file stays about the cap's size)."""
        assert self._db is not None
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._page_size

    def effective_cap(self) -> int:
        """The configured cap, or less when the disk has less room (keeping the reserve).

        The room is the database file (free pages included: they are reused) plus the free
        disk space, less the reserve.
        """
        assert self._db is not None
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        room = pages * self._page_size + self._free_bytes() - self._reserve
        return max(0, min(self.disk_cap_bytes, room))

    def _enforce_cap(self, db: sqlite3.Connection) -> None:
        used = self.used_bytes()
        cap = self.effective_cap()
        if used <= cap:
            return
        reason = "disk_cap" if cap == self.disk_cap_bytes else "disk_full"
        frames = db.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
        if not frames:
            return
        per_frame = used / frames
        excess = used - cap * CAP_MARGIN
        self._drop_oldest(db, reason, min(frames, max(1, int(excess / per_frame) + 1)))

    def _relieve_disk(self, db: sqlite3.Connection) -> None:
        """After a failed commit (the disk filled anyway): give up the ballast, drop a tenth of
        the oldest by the stated policy, and shrink the WAL, so the next commit has room."""
        with contextlib.suppress(FileNotFoundError):
            self._ballast.unlink()
        frames = db.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
        if frames:
            self._drop_oldest(db, "disk_full", max(1, frames // 10))
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _drop_oldest(self, db: sqlite3.Connection, reason: str, frames: int) -> None:
        self._drop(db, reason, "id IN (SELECT id FROM frames ORDER BY id LIMIT ?)", (frames,))
        self._refresh_stats()

    def _drop(self, db: sqlite3.Connection, reason: str, where: str, args: tuple) -> None:
        """Delete the frames `where` selects, counting their readings under `reason`."""
        try:
            db.execute("BEGIN")
            deleted = db.execute(
                f"SELECT COALESCE(SUM(count), 0) FROM frames WHERE {where}", args
            ).fetchone()[0]
            db.execute(f"DELETE FROM frames WHERE {where}", args)
            total = self.stats.dropped.get(reason, 0) + deleted
            db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) "
                "DO UPDATE SET value=excluded.value",
                (reason, total),
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            log.error("could not drop the oldest readings (%s): %s", reason, exc)
            return
        self.stats.dropped[reason] = total
        log.warning("dropped %d queued readings: %s", deleted, reason)
        if self.on_drop is not None:
            self.on_drop(reason, deleted)
