"""MQTT ingest: device statuses, gateway statuses and a bounded window of recent readings.

    kinhbac fleet serve      with KINHBAC_INGEST_ENABLED=true: a background task of the app
    kinhbac fleet ingest     the same worker on its own (run_standalone)

It subscribes at QoS 1 to what the gateways publish (kinhbac/mqtt_contract.py, docs/mqtt.md):
`<prefix>/+/+/telemetry`, `<prefix>/+/+/status`, `<prefix>/+/gateway/+/status` and
`<prefix>/+/+/ota` (update progress, which kinhbac/fleet/rollouts.py applies to rollouts). Each message
is validated as it arrives and merged into one pending batch; one writer thread commits the
batch in a single transaction every `ingest_batch_interval_s` (sooner once `ingest_batch_max`
messages wait).

The pending batch coalesces: per device it holds the newest status and the newest N readings
(N = `ingest_readings_per_device`, the window), per gateway its latest status. So however far
the database falls behind, what waits in memory is bounded by the fleet's size, and what the
merge drops is what the window would have dropped anyway. A failed write is merged back and
retried; a malformed message is counted and skipped. Neither stops the worker.

Nothing relies on arrival order (a shared subscription splits one device's messages between
instances; a broker redelivers): a status older than the stored one is ignored, readings are
keyed by (device, boot, seq) and inserted with "ignore conflicts", and the window keeps the
newest by (boot, seq), whatever order they came in.
"""

import asyncio
import json
import logging
import random
import signal
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, select

from kinhbac.fleet import rollouts
from kinhbac.fleet.models import (
    Device,
    DeviceStatus,
    GatewayStatus,
    RecentReading,
    Site,
    UTCDateTime,
    utcnow,
)
from kinhbac.fleet.settings import Settings
from kinhbac.mqtt_contract import (  # topics and payloads, as the gateways publish them
    TopicError,
    device_status_filter,
    gateway_status_filter,
    ota_progress_filter,
    parse_device_status,
    parse_gateway_status,
    parse_ota_progress,
    parse_telemetry,
    parse_topic,
    telemetry_filter,
)

if TYPE_CHECKING:
    import aiomqtt
    from fastapi import FastAPI

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.5  # first delay after a lost or refused broker connection
RECONNECT_MAX_S = 30.0  # delays double up to this, jittered
WRITE_RETRY_MAX_S = 10.0  # a failing database is retried at most this far apart
MALFORMED_LOG_EVERY_S = 10.0  # one log line per this long, whatever the rate of bad messages
KEEPALIVE_S = 30
# A boot counter this far past the last one the fleet heard is refused: a node adds one per
# restart (a node waking every minute for two months adds about 90,000), while a forged status
# far ahead would freeze the device's own later ones out.
MAX_BOOT_JUMP = 100_000
REFUSED_LOG_EVERY_S = 10.0  # messages refused for their site or boot: a line per this long
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Malformed(Exception):
    """A message the ingest cannot take: the reason is the message."""


class SubscriptionRefused(Exception):
    """The broker refused a filter (SUBACK failure): the fleet account's ACL."""


