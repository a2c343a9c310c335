"""The baseline for the gateway benchmark: the simplest forwarder one would write first.

An asyncio TCP server speaking the same wire codec (every frame verified with wire.decode and
a wire.ReplayGuard) that, for each reading of a READINGS batch, publishes one QoS 1 MQTT
message and awaits its PUBACK, in order, then acknowledges the batch to the node. Nothing is
written to disk: readings in flight die with the process, so this baseline has no durability
at all, which flatters it in any comparison with the gateway.

    python -m bench.naive_forwarder --port 7979 --keys keys.json --mqtt-port 1883

Topic: kinhbac/<site>/<device>/reading, payload one reading as JSON.
"""

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

import aiomqtt

from kinhbac import wire


def load_keys(path: Path) -> dict[bytes, wire.Key]:
    rows = json.loads(Path(path).read_text())["devices"]
    keys = {}
    for row in rows:
        device_id = bytes.fromhex(row["device_id"])
        keys[device_id] = wire.Key(device_id, row["key_id"], bytes.fromhex(row["secret"]))
    return keys


class NaiveForwarder:
    def __init__(self, keys: dict[bytes, wire.Key], client: aiomqtt.Client, site: str) -> None:
        self.keys = keys
        self.client = client
        self.site = site
        self.guard = wire.ReplayGuard()
        self.refused: dict[str, int] = {}
        self.published = 0

    def _lookup(self, device_id: bytes, key_id: int) -> wire.Key | int | None:
        key = self.keys.get(device_id)
        if key is None:
            return None
        return key if key.key_id == key_id else wire.UNKNOWN_KEY

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(wire.HEADER_SIZE)
                length = wire.frame_length(header)
                frame = header + await reader.readexactly(length - wire.HEADER_SIZE)
                try:
                    msg = wire.decode(frame, self._lookup, self.guard)
                except wire.FrameError as e:
                    self.refused[e.name] = self.refused.get(e.name, 0) + 1
                    if e.reason in (wire.STALE_BOOT, wire.REPLAY, wire.BAD_PAYLOAD):
                        # Authentic but refused: tell the node, as the protocol says.
                        _, device_id, key_id, boot, counter = e.header
                        ref = counter
                        if e.reason == wire.STALE_BOOT:
                            ref = self.guard.latest(device_id, key_id)[0]
                        writer.write(wire.encode_error(
                            self.keys[device_id], boot, wire.downlink_counter(counter, 0),
                            e.reason, ref, e.name,
                        ))
                        continue
                    return  # before the MAC: the stream cannot be trusted
                key = self.keys[msg.device_id]
                counter = wire.downlink_counter(msg.counter, 0)
                now_ms = int(time.time() * 1000)
                if msg.type == wire.HELLO:
                    writer.write(wire.encode_ack(key, msg.boot, counter, None, None, now_ms))
                elif msg.type == wire.READINGS:
                    await self._forward(msg)
                    writer.write(wire.encode_ack(
                        key, msg.boot, counter, msg.readings_boot, msg.last_seq,
                        int(time.time() * 1000),
                    ))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, wire.FrameError):
            pass
        except asyncio.CancelledError:
            pass  # shutting down: this connection's task ends here, quietly
        finally:
            writer.transport.abort()

    async def _forward(self, msg: wire.ReadingsMessage) -> None:
        device = wire.device_hex(msg.device_id)
        topic = f"kinhbac/{self.site}/{device}/reading"
        for i, (sensor, offset_ms, value) in enumerate(msg.readings):
            payload = json.dumps({
                "device": device, "boot": msg.readings_boot, "seq": msg.first_seq + i,
                "sensor": sensor, "time_ms": msg.base_ms + offset_ms, "value": value,
            })
            await self.client.publish(topic, payload, qos=1)  # returns on PUBACK
            self.published += 1


async def run(args: argparse.Namespace) -> None:
    keys = load_keys(args.keys)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with aiomqtt.Client(
        args.mqtt_host, args.mqtt_port, identifier=f"naive-{args.site}",
        max_inflight_messages=args.max_inflight,
    ) as client:
        # Many node connections publish at once; aiomqtt would log a warning per publish.
        client.pending_calls_threshold = 1_000_000
        fwd = NaiveForwarder(keys, client, args.site)
        server = await asyncio.start_server(fwd.serve, args.host, args.port, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        print(json.dumps({"listening": port}), flush=True)
        async with server:
            await stop.wait()
            server.close()
        print(json.dumps({"published": fwd.published, "refused": fwd.refused}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.naive_forwarder",
                                description="Per-reading QoS 1 forwarder (benchmark baseline).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--keys", type=Path, required=True, help="JSON key file of the nodes")
    p.add_argument("--mqtt-host", default="127.0.0.1")
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--site", default="bench-naive")
    p.add_argument("--max-inflight", type=int, default=64,
                   help="QoS 1 messages awaiting PUBACK at once (the gateway's default: 64)")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
