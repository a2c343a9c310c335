"""Load generator: many simulated sensor nodes, one TCP connection each, speaking the wire codec.

Each node has its own identity (8-byte device id, key id 1, 32-byte secret), sends HELLO,
takes the gateway's clock from the ACK, then sends READINGS batches of consecutive seqs with a
synced Unix base time, either as fast as ACKs allow (a window of frames in flight per node) or
paced so that all nodes together send a target number of readings per second. It records,
per frame, the time from the send to the ACK that covers it (ACKs are cumulative), and counts
the readings acknowledged. A node that gets an ERROR frame or loses its connection reconnects,
says HELLO again and resends its unacknowledged batches (same seqs, new frame counters), as
the firmware does.

    python -m bench.loadgen --port 7878 --keys run/bench/keys.json --nodes 200 --duration 20
    python -m bench.loadgen --port 7878 --keys run/bench/keys.json --rate 5000

The key file (written when missing) is what the receiving side needs to verify the nodes.
Results are printed as one JSON object (and written to --json-out); times are
time.monotonic(), which is one clock for every process on Linux, so a harness can line the
measurement window up with what it observed elsewhere.
"""

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from kinhbac import wire

KEY_ID = 1
SENSORS = [("temperature", "C"), ("humidity", "%RH"), ("pressure", "Pa"), ("level", "m")]
FW_VERSION = "bench-1"
READING_SPACING_MS = 20  # offset between consecutive readings of a batch
HELLO_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Identity:
    device_id: bytes
    secret: bytes

    @property
    def key(self) -> wire.Key:
        return wire.Key(self.device_id, KEY_ID, self.secret)

    @property
    def device(self) -> str:
        return wire.device_hex(self.device_id)


def make_identities(n: int) -> list[Identity]:
    """n fresh nodes: random device ids (prefix "lg") and random 32-byte secrets."""
    ids: set[bytes] = set()
    out = []
    while len(out) < n:
        device_id = b"lg" + os.urandom(6)
        if device_id in ids:
            continue
        ids.add(device_id)
        out.append(Identity(device_id, os.urandom(32)))
    return out


def write_key_file(path: Path, identities: list[Identity]) -> None:
    """The keys a receiver needs: {"devices": [{device_id, key_id, secret}]} in hex."""
    rows = [
        {"device_id": i.device, "key_id": KEY_ID, "secret": i.secret.hex()} for i in identities
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"devices": rows}, indent=1))
    os.chmod(tmp, 0o600)  # secrets
    tmp.replace(path)


def read_key_file(path: Path) -> list[Identity]:
    rows = json.loads(Path(path).read_text())["devices"]
    return [Identity(bytes.fromhex(r["device_id"]), bytes.fromhex(r["secret"])) for r in rows]


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class LoadSettings:
    host: str
    port: int
    batch: int = 50
    window: int = 4
    rate: float = 0.0  # readings/s over all nodes; 0: as fast as ACKs allow
    duration: float = 20.0  # sending time, warm-up included
    warmup: float = 3.0  # the start of the run left out of the measurement
    drain: float = 10.0  # after sending stops, how long to wait for outstanding ACKs
    ramp: float = 1.0  # nodes connect spread over this many seconds
    boot: int = 1


@dataclass
class Stats:
    window_start: float = 0.0
    window_end: float = 0.0
    acked_total: int = 0  # readings
    acked_in_window: int = 0  # readings whose ACK arrived inside the window
    sent_readings: int = 0  # readings in first sends (resends not counted)
    frames_sent: int = 0
    frames_resent: int = 0
    latencies: list[float] = field(default_factory=list)  # s, frames sent inside the window
    errors: Counter = field(default_factory=Counter)
    reconnects: int = 0
    hellos_acked: int = 0
    clock_offsets_ms: list[float] = field(default_factory=list)
    late_sends: int = 0  # paced mode: sends more than 10 ms behind schedule
    max_lag_ms: float = 0.0
    configs: int = 0


class _Batch:
    __slots__ = ("base_ms", "count", "first_seq", "measured", "sent_at")

    def __init__(self, first_seq: int, count: int, base_ms: int) -> None:
        self.first_seq = first_seq
        self.count = count
        self.base_ms = base_ms
        self.sent_at = 0.0
        self.measured = False

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1