def _from_ms(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


# ---- the pending batch


@dataclass
class Batch:
    """What waits for the next transaction, coalesced (see the module's docstring)."""

    window: int
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)  # wire id -> row
    gateways: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    readings: dict[str, dict[tuple[int, int], dict[str, Any]]] = field(default_factory=dict)
    # Update steps are not coalesced (each is an event of its rollout): per device, each step
    # once (a redelivery merges into it), at most rollouts.MAX_STEPS_PER_DEVICE.
    progress: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    messages: int = 0  # accepted messages merged in
    # The newest reading's own time (ts), for the ingest's lag (kinhbac/fleet/metrics.py).
    newest_reading_at: datetime | None = None

    def add_status(self, row: dict[str, Any]) -> None:
        held = self.statuses.get(row["wire_id"])
        if held is None or held["last_seen_at"] <= row["last_seen_at"]:
            if held is not None and row.get("free_flash_bytes") is None:
                # The device record keeps the last figure reported: a later status without
                # one (a node in safe mode) in the same batch must not lose it.
                row = {**row, "free_flash_bytes": held.get("free_flash_bytes"),
                       "free_flash_at": held.get("free_flash_at")}
            self.statuses[row["wire_id"]] = row
        elif held.get("free_flash_bytes") is None and row.get("free_flash_bytes") is not None:
            held["free_flash_bytes"] = row["free_flash_bytes"]  # an older status's figure
            held["free_flash_at"] = row["free_flash_at"]

    def add_gateway(self, row: dict[str, Any]) -> None:
        key = (row["site"], row["gateway"])
        held = self.gateways.get(key)
        if held is None:
            self.gateways[key] = row
        elif row["since_at"] is None:  # a last will: the held session ended
            self.gateways[key] = {**held, "state": row["state"],
                                  "received_at": row["received_at"]}
        elif held["since_at"] is None or held["since_at"] <= row["since_at"]:
            self.gateways[key] = row

    def add_readings(self, wire_id: str, rows: list[dict[str, Any]]) -> None:
        held = self.readings.setdefault(wire_id, {})
        for row in rows:
            held.setdefault((row["boot"], row["seq"]), row)
        if len(held) > 2 * self.window:  # trimming at 2N keeps the cost per reading constant
            self._trim(wire_id)

    def add_reading_time(self, at: datetime) -> None:
        """A reading's time, for newest_reading_at."""
        if self.newest_reading_at is None or at > self.newest_reading_at:
            self.newest_reading_at = at

    def add_progress(self, row: dict[str, Any]) -> bool:
        """Add an update step; False if its device has too many waiting already."""
        held = self.progress.setdefault(row["wire_id"], {})
        key = (row["rollout_id"], row["release_id"], row["state"], row["at"], row["bytes"])
        if key in held:
            return True
        if len(held) >= rollouts.MAX_STEPS_PER_DEVICE:
            return False
        held[key] = row
        return True

    def progress_rows(self) -> list[dict[str, Any]]:
        return [row for wire_id in sorted(self.progress)
                for row in self.progress[wire_id].values()]

    def _trim(self, wire_id: str) -> None:
        held = self.readings[wire_id]
        if len(held) > self.window:
            newest = sorted(held, reverse=True)[: self.window]
            self.readings[wire_id] = {key: held[key] for key in newest}

    def extend(self, other: "Batch") -> None:
        """Merge in `other`, as if its messages had come after this batch's."""
        for row in other.statuses.values():
            self.add_status(row)
        for row in other.gateways.values():
            self.add_gateway(row)
        for wire_id, rows in other.readings.items():
            self.add_readings(wire_id, list(rows.values()))
        for row in other.progress_rows():
            self.add_progress(row)
        if other.newest_reading_at is not None:
            self.add_reading_time(other.newest_reading_at)
        self.messages += other.messages

    def reading_rows(self) -> list[dict[str, Any]]:
        """The readings to insert: per device at most the window, in key order (without the
        topic's site, which only refuse_foreign() reads)."""
        rows = []
        for wire_id in sorted(self.readings):
            self._trim(wire_id)
            held = self.readings[wire_id]
            rows.extend({k: v for k, v in held[key].items() if k != "site"}
                        for key in sorted(held))
        return rows


# ---- the transaction


def _insert(connection: Connection, table: sa.Table) -> Any:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


_DEVICE = Device.__table__
_UPDATE_DEVICE = (
    sa.update(_DEVICE)
    .where(_DEVICE.c.wire_id == sa.bindparam("b_wire_id"))
    .where(sa.or_(_DEVICE.c.last_seen_at.is_(None),
                  _DEVICE.c.last_seen_at <= sa.bindparam("b_seen", type_=UTCDateTime())))
    .values(
        firmware_version=sa.func.coalesce(sa.bindparam("b_firmware", type_=sa.String()),
                                          _DEVICE.c.firmware_version),
        boot_counter=sa.func.coalesce(sa.bindparam("b_boot", type_=sa.BigInteger()),
                                      _DEVICE.c.boot_counter),
        last_seen_at=sa.bindparam("b_seen", type_=UTCDateTime()),
        # The last figure reported stays until another comes (a status without one keeps it).
        free_flash_bytes=sa.func.coalesce(sa.bindparam("b_free", type_=sa.BigInteger()),
                                          _DEVICE.c.free_flash_bytes),
        free_flash_at=sa.func.coalesce(sa.bindparam("b_free_at", type_=UTCDateTime()),
                                       _DEVICE.c.free_flash_at),
    )
)
# Everything older, by (boot, seq), than the device's newest `keep` readings. Row values with
# a subquery: PostgreSQL, and SQLite since 3.15.
_PRUNE = sa.text(
    "DELETE FROM recent_reading WHERE wire_id = :wire_id AND (boot, seq) <= ("
    "SELECT boot, seq FROM recent_reading WHERE wire_id = :wire_id "
    "ORDER BY boot DESC, seq DESC LIMIT 1 OFFSET :keep)"
)


