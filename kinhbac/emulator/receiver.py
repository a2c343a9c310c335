"""A test receiver: the gateway's southbound side without durability or MQTT.

It verifies every frame with the wire codec, keeps the readings it got in memory (deduplicated
by device, boot and seq), and acknowledges each batch as soon as it has it. Firmware tests and
the early demo use it; the real gateway (kinhbac/gateway/) adds the durable queue and uplink.
Faults a test can inject: stop acknowledging, refuse connections, push a CONFIG.
"""

import asyncio
import contextlib
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from kinhbac import wire


@dataclass
class Reading:
    device: str
    boot: int
    seq: int
    sensor: int
    value: float
    time_ms: int  # Unix ms, or ms since boot when `unsynced`
    unsynced: bool
    pre_sync: bool


@dataclass
class DeviceView:
    """What the receiver knows of one device."""

    hello: wire.HelloMessage | None = None
    readings: dict[tuple[int, int], Reading] = field(default_factory=dict)
    order_violations: int = 0
    duplicates: int = 0
    last_key: tuple[int, int] = (0, 0)
    connections: int = 0
    last_seen: float = 0.0


class Receiver:
    """Listens on 127.0.0.1 on its own event loop thread; read its state from any thread."""

    def __init__(self, keys: dict[bytes, wire.Key], port: int = 0) -> None:
        self.keys = dict(keys)
        self.port = port
        self.devices: dict[str, DeviceView] = defaultdict(DeviceView)
        self.refused: dict[str, int] = defaultdict(int)
        self.pending_config: dict[str, dict] = {}
        self.config_errors: list[tuple[str, str]] = []
        self.acking = True
        self.accepting = True
        self._guard = wire.ReplayGuard()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> "Receiver":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def drop_connections(self) -> None:
        """Cut every node's connection (as a gateway restart would)."""
        for writer in list(self._writers):
            self._loop.call_soon_threadsafe(writer.transport.abort)

    # ----- views for tests -----

    def readings_of(self, device: str) -> list[Reading]:
        with self._lock:
            view = self.devices.get(device)
            return sorted(view.readings.values(), key=lambda r: (r.boot, r.seq)) if view else []

    def count(self, device: str | None = None) -> int:
        with self._lock:
            if device is not None:
                view = self.devices.get(device)
                return len(view.readings) if view else 0
            return sum(len(v.readings) for v in self.devices.values())

    def wait_for_count(self, n: int, device: str | None = None, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(device) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"receiver has {self.count(device)} readings"
                    f"{' from ' + device if device else ''}, wanted {n} within {timeout:.0f} s"
                )
            time.sleep(0.02)

    # ----- protocol -----

    def _lookup(self, device_id: bytes, key_id: int) -> wire.Key | int | None:
        key = self.keys.get(device_id)
        if key is None:
            return None
        return key if key.key_id == key_id else wire.UNKNOWN_KEY

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        self._writers.add(writer)
        answers: dict[int, int] = defaultdict(int)
        try:
            while True:
                header = await reader.readexactly(wire.HEADER_SIZE)
                length = wire.frame_length(header)
                frame = header + await reader.readexactly(length - wire.HEADER_SIZE)
                msg = wire.decode(frame, self._lookup, self._guard)
                key = self.keys[msg.device_id]
                for reply in self._handle(msg):
                    kind, payload = reply
                    counter = wire.downlink_counter(msg.counter, answers[msg.counter])
                    answers[msg.counter] += 1
                    writer.write(self._encode(kind, key, msg.boot, counter, payload))
                await writer.drain()
        except wire.FrameError as e:
            self.refused[e.name] += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.transport.abort()

    @staticmethod
    def _encode(kind: str, key: wire.Key, boot: int, counter: int, payload: object) -> bytes:
        if kind == "ack":
            readings_boot, through = payload  # type: ignore[misc]
            now_ms = int(time.time() * 1000)
            return wire.encode_ack(key, boot, counter, readings_boot, through, now_ms)
        return wire.encode_config(key, boot, counter, payload)

    def _handle(self, msg: wire.Message) -> list[tuple[str, object]]:
        device = wire.device_hex(msg.device_id)
        with self._lock:
            view = self.devices[device]
            view.last_seen = time.time()
            if msg.type == wire.HELLO:
                view.hello = msg  # type: ignore[assignment]
                view.connections += 1
                replies: list[tuple[str, object]] = [("ack", (None, None))]
                if device in self.pending_config:
                    replies.append(("config", self.pending_config.pop(device)))
                return replies
            if msg.type == wire.READINGS:
                self._store(device, view, msg)  # type: ignore[arg-type]
                if not self.acking:
                    return []
                return [("ack", (msg.readings_boot, msg.last_seq))]  # type: ignore[attr-defined]
            if msg.type == wire.ERROR_UP:
                self.config_errors.append((device, msg.detail))  # type: ignore[attr-defined]
        return []

    def _store(self, device: str, view: DeviceView, msg: wire.ReadingsMessage) -> None:
        for i, (sensor, offset_ms, value) in enumerate(msg.readings):
            key = (msg.readings_boot, msg.first_seq + i)
            if key in view.readings:
                view.duplicates += 1
                continue
            if key < view.last_key:
                view.order_violations += 1
            view.last_key = max(view.last_key, key)
            view.readings[key] = Reading(
                device, key[0], key[1], sensor, value, msg.base_ms + offset_ms,
                msg.unsynced, msg.pre_sync,
            )
