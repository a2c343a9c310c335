"""The northbound side: queued readings to the MQTT broker, QoS 1, deleted only after PUBACK.

Readings go out in queue order, several per message (one device and boot per message). A
device has at most one message awaiting its PUBACK, so its order holds across reconnects and
restarts; different devices' messages fly together, up to `max_inflight`. After a reconnect
everything still queued is sent again, marked `"replayed": true` when it waited through an
outage.

A lost broker ends the session at once, even when nothing is being published: a task waits on
the connection (aiomqtt ends its message iteration when the broker closes the connection, or
when paho's keepalive finds it silent), so `uplink_connected` and the log say so within the
figures docs/mqtt.md states ("Broker loss and recovery"). Reconnects follow a capped, jittered
exponential backoff; a lost broker is logged once, and while it stays away a reminder once a
minute, not a line per attempt.

The gateway's own retained status (online, its policy drops, its queue's depth and oldest
reading) goes out as each session begins, as the drops change, and every `mqtt.status_every_s`
while connected; while the broker is away nothing can be published, and the fleet shows when
the last status came.

Beside the readings, the queue's outbox (OTA progress, docs/ota.md) goes to
`<prefix>/<site>/<device>/ota`, QoS 1, one message at a time in the order kept, each deleted
after its PUBACK; a new session sends again what was not acknowledged.
"""

import asyncio
import contextlib
import logging
import os
import random
import ssl
import time
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt

from kinhbac import mqtt_contract as contract
from kinhbac.gateway.config import GatewaySettings
from kinhbac.gateway.metrics import Metrics
from kinhbac.gateway.queue import Queue, Stored
from kinhbac.gateway.telemetry import ReadingsEncoder

log = logging.getLogger(__name__)

FETCH = 256  # frames read from the queue at a time: ~13,000 readings, a few MB in memory
PROBE_TIMEOUT_S = 5.0  # a publish to our own subtree must come back within this
IDLE_POLL_S = 0.02  # how often an empty queue is looked at again
OUTBOX_POLL_S = 0.1  # how often an empty outbox is looked at again (OTA progress is rare)
OUTBOX_FETCH = 64  # outbox messages read at a time
STATUS_EVERY_S = 30.0  # a device's retained status is refreshed at most this often
# A CONNACK comes within milliseconds from a live broker; a proxy in front of a stopped one may
# accept the connection and never answer, and must not hold an attempt for the PUBACK timeout.
CONNECT_TIMEOUT_S = 10.0
PUBACK_TIMEOUT_S = 30.0  # on a connection whose keepalive is answered, a longer wait is a fault
REMIND_EVERY_S = 60.0  # while the broker stays unreachable, one log line this often
# aiomqtt's and paho's own lines, under the gateway's name. paho logs nothing useful below
# WARNING for an operator (its DEBUG is every packet).
_mqtt_log = logging.getLogger("kinhbac.gateway.mqtt")
_mqtt_log.setLevel(logging.WARNING)


class _ConnectionLossLines(logging.Filter):
    """paho logs a connection that breaks as an ERROR ("failed to receive on socket: [Errno 104]
    Connection reset by peer"): at every broker restart. The uplink reports the loss itself, once,
    as a warning; this keeps paho's reason for that report instead of printing it."""

    _FORMATS = ("failed to receive on socket: %s", "timeout on socket: %s")

    def __init__(self) -> None:
        super().__init__()
        self.last: tuple[float, str] = (0.0, "")  # (time.time(), paho's reason)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self._FORMATS:
            self.last = (record.created, record.getMessage().partition(": ")[2])
            return False
        return True

    def since(self, t: float) -> str | None:
        """paho's reason for a broken connection, if it logged one after time.time() t."""
        at, reason = self.last
        return reason if at >= t else None


_connection_loss = _ConnectionLossLines()
_mqtt_log.addFilter(_connection_loss)


@dataclass
class Message:
    device: str
    topic: str
    payload: bytes
    frames: list[tuple[int, int]]  # (stored frame id, readings in it)

    @property
    def readings(self) -> int:
        return sum(n for _, n in self.frames)


class AccessDenied(aiomqtt.MqttError):
    """The broker accepted our login but does not deliver what we publish under our site."""


