"""The northbound side: queued readings to the MQTT broker, QoS 1, deleted only after PUBACK.

Readings go out in queue order, several per message (one device and boot per message). A
device has at most one message awaiting its PUBACK, so its order holds across reconnects and
restarts; different devices' messages fly together, up to `max_inflight`. After a reconnect
everything still queued is sent again, marked `"replayed": true` when it waited through an
outage. Connection loss is retried with capped, jittered exponential backoff.
"""

import asyncio
import contextlib
import json
import logging
import os
import random
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiomqtt

from kinhbac.gateway.config import GatewaySettings
from kinhbac.gateway.metrics import Metrics
from kinhbac.gateway.queue import Queue, Stored
from kinhbac.gateway.telemetry import ReadingsEncoder

log = logging.getLogger(__name__)

FETCH = 256  # frames read from the queue at a time: ~13,000 readings, a few MB in memory
PROBE_TIMEOUT_S = 5.0  # a publish to our own subtree must come back within this
IDLE_POLL_S = 0.02  # how often an empty queue is looked at again
STATUS_EVERY_S = 30.0  # a device's retained status is refreshed at most this often


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
        self._prefix = f"{self.mqtt.topic_prefix}/{settings.site}"
        self._status: dict[str, dict[str, Any]] = {}
        self._status_due: set[str] = set()
        self._status_sent: dict[str, float] = {}
        self._client: aiomqtt.Client | None = None
        self._stopping = asyncio.Event()
        self._dropped_reported: dict[str, int] = {}
        self._readings_json = ReadingsEncoder()

    # ----- topics -----

    def telemetry_topic(self, device: str) -> str:
        return f"{self._prefix}/{device}/telemetry"

    def device_status_topic(self, device: str) -> str:
        return f"{self._prefix}/{device}/status"

    @property
    def gateway_status_topic(self) -> str:
        return f"{self._prefix}/gateway/{self.settings.gateway_id}/status"

    def device_status(self, device: str, status: dict[str, Any]) -> None:
        """A node's status changed (HELLO): publish it, retained, at the next chance."""
        self._status[device] = status
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
        offline = json.dumps({"state": "offline", "gateway": self.settings.gateway_id})
        return aiomqtt.Client(
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
            timeout=30,
        )

    async def run(self) -> None:
        """Stay connected and publish until stop(); never raises for a broker problem."""
        failures = 0
        while not self._stopping.is_set():
            try:
                async with self._client_for() as client:
                    self._client = client
                    failures = 0
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                if not self._stopping.is_set():
                    log.warning("broker %s:%d: %s", self.mqtt.host, self.mqtt.port, exc)
            finally:
                self._client = None
                self.connected.clear()
                self.metrics.uplink_up.set(0)
            if self._stopping.is_set():
                return
            self.state = "reconnecting"
            failures += 1
            delay = min(self.mqtt.backoff_max_s, self.mqtt.backoff_min_s * 2 ** (failures - 1))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay * random.uniform(0.5, 1.0))

    async def stop(self, drain_s: float = 5.0) -> None:
        """Publish what is queued for up to drain_s, say offline, disconnect."""
        deadline = time.monotonic() + drain_s
        while self.connected.is_set() and self.queue.stats.depth and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stopping.set()

    async def _probe(self, client: aiomqtt.Client) -> None:
        """Publish to our own subtree and read it back before trusting PUBACKs.

        With MQTT 3.1.1 a broker acknowledges a publish its ACL then discards: an account that
        does not match the site would see every reading "delivered" and deleted. So the uplink
        proves it can write (and read) kinhbac/<site>/# first, and otherwise keeps everything
        queued and says why.
        """
        topic = f"{self._prefix}/gateway/{self.settings.gateway_id}/probe"
        nonce = json.dumps({"probe": os.urandom(8).hex()}).encode()  # JSON, like every topic
        await client.subscribe(topic, qos=1)
        await client.publish(topic, nonce, qos=1)

        async def echoed() -> None:
            async for message in client.messages:
                if message.payload == nonce:
                    return

        try:
            await asyncio.wait_for(echoed(), PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
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
        self.state = "connected"
        self.connected.set()
        self.metrics.uplink_up.set(1)
        log.info("connected to broker %s:%d", self.mqtt.host, self.mqtt.port)
        self._status_sent.clear()
        self._status_due.update(self._status)  # a new broker session may have lost them
        try:
            await self._publish_loop(client)
        finally:
            if self._stopping.is_set():
                with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                    await client.publish(self.gateway_status_topic,
                                         self._gateway_status("offline"), qos=1, retain=True,
                                         timeout=2)

    def _gateway_status(self, state: str) -> str:
        return json.dumps({
            "state": state,
            "gateway": self.settings.gateway_id,
            "since_ms": self.connected_since_ms,
            "dropped": self.queue.stats.dropped,
        })

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
        except aiomqtt.MqttError as exc:
            if not failed.done():
                failed.set_exception(exc)  # the publish loop raises it and ends the session
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
        head = json.dumps({
            "device": first.device,
            "site": self.settings.site,
            "gateway": self.settings.gateway_id,
            "boot": first.boot,
            "seq": first.first_seq,
            "replayed": first.received_ms < self.connected_since_ms,
        }, separators=(",", ":"))
        body = ",".join(self._readings_json.encode(f) for f in frames)
        payload = f'{head[:-1]},"readings":[{body}]}}'
        return Message(first.device, self.telemetry_topic(first.device), payload.encode(),
                       [(f.id, f.count) for f in frames])

    async def _publish_statuses(self, client: aiomqtt.Client) -> None:
        dropped = dict(self.queue.stats.dropped)
        if dropped != self._dropped_reported:
            # Drops are reported upstream as they happen, not only at the next reconnect.
            await client.publish(self.gateway_status_topic, self._gateway_status("online"),
                                 qos=1, retain=True)
            self._dropped_reported = dropped
        while self._status_due:
            device = self._status_due.pop()
            await client.publish(self.device_status_topic(device),
                                 json.dumps(self._status[device]), qos=1, retain=True)
            self._status_sent[device] = time.monotonic()