class _Reset(Exception):
    """Drop the connection and start again with HELLO."""


class SimNode:
    """One node: its own key, boot, counters and batches in flight, over one connection."""

    def __init__(self, ident: Identity, index: int, n_nodes: int, cfg: LoadSettings,
                 stats: Stats) -> None:
        self.ident = ident
        self.key = ident.key
        self.cfg = cfg
        self.stats = stats
        self.index = index
        self.n_nodes = n_nodes
        self.guard = wire.DownlinkGuard(cfg.boot)
        self.writer_buf = wire.ReadingsWriter(self.key)
        self.next_seq = 1
        self.inflight: deque[_Batch] = deque()
        self.resend: deque[_Batch] = deque()
        self.clock_offset_ms = 0.0
        self.space = asyncio.Event()
        self.all_acked = asyncio.Event()
        self.all_acked.set()
        rnd = random.Random(ident.device_id)
        self.values = [rnd.uniform(0.0, 100.0) for _ in range(cfg.batch)]

    def _lookup(self, device_id: bytes, key_id: int) -> wire.Key | int | None:
        if device_id != self.key.device_id:
            return None
        return self.key if key_id == KEY_ID else wire.UNKNOWN_KEY

    def _encode(self, b: _Batch) -> bytes:
        w = self.writer_buf
        w.begin(self.cfg.boot, b.first_seq, b.base_ms)
        n_sensors = len(SENSORS)
        values = self.values
        for i in range(b.count):
            w.add(i % n_sensors, i * READING_SPACING_MS, values[i] + (b.first_seq & 7))
        # bytes(): the writer's buffer is reused for the next frame; a transport may keep a view.
        return bytes(w.finish(self.cfg.boot, self.guard.next_counter()))

    async def _read_frame(self, reader: asyncio.StreamReader) -> wire.Message:
        header = await reader.readexactly(wire.HEADER_SIZE)
        length = wire.frame_length(header)
        frame = header + await reader.readexactly(length - wire.HEADER_SIZE)
        return wire.decode(frame, self._lookup, self.guard, True)

    async def run(self, start: float, stop_sending: float, give_up: float) -> None:
        """Connect, send until stop_sending, wait for the last ACKs until give_up."""
        await asyncio.sleep(max(0.0, start + self.cfg.ramp * self.index / self.n_nodes
                                - time.monotonic()))
        backoff = 0.1
        while time.monotonic() < give_up:
            if time.monotonic() >= stop_sending and not self.inflight and not self.resend:
                return
            try:
                await self._session(start, stop_sending, give_up)
                return
            except (TimeoutError, _Reset, OSError, asyncio.IncompleteReadError, wire.FrameError) as e:
                if isinstance(e, wire.FrameError):
                    self.stats.errors["local_" + e.name] += 1
                elif isinstance(e, asyncio.TimeoutError):
                    self.stats.errors["timeout"] += 1
                elif not isinstance(e, _Reset):
                    self.stats.errors[type(e).__name__] += 1
                self.stats.reconnects += 1
                # Unacknowledged batches go again, oldest first, after a new HELLO.
                self.resend.extendleft(reversed(self.inflight))
                self.inflight.clear()
                await asyncio.sleep(min(backoff, max(0.0, give_up - time.monotonic())))
                backoff = min(backoff * 2, 2.0)

    async def _session(self, start: float, stop_sending: float, give_up: float) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.cfg.host, self.cfg.port), CONNECT_TIMEOUT_S
        )
        try:
            hello = wire.encode_hello(
                self.key, self.cfg.boot, self.guard.next_counter(), FW_VERSION,
                wire.RESET_POWER_ON, [0, 0, 0], SENSORS,
            )
            writer.write(hello)
            msg = await asyncio.wait_for(self._read_frame(reader), HELLO_TIMEOUT_S)
            if msg.type == wire.ERROR_DOWN:
                self.stats.errors["hello_" + msg.reason_name] += 1
                raise _Reset()
            if msg.type != wire.ACK:
                raise _Reset()
            self.stats.hellos_acked += 1
            if msg.gateway_time_ms is not None:
                self.clock_offset_ms = msg.gateway_time_ms - time.time() * 1000
                self.stats.clock_offsets_ms.append(self.clock_offset_ms)
            self.space.set()
            sender = asyncio.create_task(self._send_loop(writer, start, stop_sending))
            receiver = asyncio.create_task(self._receive_loop(reader))
            try:
                done, _ = await asyncio.wait(
                    {sender, receiver}, timeout=max(0.0, give_up - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    task.result()  # raises the session's error, if any
                if sender in done:
                    # Everything sent: wait for the ACKs still outstanding (the receiver
                    # only ever ends by raising).
                    acked = asyncio.create_task(self.all_acked.wait())
                    done, _ = await asyncio.wait(
                        {acked, receiver}, timeout=max(0.0, give_up - time.monotonic()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    acked.cancel()
                    if receiver in done:
                        receiver.result()
            finally:
                for task in (sender, receiver):
                    task.cancel()
                await asyncio.gather(sender, receiver, return_exceptions=True)
        finally:
            writer.transport.abort()

    async def _send_loop(self, writer: asyncio.StreamWriter, start: float,
                         stop_sending: float) -> None:
        cfg, stats = self.cfg, self.stats
        paced = cfg.rate > 0
        interval = self.n_nodes * cfg.batch / cfg.rate if paced else 0.0
        # Paced nodes are spread evenly over one interval, so the total rate is smooth.
        k = 0
        first_at = start + cfg.ramp + interval * self.index / self.n_nodes
        while True:
            while len(self.inflight) >= cfg.window:
                self.space.clear()
                await self.space.wait()
            if self.resend:
                b = self.resend.popleft()
                stats.frames_resent += 1
            else:
                if paced:
                    due = first_at + k * interval
                    if due >= stop_sending:
                        return
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    else:
                        lag_ms = -delay * 1000
                        stats.max_lag_ms = max(stats.max_lag_ms, lag_ms)
                        if lag_ms > 10:
                            stats.late_sends += 1
                    k += 1
                    while len(self.inflight) >= cfg.window:
                        self.space.clear()
                        await self.space.wait()
                elif time.monotonic() >= stop_sending:
                    return
                base_ms = int(time.time() * 1000 + self.clock_offset_ms)
                b = _Batch(self.next_seq, cfg.batch, base_ms)
                self.next_seq += cfg.batch
                stats.sent_readings += b.count
            frame = self._encode(b)
            now = time.monotonic()
            b.sent_at = now
            b.measured = stats.window_start <= now < stats.window_end
            self.inflight.append(b)
            self.all_acked.clear()
            writer.write(frame)
            stats.frames_sent += 1
            await writer.drain()

    async def _receive_loop(self, reader: asyncio.StreamReader) -> None:
        stats = self.stats
        while True:
            msg = await self._read_frame(reader)
            if msg.type == wire.ACK:
                if msg.through_seq is None or msg.readings_boot != self.cfg.boot:
                    continue
                now = time.monotonic()
                in_window = stats.window_start <= now < stats.window_end
                inflight = self.inflight
                while inflight and inflight[0].last_seq <= msg.through_seq:
                    b = inflight.popleft()
                    stats.acked_total += b.count
                    if in_window:
                        stats.acked_in_window += b.count
                    if b.measured:
                        stats.latencies.append(now - b.sent_at)
                self.space.set()
                if not inflight and not self.resend:
                    self.all_acked.set()
            elif msg.type == wire.ERROR_DOWN:
                stats.errors[msg.reason_name] += 1
                raise _Reset()
            elif msg.type == wire.CONFIG:
                stats.configs += 1


async def run_load(identities: list[Identity], cfg: LoadSettings) -> dict:
    """Run the nodes against cfg.host:cfg.port; returns the results as a JSON-ready dict."""
    stats = Stats()
    start = time.monotonic()
    stop_sending = start + cfg.duration
    stats.window_start = min(start + cfg.warmup, stop_sending)
    stats.window_end = stop_sending
    give_up = stop_sending + cfg.drain
    cpu0 = time.process_time()
    nodes = [SimNode(ident, i, len(identities), cfg, stats) for i, ident in enumerate(identities)]
    await asyncio.gather(*(n.run(start, stop_sending, give_up) for n in nodes))
    ended = time.monotonic()
    window = stats.window_end - stats.window_start
    lat = sorted(stats.latencies)
    unacked = sum(sum(b.count for b in n.inflight) + sum(b.count for b in n.resend)
                  for n in nodes)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    offsets = sorted(stats.clock_offsets_ms)
    return {
        "host": cfg.host,
        "port": cfg.port,
        "nodes": len(identities),
        "batch": cfg.batch,
        "window_frames": cfg.window,
        "target_rate": cfg.rate or None,
        "boot": cfg.boot,
        "started": start,
        "window_start": stats.window_start,
        "window_end": stats.window_end,
        "window_s": window,
        "ended": ended,
        "sent_readings": stats.sent_readings,
        "acked_total": stats.acked_total,
        "acked_in_window": stats.acked_in_window,
        "acked_per_s": stats.acked_in_window / window if window > 0 else None,
        "unacked_at_end": unacked,
        "frames_sent": stats.frames_sent,
        "frames_resent": stats.frames_resent,
        "latency_samples": len(lat),
        "latency_ms": {
            "p50": ms(percentile(lat, 50)),
            "p90": ms(percentile(lat, 90)),
            "p99": ms(percentile(lat, 99)),
            "max": ms(lat[-1] if lat else None),
        },
        "errors": dict(stats.errors),
        "reconnects": stats.reconnects,
        "hellos_acked": stats.hellos_acked,
        "configs_received": stats.configs,
        "clock_offset_ms_median": percentile(offsets, 50),
        "late_sends": stats.late_sends,
        "max_send_lag_ms": round(stats.max_lag_ms, 3),
        "loadgen_cpu_s": time.process_time() - cpu0,
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--keys", type=Path, required=True,
                   help="key file: read if it exists, else written with --nodes new nodes")
    p.add_argument("--nodes", type=int, default=200, help="nodes (connections); default 200")
    p.add_argument("--batch", type=int, default=50, help="readings per frame (1..192)")
    p.add_argument("--window", type=int, default=4, help="frames in flight per node")
    p.add_argument("--rate", type=float, default=0.0,
                   help="total readings/s to pace at; 0 (default): as fast as ACKs allow")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of sending")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds left out of the figures")
    p.add_argument("--drain", type=float, default=10.0, help="seconds to wait for the last ACKs")
    p.add_argument("--boot", type=int, default=None,
                   help="boot counter of every node (default: Unix time, so it grows per run)")
    p.add_argument("--json-out", type=Path, default=None)
    a = p.parse_args(argv)
    if not 1 <= a.batch <= wire.MAX_READINGS:
        p.error(f"--batch must be 1..{wire.MAX_READINGS}")
    if a.batch > wire.MAX_OFFSET_MS // READING_SPACING_MS + 1:
        p.error("--batch too large for the reading spacing")
    if a.nodes < 1 or a.window < 1 or a.duration <= 0 or a.rate < 0:
        p.error("--nodes, --window and --duration must be positive, --rate >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    if a.keys.exists():
        identities = read_key_file(a.keys)
        if len(identities) < a.nodes:
            print(f"{a.keys} holds {len(identities)} nodes, fewer than --nodes {a.nodes}",
                  file=sys.stderr)
            return 2
        identities = identities[: a.nodes]
    else:
        identities = make_identities(a.nodes)
        write_key_file(a.keys, identities)
    cfg = LoadSettings(
        host=a.host, port=a.port, batch=a.batch, window=a.window, rate=a.rate,
        duration=a.duration, warmup=min(a.warmup, a.duration / 2), drain=a.drain,
        boot=a.boot if a.boot is not None else int(time.time()) & 0x7FFFFFFF,
    )
    result = asyncio.run(run_load(identities, cfg))
    text = json.dumps(result, indent=1)
    if a.json_out is not None:
        a.json_out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
