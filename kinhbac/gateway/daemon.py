"""`kinhbac gateway run`: the listener, the queue and the uplink in one asyncio process.

SIGTERM (or SIGINT) stops accepting nodes, lets frames being committed get their ACKs,
publishes what it can for a few seconds, marks the gateway offline and exits cleanly.
"""

import asyncio
import json
import logging
import signal
import sys
import time
from typing import Any

from prometheus_client import Counter

from kinhbac.gateway.config import GatewaySettings
from kinhbac.gateway.keys import FileKeyStore, FleetKeyStore, KeyStore
from kinhbac.gateway.listener import DeviceInfo, Listener
from kinhbac.gateway.metrics import Metrics
from kinhbac.gateway.queue import Queue
from kinhbac.gateway.uplink import Uplink

log = logging.getLogger("kinhbac.gateway")

HOUSEKEEPING_S = 1.0  # gauges, key file changes, the age limit
DRAIN_S = 5.0


class Gateway:
    """The running gateway; `run()` returns after stop() (or a signal) has drained it."""

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
        )
        self.uplink = Uplink(settings, self.queue, self.metrics)
        self.listener = Listener(
            keys=self.keys,
            queue=self.queue,
            metrics=self.metrics,
            host=settings.listen_host,
            port=settings.listen_port,
            idle_timeout_s=settings.idle_timeout_s,
            frame_timeout_s=settings.frame_timeout_s,
            max_connections=settings.max_connections,
            node_config_dir=settings.node_config_dir,
            on_hello=self._on_hello,
            on_seen=self.uplink.device_seen,
        )
        self.metrics_port: int | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()

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
        self.uplink.device_status(device, {
            "device": device,
            "site": self.settings.site,
            "gateway": self.settings.gateway_id,
            "last_seen_ms": hello["seen_ms"],
            "firmware": hello["fw_version"],
            "boot": hello["boot"],
            "reset_cause": hello["reset_cause"],
            "drops": _drop_names(hello["drops"]),
            "sensors": [{"name": n, "unit": u} for n, u in info.sensors],
        })

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await self.queue.open()
        fleet_keys = None
        if isinstance(self.keys, FleetKeyStore):
            await self.keys.update()  # the fleet's answer (or the cache) before the first node
            fleet_keys = asyncio.create_task(self.keys.run(), name="fleet-keys")
        port = await self.listener.start()
        self.metrics_port = self.metrics.serve(self.settings.metrics_host,
                                               self.settings.metrics_port)
        uplink = asyncio.create_task(self.uplink.run(), name="uplink")
        housekeeping = asyncio.create_task(self._housekeeping(), name="housekeeping")
        log.info("gateway %s of site %s: nodes on %s:%d, %d device keys, broker %s:%d",
                 self.settings.gateway_id, self.settings.site, self.settings.listen_host, port,
                 len(self.keys), self.settings.mqtt.host, self.settings.mqtt.port)
        self.ready.set()
        await self._stop.wait()
        log.info("stopping: no new nodes, draining")
        await self.listener.stop()
        await self.uplink.stop(DRAIN_S)
        await asyncio.wait_for(uplink, timeout=DRAIN_S + 5)
        housekeeping.cancel()
        if fleet_keys is not None:
            fleet_keys.cancel()
        await self.queue.close()
        log.info("stopped; %d readings still queued for next time", self.queue.stats.depth)

    async def _housekeeping(self) -> None:
        while True:
            stats = await self.queue.maintain()
            self.metrics.queue_depth.set(stats.depth)
            oldest = stats.oldest_received_ms
            self.metrics.oldest_age.set(
                0 if oldest is None else max(0.0, time.time() - oldest / 1000))
            self.keys.refresh()
            await asyncio.sleep(HOUSEKEEPING_S)


def _drop_names(drops: list[int]) -> dict[str, int]:
    """A node's drop counters by name; counters a later firmware adds keep their position."""
    names = ("buffer_full", "storage_error", "sensor_error")
    return {names[i] if i < len(names) else f"counter_{i}": n for i, n in enumerate(drops)}


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


def setup_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def run_gateway(settings: GatewaySettings) -> None:
    """Run until SIGTERM or SIGINT."""

    async def main() -> None:
        gateway = Gateway(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, gateway.stop)
        await gateway.run()

    asyncio.run(main())
