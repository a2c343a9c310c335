"""The gateway's durable queue on its own, under a disk that fails as an ageing SD card does."""

import asyncio
import logging
import struct

import pytest
from helpers.faulty_disk import FaultyDisk

from kinhbac.gateway.queue import REDO_RETRY_S, Batch, Queue, QueueError

SENSORS = '[["temperature","C"],["humidity","%RH"]]'


def batch(first_seq, count=20, *, device="6b62000000000001", boot=1, after=None):
    readings = b"".join(struct.pack(">BHf", i % 2, i * 50, 20.0 + i) for i in range(count))
    return Batch(device=device, readings_boot=boot, first_seq=first_seq, count=count,
                 base_ms=1_800_000_000_000, flags=0, readings=readings, sensors=SENSORS,
                 replay=(1, boot, first_seq), after=after)


def run(tmp_path, body, **settings):
    async def main():
        queue = Queue(tmp_path / "queue.sqlite3", disk_cap_bytes=settings.pop("cap", 0),
                      max_age_s=3600, **settings)
        await queue.open()
        try:
            return await body(queue)
        finally:
            await queue.close()

    return asyncio.run(main())


async def stored_seqs(queue):
    return [(r.device, r.boot, s) for r in await queue.fetch(0, 10_000)
            for s in range(r.first_seq, r.first_seq + r.count)]


@pytest.fixture
def disk():
    with FaultyDisk() as d:
        yield d


def test_a_batch_after_one_that_failed_to_commit_is_refused_until_the_resend_is_stored(
        tmp_path, disk):
    async def body(queue):
        assert await queue.put(batch(1)) == 20
        disk.fail_syncs(1, stall_s=0.1)
        with pytest.raises(QueueError) as failed:
            await queue.put(batch(21, after=(1, 20)))
        assert failed.value.reason == "io_error"
        # The node's next pipelined batch: storing it would move the mark over 21..40, and the
        # node's resend of 21..40 would then be taken for a duplicate and never stored.
        with pytest.raises(QueueError) as refused:
            await queue.put(batch(41, after=(1, 40)))
        assert refused.value.reason == "earlier_refused"
        assert queue.marks["6b62000000000001"] == (1, 20)
        # The node resends from its last ACK on a new connection: all of it is stored.
        assert await queue.put(batch(21)) == 20
        assert await queue.put(batch(41, after=(1, 40))) == 20
        assert await stored_seqs(queue) == [("6b62000000000001", 1, s) for s in range(1, 61)]

    run(tmp_path, body)


def test_a_resend_is_stored_once_and_acknowledged_again(tmp_path):
    async def body(queue):
        assert await queue.put(batch(1)) == 20
        assert await queue.put(batch(1)) == 0
        assert await queue.put(batch(11, count=20)) == 10  # half resent, half new
        rows = await queue.fetch(0, 100)
        assert [(r.first_seq, r.count) for r in rows] == [(1, 20), (21, 10)]
        # The new half keeps its own readings: offsets and values of seqs 21..30.
        assert rows[1].readings == batch(11).readings[10 * 7:]

    run(tmp_path, body)


def test_deletes_lost_with_a_failed_commit_are_redone(tmp_path, disk):
    async def body(queue):
        await queue.put(batch(1))
        await queue.put(batch(21, after=(1, 20)))
        first = (await queue.fetch(0, 1))[0]
        disk.fail_syncs(1)
        queue.forget([(first.id, first.count)])
        await queue.maintain()  # after the failed commit of the delete
        assert disk.failed_syncs == 1
        await asyncio.sleep(REDO_RETRY_S * 4)
        stats = await queue.maintain()
        assert stats.depth == 20
        assert [r.first_seq for r in await queue.fetch(0, 10)] == [21]

    run(tmp_path, body)


def test_an_io_error_deletes_nothing_and_logs_once(tmp_path, disk, caplog):
    caplog.set_level(logging.INFO, logger="kinhbac.gateway.queue")

    async def body(queue):
        for i in range(50):
            await queue.put(batch(1 + 20 * i, after=(1, 20 * i) if i else None))
        disk.fail_syncs(3)
        for _ in range(3):
            with pytest.raises(QueueError):
                await queue.put(batch(1001))
        assert await queue.put(batch(1001)) == 20
        assert (await queue.maintain()).depth == 1020
        assert queue.stats.dropped == {}
        assert queue.stats.storage_faults == {"io_error": 3}

    run(tmp_path, body)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "I/O error" in errors[0].getMessage(), errors
    assert any("works again" in r.getMessage() and "3 failed commits" in r.getMessage()
               for r in caplog.records)