@dataclass
class Refusals:
    """Messages' rows kept out of a batch: a device's status or readings under another site's
    topics than the one it is registered at, or a boot counter far past its last; update
    steps that rollouts.apply_progress() refused (site, rollout, release)."""

    site: int = 0
    boot: int = 0
    ota: int = 0
    example: str = ""  # one of them, for the log
    steps_failed: int = 0  # update steps not applied: the rules raised (logged with its trace)

    def __bool__(self) -> bool:
        return bool(self.site or self.boot or self.ota or self.steps_failed)


def refuse_foreign(connection: Connection, batch: Batch) -> Refusals:
    """Drop from `batch` what its topic's site may not say about a device.

    The broker keeps a site's gateway account to its own subtree, but any device id can be
    named there: a registered device is believed only under its own site's topics (a device
    registered without a site, under none), and never with a boot counter MAX_BOOT_JUMP past
    the last one the fleet heard."""
    refused = Refusals()
    ids = sorted(set(batch.statuses) | set(batch.readings))
    if not ids:
        return refused
    site = Site.__table__
    registered = dict(connection.execute(
        sa.select(_DEVICE.c.wire_id, site.c.slug)
        .select_from(_DEVICE.outerjoin(site, site.c.id == _DEVICE.c.site_id))
        .where(_DEVICE.c.wire_id.in_(ids))).all())
    status = DeviceStatus.__table__
    boots = dict(connection.execute(
        sa.select(status.c.wire_id, status.c.boot).where(status.c.wire_id.in_(ids))).all())

    def why_not(wire_id: str, topic_site: str, boot: int | None) -> str | None:
        if wire_id in registered and registered[wire_id] != topic_site:
            refused.site += 1
            home = registered[wire_id]
            return (f"{wire_id} under site {topic_site!r}, registered at "
                    f"{home!r}" if home else f"{wire_id} under site {topic_site!r}, "
                    "registered at no site")
        last = boots.get(wire_id)
        if boot is not None and last is not None and boot > last + MAX_BOOT_JUMP:
            refused.boot += 1
            return f"{wire_id} boot {boot}, last heard {last}"
        return None

    for wire_id, row in list(batch.statuses.items()):
        reason = why_not(wire_id, row["site"], row["boot"])
        if reason:
            refused.example = reason
            del batch.statuses[wire_id]
    for wire_id, held in list(batch.readings.items()):
        for key, row in list(held.items()):
            reason = why_not(wire_id, row["site"], row["boot"])
            if reason:
                refused.example = reason
                del held[key]
        if not held:
            del batch.readings[wire_id]
    return refused


def write_batch(engine: Engine, batch: Batch) -> Refusals:
    """Commit `batch` in one transaction, less what refuse_foreign() keeps out (returned).
    Rows go in key order, so that instances writing at once take their row locks in the same
    order."""
    with engine.begin() as connection:
        refused = refuse_foreign(connection, batch)
        if batch.gateways:
            _write_gateways(connection, [batch.gateways[k] for k in sorted(batch.gateways)])
        if batch.statuses:
            _write_statuses(connection, [batch.statuses[k] for k in sorted(batch.statuses)])
        if batch.readings:
            _write_readings(connection, batch)
        if batch.progress:
            _apply_progress(connection, batch, refused)
    return refused


