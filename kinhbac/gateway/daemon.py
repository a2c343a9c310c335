"""`kinhbac gateway run`: the listener, the queue and the uplink in one asyncio process.

Every long-running task runs under one supervisor, a TaskGroup, as aiomqtt runs its loops: the
uplink, housekeeping, the fleet key refresh (and the OTA assignments after each listing), the
OTA release fetcher, the node listener's server, the watch on the queue's database thread and
the systemd watchdog pings. If one of them dies (or returns, which
none does while the gateway runs), the gateway logs one line naming the task and the error
("gateway stopped: task housekeeping failed: RuntimeError: ..."), marks itself offline, closes
the queue and `run()` raises GatewayFailed: the process exits 1 and systemd restarts it.

SIGTERM (or SIGINT) stops accepting nodes, lets frames being committed get their ACKs,
publishes what it can for a few seconds, marks the gateway offline and exits cleanly (0).
"""

import asyncio
import faulthandler
import json
import logging
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any

from prometheus_client import Counter

from kinhbac import mqtt_contract
from kinhbac.gateway.config import GatewaySettings
from kinhbac.gateway.keys import FileKeyStore, FleetKeyStore, KeyStore
from kinhbac.gateway.listener import DeviceInfo, Listener
from kinhbac.gateway.metrics import Metrics
from kinhbac.gateway.ota_cache import ReleaseCache
from kinhbac.gateway.ota_offers import OtaOffers
from kinhbac.gateway.queue import Queue, QueueError, QueueLayoutError
from kinhbac.gateway.systemd import Notifier
from kinhbac.gateway.uplink import Uplink

log = logging.getLogger("kinhbac.gateway")

HOUSEKEEPING_S = 1.0  # gauges, key file changes, the age limit
DRAIN_S = 5.0  # a stop publishes what is queued for up to this long
UPLINK_STOP_S = 5.0  # then the uplink says offline (a 2 s publish) and disconnects within this
OFFLINE_S = 3.0  # after a task died, the uplink gets this long to mark the gateway offline
CLOSE_S = 5.0  # the queue's last checkpoint; a disk hung longer is left (commits are in the WAL)


class GatewayFailed(Exception):
    """The gateway stopped on a failure; str() is the one-line reason, `task` names the task
    that died (None when start-up or the stop itself failed)."""

    def __init__(self, reason: str, *, task: str | None = None) -> None:
        super().__init__(reason)
        self.task = task


class TaskEnded(Exception):
    """A supervised task ended by itself while the gateway was running."""


