"""The gateway's queue: bytes a reading costs on disk, and how fast a one-hour backlog drains.

    python -m bench.queue_bench                # both parts, about 3 minutes; writes RESULTS.md
    python -m bench.queue_bench --readings 360000   # a tenth of the backlog, for a quick look

1. Bytes per reading: the same readings stored in the queue's layout (the wire's 7 bytes a
   reading beside the frame's identity) and, as the baseline measured in the same run, in the
   first layout (each frame's readings as the JSON it publishes), for frames of 1 to 50
   readings. Used pages of the database, free pages excluded.
2. A one-hour broker outage at 1,000 readings/s (3.6 million readings from 50 nodes in
   20-reading frames) sits in the queue; the gateway (`kinhbac gateway run`, real defaults but
   the ports) starts with the broker down, the broker comes back after the outage's backoff
   has grown, and a subscriber counts each (device, seq) once. Measured from the broker's
   return: the first reading at the subscriber, and the last; nothing may be missing or
   dropped.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho

from bench.gateway_bench import RESULTS, describe_machine, free_port, scrape_metrics
from kinhbac.broker import LocalBroker
from kinhbac.gateway.queue import Batch, Queue, Stored
from kinhbac.gateway.telemetry import ReadingsEncoder

BEGIN = "<!-- queue-bench:begin (written by python -m bench.queue_bench) -->"
END = "<!-- queue-bench:end -->"
SENSORS = '[["temperature","C"],["humidity","%RH"],["pressure","Pa"],["level","m"]]'
FRAME_SIZES = (1, 5, 20, 50)
SIZE_READINGS = 200_000  # per layout and frame size
BACKLOG_NODES = 50
OUTAGE_S = 12.0  # broker down before it returns: the reconnect backoff has grown by then
DRAIN_TIMEOUT_S = 900.0
TARGET_BYTES = 16.0
TARGET_HOURS = 8.0  # of 1,000 readings/s, in the default cap of a small (8 GB) card


def batch(device: str, first_seq: int, count: int) -> Batch:
    readings = b"".join(struct.pack(">BHf", i % 4, i * 50, 20.0 + (first_seq + i) % 97 / 7)
                        for i in range(count))
    return Batch(device=device, readings_boot=1, first_seq=first_seq, count=count,
                 base_ms=1_800_000_000_000 + first_seq * 50, flags=0, readings=readings,
                 sensors=SENSORS, replay=(1, 1, first_seq))


async def fill(path: Path, total: int, frame: int, devices: int) -> Queue:
    """`total` readings in `frame`-reading frames from `devices` nodes, in arrival order."""
    queue = Queue(path, disk_cap_bytes=64 * 1024**3, max_age_s=30 * 86400,
                  commit_window_ms=0)
    await queue.open()
    seqs = [1] * devices
    pending = []
    stored = 0
    while stored < total:
        d = (stored // frame) % devices
        pending.append(queue.submit(batch(f"6271{d:012x}", seqs[d], frame)))
        seqs[d] += frame
        stored += frame
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    return queue


async def stored_frames(queue: Queue) -> list[Stored]:
    """Every frame of the queue, read back as the uplink reads them."""
    frames: list[Stored] = []
    while batch := await queue.fetch(frames[-1].id if frames else 0, 10_000):
        frames += batch
    return frames


def first_layout_bytes(frames: list[Stored], out: Path) -> tuple[int, int]:
    """The same readings in the first layout (JSON text per frame, as published): bytes used
    and readings stored."""
    encoder = ReadingsEncoder()
    db = sqlite3.connect(out)
    db.executescript("""
        PRAGMA journal_mode=WAL;
        CREATE TABLE frames (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL,
            boot INTEGER NOT NULL, first_seq INTEGER NOT NULL, count INTEGER NOT NULL,
            readings TEXT NOT NULL, received_ms INTEGER NOT NULL);
    """)
    with db:
        db.executemany(
            "INSERT INTO frames (device, boot, first_seq, count, readings, received_ms) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            ((s.device, s.boot, s.first_seq, s.count, encoder.encode(s), s.received_ms)
             for s in frames))
    readings = db.execute("SELECT SUM(count) FROM frames").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    return (pages - free) * size, readings


async def measure_sizes(work: Path, readings: int) -> list[dict]:
    out = []
    for frame in FRAME_SIZES:
        folder = work / f"size-{frame}"
        folder.mkdir()
        queue = await fill(folder / "queue.sqlite3", readings, frame, 20)
        used, depth = queue.used_bytes(), queue.stats.depth
        frames = await stored_frames(queue)
        await queue.close()
        old_used, old_readings = first_layout_bytes(frames, folder / "v1.db")
        assert old_readings == depth
        out.append({"frame": frame, "readings": depth, "bytes": used / depth,
                    "first_layout_bytes": old_used / depth})
        shutil.rmtree(folder)
        print(f"[queue-bench] {frame:>2}-reading frames: {used / depth:.1f} bytes a reading "
              f"(first layout {old_used / depth:.1f})", flush=True)
    return out


class Counter:
    """A subscriber that marks each (device, seq) it receives, once."""

    def __init__(self, port: int, expected: dict[str, int]) -> None:
        self.seen = {d: bytearray(n + 1) for d, n in expected.items()}
        self.unique = 0
        self.duplicates = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=f"queue-bench-{os.getpid()}", clean_session=False)
        self.client.on_connect = lambda c, *_: c.subscribe("kinhbac/bench/+/telemetry", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        payload = json.loads(msg.payload)
        seen = self.seen[payload["device"]]
        now = time.monotonic()
        with self.lock:
            if self.first_at is None:
                self.first_at = now
            for r in payload["readings"]:
                if seen[r["seq"]]:
                    self.duplicates += 1
                else:
                    seen[r["seq"]] = 1
                    self.unique += 1
            self.last_at = now

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def drain_backlog(work: Path, readings: int) -> dict:
    data = work / "gateway"
    data.mkdir()
    print(f"[queue-bench] filling the queue with {readings:,} readings ...", flush=True)
    started = time.monotonic()

    async def prefill() -> int:
        queue = await fill(data / "queue.sqlite3", readings, 20, BACKLOG_NODES)
        depth = queue.stats.depth
        await queue.close()
        return depth

    depth = asyncio.run(prefill())
    fill_s = time.monotonic() - started
    db_bytes = sum(f.stat().st_size for f in data.glob("queue.sqlite3*"))  # not the ballast
    per_device = readings // BACKLOG_NODES
    expected = {f"6271{d:012x}": per_device for d in range(BACKLOG_NODES)}
    keys = work / "keys.json"
    keys.write_text('{"devices": []}')
    metrics_port = free_port()
    broker_port = free_port()
    config = work / "gateway.toml"
    config.write_text("\n".join([
        'site = "bench"', 'gateway_id = "bench"', 'listen_host = "127.0.0.1"',
        f"listen_port = {free_port()}", f"data_dir = {json.dumps(str(data))}",
        f"key_file = {json.dumps(str(keys))}", f"metrics_port = {metrics_port}",
        "[mqtt]", f"port = {broker_port}", ""]))
    log = open(work / "gateway.log", "wb")
    gateway = subprocess.Popen([sys.executable, "-m", "kinhbac.cli", "gateway", "run", "-c",
                                str(config)], stdout=log, stderr=log)
    broker = LocalBroker(work / "broker", port=broker_port, persistence=True)
    try:
        time.sleep(OUTAGE_S)  # the gateway retries, its backoff grows
        broker.start()
        back_at = time.monotonic()
        counter = Counter(broker.port, expected)
        deadline = back_at + DRAIN_TIMEOUT_S
        while counter.unique < depth and time.monotonic() < deadline and gateway.poll() is None:
            time.sleep(0.5)
        m = scrape_metrics(metrics_port)
        counter.close()
        dropped = sum(v for k, v in m.items() if k.startswith("kinhbac_gateway_readings_drop")
                      and k.endswith("}"))
        return {
            "readings": depth, "fill_s": fill_s, "db_bytes": db_bytes,
            "bytes_per_reading_file": db_bytes / depth, "outage_s": OUTAGE_S,
            "first_after_s": None if counter.first_at is None else counter.first_at - back_at,
            "drained_after_s": None if counter.last_at is None else counter.last_at - back_at,
            "received": counter.unique, "duplicates": counter.duplicates,
            "missing": depth - counter.unique, "dropped": dropped,
            "broker": broker.describe(),
        }
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(60)
        except subprocess.TimeoutExpired:
            gateway.kill()
        broker.stop()
        log.close()


def report(sizes: list[dict], drain: dict, machine: list[tuple[str, str]]) -> str:
    twenty = next(s for s in sizes if s["frame"] == 20)
    cap = 2 * 1024**3  # the default cap of an 8 GB card
    hours = cap / twenty["bytes"] / 1000 / 3600
    lines = [BEGIN, "# Gateway queue benchmark", "",
             "Written by `python -m bench.queue_bench` (part of `make bench`).", "",
             "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine]
    lines += ["", "## Bytes a reading costs on disk", "",
              f"{twenty['readings']:,} readings for each frame size, from 20 nodes; used pages "
              "of the database (free pages excluded). The first layout, measured in the same "
              "run from the same readings, is the baseline.", "",
              "| Readings per frame | Queue (bytes/reading) | First layout (bytes/reading) | "
              "Ratio |", "|---:|---:|---:|---:|"]
    for s in sizes:
        lines.append(f"| {s['frame']} | {s['bytes']:.1f} | {s['first_layout_bytes']:.1f} | "
                     f"{s['first_layout_bytes'] / s['bytes']:.1f}x |")
    met = "met" if twenty["bytes"] <= TARGET_BYTES else "NOT met"
    lines += ["", f"Target: at most {TARGET_BYTES:.0f} bytes a reading in 20-reading frames: "
              f"{twenty['bytes']:.1f}, {met}. The default cap (a quarter of the disk) on an "
              f"8 GB card is 2 GiB: {hours:.0f} hours of 1,000 readings/s (target "
              f"{TARGET_HOURS:.0f}, {'met' if hours >= TARGET_HOURS else 'NOT met'}); 512 MiB "
              f"hold {512 * 1024**2 / twenty['bytes'] / 1000 / 3600:.1f} hours. Single-reading "
              "frames (a node that sends each reading at once) cost the row's identity per "
              "reading; a backlog builds up from full frames, since nodes batch what waits.",
              "", "## Draining a one-hour outage", "",
              f"{drain['readings']:,} readings ({hours_of(drain['readings'])} of 1,000 "
              f"readings/s) from "
              f"{BACKLOG_NODES} nodes in 20-reading frames, queued ({drain['db_bytes'] / 1e6:.1f} "
              f"MB of files, {drain['bytes_per_reading_file']:.1f} bytes a reading; filled in "
              f"{drain['fill_s']:.0f} s). The gateway starts with the broker down; the broker "
              f"({drain['broker']}) comes back after {drain['outage_s']:.0f} s.", "",
              "| Measure | Value |", "|---|---:|"]
    first = drain["first_after_s"]
    last = drain["drained_after_s"]
    rate = drain["received"] / (last - first) if first is not None and last else 0.0
    lines += [
        f"| First reading at the subscriber after the broker is back | "
        f"{'-' if first is None else f'{first:.1f} s'} |",
        f"| Whole backlog at the subscriber after the broker is back | "
        f"{'-' if last is None else f'{last:.1f} s'} |",
        f"| Drain rate, first to last reading | {'-' if not rate else f'{rate:,.0f} readings/s'} |",
        f"| Readings received (each once) / missing | {drain['received']:,} / "
        f"{drain['missing']:,} |",
        f"| Duplicates received | {drain['duplicates']:,} |",
        f"| Readings dropped by the gateway | {drain['dropped']:,.0f} |",
        "", "The uplink builds each reading's JSON as it publishes (the queue keeps wire "
        "bytes), so at the gateway benchmark's max load the nodes are acknowledged faster than "
        "the broker is fed and the queue takes up the difference: see 'acked at the nodes' "
        "against 'end to end' above.", "", END, ""]
    return "\n".join(lines)


def hours_of(readings: int) -> str:
    hours = readings / 3.6e6
    return "an hour" if hours == 1 else f"{hours:.2g} hours"


def write_results(section: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + section + rest.split(END, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.queue_bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--readings", type=int, default=3_600_000, help="backlog to drain")
    p.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="queue-bench-", dir=Path.home()) as tmp:
        work = Path(tmp)
        sizes = asyncio.run(measure_sizes(work, SIZE_READINGS))
        drain = drain_backlog(work, a.readings)
        with LocalBroker(work / "describe") as b:
            machine = describe_machine(work, b)
    print(json.dumps({"sizes": sizes, "drain": drain}, indent=1))
    section = report(sizes, drain, machine)
    if not a.no_write:
        write_results(section)
    print(section)
    ok = drain["missing"] == 0 and drain["dropped"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