def _apply_progress(connection: Connection, batch: Batch, refused: Refusals) -> None:
    """The batch's update steps through the ORM's records and rules, in this same transaction
    but inside a savepoint: a step the rules fail on (a bug, data the checks let through) costs
    the batch's update steps, logged, and not the readings and statuses that came with them."""
    steps = batch.progress_rows()
    try:
        with connection.begin_nested(), Session(bind=connection) as session:
            problems = rollouts.apply_progress(session, steps)
            # Inside a savepoint the session keeps one of its own (SQLAlchemy's
            # conservative_savepoint), released here; the transaction commits in write_batch.
            session.commit()
    except (sa.exc.OperationalError, sa.exc.InterfaceError):
        raise  # the database is away, or a deadlock: the whole batch is retried
    except Exception:
        log.exception("ingest: %d update steps could not be applied and are dropped; the "
                      "batch's readings and statuses are written", len(steps))
        refused.steps_failed += len(steps)
        return
    refused.ota += len(problems)
    if problems:
        refused.example = problems[0]


def _write_gateways(connection: Connection, rows: list[dict[str, Any]]) -> None:
    table = GatewayStatus.__table__
    full = [row for row in rows if row["since_at"] is not None]
    wills = [row for row in rows if row["since_at"] is None]
    if full:
        insert = _insert(connection, table)
        connection.execute(insert.on_conflict_do_update(
            index_elements=["site", "gateway"],
            set_={name: insert.excluded[name]
                  for name in ("state", "since_at", "dropped", "received_at", "queue_depth",
                               "oldest_queued_at")},
            where=sa.or_(table.c.since_at.is_(None), table.c.since_at <= insert.excluded.since_at),
        ), full)
    # Only the state changes: the session, its drop counts and its queue's last figures stay
    # as they were (the readings are still waiting on the gateway's disk, most likely).
    if wills:
        insert = _insert(connection, table)
        connection.execute(insert.on_conflict_do_update(
            index_elements=["site", "gateway"],
            set_={"state": insert.excluded.state, "received_at": insert.excluded.received_at},
        ), wills)


def _write_statuses(connection: Connection, rows: list[dict[str, Any]]) -> None:
    if connection.dialect.name == "postgresql":
        statuses = _records(rows)
        connection.execute(_PG_UPSERT_STATUSES, {"rows": statuses})
        connection.execute(_PG_UPDATE_DEVICES, {"rows": statuses})
        return
    table = DeviceStatus.__table__
    insert = _insert(connection, table)
    columns = set(table.columns.keys())
    connection.execute(insert.on_conflict_do_update(
        index_elements=["wire_id"],
        set_={column.name: insert.excluded[column.name]
              for column in table.columns if column.name != "wire_id"},
        where=table.c.last_seen_at <= insert.excluded.last_seen_at,
    ), [{name: value for name, value in row.items() if name in columns} for row in rows])
    # Registered devices: their registry row too (no match for an unknown one).
    connection.execute(_UPDATE_DEVICE, [
        {"b_wire_id": row["wire_id"], "b_seen": row["last_seen_at"],
         "b_firmware": row["firmware"], "b_boot": row["boot"],
         "b_free": row["free_flash_bytes"], "b_free_at": row["free_flash_at"]}
        for row in rows
    ])


def _write_readings(connection: Connection, batch: Batch) -> None:
    rows = batch.reading_rows()
    devices = sorted(batch.readings)
    if connection.dialect.name == "postgresql":
        connection.execute(_PG_INSERT_READINGS, {"rows": _records(rows)})
        connection.execute(_PG_PRUNE, {"devices": json.dumps(devices), "keep": batch.window})
        return
    insert = _insert(connection, RecentReading.__table__)
    connection.execute(insert.on_conflict_do_nothing(index_elements=["wire_id", "boot", "seq"]),
                       rows)
    connection.execute(_PRUNE, [{"wire_id": wire_id, "keep": batch.window}
                                for wire_id in devices])


# PostgreSQL: one statement per table and batch, the rows passed as one JSON document that the
# server takes apart (json_to_recordset). Measured on 1,600-message batches, this costs the
# ingest a seventh of the CPU time of executemany (or of arrays, which psycopg's text dumper
# escapes element by element), and the server half the time.


def _records(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, default=datetime.isoformat)


_PG_STATUS_RECORD = """json_to_recordset(CAST(:rows AS json)) AS heard (
    wire_id text, site text, gateway text, last_seen_at timestamptz, offline_at timestamptz,
    firmware text, boot bigint, reset_cause text, drops json, sensors json,
    sensor_failures json, received_at timestamptz, free_flash_bytes bigint,
    free_flash_at timestamptz)"""
