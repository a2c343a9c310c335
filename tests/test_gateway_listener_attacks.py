"""The node listener under attack from the site's WiFi, by a host that holds no key: silent and
half-sent connections, and a flood of frames under random device ids. Real nodes (simulated,
pipelining as the firmware does) must keep being served, and the gateway's memory and log stay
bounded. The attacker connects from other loopback addresses than the nodes, as another host
on the WiFi would."""

import asyncio
import logging
import os
import socket
import time

from helpers.gateway import Collector

from bench import loadgen
from kinhbac import wire
from kinhbac.gateway.config import GatewaySettings, MqttSettings
from kinhbac.gateway.daemon import Gateway
from kinhbac.gateway.listener import LOG_BUDGET, LOG_DEVICES_KEPT

NODES = 5


def settings_for(tmp_path, broker, keys, **overrides):
    return GatewaySettings(
        site="testsite", gateway_id="gw1", listen_host="127.0.0.1", listen_port=0,
        data_dir=tmp_path / "data", key_file=keys, metrics_port=0,
        mqtt=MqttSettings(port=broker.port), **overrides)


async def open_from(address: str, port: int, count: int, send: bytes = b""):
    """`count` connections from `address` (a loopback source address), each sending `send`."""
    held = []
    for _ in range(count):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                           local_addr=(address, 0))
        except OSError:
            continue
        if send:
            writer.write(send)
        held.append(writer)
    return held


def test_silent_and_half_sent_connections_cannot_lock_the_nodes_out(tmp_path, broker):
    identities = loadgen.make_identities(NODES)
    keys = tmp_path / "keys.json"
    loadgen.write_key_file(keys, identities)
    gateway = Gateway(settings_for(tmp_path, broker, keys, max_connections=40,
                                   max_connections_per_address=8, frame_timeout_s=2.0))
    collector = Collector(broker.port, "kinhbac/testsite/+/telemetry")

    async def main():
        run = asyncio.create_task(gateway.run())
        await asyncio.wait_for(gateway.ready.wait(), 20)
        port = gateway.listener.port
        # Enough to fill every slot twice over: silent ones, and ones that stop mid-header.
        held = await open_from("127.0.0.2", port, 40)
        held += await open_from("127.0.0.3", port, 40, send=b"\x01\x02")
        cfg = loadgen.LoadSettings(host="127.0.0.1", port=port, batch=20, window=4, rate=500,
                                   duration=4.0, drain=20.0, ramp=0.2, boot=3)
        stats = loadgen.Stats()
        nodes = [loadgen.SimNode(ident, i, NODES, cfg, stats)
                 for i, ident in enumerate(identities)]
        start = time.monotonic()
        await asyncio.gather(*(n.run(start, start + cfg.duration, start + cfg.duration
                                     + cfg.drain) for n in nodes))
        sample = gateway.metrics.registry.get_sample_value
        refused = {r: sample("kinhbac_gateway_frames_refused_total", {"reason": r}) or 0
                   for r in ("address_limit", "incomplete_frame", "connection_limit")}
        open_now = sample("kinhbac_gateway_node_connections")
        for writer in held:
            writer.transport.abort()
        gateway.stop()
        await asyncio.wait_for(run, 30)
        return nodes, stats, refused, open_now

    nodes, stats, refused, open_now = asyncio.run(main())
    try:
        for node in nodes:
            assert not node.inflight and not node.resend, (
                f"a node kept readings unacknowledged; refusals {refused}")
            assert node.next_seq > 20 * 10
        assert stats.hellos_acked >= NODES and stats.errors.get("timeout", 0) == 0, stats.errors
        assert refused["address_limit"] >= 60  # 8 of each attacker's 40 got a slot
        assert refused["incomplete_frame"] >= 8  # the half-sent ones were closed
        deadline = time.monotonic() + 30
        while collector.count() < sum(n.next_seq - 1 for n in nodes):
            assert time.monotonic() < deadline, "acknowledged readings did not reach the broker"
            time.sleep(0.2)
    finally:
        collector.close()


def test_a_flood_of_unknown_device_ids_keeps_the_log_and_memory_bounded(tmp_path, broker,
                                                                        caplog):
    caplog.set_level(logging.WARNING, logger="kinhbac.gateway.listener")
    keys = tmp_path / "keys.json"
    loadgen.write_key_file(keys, loadgen.make_identities(1))
    gateway = Gateway(settings_for(tmp_path, broker, keys))
    flood = 3000

    async def main():
        run = asyncio.create_task(gateway.run())
        await asyncio.wait_for(gateway.ready.wait(), 20)
        port = gateway.listener.port

        def send_all():
            for _ in range(flood):  # each frame under a fresh random id, on its own connection
                key = wire.Key(os.urandom(8), 1, os.urandom(32))
                frame = wire.encode_hello(key, 1, 1, "x", wire.RESET_POWER_ON, [], [])
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(frame)
                    s.recv(1)  # the gateway closes it

        await asyncio.to_thread(send_all)
        refused = gateway.metrics.registry.get_sample_value(
            "kinhbac_gateway_frames_refused_total", {"reason": "unknown_device"})
        remembered = len(gateway.listener._last_logged)
        gateway.stop()
        await asyncio.wait_for(run, 30)
        return refused, remembered

    refused, remembered = asyncio.run(main())
    assert refused == flood  # every refusal is counted ...
    lines = [r for r in caplog.records if "refused a frame" in r.getMessage()]
    assert len(lines) <= LOG_BUDGET  # ... few are logged ...
    assert remembered <= LOG_DEVICES_KEPT  # ... and the memory of them is bounded
