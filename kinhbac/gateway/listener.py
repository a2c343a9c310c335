"""The southbound side: nodes connect over TCP and speak the wire codec.

Every frame is verified (known device and key id, MAC, fresh counter, supported version). A
READINGS frame is acknowledged only once its readings are committed to the queue; frames of one
connection are verified in order while earlier ones are still being committed, and their ACKs
go out in order. A refused frame is counted by reason and logged at most once per device per
minute; it never disturbs other connections.

The acknowledgement invariant (docs/protocol.md): an ACK through seq s of boot b goes out only
when every reading of that boot up to s that the node sent on this connection is stored. Here,
batches reach the queue in the order they came, each naming the last reading sent before it on
the connection (the queue refuses it unless that one is stored), and once a batch of a device
is refused its later batches on the connection are refused without a try.

Replay windows are kept per (device, key id) in memory and in the queue, CLAIM frames' too (key
id 0xFFFF), and loaded at start: a frame recorded on the WiFi is refused after a gateway restart
as before it. A CLAIM's window is saved on its own; claim traffic never touches the window,
mark, status or pending CONFIG of the device's own key.

OTA (docs/ota.md): an offer follows a HELLO's ACK (and CONFIG) when ota_offers.py has one due,
or, once per connection, a READINGS ACK when it became due during the session;
a chunk request is answered from the release cache or refused with ERROR UNSUPPORTED, and the
session goes on; a result is recorded and never answered.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kinhbac import wire
from kinhbac.gateway.keys import KeyStore
from kinhbac.gateway.metrics import Metrics
from kinhbac.gateway.ota_offers import OtaOffers, OtaRefusal
from kinhbac.gateway.queue import Batch, Queue, QueueError
from kinhbac.gateway.telemetry import sensors_json

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0  # refusals of one device are logged at most this often
LOG_BUDGET = 20  # refusal lines a minute over all devices: random device ids cannot flood the log
LOG_DEVICES_KEPT = 1024  # devices whose last refusal line is remembered (bounded memory)
PIPELINE = 8  # frames of one connection verified ahead of their ACKs
# CLAIM windows kept, in memory and in the queue; the least recently claimed id is forgotten
# first. A site has far fewer claiming boards (the fleet holds at most 100 pending claims a
# site); only a holder of the claim key can make more ids, and a forgotten window costs only
# that a recorded CLAIM of that id is taken once more (reported again: the fleet pins the
# first claim's nonce). At the cap: about 3 MB of memory and 0.4 MB of disk (measured).
MAX_CLAIM_WINDOWS = 10_000
# Refusals that come after the MAC check: the frame is authentic, so the gateway may answer
# it with an ERROR frame. Before the MAC it cannot attribute the frame: it closes the stream.
_ANSWERABLE = (wire.STALE_BOOT, wire.REPLAY, wire.BAD_PAYLOAD)


class DeviceInfo:
    """What the gateway knows of a node from its HELLO (for topics, units and status)."""

    def __init__(self, hello: dict[str, Any]) -> None:
        self.hello = hello
        sensors = hello.get("sensors", [])
        self.sensors = [(name, unit) for name, unit in sensors]
        # Stored beside each frame (by reference): a later HELLO with another table does not
        # rename readings already queued.
        self.sensors_json = sensors_json(self.sensors)


UNKNOWN_DEVICE_INFO = DeviceInfo({})
_READINGS_AT = wire.HEADER_SIZE + wire.READINGS_HEAD_SIZE  # the readings' bytes in a frame


class _Connection:
    """What the listener tracks of one node connection for the acknowledgement invariant."""

    def __init__(self) -> None:
        # Per device: the last reading sent on this connection in a batch given to the queue.
        self.last_sent: dict[str, tuple[int, int]] = {}
        # Devices with a refused READINGS frame on this connection: their later batches are
        # refused too (docs/protocol.md, ACK), never stored past the refused ones.
        self.refused: set[str] = set()
        self.offered: dict[str, int] = {}  # device -> the release ref offered on this connection


class Listener:
    def __init__(
        self,
        *,
        keys: KeyStore,
        queue: Queue,
        metrics: Metrics,
        host: str,
        port: int,
        idle_timeout_s: float,
        frame_timeout_s: float,
        max_connections: int,
        max_connections_per_address: int | None = None,
        node_config_dir: Path | None = None,
        on_hello: Callable[[str, DeviceInfo], None] | None = None,
        on_seen: Callable[[str], None] | None = None,
        on_safe_mode: Callable[[str, str], None] | None = None,
        ota: OtaOffers | None = None,
    ) -> None:
        self.keys = keys
        self.queue = queue
        self.metrics = metrics
        self.host = host
        self.port = port
        self.idle_timeout_s = idle_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self.max_connections = max_connections
        self.max_per_address = max_connections_per_address or max_connections
        self._per_address: dict[str, int] = {}
        self._log_window = (0.0, 0)  # (start of the current minute, refusal lines in it)
        self._unlogged = 0  # refusal lines held back by the budget since the last one
        self.node_config_dir = node_config_dir
        self.on_hello = on_hello
        self.on_seen = on_seen
        self.on_safe_mode = on_safe_mode
        self.ota = ota  # None: nothing is offered, every chunk request is refused
        self.guard = wire.ReplayGuard()
        self._claim_windows: OrderedDict[str, None] = OrderedDict()  # device hex, oldest first
        self.devices: dict[str, DeviceInfo] = {}
        self.config_sent: dict[str, str | None] = {}
        self.refused: dict[str, int] = defaultdict(int)
        self._last_logged: dict[str, float] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> int:
        """Load what the queue remembers of devices, then listen; returns the port."""
        for device, known in (await self.queue.devices()).items():
            for key_id, (frame_boot, counter) in known["windows"].items():
                self.guard.commit(bytes.fromhex(device), key_id, frame_boot, counter)
            if wire.CLAIM_KEY_ID in known["windows"]:
                self._claim_windows[device] = None  # in no particular order: a pending
                # board's next claim makes its id the most recent again
            if known["hello"]:
                self.devices[device] = DeviceInfo(known["hello"])
            if known["config_sent"] is not None:
                self.config_sent[device] = known["config_sent"]
        self._bound_claim_windows()
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def serve(self) -> None:
        """Accept nodes until stop() (after start())."""
        assert self._server is not None, "start() first"
        await self._server.serve_forever()

    async def stop(self) -> None:
        """Stop accepting; let each connection finish the frame it is committing."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5)

    # ----- one connection -----

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.max_connections:
            self._refuse_quietly("connection_limit")
            writer.transport.abort()
            return
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        if self._per_address.get(address, 0) >= self.max_per_address:
            # One host on the site's WiFi cannot take the slots of every node.
            self._refuse_quietly("address_limit")
            writer.transport.abort()
            return
        self._per_address[address] = self._per_address.get(address, 0) + 1
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.metrics.connections.inc()
        replies: asyncio.Queue = asyncio.Queue(PIPELINE)
        conn = _Connection()
        sender = asyncio.create_task(self._send_replies(writer, replies, conn))
        try:
            await self._read_frames(reader, replies, conn)
        except asyncio.CancelledError:
            pass
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                replies.put_nowait(None)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(sender, timeout=5)
            sender.cancel()
            writer.transport.abort()
            self.metrics.connections.dec()
            self._connections.discard(task)
            left = self._per_address.pop(address) - 1
            if left:
                self._per_address[address] = left

    async def _read_frames(self, reader: asyncio.StreamReader, replies: asyncio.Queue,
                           conn: _Connection) -> None:
        # A node speaks at once: the first frame of a connection must be whole within
        # frame_timeout_s, so silent connections cannot hold slots. Between frames a node may
        # wait idle_timeout_s; once a frame's first byte came, the rest must follow within
        # frame_timeout_s (a slow-loris cannot stretch a frame either).
        wait_s = self.frame_timeout_s
        while True:
            try:
                first = await asyncio.wait_for(reader.readexactly(1), wait_s)
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                return  # closed, or silent for too long
            wait_s = self.idle_timeout_s
            deadline = asyncio.get_running_loop().time() + self.frame_timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    header = first + await reader.readexactly(wire.HEADER_SIZE - 1)
                    length = wire.frame_length(header)
                    body = await reader.readexactly(length - wire.HEADER_SIZE)
            except wire.FrameError as exc:
                self._refused(exc, header)
                return
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                self._refuse_quietly("incomplete_frame")
                return
            frame = header + body
            try:
                msg = wire.decode(frame, self.keys.lookup, self.guard)
            except wire.FrameError as exc:
                self._refused(exc, frame)
                if exc.reason not in _ANSWERABLE or exc.header is None:
                    return  # cannot be answered, and the stream cannot be trusted
                if exc.header[0] == wire.READINGS:
                    conn.refused.add(wire.device_hex(exc.header[1]))
                await replies.put(self._error_reply(exc))
                continue
            await replies.put(self._handle(msg, frame, conn))

    async def _send_replies(self, writer: asyncio.StreamWriter, replies: asyncio.Queue,
                            conn: _Connection) -> None:
        """Write each frame's answers in the order the frames came."""
        while True:
            item = await replies.get()
            if item is None:
                return
            frames = await item if asyncio.isfuture(item) else item
            if frames:
                writer.write(b"".join(frames))
                try:
                    await writer.drain()
                except ConnectionError:
                    return

    # ----- frames -----

    def _handle(self, msg: wire.Message, frame: bytes, conn: _Connection) -> Any:
        device = wire.device_hex(msg.device_id)
        key = self.keys.lookup(msg.device_id, msg.key_id)
        assert isinstance(key, wire.Key)
        replay = (msg.key_id, msg.boot, msg.counter)
        if msg.type == wire.HELLO:
            return self._hello(device, key, msg, replay, conn)  # type: ignore[arg-type]
        if msg.type == wire.READINGS:
            return self._readings(device, key, msg, frame, replay, conn)  # type: ignore
        if msg.type == wire.CLAIM:
            # Its window alone, under the claim key id: nothing of the device's own key.
            self.queue.note_window(device, replay)
            self._claim_windows[device] = None
            self._claim_windows.move_to_end(device)
            self._bound_claim_windows()
            return self._claim(device, key, msg)  # type: ignore[arg-type]
        if msg.type == wire.OTA_CHUNK_REQUEST:
            # Its window only: a download is hundreds of requests, and a window noted is
            # written once per commit, where a device note is a row update each.
            self.queue.note_window(device, replay)
            ref = msg.ref  # type: ignore[attr-defined]
            try:
                if self.ota is None:
                    raise OtaRefusal(f"release ref {ref:08x} is not offered to this node")
                return [self.ota.chunk(device, key, msg)]  # type: ignore[arg-type]
            except OtaRefusal as refusal:
                return self._unsupported(key, msg, frame, str(refusal))
        self.queue.note_device(device, None, replay)
        if msg.type == wire.ERROR_UP:
            self._node_error(device, msg)  # type: ignore[arg-type]
            return []
        if msg.type == wire.OTA_RESULT:
            if self.ota is not None:
                self.ota.record_result(device, msg)  # type: ignore[arg-type]
            return []  # recorded, never answered (docs/ota.md)
        return self._unsupported(key, msg, frame, f"{msg.type_name} is not served by this "
                                 "gateway")

    def _unsupported(self, key: wire.Key, msg: wire.Message, frame: bytes,
                     why: str) -> list[bytes]:
        """An authentic, fresh frame this gateway will not serve (e.g. a chunk of a release
        it does not offer that node): refused by name, counted; the connection goes on."""
        header = (msg.type, msg.device_id, msg.key_id, msg.boot, msg.counter)
        self._refused(wire.FrameError(wire.UNSUPPORTED, why, header), frame)
        return [wire.encode_error(key, msg.boot, wire.downlink_counter(msg.counter, 0),
                                  wire.UNSUPPORTED, msg.counter, why)]

    def _node_error(self, device: str, msg: wire.ErrorMessage) -> None:
        """An ERROR_UP: the node refused one of our frames (ref, its counter), or, with ref 0,
        reports its own state: safe mode, or another fault of its own."""
        ref, reason, detail = msg.ref, msg.reason, msg.detail  # type: ignore[attr-defined]
        if ref == 0 and detail.startswith(wire.SAFE_MODE_REPORT):
            why = detail[len(wire.SAFE_MODE_REPORT):]
            log.warning("node %s is in safe mode: %s", device, why)
            if self.on_safe_mode is not None:
                self.on_safe_mode(device, why)
        elif ref == 0:
            log.warning("node %s reports %s: %s", device, wire.reason_name(reason), detail)
        else:
            log.warning("node %s refused our frame %d: %s %s", device, ref,
                        wire.reason_name(reason), detail)

    def _hello(self, device: str, key: wire.Key, msg: wire.HelloMessage,
               replay: tuple[int, int, int], conn: _Connection) -> list[bytes]:
        hello = {
            "fw_version": msg.fw_version,
            "boot": msg.boot,
            "reset_cause": wire.RESET_NAMES.get(msg.reset_cause, str(msg.reset_cause)),
            "drops": list(msg.drops),
            "sensors": [list(s) for s in msg.sensors],
            # Per sensor, in table order; None from a node that sends no failure counts.
            "failures": None if msg.failures is None else [list(f) for f in msg.failures],
            # Flash bytes an update may use; None from a node that did not say.
            "free_flash": msg.free_flash,
            "seen_ms": int(time.time() * 1000),
        }
        info = self.devices[device] = DeviceInfo(hello)
        self.queue.note_device(device, hello, replay)
        if self.on_hello is not None:
            self.on_hello(device, info)
        answers = [wire.encode_ack(key, msg.boot, wire.downlink_counter(msg.counter, 0),
                                   gateway_time_ms=int(time.time() * 1000))]
        settings = self._pending_config(device)
        if settings is not None:
            answers.append(wire.encode_config(
                key, msg.boot, wire.downlink_counter(msg.counter, 1), settings))
            text = json.dumps(settings, sort_keys=True)
            self.config_sent[device] = text
            asyncio.ensure_future(self.queue.set_config_sent(device, settings))
            log.info("sent CONFIG to %s: %s", device, text)
        # After the ACK (and CONFIG): the next answer number.
        offer = self._offer(conn, device, key, msg.boot,
                            wire.downlink_counter(msg.counter, len(answers)))
        if offer is not None:
            answers.append(offer)
        return answers

    def _offer(self, conn: _Connection, device: str, key: wire.Key, boot: int,
               counter: int) -> bytes | None:
        """An OTA_OFFER due to the node, once per connection and release: after its HELLO's
        ACK, or, for a release that became due during a long session, after the ACK of its
        next READINGS (a node that stays connected would otherwise never be offered it).
        A release withdrawn meanwhile (its rollout paused) is forgotten for the connection: the
        node's chunk requests were refused and it stopped, so when it is due again (resumed)
        it is offered again, or the node would wait for its next session to go on."""
        if self.ota is None:
            return None
        ref = self.ota.due(device)
        if ref is None:
            conn.offered.pop(device, None)
            return None
        if conn.offered.get(device) == ref:
            return None
        offer = self.ota.offer(device, key, boot, counter)
        if offer is not None:
            conn.offered[device] = ref
        return offer

    def _claim(self, device: str, claim_key: wire.Key, msg: wire.ClaimMessage) -> list[bytes]:
        """A board holding only its site's claim key: its identity once an admin approved this
        very claim, else where the claim stands (the node asks again later)."""
        counter = wire.downlink_counter(msg.counter, 0)
        identity = self.keys.identity_for(msg.device_id, msg.nonce)
        if identity is not None:
            self.metrics.claims.labels("identity_sent").inc()
            log.info("claim of %s approved: sent its identity (key id %d)", device,
                     identity.key_id)
            return [wire.encode_identity(identity, msg.boot, counter)]
        state = self.keys.report_claim(device, msg.nonce, msg.fw_version)
        self.metrics.claims.labels(state).inc()
        if state in ("rejected", "refused"):
            return [wire.encode_error(claim_key, msg.boot, counter, wire.CLAIM_REJECTED,
                                      msg.counter, f"claim {state}")]
        return [wire.encode_error(claim_key, msg.boot, counter, wire.CLAIM_PENDING, msg.counter,
                                  "awaiting approval")]

    def _bound_claim_windows(self) -> None:
        """Forget the least recently claimed ids' CLAIM windows past MAX_CLAIM_WINDOWS."""
        while len(self._claim_windows) > MAX_CLAIM_WINDOWS:
            device, _ = self._claim_windows.popitem(last=False)
            self.guard.forget(bytes.fromhex(device), wire.CLAIM_KEY_ID)
            self.queue.forget_window(device, wire.CLAIM_KEY_ID)

    def _pending_config(self, device: str) -> dict[str, Any] | None:
        """The node's CONFIG (from the fleet, else its file), if it changed since it was last
        delivered."""
        settings = self.keys.node_config(device)
        if settings is None and self.node_config_dir is not None:
            path = self.node_config_dir / f"{device}.json"
            try:
                settings = json.loads(path.read_text())
            except FileNotFoundError:
                return None
            except ValueError as exc:
                log.error("%s is not valid JSON, not sent: %s", path, exc)
                return None
        if settings is None:
            return None
        if json.dumps(settings, sort_keys=True) == self.config_sent.get(device):
            return None
        return settings

    def _readings(self, device: str, key: wire.Key, msg: wire.ReadingsMessage, frame: bytes,
                  replay: tuple[int, int, int], conn: _Connection) -> asyncio.Future | list:
        """Give the batch to the queue now (so batches reach it in the order they came) and
        return the future of its answer: an ACK once stored, else BUSY."""
        count = len(msg.readings)
        self.metrics.readings_in.inc(count)

        def busy() -> list[bytes]:
            """Refused with BUSY, counted; encoded only then (a frame acked costs no ERROR)."""
            self.metrics.frames_refused.labels("busy").inc()
            return [wire.encode_error(key, msg.boot, wire.downlink_counter(msg.counter, 0),
                                      wire.BUSY, msg.counter, "queue unavailable")]

        if device in conn.refused:
            # An earlier batch of this device was refused on this connection: acknowledging a
            # later one would cover it (ACKs are cumulative).
            return busy()
        info = self.devices.get(device, UNKNOWN_DEVICE_INFO)
        flags = ((wire.READINGS_UNSYNCED if msg.unsynced else 0)
                 | (wire.READINGS_PRE_SYNC if msg.pre_sync else 0))
        batch = Batch(
            device=device, readings_boot=msg.readings_boot, first_seq=msg.first_seq,
            count=count, base_ms=msg.base_ms, flags=flags,
            readings=bytes(frame[_READINGS_AT:_READINGS_AT + count * wire.READING_SIZE]),
            sensors=info.sensors_json, replay=replay, after=conn.last_sent.get(device),
        )
        conn.last_sent[device] = (msg.readings_boot, batch.last_seq)
        stored = self.queue.submit(batch)

        async def answer() -> list[bytes]:
            try:
                fresh = await stored
            except QueueError:
                # Not stored, not acknowledged: the node keeps the readings and sends them
                # again. The queue logs the storage fault once; each refusal is counted.
                conn.refused.add(device)
                return busy()
            self.metrics.readings_acked.inc(count)
            if self.on_seen is not None:
                self.on_seen(device)
            if fresh < count:
                self.metrics.readings_duplicate.inc(count - fresh)
            ack = wire.encode_ack(key, msg.boot, wire.downlink_counter(msg.counter, 0),
                                  msg.readings_boot, msg.last_seq, int(time.time() * 1000))
            offer = self._offer(conn, device, key, msg.boot,
                                wire.downlink_counter(msg.counter, 1))
            return [ack] if offer is None else [ack, offer]

        return asyncio.ensure_future(answer())

    def _error_reply(self, exc: wire.FrameError) -> list[bytes]:
        _type, device_id, key_id, boot, counter = exc.header
        key = self.keys.lookup(device_id, key_id)
        if not isinstance(key, wire.Key):
            return []
        ref = counter
        if exc.reason == wire.STALE_BOOT:
            latest = self.guard.latest(device_id, key_id)
            ref = latest[0] if latest else 0
        # An answer to a refused frame counts as answer 15, so it never reuses the counter of a
        # normal answer to the same uplink counter.
        return [wire.encode_error(key, boot, wire.downlink_counter(counter, 15), exc.reason, ref,
                                  exc.name)]

    # ----- refusals -----

    def _refused(self, exc: wire.FrameError, frame: bytes) -> None:
        self.refused[exc.name] += 1
        self.metrics.frames_refused.labels(exc.name.lower()).inc()
        device = wire.device_hex(exc.header[1]) if exc.header else "?"
        now = time.monotonic()
        if now - self._last_logged.get(device, -LOG_EVERY_S) < LOG_EVERY_S:
            return
        started, lines = self._log_window
        if now - started >= 60.0:
            if self._unlogged:
                log.warning("%d more refused frames were counted, not logged, in the last "
                            "minute (kinhbac_gateway_frames_refused_total)", self._unlogged)
            started, lines, self._unlogged = now, 0, 0
        if lines >= LOG_BUDGET:
            self._unlogged += 1
            self._log_window = (started, lines)
            return
        self._log_window = (started, lines + 1)
        if len(self._last_logged) >= LOG_DEVICES_KEPT:
            self._last_logged.clear()  # forgetting costs at most a line more per device
        self._last_logged[device] = now
        log.warning("refused a frame from %s: %s (%s); further refusals of this device "
                    "are counted, not logged, for %d s", device, exc.name, exc.message,
                    LOG_EVERY_S)

    def _refuse_quietly(self, reason: str) -> None:
        self.refused[reason.upper()] += 1
        self.metrics.frames_refused.labels(reason).inc()