class Gateway:
    """The running gateway; `run()` returns after stop() (or a signal) has drained it, or
    raises GatewayFailed when one of its tasks died."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.keys = self._key_store()
        self.queue = Queue(
            settings.database,
            disk_cap_bytes=settings.disk_cap_bytes,
            max_age_s=settings.max_age_s,
            commit_window_ms=settings.commit_window_ms,
            on_commit=lambda seconds, _rows: self.metrics.commit_seconds.observe(seconds),
            on_drop=lambda reason, n: self.metrics.readings_dropped.labels(reason).inc(n),
            on_fault=lambda kind: self.metrics.storage_faults.labels(kind).inc(),
        )
        self.uplink = Uplink(settings, self.queue, self.metrics)
        fleet = self.keys if isinstance(self.keys, FleetKeyStore) else None
        self.ota = OtaOffers(
            cache=ReleaseCache(settings.ota_cache_dir, settings.ota.cache_bytes),
            queue=self.queue,
            site=settings.site,
            gateway=settings.gateway_id,
            fleet=fleet,  # a key file gateway has no assignments: it offers nothing
            assignments_file=settings.fleet_ota_cache if fleet is not None else None,
            registry=self.metrics.registry,
        )
        self.listener = Listener(
            keys=self.keys,
            queue=self.queue,
            metrics=self.metrics,
            host=settings.listen_host,
            port=settings.listen_port,
            idle_timeout_s=settings.idle_timeout_s,
            frame_timeout_s=settings.frame_timeout_s,
            max_connections=settings.max_connections,
            max_connections_per_address=settings.max_connections_per_address,
            node_config_dir=settings.node_config_dir,
            on_hello=self._on_hello,
            on_seen=self.uplink.device_seen,
            on_safe_mode=self.uplink.device_in_safe_mode,
            ota=self.ota,
        )
        self.metrics_port: int | None = None
        self.systemd = Notifier.from_environment()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False  # a stop or a failure is under way: tasks may end now
        self._failure: GatewayFailed | None = None
        self._tasks: list[asyncio.Task] = []
        self._uplink_task: asyncio.Task | None = None

    def _key_store(self) -> KeyStore:
        """The local key file, or the fleet (with a failure counter beside the other metrics)."""
        settings = self.settings
        if settings.key_file is not None:
            return FileKeyStore(settings.key_file)
        assert settings.fleet_url is not None and settings.fleet_token is not None
        failures = Counter("kinhbac_gateway_key_fetch_failures", "Failed fetches of device "
                           "keys from the fleet, by kind", ["kind"],
                           registry=self.metrics.registry)
        return FleetKeyStore(
            url=settings.fleet_url,
            token=settings.fleet_token.get_secret_value(),
            cache_file=settings.fleet_key_cache,
            refresh_s=settings.key_refresh_s,
            on_failure=lambda kind: failures.labels(kind).inc(),
        )

    def _on_hello(self, device: str, info: DeviceInfo) -> None:
        hello = info.hello
        self.uplink.device_status(device, mqtt_contract.device_status(
            device=device,
            site=self.settings.site,
            gateway=self.settings.gateway_id,
            last_seen_ms=hello["seen_ms"],
            firmware=hello["fw_version"],
            boot=hello["boot"],
            reset_cause=hello["reset_cause"],
            drops=hello["drops"],
            sensors=info.sensors,
            failures=hello.get("failures"),  # None from a node that does not count by sensor
            free_flash_bytes=hello.get("free_flash"),  # None from a node that does not say
        ))

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until stop(), then drain and return. If a task dies (or start-up fails), log
        the reason in one line, stop without draining, and raise GatewayFailed."""
        try:
            try:
                port = await self._start()
            except QueueLayoutError:
                raise  # not a crash: restarting cannot fix it (the caller exits 2)
            except Exception as exc:
                raise self._failed("start-up failed", exc) from exc
            try:
                async with asyncio.TaskGroup() as tasks:
                    self._start_tasks(tasks)
                    await asyncio.sleep(0)  # every task has taken its first step
                    self._announce(port)
                    await self._stop.wait()
                    await self._drain()
            except BaseExceptionGroup as group:
                if self._failure is None:  # no task died: the drain itself failed
                    raise self._failed("stop failed", group.exceptions[0]) from group
                raise self._failure  # its cause is the task's error
            if self._failure is not None:  # a stop cancelled the failed task as it ended
                raise self._failure
        finally:
            await self._close()

    async def _start(self) -> int:
        await self.queue.open()
        await asyncio.to_thread(self.ota.load)  # the release cache and the last assignments
        if isinstance(self.keys, FleetKeyStore):
            # The fleet's answer (or the cache) before the first node; the OTA assignments
            # right after a good listing, as at every refresh.
            if await self.keys.update():
                await self.ota.update()
        port = await self.listener.start()
        self.metrics_port = self.metrics.serve(self.settings.metrics_host,
                                               self.settings.metrics_port)
        return port

    def _start_tasks(self, tasks: asyncio.TaskGroup) -> None:
        def supervise(name: str, work: Coroutine[Any, Any, Any]) -> asyncio.Task:
            task = tasks.create_task(self._supervised(name, work), name=name)
            self._tasks.append(task)
            return task

        supervise("queue", self.queue.watch())
        supervise("listener", self._serve_nodes())
        self._uplink_task = supervise("uplink", self.uplink.run())
        supervise("housekeeping", self._housekeeping())
        supervise("ota", self.ota.run())
        if isinstance(self.keys, FleetKeyStore):
            supervise("fleet-keys", self.keys.run(then=self.ota.update))
        interval = self.systemd.ping_interval_s
        if interval is not None:
            supervise("watchdog", self._watchdog(interval))

    def _announce(self, port: int) -> None:
        """Serving: nodes can connect and the uplink runs (connected or not: an absent broker
        is not a failure, the queue holds the readings)."""
        where = (f"nodes on {self.settings.listen_host}:{port}, {len(self.keys)} device keys, "
                 f"broker {self.settings.mqtt.host}:{self.settings.mqtt.port}")
        log.info("gateway %s of site %s: %s", self.settings.gateway_id, self.settings.site, where)
        self.ready.set()
        self.systemd.notify("READY=1", f"STATUS=serving {where}")

    async def _drain(self) -> None:
        """The graceful stop: no new nodes, ACKs being committed go out, the queue drains for
        DRAIN_S, the gateway says offline; then the other tasks are cancelled."""
        self._stopping = True
        self.systemd.notify("STOPPING=1", "STATUS=stopping: draining")
        log.info("stopping: no new nodes, draining")
        await self.listener.stop()
        await self.uplink.stop(DRAIN_S)
        assert self._uplink_task is not None
        done, _ = await asyncio.wait({self._uplink_task}, timeout=UPLINK_STOP_S)
        if not done:
            log.warning("the uplink did not stop within %g s: cancelled (what it was sending "
                        "stays queued)", UPLINK_STOP_S)
        for task in self._tasks:
            task.cancel()

    async def _close(self) -> None:
        """Whatever ended the run: no node connections left, the queue closed (bounded)."""
        self._stopping = True
        await self.listener.stop()
        try:
            await asyncio.wait_for(self.queue.close(), CLOSE_S)
        except TimeoutError:
            log.error("the queue did not close within %g s; what it committed is safe in its "
                      "write-ahead log", CLOSE_S)
        except Exception as exc:  # noqa: BLE001 - the process ends anyway: say why, go on
            log.error("closing the queue: %s", _describe(exc))
        self.ota.cache.close()
        self.systemd.close()
        log.info("stopped; %d readings still queued for next time", self.queue.stats.depth)

    # ----- the supervisor -----

    async def _supervised(self, name: str, work: Coroutine[Any, Any, Any]) -> None:
        """Run one of the gateway's tasks; if it dies, or ends while the gateway runs, the
        gateway stops (the TaskGroup cancels the others) and run() raises GatewayFailed."""
        try:
            await work
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._stopping or (task is not None and task.cancelling()):
                raise  # the supervisor's own cancel (a stop, or another task died)
            error: BaseException = TaskEnded("cancelled from within")
        except Exception as exc:  # noqa: BLE001 - whatever it is, it ends the gateway
            error = exc
        else:
            if self._stopping:
                return
            error = TaskEnded("returned while the gateway was running")
        failure = self._failed(f"task {name} failed", error, task=name)
        if failure is self._failure and name != "uplink":
            await self._mark_offline()
        raise failure from error

    def _failed(self, reason: str, error: BaseException, *,
                task: str | None = None) -> GatewayFailed:
        """Record a failure and log it in one line (its traceback rides in the same record);
        only the first one stops the gateway, later ones are what the stop shook loose."""
        failure = GatewayFailed(f"{reason}: {_describe(error)}", task=task)
        failure.__cause__ = error
        if self._failure is not None:
            log.error("while stopping: %s", failure, exc_info=error)
            return failure
        self._failure = failure
        self._stopping = True
        log.critical("gateway stopped: %s", failure, exc_info=error)
        self.systemd.notify("STOPPING=1", f"STATUS=stopped: {failure}")
        return failure

    async def _mark_offline(self) -> None:
        """After a task died: let the uplink publish the gateway's offline status (no drain),
        which a cancelled connection would not (its clean disconnect drops the will)."""
        uplink = self._uplink_task
        if uplink is None or uplink.done():
            return
        await self.uplink.stop(0)
        await asyncio.wait({uplink}, timeout=OFFLINE_S)

    async def _serve_nodes(self) -> None:
        """The node listener's server, until the gateway stops; it closing by itself is a
        failure (a gateway that no longer hears its nodes must be restarted).

        Each node's connection runs in a task of the server's, not of this supervisor: a
        connection that breaks, however it breaks, ends only itself. Were they supervised, any
        peer on the site's WiFi could stop the gateway at will."""
        try:
            await self.listener.serve()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._stopping or (task is not None and task.cancelling()):
                raise
        if not self._stopping:
            raise TaskEnded("the node listener stopped accepting connections")

    async def _watchdog(self, interval_s: float) -> None:
        """WATCHDOG=1 from the event loop itself: a loop that hangs stops these, and systemd
        restarts the gateway (WatchdogSec= in the unit)."""
        while True:
            self.systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    async def _housekeeping(self) -> None:
        """Gauges, the age limit, key file changes. A failed maintenance (an I/O error) is
        logged once per streak and tried again next round: the queue reports storage faults
        itself. Anything else ends the task, and so the gateway."""
        failing: str | None = None
        while True:
            try:
                stats = await self.queue.maintain()
            except QueueError as exc:
                if failing is None:
                    log.warning("queue maintenance failed (%s); trying again every %g s",
                                _describe(exc), HOUSEKEEPING_S)
                failing = str(exc)
            else:
                if failing is not None:
                    log.info("queue maintenance works again")
                    failing = None
                self.metrics.queue_depth.set(stats.depth)
                oldest = stats.oldest_received_ms
                self.metrics.oldest_age.set(
                    0 if oldest is None else max(0.0, time.time() - oldest / 1000))
            self.keys.refresh()
            await asyncio.sleep(HOUSEKEEPING_S)


def _describe(error: BaseException) -> str:
    """"QueueError: maintain failed: disk I/O error", on one line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _OneLine(logging.Formatter):
    """Text, one line per record: a traceback stays on its record's line, its line breaks
    written as \\n. The journal stores each line of stderr as an entry of its own, so a
    multi-line traceback would be split up and interleaved with other lines."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


def setup_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonLines())
    else:
        handler.setFormatter(_OneLine("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def run_gateway(settings: GatewaySettings) -> None:
    """Run until SIGTERM or SIGINT (then return), or until a task dies (GatewayFailed, already
    logged in one line: the caller exits 1)."""
    # systemd's watchdog kills a hung gateway with SIGABRT: the journal then shows where every
    # thread was stuck.
    faulthandler.enable(all_threads=True)

    async def main() -> None:
        gateway = Gateway(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, gateway.stop)
        await gateway.run()

    asyncio.run(main())