_PG_UPSERT_STATUSES = sa.text(f"""
INSERT INTO device_status AS held (wire_id, site, gateway, last_seen_at, offline_at, firmware,
                                   boot, reset_cause, drops, sensors, sensor_failures,
                                   received_at)
SELECT wire_id, site, gateway, last_seen_at, offline_at, firmware, boot, reset_cause, drops,
       sensors, sensor_failures, received_at
FROM {_PG_STATUS_RECORD}
ON CONFLICT (wire_id) DO UPDATE SET
    site = excluded.site, gateway = excluded.gateway, last_seen_at = excluded.last_seen_at,
    offline_at = excluded.offline_at, firmware = excluded.firmware, boot = excluded.boot,
    reset_cause = excluded.reset_cause, drops = excluded.drops, sensors = excluded.sensors,
    sensor_failures = excluded.sensor_failures, received_at = excluded.received_at
WHERE held.last_seen_at <= excluded.last_seen_at
""")
_PG_UPDATE_DEVICES = sa.text(f"""
UPDATE device SET
    firmware_version = COALESCE(heard.firmware, device.firmware_version),
    boot_counter = COALESCE(heard.boot, device.boot_counter),
    last_seen_at = heard.last_seen_at,
    free_flash_bytes = COALESCE(heard.free_flash_bytes, device.free_flash_bytes),
    free_flash_at = COALESCE(heard.free_flash_at, device.free_flash_at)
FROM {_PG_STATUS_RECORD}
WHERE device.wire_id = heard.wire_id
  AND (device.last_seen_at IS NULL OR device.last_seen_at <= heard.last_seen_at)
""")
_PG_INSERT_READINGS = sa.text("""
INSERT INTO recent_reading (wire_id, boot, seq, sensor, unit, value, ts, boot_ms, pre_sync)
SELECT wire_id, boot, seq, sensor, unit, value, ts, boot_ms, pre_sync
FROM json_to_recordset(CAST(:rows AS json)) AS r (
    wire_id text, boot bigint, seq bigint, sensor text, unit text, value float8,
    ts timestamptz, boot_ms bigint, pre_sync boolean)
ON CONFLICT (wire_id, boot, seq) DO NOTHING
""")
_PG_PRUNE = sa.text("""
DELETE FROM recent_reading AS r
USING json_array_elements_text(CAST(:devices AS json)) AS d (wire_id),
      LATERAL (SELECT boot, seq FROM recent_reading AS x WHERE x.wire_id = d.wire_id
               ORDER BY boot DESC, seq DESC LIMIT 1 OFFSET :keep) AS cut
WHERE r.wire_id = d.wire_id AND (r.boot, r.seq) <= (cut.boot, cut.seq)
""")


def recent_readings(session: Session, wire_id: str, limit: int) -> list[RecentReading]:
    """The device's newest readings in the window, newest first by (boot, seq)."""
    query = (select(RecentReading).where(RecentReading.wire_id == wire_id)
             .order_by(RecentReading.boot.desc(), RecentReading.seq.desc()).limit(limit))
    return list(session.exec(query).all())


# ---- the worker


def subscriptions(settings: Settings, *, shared: bool | None = None) -> list[str]:
    """The filters the ingest subscribes to. Gateway statuses are never shared: there are few,
    and every instance takes each one (the states converge whatever the order)."""
    shared = settings.mqtt_shared if shared is None else shared
    share = f"$share/{settings.mqtt_share_group}/" if shared else ""
    prefix = settings.mqtt_topic_prefix
    return [share + telemetry_filter(prefix), share + device_status_filter(prefix),
            gateway_status_filter(prefix), share + ota_progress_filter(prefix)]


@dataclass
class IngestStats:
    """Counters since the worker started."""

    received: int = 0  # messages from the broker
    malformed: int = 0  # skipped: not JSON, not the documented shape, or a topic not read
    ignored: int = 0  # empty payloads (a retained status being cleared)
    written: int = 0  # accepted messages whose batch committed
    dropped: int = 0  # accepted messages whose batch failed for a reason a retry cannot mend
    readings_written: int = 0  # readings offered to the database, after merging
    batches: int = 0  # transactions committed
    write_failures: int = 0  # transactions that failed (and were retried)
    refused_site: int = 0  # status or reading rows under another site than the device's
    refused_boot: int = 0  # status or reading rows with a boot far past the device's last
    refused_ota: int = 0  # update steps: another site's device, an unknown rollout or release
    steps_failed: int = 0  # update steps dropped because the rules raised on them (a bug)


