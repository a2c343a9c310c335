"""A running gateway on a disk that misbehaves as an ageing SD card does: fsyncs that fail with
EIO after a stall, a full disk, fsyncs that only stall. Twenty nodes pipeline frames as the
firmware does (up to 4 unacknowledged, resend from the last ACK after a refusal); every reading
a node holds an ACK for must reach a broker subscriber, checked by (device, boot, seq)."""

import asyncio
import logging
import time

import pytest
from helpers.faulty_disk import FaultyDisk
from helpers.gateway import Collector

from bench import loadgen
from kinhbac.broker import LocalBroker
from kinhbac.gateway.config import GatewaySettings, MqttSettings
from kinhbac.gateway.daemon import Gateway

NODES = 20
RATE = 2000  # readings/s over all nodes, 20 a frame: each node sends 5 frames a second
BOOT = 7


@pytest.fixture
def broker(tmp_path):
    """Persistent: the tests stop and restart it, and the collector's session must survive."""
    with LocalBroker(tmp_path / "broker", persistence=True) as b:
        yield b


@pytest.fixture
def disk():
    with FaultyDisk() as d:
        yield d


class SiteUnderTest:
    """An in-process gateway on the faulty disk, simulated nodes, and a subscriber."""

    def __init__(self, tmp_path, broker) -> None:
        self.identities = loadgen.make_identities(NODES)
        keys = tmp_path / "keys.json"
        loadgen.write_key_file(keys, self.identities)
        self.settings = GatewaySettings(
            site="testsite", gateway_id="gw1", listen_host="127.0.0.1", listen_port=0,
            data_dir=tmp_path / "data", key_file=keys, metrics_port=0, commit_window_ms=2.0,
            mqtt=MqttSettings(port=broker.port, backoff_min_s=0.2, backoff_max_s=1.0),
            max_connections_per_address=NODES,  # all from 127.0.0.1
        )
        self.collector = Collector(broker.port, "kinhbac/testsite/+/telemetry")
        self.gateway = Gateway(self.settings)
        self.nodes: list[loadgen.SimNode] = []

    def sample(self, name, **labels):
        return self.gateway.metrics.registry.get_sample_value(name, labels) or 0

    async def run(self, faults, *, sending_s=8.0):
        """Start the gateway, let the nodes send for `sending_s` while `faults()` runs, then
        wait until every node holds ACKs for everything it sent."""
        run = asyncio.create_task(self.gateway.run())
        await asyncio.wait_for(self.gateway.ready.wait(), 20)
        cfg = loadgen.LoadSettings(host="127.0.0.1", port=self.gateway.listener.port, batch=20,
                                   window=4, rate=RATE, duration=sending_s, drain=60.0,
                                   ramp=0.5, boot=BOOT)
        stats = loadgen.Stats()
        self.nodes = [loadgen.SimNode(ident, i, NODES, cfg, stats)
                      for i, ident in enumerate(self.identities)]
        start = time.monotonic()
        injector = asyncio.create_task(faults())
        await asyncio.gather(*(n.run(start, start + cfg.duration, start + cfg.duration
                                     + cfg.drain) for n in self.nodes))
        await injector
        self.stats = stats
        return run

    def acknowledged(self):
        """(device, boot, seq) of every reading a node holds an ACK for."""
        out = set()
        for node in self.nodes:
            unacked = {s for b in [*node.inflight, *node.resend]
                       for s in range(b.first_seq, b.last_seq + 1)}
            out |= {(node.ident.device, BOOT, s) for s in range(1, node.next_seq)
                    if s not in unacked}
        return out

    def received(self):
        with self.collector.lock:
            return {(device, boot, seq) for device, keys in self.collector.readings.items()
                    for boot, seq in keys}

    async def all_acknowledged_reach_the_broker(self, timeout=90.0):
        acked = self.acknowledged()
        assert len(acked) >= NODES * 100, "the nodes sent too little to prove anything"
        deadline = time.monotonic() + timeout
        while acked - self.received():
            if time.monotonic() > deadline:
                missing = sorted(acked - self.received())
                raise AssertionError(f"{len(missing)} acknowledged readings never reached the "
                                     f"broker, e.g. {missing[:5]}")
            await asyncio.sleep(0.2)
        return acked

    async def stop(self, run):
        self.gateway.stop()
        await asyncio.wait_for(run, 30)
        self.collector.close()