def test_a_full_disk_refuses_new_frames_and_deletes_nothing_queued(tmp_path, disk):
    async def body(queue):
        for i in range(10):
            await queue.put(batch(1 + 20 * i))
        disk.fill()
        for _ in range(3):
            with pytest.raises(QueueError) as full:
                await queue.put(batch(201))
            assert full.value.reason == "disk_full"
        disk.free()
        await asyncio.sleep(1.2)  # refused without a try for a second after a full disk
        assert await queue.put(batch(201)) == 20
        assert (await queue.maintain()).depth == 220
        assert queue.stats.dropped == {}

    run(tmp_path, body)


def test_disk_cap_drops_only_the_oldest_excess_and_names_them(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="kinhbac.gateway.queue")
    cap = 256 * 1024
    events = []

    async def body(queue):
        seq = {d: 1 for d in ("6b62000000000001", "6b62000000000002")}
        for _ in range(1200):
            for device in seq:
                await queue.put(batch(seq[device], device=device))
                seq[device] += 20
        stats = await queue.maintain()
        assert 0.95 * cap <= queue.used_bytes() <= cap  # full, but not over
        assert stats.depth == 48_000 - stats.dropped["disk_cap"]
        # Each drop took little more than the excess of one commit: a few frames, a small
        # share of what the cap holds, not a tenth of the queue.
        assert events and max(events) < 0.05 * stats.depth, (max(events), stats.depth)
        kept = await queue.fetch(0, 100_000)
        first = {r.device: r.first_seq for r in reversed(kept)}
        assert all(s > 1 for s in first.values())  # the oldest went ...
        for device in seq:  # ... and what is left has no hole
            seqs = [s for r in kept if r.device == device
                    for s in range(r.first_seq, r.first_seq + r.count)]
            assert seqs == list(range(seqs[0], seq[device]))

    run(tmp_path, body, cap=cap, on_drop=lambda reason, n: events.append(n))
    drops = [r.getMessage() for r in caplog.records if "disk_cap" in r.getMessage()]
    # Logged once with the readings it took (then gathered into a line a minute).
    assert len(drops) == 1 and "6b62000000000001 boot 1 seq 1-" in drops[0], drops


def test_a_reading_costs_at_most_16_bytes_on_disk_in_20_reading_frames(tmp_path):
    async def body(queue):
        for d in range(20):  # 20 nodes, 100,000 readings
            device = f"6b6200000000{d:04x}"
            for i in range(250):
                await queue.put(batch(1 + 20 * i, device=device))
        stats = await queue.maintain()
        assert stats.depth == 100_000
        return queue.used_bytes() / stats.depth

    per_reading = run(tmp_path, body)
    assert per_reading <= 16, per_reading


def test_a_node_that_keeps_changing_its_sensor_table_cannot_grow_the_queue_without_bound(
        tmp_path):
    async def body(queue):
        for i in range(300):  # a new table with every batch, as a HELLO before each would give
            b = batch(1 + 20 * i, after=(1, 20 * i) if i else None)
            b.sensors = f'[["t{i}","C"]]'
            await queue.put(b)
            if i % 100 == 99:  # the broker takes all but the newest batch
                rows = await queue.fetch(0, 1000)
                queue.forget([(r.id, r.count) for r in rows[:-1]])
        await queue.maintain()
        assert len(queue._sensor_refs) <= 4 + 64
        rows = await queue.fetch(0, 1000)
        # What is still queued keeps its own table: its readings are named as they came.
        assert rows[-1].sensors == '[["t299","C"]]'
        again = batch(6001, after=(1, 6000))
        again.sensors = '[["t0","C"]]'  # a table that was forgotten comes back
        await queue.put(again)
        assert (await queue.fetch(rows[-1].id, 10))[0].sensors == '[["t0","C"]]'

    run(tmp_path, body)