class IngestWorker:
    """Subscribe, validate, batch and write until cancelled. One per fleet instance."""

    def __init__(self, settings: Settings, engine: Engine, *,
                 on_commit: Callable[[Batch, float], None] | None = None) -> None:
        """`on_commit(batch, seconds)` is called on the event loop after each transaction."""
        self.settings = settings
        self.engine = engine
        self.stats = IngestStats()
        self.subscribed = asyncio.Event()  # set while connected and subscribed
        self.client_id = settings.mqtt_client_id or f"kinhbac-fleet-{socket.gethostname()}"
        self._on_commit = on_commit
        self._window = settings.ingest_readings_per_device
        self._offline_after = timedelta(seconds=settings.ingest_offline_after_s)
        self._pending = Batch(self._window)
        self._wake = asyncio.Event()  # the batch is full, or the worker is stopping
        self._stopping = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fleet-ingest-db")
        self._malformed_logged_at = -MALFORMED_LOG_EVERY_S
        self._malformed_unlogged = 0
        self._refused_logged_at = -REFUSED_LOG_EVERY_S
        self._refused_unlogged = 0

    async def run(self) -> None:
        """Receive and write until cancelled; then write what was received, and return."""
        writer = asyncio.create_task(self._write_loop(), name="fleet-ingest-writer")
        try:
            await self._receive_loop()
        finally:
            self._stopping = True
            self._wake.set()
            try:
                await writer
            finally:
                self._executor.shutdown(wait=False)

    # -- receiving

    async def _receive_loop(self) -> None:
        import aiomqtt  # the fleet extra's API works without it while ingest is off

        failures = 0
        where = f"{self.settings.mqtt_host}:{self.settings.mqtt_port}"
        while True:
            try:
                async with self._client(aiomqtt) as client:
                    await self._subscribe(client)
                    log.info("ingest subscribed at %s as %s", where, self.client_id)
                    failures = 0
                    async for message in client.messages:
                        self.accept(message.topic.value, message.payload)
            except (aiomqtt.MqttError, SubscriptionRefused) as exc:
                log.warning("ingest: MQTT broker %s: %s; reconnecting", where, exc)
            except Exception:  # a bug or a bad TLS file: keep trying, loudly, never stop
                log.exception("ingest: MQTT broker %s; reconnecting", where)
            finally:
                self.subscribed.clear()
            failures += 1
            delay = min(RECONNECT_MAX_S, RECONNECT_MIN_S * 2 ** (failures - 1))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    def _client(self, aiomqtt: Any) -> "aiomqtt.Client":
        settings = self.settings
        tls = None
        if settings.mqtt_tls:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(settings.mqtt_ca_file) if settings.mqtt_ca_file else None,
                cert_reqs=ssl.CERT_REQUIRED,  # always verify the broker
            )
        password = settings.mqtt_password
        return aiomqtt.Client(
            settings.mqtt_host, settings.mqtt_port,
            identifier=self.client_id,
            username=settings.mqtt_username,
            password=password.get_secret_value() if password else None,
            clean_session=False,  # the broker keeps what is published while we are away
            keepalive=KEEPALIVE_S,
            tls_params=tls,
            timeout=30,
        )

    async def _subscribe(self, client: "aiomqtt.Client") -> None:
        wanted = subscriptions(self.settings)
        # Every SUBSCRIBE brings the retained statuses again, one per device and gateway (also
        # to a shared subscription, from mosquitto): a burst the guards turn into no-ops. MQTT 5
        # could ask for them only for a new subscription, but paho costs a quarter more CPU
        # per message with it, and reconnects are rare (docs/fleet.md).
        granted = await client.subscribe([(topic, 1) for topic in wanted])
        refused = [topic for topic, code in zip(wanted, granted, strict=False)
                   if int(getattr(code, "value", code)) >= 0x80]
        if refused:
            raise SubscriptionRefused(f"the broker refused {', '.join(refused)}: check the fleet "
                            "account's ACL (it needs read on the prefix)")
        # The session outlives this connection: drop the filters of the other mode, or a
        # change of KINHBAC_MQTT_SHARED would leave both subscribed.
        other_mode = subscriptions(self.settings, shared=not self.settings.mqtt_shared)
        stale = [topic for topic in other_mode if topic not in wanted]
        await client.unsubscribe(stale)
        self.subscribed.set()

    def accept(self, topic: str, payload: Any, received: datetime | None = None) -> None:
        """Validate one message and merge it into the pending batch; a bad one is counted,
        logged (at most every MALFORMED_LOG_EVERY_S) and skipped."""
        self.stats.received += 1
        if not payload:
            self.stats.ignored += 1
            return
        try:
            self._merge(topic, payload, received or utcnow())
        except (Malformed, ValidationError) as exc:
            self._skip(topic, _reason(exc))
            return
        except Exception as exc:  # a bug here must not stop the ingest of everything else
            log.exception("ingest: message on %s", topic)
            self._skip(topic, repr(exc))
            return
        self._pending.messages += 1
        if self._pending.messages >= self.settings.ingest_batch_max:
            self._wake.set()

    def _merge(self, topic: str, payload: Any, received: datetime) -> None:
        try:
            where = parse_topic(self.settings.mqtt_topic_prefix, topic)
        except TopicError as exc:
            raise Malformed(str(exc)) from exc
        site, device, gateway = where.site, where.device or "", where.gateway or ""
        match where.kind:
            case "telemetry":
                telemetry = parse_telemetry(payload)
                _same(device, telemetry.device)
                self._pending.add_readings(device, [
                    {"wire_id": device, "site": site, "boot": telemetry.boot, "seq": r.seq,
                     "sensor": r.sensor,
                     "unit": r.unit, "value": r.value,
                     "ts": None if r.ts is None else _from_ms(r.ts), "boot_ms": r.boot_ms,
                     "pre_sync": r.pre_sync}
                    for r in telemetry.readings
                ])
                # For the lag: a reading stamped after it arrived comes from a clock ahead of
                # ours and would hide the lag of every batch its node is in, so it is left out.
                stamps = [r.ts for r in telemetry.readings
                          if r.ts is not None and _from_ms(r.ts) <= received]
                if stamps:
                    self._pending.add_reading_time(_from_ms(max(stamps)))
            case "device_status":
                status = parse_device_status(payload)
                _same(device, status.device)
                # A gateway's clock ahead of ours must not keep a device online for long.
                seen = min(_from_ms(status.last_seen_ms), received)
                self._pending.add_status({
                    "wire_id": device, "site": site, "gateway": status.gateway,
                    "last_seen_at": seen, "offline_at": seen + self._offline_after,
                    "firmware": status.firmware, "boot": status.boot,
                    "reset_cause": status.reset_cause, "drops": status.drops,
                    "sensors": [sensor.model_dump() for sensor in status.sensors],
                    "sensor_failures": None if status.sensor_failures is None else {
                        name: counts.model_dump()
                        for name, counts in status.sensor_failures.items()},
                    "received_at": received,
                    # The device's record, not the status table: kept until another figure.
                    "free_flash_bytes": status.free_flash_bytes,
                    "free_flash_at": None if status.free_flash_bytes is None else seen,
                })
            case "gateway_status":
                gateway_status = parse_gateway_status(payload)
                _same(gateway, gateway_status.gateway)
                since = gateway_status.since_ms
                self._pending.add_gateway({
                    "site": site, "gateway": gateway, "state": gateway_status.state,
                    "since_at": None if since is None else _from_ms(since),
                    "dropped": gateway_status.dropped or {}, "received_at": received,
                    # Null from a gateway that does not report them: "not reported".
                    "queue_depth": gateway_status.queue_depth,
                    "oldest_queued_at": None if gateway_status.oldest_queued_ms is None
                    else _from_ms(gateway_status.oldest_queued_ms),
                })
            case "ota_progress":
                step = parse_ota_progress(payload)
                _same(device, step.device)
                try:
                    release_id = uuid.UUID(step.release_id)
                    rollout_id = None if step.rollout_id is None else uuid.UUID(step.rollout_id)
                except ValueError as exc:
                    raise Malformed(f"release_id or rollout_id is not a UUID: {exc}") from None
                if not self._pending.add_progress({
                    "wire_id": device, "site": site, "release_id": release_id,
                    "rollout_id": rollout_id, "state": step.state, "bytes": step.bytes,
                    "reason": step.reason, "at": _from_ms(step.ts_ms), "boot": step.boot,
                }):
                    raise Malformed(f"more than {rollouts.MAX_STEPS_PER_DEVICE} update steps of "
                                    f"{device} in one batch")

    def _skip(self, topic: str, reason: str) -> None:
        self.stats.malformed += 1
        now = time.monotonic()
        if now - self._malformed_logged_at < MALFORMED_LOG_EVERY_S:
            self._malformed_unlogged += 1
            return
        more = (f" ({self._malformed_unlogged} more skipped since the last report)"
                if self._malformed_unlogged else "")
        log.warning("ingest: skipped a malformed message on %s: %s%s", topic, reason, more)
        self._malformed_logged_at = now
        self._malformed_unlogged = 0

    def _refused(self, refused: Refusals) -> None:
        """Count rows refuse_foreign() kept out; log them at most every REFUSED_LOG_EVERY_S."""
        self.stats.refused_site += refused.site
        self.stats.refused_boot += refused.boot
        self.stats.refused_ota += refused.ota
        self.stats.steps_failed += refused.steps_failed
        self._refused_unlogged += refused.site + refused.boot + refused.ota
        now = time.monotonic()
        if now - self._refused_logged_at < REFUSED_LOG_EVERY_S:
            return
        log.warning("ingest: refused %d status, reading or update rows (a device under another "
                    "site's topics, a boot far ahead, an update step for no rollout of it), e.g. "
                    "%s; a site's broker account may be misused", self._refused_unlogged,
                    refused.example)
        self._refused_logged_at = now
        self._refused_unlogged = 0

    # -- writing

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            if not self._stopping:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.ingest_batch_interval_s)
            self._wake.clear()
            batch = self._pending
            if not batch.messages:
                if self._stopping:
                    return
                continue
            self._pending = Batch(self._window)
            started = time.perf_counter()
            try:
                refused = await loop.run_in_executor(self._executor, write_batch, self.engine,
                                                     batch)
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                # The database is away, or a deadlock with another instance: retry.
                self.stats.write_failures += 1
                failures += 1
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                if self._stopping:
                    log.error("ingest: stopping; %d received messages not written: %s",
                              batch.messages, reason)
                    return
                log.warning("ingest: writing %d messages failed (%s); retrying",
                            batch.messages, reason)
                batch.extend(self._pending)  # what came meanwhile is newer
                self._pending = batch
                delay = min(WRITE_RETRY_MAX_S, 0.1 * 2 ** (failures - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            except Exception:  # data the checks let through, or a bug: the same next time
                self.stats.write_failures += 1
                self.stats.dropped += batch.messages
                log.exception("ingest: dropped a batch of %d messages that cannot be written",
                              batch.messages)
                continue
            failures = 0
            if refused:
                self._refused(refused)
            self.stats.batches += 1
            self.stats.written += batch.messages
            self.stats.readings_written += sum(len(r) for r in batch.readings.values())
            if self._on_commit is not None:
                self._on_commit(batch, time.perf_counter() - started)


def _same(in_topic: str, in_payload: str) -> None:
    if in_topic != in_payload:
        raise Malformed(f"the topic names {in_topic!r} but the payload {in_payload!r}")


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return str(exc)


# ---- where it runs


@asynccontextmanager
async def running(app: "FastAPI") -> AsyncIterator[IngestWorker | None]:
    """The app's ingest as a background task while the block runs, if the settings enable
    it (app.state.ingest is the worker, or None)."""
    settings: Settings = app.state.settings
    app.state.ingest = None
    if not settings.ingest_enabled:
        yield None
        return
    worker = IngestWorker(settings, app.state.engine,
                          on_commit=app.state.metrics.ingest_committed)
    app.state.ingest = worker
    task = asyncio.create_task(worker.run(), name="fleet-ingest")
    try:
        yield worker
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def run_standalone(config: Path | None = None) -> None:
    """`kinhbac fleet ingest`: wait for the database, migrate it, then ingest until Ctrl-C or
    SIGTERM (both write what was received first). FleetCliError for a bad setup."""
    from kinhbac.fleet.cli import _prepared, _settings

    settings = _settings(config)
    engine = _prepared(settings)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await IngestWorker(settings, engine).run()

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        engine.dispose()