class Uplink:
    def __init__(self, settings: GatewaySettings, queue: Queue, metrics: Metrics) -> None:
        self.settings = settings
        self.mqtt = settings.mqtt
        self.queue = queue
        self.metrics = metrics
        self.connected = asyncio.Event()
        self.connected_since_ms = 0
        self.state = "starting"
        self.published = 0
        self._prefix = f"{self.mqtt.topic_prefix}/{settings.site}"  # our subtree, for the log
        self._status: dict[str, dict[str, Any]] = {}
        self._status_due: set[str] = set()
        self._status_sent: dict[str, float] = {}
        self._client: aiomqtt.Client | None = None
        self._stopping = asyncio.Event()
        self._dropped_reported: dict[str, int] = {}
        self._gateway_status_at = 0.0  # time.monotonic() of the last online status published
        self._readings_json = ReadingsEncoder()
        # The current outage (or the start-up without a broker yet), for the log.
        self._offline_since = time.monotonic()
        self._failures = 0  # attempts failed in a row
        self._reported_at: float | None = None  # when the outage was last logged
        self._had_session = False

    # ----- topics -----

    def telemetry_topic(self, device: str) -> str:
        return contract.telemetry_topic(self.mqtt.topic_prefix, self.settings.site, device)

    def device_status_topic(self, device: str) -> str:
        return contract.device_status_topic(self.mqtt.topic_prefix, self.settings.site, device)

    @property
    def gateway_status_topic(self) -> str:
        return contract.gateway_status_topic(self.mqtt.topic_prefix, self.settings.site,
                                             self.settings.gateway_id)

    def device_status(self, device: str, status: dict[str, Any]) -> None:
        """A node's status changed (HELLO): publish it, retained, at the next chance."""
        self._status[device] = status
        self._status_due.add(device)

    def device_in_safe_mode(self, device: str, reason: str) -> None:
        """A node reported safe mode (after its HELLO, on the same connection): its status
        says why until a HELLO of a normal boot replaces it."""
        status = self._status.get(device)
        if status is None:
            return  # its HELLO came before this gateway started: nothing to add the reason to
        status["safe_mode"] = reason
        self._status_due.add(device)

    def device_seen(self, device: str) -> None:
        """A node sent readings: refresh its retained status's last_seen, now and then."""
        status = self._status.get(device)
        if status is None:
            return
        status["last_seen_ms"] = int(time.time() * 1000)
        if time.monotonic() - self._status_sent.get(device, -STATUS_EVERY_S) >= STATUS_EVERY_S:
            self._status_due.add(device)

    # ----- connection -----

    def _tls(self) -> aiomqtt.TLSParameters | None:
        if not self.mqtt.tls:
            return None
        return aiomqtt.TLSParameters(
            ca_certs=str(self.mqtt.ca_file) if self.mqtt.ca_file else None,
            certfile=str(self.mqtt.cert_file) if self.mqtt.cert_file else None,
            keyfile=str(self.mqtt.key_file) if self.mqtt.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,  # always verify the broker
        )

    def _client_for(self) -> aiomqtt.Client:
        offline = contract.gateway_status_payload(state="offline",
                                                  gateway=self.settings.gateway_id)
        client = aiomqtt.Client(
            self.mqtt.host,
            self.mqtt.port,
            identifier=self.mqtt.client_id or f"kinhbac-{self.settings.site}-"
            f"{self.settings.gateway_id}",
            username=self.mqtt.username,
            password=self.mqtt.password.get_secret_value() if self.mqtt.password else None,
            keepalive=self.mqtt.keepalive_s,
            tls_params=self._tls(),
            will=aiomqtt.Will(self.gateway_status_topic, offline, qos=1, retain=True),
            max_inflight_messages=self.mqtt.max_inflight,
            timeout=CONNECT_TIMEOUT_S,  # raised to PUBACK_TIMEOUT_S once connected
            logger=_mqtt_log,
        )
        # aiomqtt warns of "N pending publish calls" above 10; the gateway itself keeps up to
        # max_inflight telemetry messages and one status in flight, so only more is news.
        client.pending_calls_threshold = self.mqtt.max_inflight + 1
        return client

    async def run(self) -> None:
        """Stay connected and publish until stop(); never raises for a broker problem."""
        self._offline_since = time.monotonic()
        while not self._stopping.is_set():
            try:
                async with self._client_for() as client:
                    self._client = client
                    client.timeout = PUBACK_TIMEOUT_S
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                if not self._stopping.is_set():
                    self._note_failure(exc)
            finally:
                self._client = None
                self.connected.clear()
                self.metrics.uplink_up.set(0)
            if self._stopping.is_set():
                return
            self.state = "reconnecting"
            # 0.5, 1, 2, 4 s, then backoff_max_s (5 s): a broker back after an outage of any
            # length is tried again within backoff_max_s. Jitter spreads a site's gateways.
            delay = min(self.mqtt.backoff_max_s, self.mqtt.backoff_min_s * 2 ** self._failures)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay * random.uniform(0.5, 1.0))

    @property
    def _broker(self) -> str:
        return f"{self.mqtt.host}:{self.mqtt.port}"

    def _note_failure(self, exc: aiomqtt.MqttError) -> None:
        """Log a broker problem once as it begins, then once a minute while it lasts."""
        now = time.monotonic()
        why = self._why(exc)
        queued = self.queue.stats.depth
        if self.connected.is_set():  # a session was running: the broker is lost
            self._offline_since = self._reported_at = now
            self._failures = 0
            log.warning("lost the broker %s: %s; %d readings queued, reconnecting every %g s "
                        "at most", self._broker, why, queued, self.mqtt.backoff_max_s)
            return
        self._failures += 1
        if self._reported_at is None:  # at start-up: the first attempt failed
            self._reported_at = now
            log.warning("cannot connect to the broker %s: %s; readings are queued meanwhile, "
                        "retrying every %g s at most", self._broker, why,
                        self.mqtt.backoff_max_s)
        elif now - self._reported_at >= REMIND_EVERY_S:
            self._reported_at = now
            log.warning("broker %s still unreachable after %.0f s (%d attempts, the last: %s); "
                        "%d readings queued", self._broker, now - self._offline_since,
                        self._failures, why, queued)

    def _note_connected(self) -> None:
        """The probe passed: log the connection, and how long the gateway was without one."""
        away = time.monotonic() - self._offline_since
        if self._had_session:
            log.info("reconnected to broker %s after %.0f s (%d failed attempts); %d readings "
                     "queued to send", self._broker, away, self._failures,
                     self.queue.stats.depth)
        elif self._failures:
            log.info("connected to broker %s after %.0f s (%d failed attempts)", self._broker,
                     away, self._failures)
        else:
            log.info("connected to broker %s", self._broker)
        self._had_session = True
        self._failures = 0
        self._reported_at = None

    def _why(self, exc: BaseException) -> str:
        """What ended a session or an attempt, in words; paho's reason when it gave one."""
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        if "Keep alive timeout" in str(root):
            return (f"no answer from the broker within the keepalive "
                    f"(mqtt.keepalive_s {self.mqtt.keepalive_s})")
        if isinstance(root, OSError):
            return f"the connection broke: {root}"
        if isinstance(root, aiomqtt.MqttCodeError) and root.args == ("Unexpected disconnection",):
            broken = _connection_loss.since(self.connected_since_ms / 1000)
            if broken:
                return f"the connection broke: {broken}"
            return "the broker closed the connection"
        return str(exc) if root is exc else f"{exc} ({root})"

    async def stop(self, drain_s: float = 5.0) -> None:
        """Publish what is queued for up to drain_s, say offline, disconnect."""
        deadline = time.monotonic() + drain_s
        stats = self.queue.stats
        while self.connected.is_set() and (stats.depth or stats.outbox_depth) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stopping.set()

    async def _probe(self, client: aiomqtt.Client) -> None:
        """Publish to our own subtree and read it back before trusting PUBACKs.

        With MQTT 3.1.1 a broker acknowledges a publish its ACL then discards: an account that
        does not match the site would see every reading "delivered" and deleted. So the uplink
        proves it can write (and read) kinhbac/<site>/# first, and otherwise keeps everything
        queued and says why.
        """
        topic = contract.gateway_probe_topic(self.mqtt.topic_prefix, self.settings.site,
                                             self.settings.gateway_id)
        nonce = contract.probe_payload(os.urandom(8).hex())
        await client.subscribe(topic, qos=1)
        await client.publish(topic, nonce, qos=1)

        async def echoed() -> None:
            async for message in client.messages:
                if message.payload == nonce:
                    return

        try:
            await asyncio.wait_for(echoed(), PROBE_TIMEOUT_S)
        except TimeoutError:
            raise AccessDenied(
                f"the broker accepted user {self.mqtt.username!r} but did not deliver its "
                f"publish to {topic}: this account may not read and write {self._prefix}/#; "
                "check the broker's ACL (a gateway's account must match its site)"
            ) from None
        finally:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe(topic)

    async def _session(self, client: aiomqtt.Client) -> None:
        await self._probe(client)
        self.metrics.reconnects.inc()
        self.connected_since_ms = int(time.time() * 1000)
        self._dropped_reported = dict(self.queue.stats.dropped)
        await client.publish(self.gateway_status_topic, self._gateway_status("online"),
                             qos=1, retain=True)
        self._gateway_status_at = time.monotonic()
        self.state = "connected"
        self.connected.set()
        self.metrics.uplink_up.set(1)
        self._note_connected()
        self._status_sent.clear()
        self._status_due.update(self._status)  # a new broker session may have lost them
        try:
            await self._serve(client)
        finally:
            if self._stopping.is_set():
                with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                    await client.publish(self.gateway_status_topic,
                                         self._gateway_status("offline"), qos=1, retain=True,
                                         timeout=2)

    def _gateway_status(self, state: Literal["online", "offline"]) -> bytes:
        depth, oldest_ms = self.queue.backlog()
        return contract.gateway_status_payload(state=state, gateway=self.settings.gateway_id,
                                               since_ms=self.connected_since_ms,
                                               dropped=self.queue.stats.dropped,
                                               queue_depth=depth, oldest_queued_ms=oldest_ms)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Publish until stop(); a lost connection ends it at once, whatever is in flight."""
        publishing = asyncio.create_task(self._publish_loop(client), name="uplink-publish")
        outbox = asyncio.create_task(self._outbox_loop(client), name="uplink-outbox")
        watching = asyncio.create_task(self._watch(client), name="uplink-watch")
        try:
            await asyncio.wait({publishing, outbox, watching},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (publishing, outbox, watching):
                task.cancel()
            results = await asyncio.gather(publishing, outbox, watching,
                                           return_exceptions=True)
        for result in reversed(results):  # the watcher's error says best why the session ended
            if isinstance(result, Exception):
                raise result

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Return only by raising: aiomqtt ends message iteration with an MqttError when the
        broker closes the connection or paho's keepalive finds it silent."""
        async for _message in client.messages:
            pass  # nothing is subscribed after the probe; a late probe echo ends here
        raise aiomqtt.MqttError("the broker connection's message iteration ended")

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        """Everything still queued, then whatever arrives, until the connection fails."""
        after_id = 0  # a new session starts from the oldest reading not yet acknowledged
        tails: dict[str, asyncio.Future] = {}  # each device's last message in flight
        window = asyncio.Semaphore(self.mqtt.max_inflight)
        failed: asyncio.Future = asyncio.get_running_loop().create_future()
        tasks: set[asyncio.Task] = set()
        try:
            while not self._stopping.is_set():
                if failed.done():
                    failed.result()
                await self._publish_statuses(client)
                rows = await self.queue.fetch(after_id, FETCH)
                if not rows:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(failed), IDLE_POLL_S)
                    continue
                after_id = rows[-1].id
                for message in self._messages(rows):
                    await window.acquire()
                    previous = tails.get(message.device)
                    task = asyncio.create_task(
                        self._publish(client, message, previous, window, failed))
                    tails[message.device] = task
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()
            if not failed.done():
                failed.cancel()
            elif not failed.cancelled():
                failed.exception()  # seen: the watcher may have ended the session first

    async def _outbox_loop(self, client: aiomqtt.Client) -> None:
        """The outbox (OTA progress), one message at a time in the order kept, each deleted
        once the broker acknowledged it; until the connection fails. Apart from the readings,
        so that neither waits for the other's PUBACKs."""
        after_id = 0  # a new session starts from the oldest message not yet acknowledged
        while not self._stopping.is_set():
            if not self.queue.stats.outbox_depth:
                await asyncio.sleep(OUTBOX_POLL_S)
                continue
            rows = await self.queue.fetch_outbox(after_id, OUTBOX_FETCH)
            if not rows:
                await asyncio.sleep(OUTBOX_POLL_S)  # deletes not committed yet
                continue
            for row in rows:
                if row.kind == contract.OTA:
                    topic = contract.ota_progress_topic(self.mqtt.topic_prefix,
                                                        self.settings.site, row.device)
                    await client.publish(topic, row.payload, qos=1)
                else:  # only a newer gateway's queue file could hold one: not ours to send
                    log.error("outbox message %d of unknown kind %r deleted unsent", row.id,
                              row.kind)
                self.queue.forget_outbox([row.id])
                after_id = row.id

    async def _publish(self, client: aiomqtt.Client, message: Message,
                       previous: asyncio.Future | None, window: asyncio.Semaphore,
                       failed: asyncio.Future) -> None:
        try:
            if previous is not None:
                await previous  # the device's earlier message is acknowledged first
            if failed.done():
                return  # the session failed: keep order, this one goes again next session
            await client.publish(message.topic, message.payload, qos=1)
            self.queue.forget(message.frames)
            self.published += message.readings
            self.metrics.readings_published.inc(message.readings)
        except Exception as exc:  # noqa: BLE001 - handed on, never swallowed
            # The publish loop raises it: an MQTT error ends the session (and reconnects),
            # anything else ends the uplink task, and the supervisor the gateway.
            if not failed.done():
                failed.set_exception(exc)
        finally:
            window.release()

    def _messages(self, frames: list[Stored]) -> list[Message]:
        """Group stored frames of one device and boot, up to readings_per_message each."""
        limit = self.mqtt.readings_per_message
        groups: dict[tuple[str, int], list[Stored]] = {}
        sizes: dict[tuple[str, int], int] = {}
        out: list[Message] = []
        for frame in frames:
            key = (frame.device, frame.boot)
            group = groups.get(key)
            if group is not None and sizes[key] + frame.count > limit:
                out.append(self._message(group))
                group = None
            if group is None:
                group = groups[key] = []
                sizes[key] = 0
            group.append(frame)
            sizes[key] += frame.count
        out.extend(self._message(g) for g in groups.values() if g)
        out.sort(key=lambda m: m.frames[0][0])  # queue order, so per-device order holds
        return out

    def _message(self, frames: list[Stored]) -> Message:
        """The telemetry payload (docs/mqtt.md), its readings encoded from the stored frames."""
        first = frames[0]
        payload = contract.telemetry_payload(
            device=first.device,
            site=self.settings.site,
            gateway=self.settings.gateway_id,
            boot=first.boot,
            seq=first.first_seq,
            replayed=first.received_ms < self.connected_since_ms,
            readings=",".join(self._readings_json.encode(f) for f in frames),
        )
        return Message(first.device, self.telemetry_topic(first.device), payload,
                       [(f.id, f.count) for f in frames])

    async def _publish_statuses(self, client: aiomqtt.Client) -> None:
        dropped = dict(self.queue.stats.dropped)
        # Drops are reported upstream as they happen, not only at the next reconnect; the
        # queue's figures every status_every_s, so that a backlog is seen growing or draining.
        if dropped != self._dropped_reported or \
                time.monotonic() - self._gateway_status_at >= self.mqtt.status_every_s:
            await client.publish(self.gateway_status_topic, self._gateway_status("online"),
                                 qos=1, retain=True)
            self._dropped_reported = dropped
            self._gateway_status_at = time.monotonic()
        while self._status_due:
            device = self._status_due.pop()
            await client.publish(self.device_status_topic(device),
                                 contract.device_status_payload(self._status[device]), qos=1,
                                 retain=True)
            self._status_sent[device] = time.monotonic()