V1_SCHEMA = """
CREATE TABLE frames (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL,
    boot INTEGER NOT NULL, first_seq INTEGER NOT NULL, count INTEGER NOT NULL,
    readings TEXT NOT NULL, received_ms INTEGER NOT NULL);
CREATE TABLE devices (device TEXT PRIMARY KEY, mark_boot INTEGER NOT NULL DEFAULT 0,
    mark_seq INTEGER NOT NULL DEFAULT 0, key_id INTEGER, frame_boot INTEGER,
    frame_counter INTEGER, hello TEXT, last_seen_ms INTEGER, config_sent TEXT);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def test_an_upgrade_converts_a_queue_of_the_earlier_layout_without_losing_a_reading(tmp_path):
    """The first layout kept each frame's readings as the JSON it publishes; what the uplink
    publishes from the converted queue is the same text."""
    import sqlite3

    from kinhbac.gateway.telemetry import ReadingsEncoder, reading_json

    t, h = ('"temperature"', '"C"'), ('"humidity"', '"%RH"')
    synced = ",".join(reading_json(5 + i, (t, h)[i % 2], struct.unpack(">f", struct.pack(
        ">f", 20.1 + i))[0], 1_800_000_000_000 + 100 * i, False, i > 0) for i in range(3))
    synced = synced.replace('"pre_sync":false', '"pre_sync":true')  # one batch, one flag
    unsynced = ",".join([reading_json(9, t, float("nan"), 65_000, True, False),
                         reading_json(10, ('"sensor7"', '""'), 1.5, 64_000, True, False)])
    with sqlite3.connect(tmp_path / "queue.sqlite3") as old:
        old.executescript(V1_SCHEMA)
        old.execute("INSERT INTO devices VALUES ('6b62000000000001', 1, 10, 1, 1, 77, NULL, 1, "
                    "NULL)")
        old.execute("INSERT INTO frames VALUES (41, '6b62000000000001', 1, 5, 3, ?, 123)",
                    (synced,))
        old.execute("INSERT INTO frames VALUES (42, '6b62000000000001', 1, 9, 2, ?, 124)",
                    (unsynced,))
        old.execute("INSERT INTO counters VALUES ('disk_cap', 12)")

    async def body(queue):
        rows = await queue.fetch(0, 10)
        encoder = ReadingsEncoder()
        assert [(r.id, r.first_seq, r.count, r.received_ms) for r in rows] == [
            (41, 5, 3, 123), (42, 9, 2, 124)]
        assert [encoder.encode(r) for r in rows] == [synced, unsynced]
        assert queue.marks == {"6b62000000000001": (1, 10)}
        assert queue.stats.dropped == {"disk_cap": 12}
        windows = (await queue.devices())["6b62000000000001"]["windows"]
        assert await queue.put(batch(9, count=5)) == 3  # the mark still dedups
        return windows

    assert run(tmp_path, body) == {1: (1, 77)}  # the replay window came along


def test_the_queue_files_are_the_gateways_alone(tmp_path):
    import os
    import stat

    async def body(queue):
        await queue.put(batch(1))

    old = os.umask(0o022)  # a permissive umask, as a hand-started gateway may have
    try:
        run(tmp_path, body)
    finally:
        os.umask(old)
    for name in ("queue.sqlite3",):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode & 0o077 == 0, oct(mode)


V2_SCHEMA = """
CREATE TABLE frames (id INTEGER PRIMARY KEY AUTOINCREMENT, device INTEGER NOT NULL,
    boot INTEGER NOT NULL, first_seq INTEGER NOT NULL, count INTEGER NOT NULL,
    base_ms INTEGER NOT NULL, flags INTEGER NOT NULL, sensors INTEGER NOT NULL,
    received_ms INTEGER NOT NULL, readings BLOB NOT NULL);
CREATE TABLE devices (ref INTEGER PRIMARY KEY, device TEXT NOT NULL UNIQUE,
    mark_boot INTEGER NOT NULL DEFAULT 0, mark_seq INTEGER NOT NULL DEFAULT 0,
    key_id INTEGER, frame_boot INTEGER, frame_counter INTEGER, hello TEXT,
    last_seen_ms INTEGER, config_sent TEXT);
