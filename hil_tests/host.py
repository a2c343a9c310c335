"""The site the boards report to, run on the host by the suite: a private broker, the real
gateway as a process (verifying every node with the keys of this session), and a subscriber
that keeps every reading that reaches the broker, by (device, boot, seq)."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kinhbac.broker import LocalBroker

from helpers.gateway import Collector, GatewayProcess

from .boards import BoardUnderTest


@dataclass
class HostSite:
    broker: LocalBroker
    gateway: GatewayProcess
    collector: Collector
    key_file: Path

    def close(self) -> None:
        self.collector.close()
        self.gateway.stop()
        self.broker.stop()


def write_keys(path: Path, boards: list[BoardUnderTest]) -> None:
    """Every board's key, as the gateway's key file holds them (it reloads on change)."""
    rows = [{"device_id": b.identity.device, "key_id": 1, "secret": b.identity.secret.hex()}
            for b in boards if b.identity is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({"devices": rows}, indent=1))
    os.chmod(partial, 0o600)  # secrets
    partial.replace(path)


def start_site(workdir: Path, boards: list[BoardUnderTest], *, listen_host: str) -> HostSite:
    """The broker, the gateway listening on `listen_host` (all addresses for boards on a
    bench WiFi, loopback for emulated ones) and the collector."""
    broker = LocalBroker(workdir / "broker")
    broker.start()
    key_file = workdir / "keys.json"
    write_keys(key_file, boards)
    gateway = GatewayProcess(workdir / "gateway", key_file=key_file, broker_port=broker.port,
                             listen_host=listen_host, site="hil")
    try:
        gateway.start()
        collector = Collector(broker.port)
    except BaseException:
        gateway.stop() if gateway.proc is not None else None
        broker.stop()
        raise
    return HostSite(broker, gateway, collector, key_file)