def test_a_failed_fsync_never_acknowledges_a_reading_it_did_not_store(tmp_path, broker, disk,
                                                                       caplog):
    caplog.set_level(logging.INFO)
    site = SiteUnderTest(tmp_path, broker)

    async def faults():
        for at in (1.5, 3.5, 5.5):  # three failing fsyncs, each after a stall, as a card does
            await asyncio.sleep(at - (time.monotonic() - started))
            disk.fail_syncs(1, stall_s=0.3)

    async def main():
        nonlocal started
        started = time.monotonic()
        run = await site.run(faults)
        acked = await site.all_acknowledged_reach_the_broker()
        assert site.sample("kinhbac_gateway_storage_faults_total", kind="io_error") >= 2
        assert site.sample("kinhbac_gateway_frames_refused_total", reason="busy") >= 2
        for reason in ("disk_cap", "disk_full", "max_age"):
            assert site.sample("kinhbac_gateway_readings_dropped_total", reason=reason) == 0
        await site.stop(run)
        return acked

    started = 0.0
    asyncio.run(main())
    assert disk.failed_syncs == 3
    faults_logged = [r for r in caplog.records if r.name == "kinhbac.gateway.queue"
                     and r.levelno >= logging.ERROR]
    assert 1 <= len(faults_logged) <= 3  # once per fault, not once per refused frame


def test_an_io_error_during_a_broker_outage_deletes_nothing(tmp_path, broker, disk):
    site = SiteUnderTest(tmp_path, broker)

    async def faults():
        await asyncio.sleep(1.0)
        broker.stop()
        await asyncio.sleep(1.5)
        disk.fail_syncs(2, stall_s=0.2)
        await asyncio.sleep(2.0)
        disk.fail_syncs(1)
        await asyncio.sleep(2.0)
        broker.start()

    async def main():
        run = await site.run(faults)
        await site.all_acknowledged_reach_the_broker()
        assert site.sample("kinhbac_gateway_storage_faults_total", kind="io_error") >= 1
        for reason in ("disk_cap", "disk_full", "max_age"):
            assert site.sample("kinhbac_gateway_readings_dropped_total", reason=reason) == 0
        # Deletes of published readings that failed with a commit were redone: nothing stays.
        deadline = time.monotonic() + 30
        while (await site.gateway.queue.maintain()).depth:
            assert time.monotonic() < deadline, "published readings stayed queued"
            await asyncio.sleep(0.2)
        await site.stop(run)

    asyncio.run(main())


def test_a_full_disk_keeps_readings_on_the_nodes_instead_of_deleting_acknowledged_ones(
        tmp_path, broker, disk, caplog):
    caplog.set_level(logging.INFO)
    site = SiteUnderTest(tmp_path, broker)
    depth_when_full = []

    async def faults():
        await asyncio.sleep(1.0)
        broker.stop()
        await asyncio.sleep(2.0)
        depth_when_full.append(site.gateway.queue.stats.depth)
        disk.fill()
        await asyncio.sleep(3.0)
        depth_when_full.append(site.gateway.queue.stats.depth)
        disk.free()
        await asyncio.sleep(0.5)
        broker.start()

    async def main():
        run = await site.run(faults)
        await site.all_acknowledged_reach_the_broker()
        assert site.sample("kinhbac_gateway_storage_faults_total", kind="disk_full") >= 1
        assert site.sample("kinhbac_gateway_frames_refused_total", reason="busy") >= 1
        for reason in ("disk_cap", "disk_full", "max_age"):
            assert site.sample("kinhbac_gateway_readings_dropped_total", reason=reason) == 0
        await site.stop(run)

    asyncio.run(main())
    # While the disk was full the backlog was kept, not deleted to make room.
    assert depth_when_full[1] >= depth_when_full[0] > 0
    full = [r.getMessage() for r in caplog.records if r.name == "kinhbac.gateway.queue"
            and r.levelno >= logging.ERROR]
    assert len(full) == 1 and "disk is full" in full[0], full


def test_stalled_fsyncs_delay_acks_but_lose_and_refuse_nothing(tmp_path, broker, disk):
    site = SiteUnderTest(tmp_path, broker)

    async def faults():
        await asyncio.sleep(2.0)
        disk.stall_syncs(0.5)  # half a second per fsync for 3 s, as a card erasing a block
        await asyncio.sleep(3.0)
        disk.stall_syncs(0)

    async def main():
        run = await site.run(faults)
        await site.all_acknowledged_reach_the_broker()
        assert site.sample("kinhbac_gateway_frames_refused_total", reason="busy") == 0
        await site.stop(run)

    asyncio.run(main())