CREATE TABLE sensor_tables (ref INTEGER PRIMARY KEY, sensors TEXT NOT NULL UNIQUE);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
PRAGMA user_version=2;
"""


def test_an_upgrade_moves_the_replay_windows_of_a_second_layout_queue_to_their_own_table(
        tmp_path):
    """The second layout kept one replay window per device, in its row."""
    import sqlite3

    readings = batch(1, count=3).readings
    with sqlite3.connect(tmp_path / "queue.sqlite3") as old:
        old.executescript(V2_SCHEMA)
        old.execute("INSERT INTO sensor_tables VALUES (1, ?)", (SENSORS,))
        old.execute("INSERT INTO devices VALUES (1, '6b62000000000001', 4, 3, 1, 4, 9, "
                    "'{\"fw_version\": \"0.1.0\"}', 100, '{\"interval_ms\": 200}')")
        old.execute("INSERT INTO devices VALUES (2, '6b62000000000002', 0, 0, NULL, NULL, NULL, "
                    "NULL, NULL, NULL)")  # known, never a frame saved
        old.execute("INSERT INTO frames VALUES (7, 1, 4, 1, 3, 5, 0, 1, 123, ?)", (readings,))

    async def body(queue):
        devices = await queue.devices()
        assert devices["6b62000000000001"] == {
            "windows": {1: (4, 9)}, "hello": {"fw_version": "0.1.0"}, "last_seen_ms": 100,
            "config_sent": '{"interval_ms": 200}'}
        assert devices["6b62000000000002"]["windows"] == {}
        [row] = await queue.fetch(0, 10)
        assert (row.id, row.device, row.first_seq, row.readings) == (
            7, "6b62000000000001", 1, readings)
        assert await queue.put(batch(1, count=5, boot=4)) == 2  # the mark came along

    run(tmp_path, body)
    with sqlite3.connect(tmp_path / "queue.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (3,)
        columns = [r[1] for r in db.execute("PRAGMA table_info(devices)")]
        assert "key_id" not in columns and "frame_counter" not in columns


def test_replay_windows_are_kept_per_device_and_key_id_and_only_move_forward(tmp_path):
    device = "6b62000000000001"

    async def body(queue):
        await queue.put(batch(1, boot=3))  # key id 1, boot 3, counter 1
        queue.note_device(device, None, (1, 3, 5))
        queue.note_device(device, None, (1, 3, 4))  # behind: never moves the window back
        queue.note_window(device, (0xFFFF, 1 << 30, 2))  # a CLAIM under its id
        queue.note_window("6b620000000000ff", (0xFFFF, 1, 1))  # a board that is no device
        queue.note_device(device, None, (2, 1, 1))  # re-provisioned: key id 2
        await queue.maintain()  # after the commit of the notes
        queue.forget_window("6b620000000000ff", 0xFFFF)
        queue.note_window("6b620000000000fe", (0xFFFF, 1, 1))
        queue.forget_window("6b620000000000fe", 0xFFFF)  # noted and forgotten in one commit

    run(tmp_path, body)

    async def reopened(queue):
        return await queue.devices(), queue.marks

    devices, marks = run(tmp_path, reopened)
    assert devices == {device: {"windows": {1: (3, 5), 0xFFFF: (1 << 30, 2), 2: (1, 1)},
                                "hello": None, "last_seen_ms": devices[device]["last_seen_ms"],
                                "config_sent": None}}
    assert marks == {device: (3, 20)}  # the claim window moved none of the device's own


def test_window_notes_of_a_failed_commit_are_saved_with_the_next(tmp_path, disk):
    async def body(queue):
        await queue.put(batch(1))
        disk.fail_syncs(1)
        queue.note_window("6b620000000000ff", (0xFFFF, 7, 3))
        await queue.maintain()  # after the failed commit
        assert disk.failed_syncs == 1
        await asyncio.sleep(REDO_RETRY_S * 4)
        return (await queue.devices())["6b620000000000ff"]["windows"]

    assert run(tmp_path, body) == {0xFFFF: (7, 3)}


def test_the_backlog_stays_exact_when_a_published_frame_is_deleted_twice(tmp_path):
    # The gateway's status reports the depth kept in memory (maintain() no longer counts every
    # frame), so a delete that finds its frame gone already (acknowledged in an earlier session
    # and sent again, or dropped by the cap meanwhile) must take nothing off it.
    async def body(queue):
        assert queue.backlog() == (0, None)
        await queue.put(batch(1))
        first_stored = queue.backlog()[1]
        await asyncio.sleep(0.01)  # the second frame is stored a little later
        await queue.put(batch(21, after=(1, 20)))
        first, second = await queue.fetch(0, 10)
        assert queue.backlog() == (40, first.received_ms) and first_stored == first.received_ms
        queue.forget([(first.id, first.count)])
        queue.forget([(first.id, first.count)])
        stats = await queue.maintain()
        assert stats.depth == 20
        assert queue.backlog() == (20, second.received_ms)
        assert second.received_ms > first.received_ms
        queue.forget([(second.id, second.count)])
        await queue.maintain()
        assert queue.backlog() == (0, None)

    run(tmp_path, body)


def test_a_reopened_queue_counts_what_it_holds(tmp_path):
    async def fill(queue):
        await queue.put(batch(1))
        await queue.put(batch(1, device="6b62000000000002"))
        return (await queue.fetch(0, 1))[0].received_ms

    oldest = run(tmp_path, fill)

    async def reopened(queue):
        return queue.backlog()

    assert run(tmp_path, reopened) == (40, oldest)
