"""Gateway benchmark: readings/s end to end and node-ACK latency, against a naive baseline.

    python -m bench.gateway_bench                       # 20 s per phase, 300 s RSS soak
    python -m bench.gateway_bench --duration 5 --soak 0 # a quick look

A private mosquitto (kinhbac.broker.LocalBroker), one MQTT subscriber on kinhbac/# that counts
readings as they come out of the broker, and the load generator (bench/loadgen.py: many node
connections, the real wire codec, in a process of its own). Each system runs, in the same run:

1. the naive forwarder (bench/naive_forwarder.py: one QoS 1 message per reading, no disk),
2. the gateway (`kinhbac gateway run`, durability on: an ACK means fsynced),

under two loads: as fast as ACKs allow (throughput, and latency at saturation) and paced at
--rate readings/s (latency). Then a soak of the gateway (--soak seconds) samples its RSS every
second. Results go to bench/RESULTS.md (the gateway section) with the machine described. A
missed target is reported, not an error: the exit status is non-zero only when something
failed to run.
"""

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import apsw
import paho.mqtt.client as mqtt

from bench import loadgen
from bench.report import section_head
from kinhbac.broker import BrokerError, LocalBroker

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN = "<!-- gateway-bench:begin (written by python -m bench.gateway_bench) -->"
END = "<!-- gateway-bench:end -->"

TARGET_E2E = 50_000  # readings/s, durable, end to end
TARGET_RATIO = 5.0  # gateway / naive, end to end
TARGET_P99_MS = 50.0  # at the paced rate
TARGET_RSS_MB = 100.0
TARGET_RSS_DRIFT = 0.10  # over the soak

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
QUIET_S = 2.0  # the subscriber has drained when nothing came for this long
QUIET_TIMEOUT_S = 120.0  # ...or after this, whatever is still queued
LOADGEN_DRAIN_S = 30.0
LOADGEN_SLACK_S = 60.0  # beyond duration + drain, before a load generator counts as hung
CLK_TCK = os.sysconf("SC_CLK_TCK")
SYS_DROPPED = "$SYS/broker/publish/messages/dropped"


class BenchError(Exception):
    """Something failed to run (not a missed target)."""


# ---- small helpers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (None when it is gone)."""
    return None if pid is None else _cpu_from(f"/proc/{pid}/stat")


def _cpu_from(path: str) -> float | None:
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def cpu_s_task(tid: int | None) -> float | None:
    """CPU seconds of one thread of this process."""
    return None if tid is None else _cpu_from(f"/proc/self/task/{tid}/stat")


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


async def wait_port(port: int, timeout: float, proc: "Proc") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.exited:
            raise BenchError(f"{proc.name} exited with code {proc.returncode} before listening"
                             f" on port {port}\n{proc.tail()}")
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
            w.close()
            return
        except (TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{proc.name} did not listen on port {port} within {timeout:.0f} s"
                             f"\n{proc.tail()}")
        await asyncio.sleep(0.1)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """A child process with its output in a log file; stop() always ends it."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as out:  # noqa: ASYNC230  (a local file, once per process)
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def exited(self) -> bool:
        return self.proc is not None and self.proc.returncode is not None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  {self.name}| {line}" for line in text[-lines:])

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.stop()
            raise BenchError(f"{self.name} did not finish within {timeout:.0f} s") from None

    async def stop(self) -> None:
        p = self.proc
        if p is None or p.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
        try:
            await asyncio.wait_for(p.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()


class RssSampler:
    """VmRSS of the processes under test, once a second."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, int]]] = {}
        self.pids: dict[str, int] = {}

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid
        self.samples.setdefault(name, [])

    def unwatch(self, name: str) -> None:
        self.pids.pop(name, None)

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            for name, pid in list(self.pids.items()):
                kb = rss_kb(pid)
                if kb is not None:
                    self.samples[name].append((now, kb))
            await asyncio.sleep(1.0)

    def between(self, name: str, t0: float, t1: float) -> list[tuple[float, int]]:
        return [(t, kb) for t, kb in self.samples.get(name, []) if t0 <= t <= t1]


class Subscriber:
    """Counts readings as the broker delivers them, by arrival time (time.monotonic()).

    paho-mqtt (the client under aiomqtt) with its network loop on a thread: a message costs
    about half the CPU it costs through aiomqtt's async iterator, and the subscriber shares
    this machine's two cores with the system under test, so the cheaper the better (the
    naive forwarder's one-message-per-reading would otherwise pay for the counting).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.arrivals: dict[str, list[tuple[float, int]]] = {"gateway": [], "naive": []}
        self.last_arrival = 0.0
        self.bad_payloads = 0
        self.other_messages = 0
        self.broker_dropped: int | None = None  # mosquitto's $SYS count, as last published
        self.tid: int | None = None
        self.disconnects = 0
        self._stopping = False
        self._subscribed = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                   client_id="kinhbac-bench-sub")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect

    def start(self, timeout: float = 10.0) -> None:
        self._client.connect(self.host, self.port)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise BenchError(f"the subscriber got no SUBACK within {timeout:.0f} s")

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    def cpu_s(self) -> float | None:
        return cpu_s_task(self.tid)

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        self.tid = threading.get_native_id()
        # QoS 0: cheapest. mosquitto drops messages for a subscriber that falls too far behind
        # (QoS 1 beyond max_queued_messages, 1,000; QoS 0 too): $SYS counts the drops.
        client.subscribe([("kinhbac/#", 0), (SYS_DROPPED, 0)])

    def _on_disconnect(self, *_: object) -> None:
        if not self._stopping:
            self.disconnects += 1

    def _on_message(self, client: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        topic = m.topic
        if topic.endswith("/reading"):
            self.arrivals["naive"].append((now, 1))
        elif topic.endswith("/telemetry"):
            try:
                n = len(json.loads(m.payload)["readings"])
            except (ValueError, KeyError, TypeError):
                self.bad_payloads += 1
                return
            self.arrivals["gateway"].append((now, n))
        elif topic == SYS_DROPPED:
            with contextlib.suppress(ValueError):
                self.broker_dropped = int(m.payload)
            return
        else:
            self.other_messages += 1
            return
        self.last_arrival = now

    def count(self, kind: str, t0: float, t1: float = math.inf) -> int:
        return sum(n for t, n in list(self.arrivals[kind]) if t0 <= t < t1)

    async def wait_quiet(self, since: float) -> float:
        """Wait until nothing arrived for QUIET_S (or QUIET_TIMEOUT_S); returns the wait."""
        start = time.monotonic()
        while time.monotonic() - start < QUIET_TIMEOUT_S:
            last = max(self.last_arrival, since)
            if time.monotonic() - last >= QUIET_S:
                break
            await asyncio.sleep(0.2)
        return time.monotonic() - start


def scrape_metrics(port: int) -> dict[str, float]:
    """The gateway's /metrics as {sample name with labels: value} (kinhbac_* only)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("kinhbac_") and "_bucket{" not in line and "_created" not in line:
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def broker_pid(broker: LocalBroker) -> int | None:
    pid = getattr(broker, "pid", None)
    if pid is None:
        proc = getattr(broker, "_proc", None)  # until LocalBroker exposes its pid
        pid = getattr(proc, "pid", None)
    return pid


# ---- phases ----------------------------------------------------------------------------------


@dataclass
class Phase:
    system: str  # "naive" or "gateway"
    name: str  # "max", "paced", "soak"
    load: dict  # the load generator's results
    e2e_in_window: int = 0
    e2e_per_s: float = 0.0
    delivered_after_drain: int = 0
    drain_wait_s: float = 0.0
    sut_cpu_pct: float | None = None  # of one core, over the load generator's run
    broker_cpu_pct: float | None = None
    loadgen_cpu_pct: float | None = None
    sub_cpu_pct: float | None = None
    others_cpu_pct: float | None = None  # processes outside the benchmark
    machine_busy_pct: float | None = None  # of all cores
    rss_kb: list[tuple[float, int]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def acked_per_s(self) -> float:
        return self.load.get("acked_per_s") or 0.0

    def latency(self, p: str) -> float | None:
        return self.load["latency_ms"].get(p)


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    keys_path: Path
    broker: LocalBroker
    sub: Subscriber
    rss: RssSampler
    boot_base: int
    phases: list[Phase] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    gateway_skipped: str | None = None
    _boots: int = 0

    def next_boot(self) -> int:
        self._boots += 1
        return self.boot_base + self._boots

    async def run_phase(self, system: str, name: str, port: int, sut: Proc, rate: float,
                        duration: float, warmup: float, metrics_port: int | None = None) -> Phase:
        a = self.args
        out = self.workdir / f"load-{system}-{name}.json"
        lg = Proc(f"loadgen-{system}-{name}", [
            sys.executable, "-m", "bench.loadgen", "--port", str(port),
            "--keys", str(self.keys_path), "--nodes", str(a.nodes), "--batch", str(a.batch),
            "--window", str(a.window), "--rate", str(rate), "--duration", str(duration),
            "--warmup", str(warmup), "--drain", str(LOADGEN_DRAIN_S),
            "--boot", str(self.next_boot()), "--json-out", str(out),
        ], self.workdir / f"loadgen-{system}-{name}.log")
        print(f"[bench] {system}: {name} load ({f'{rate:g} readings/s' if rate else 'max'},"
              f" {duration:g} s)...", flush=True)
        bpid = broker_pid(self.broker)
        c0 = (cpu_s(sut.pid), cpu_s(bpid), machine_cpu(), time.monotonic(), self.sub.cpu_s(),
              cpu_s(os.getpid()))
        await lg.start()
        try:
            rc = await lg.wait(duration + LOADGEN_DRAIN_S + LOADGEN_SLACK_S)
        finally:
            await lg.stop()
        c1 = (cpu_s(sut.pid), cpu_s(bpid), machine_cpu(), time.monotonic(), self.sub.cpu_s(),
              cpu_s(os.getpid()))
        if rc != 0 or not out.exists():
            raise BenchError(f"load generator failed (exit {rc})\n{lg.tail()}")
        load = json.loads(out.read_text())
        ph = Phase(system, name, load)
        ws, we = load["window_start"], load["window_end"]
        ph.e2e_in_window = self.sub.count(system, ws, we)
        ph.e2e_per_s = ph.e2e_in_window / (we - ws) if we > ws else 0.0
        ph.drain_wait_s = await self.sub.wait_quiet(load["ended"])
        ph.delivered_after_drain = self.sub.count(system, load["started"])
        elapsed = c1[3] - c0[3]
        if c0[0] is not None and c1[0] is not None:
            ph.sut_cpu_pct = 100 * (c1[0] - c0[0]) / elapsed
        if c0[1] is not None and c1[1] is not None:
            ph.broker_cpu_pct = 100 * (c1[1] - c0[1]) / elapsed
        if c0[4] is not None and c1[4] is not None:
            ph.sub_cpu_pct = 100 * (c1[4] - c0[4]) / elapsed
        busy, total = c1[2][0] - c0[2][0], c1[2][1] - c0[2][1]
        ph.machine_busy_pct = 100 * busy / total if total else None
        ours = sum((c1[i] or 0) - (c0[i] or 0) for i in (0, 1, 5)) + load["loadgen_cpu_s"]
        ph.others_cpu_pct = 100 * (busy / CLK_TCK - ours) / elapsed
        if ph.others_cpu_pct > 25:
            self.notes.append(
                f"{system} {name}: other processes on this machine used about "
                f"{ph.others_cpu_pct:.0f}% of a core meanwhile; this phase's figures are "
                "pessimistic")
        ph.loadgen_cpu_pct = 100 * load["loadgen_cpu_s"] / elapsed
        ph.rss_kb = self.rss.between(system, load["started"], load["ended"])
        if metrics_port is not None:
            try:
                ph.metrics = await asyncio.to_thread(scrape_metrics, metrics_port)
            except OSError as e:
                self.notes.append(f"gateway /metrics not readable after {name}: {e}")
        if load["errors"]:
            self.notes.append(f"{system} {name}: the nodes saw {load['errors']} "
                              f"({load['reconnects']} reconnects)")
        print(f"[bench] {system} {name}: acked {ph.acked_per_s:,.0f}/s, end to end "
              f"{ph.e2e_per_s:,.0f}/s, ACK p50 {load['latency_ms']['p50']} ms p99 "
              f"{load['latency_ms']['p99']} ms", flush=True)
        self.phases.append(ph)
        return ph

    def phase(self, system: str, name: str) -> Phase | None:
        for ph in self.phases:
            if ph.system == system and ph.name == name:
                return ph
        return None


async def bench_naive(b: Bench) -> None:
    a = b.args
    port = free_port()
    sut = Proc("naive", [
        sys.executable, "-m", "bench.naive_forwarder", "--port", str(port),
        "--keys", str(b.keys_path), "--mqtt-host", b.broker.host,
        "--mqtt-port", str(b.broker.port),
    ], b.workdir / "naive.log")
    await sut.start()
    try:
        await wait_port(port, START_TIMEOUT_S, sut)
        b.rss.watch("naive", sut.pid)
        await b.run_phase("naive", "max", port, sut, 0, a.duration, a.warmup)
        await b.run_phase("naive", "paced", port, sut, a.rate, a.duration, a.warmup)
        if sut.exited:
            raise BenchError(f"the naive forwarder died (exit {sut.returncode})\n{sut.tail()}")
    finally:
        b.rss.unwatch("naive")
        await sut.stop()


def gateway_command() -> list[str]:
    return [sys.executable, "-m", "kinhbac.cli", "gateway", "run"]


def gateway_missing() -> str | None:
    """Why `kinhbac gateway run` cannot be used here, or None when it can."""
    try:
        r = subprocess.run([*gateway_command(), "--help"], check=False, cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`kinhbac gateway run --help` failed: {e}"
    if r.returncode != 0:
        return ("`kinhbac gateway run` is not available: "
                + (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1])
    return None


def write_gateway_config(path: Path, port: int, data_dir: Path, key_file: Path,
                         metrics_port: int, mqtt_host: str, mqtt_port: int) -> None:
    path.write_text("\n".join([
        'site = "bench"',
        'gateway_id = "bench"',
        'listen_host = "127.0.0.1"',
        f"listen_port = {port}",
        f"data_dir = {json.dumps(str(data_dir))}",
        f"key_file = {json.dumps(str(key_file))}",
        'metrics_host = "127.0.0.1"',
        f"metrics_port = {metrics_port}",
        "max_connections_per_address = 2000  # every simulated node comes from 127.0.0.1",
        "",
        "[mqtt]",
        f"host = {json.dumps(mqtt_host)}",
        f"port = {mqtt_port}",
        "",
    ]))


async def bench_gateway(b: Bench) -> None:
    a = b.args
    why = gateway_missing()
    if why is not None:
        b.gateway_skipped = why
        print(f"[bench] gateway skipped: {why}", flush=True)
        return
    port, metrics_port = free_port(), free_port()
    data_dir = b.workdir / "gateway-data"
    data_dir.mkdir()
    config = b.workdir / "gateway.toml"
    write_gateway_config(config, port, data_dir, b.keys_path, metrics_port, b.broker.host,
                         b.broker.port)
    sut = Proc("gateway", [*gateway_command(), "--config", str(config)], b.workdir / "gateway.log")
    await sut.start()
    try:
        await wait_port(port, START_TIMEOUT_S, sut)
        b.rss.watch("gateway", sut.pid)
        await b.run_phase("gateway", "max", port, sut, 0, a.duration, a.warmup, metrics_port)
        await b.run_phase("gateway", "paced", port, sut, a.rate, a.duration, a.warmup,
                          metrics_port)
        if a.soak > 0:
            await b.run_phase("gateway", "soak", port, sut, a.soak_rate, a.soak,
                              min(30.0, a.soak / 10), metrics_port)
        if sut.exited:
            raise BenchError(f"the gateway died (exit {sut.returncode})\n{sut.tail()}")
    finally:
        b.rss.unwatch("gateway")
        await sut.stop()
        if sut.returncode not in (None, 0, -15):
            b.notes.append(f"the gateway exited with code {sut.returncode} when stopped")


async def run_bench(args: argparse.Namespace, workdir: Path) -> Bench:
    keys_path = workdir / "keys.json"
    loadgen.write_key_file(keys_path, loadgen.make_identities(args.nodes))
    broker = LocalBroker(workdir / "broker")
    rss = RssSampler()
    b = Bench(args, workdir, keys_path, broker, Subscriber(broker.host, broker.port), rss,
              int(time.time()) & 0x3FFFFFFF)
    sampler = None
    try:
        try:
            await asyncio.to_thread(broker.start)
        except BrokerError as e:
            raise BenchError(f"the broker did not start: {e}") from e
        await asyncio.to_thread(b.sub.start)
        sampler = asyncio.create_task(rss.run())
        for system, fn in (("naive", bench_naive), ("gateway", bench_gateway)):
            if system in args.skip:
                continue
            try:
                await fn(b)
            except BenchError as e:
                b.errors.append(f"{system}: {e}")
                print(f"[bench] ERROR {system}: {e}", file=sys.stderr, flush=True)
    finally:
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        b.sub.stop()
        await asyncio.to_thread(broker.stop)
    if b.sub.disconnects:
        b.notes.append(f"the subscriber lost its broker connection {b.sub.disconnects} times: "
                       "readings published meanwhile are missing from the end-to-end counts")
    if b.sub.broker_dropped:
        b.notes.append(
            f"mosquitto counted {b.sub.broker_dropped:,} messages dropped over the run "
            "($SYS/broker/publish/messages/dropped, as last published): messages it could not "
            "queue for the bench's subscriber, which had fallen behind. They are missing from "
            "the end-to-end counts; the systems' own publish counts (the gateway's metrics "
            "below) say whether the broker had them.")
    if b.sub.bad_payloads:
        b.notes.append(f"{b.sub.bad_payloads} telemetry messages were not JSON with a "
                       "readings list (not counted)")
    return b


# ---- the report ------------------------------------------------------------------------------


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, check=False, capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def describe_machine(data_dir: Path, broker: LocalBroker) -> list[tuple[str, str]]:
    lscpu = _run(["lscpu"])
    model = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
    mem_kb = 0
    with contextlib.suppress(OSError):
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
    disk = "unknown"
    src = _run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(data_dir)]).split()
    if src:
        disk = f"{src[0]} ({src[1] if len(src) > 1 else '?'})"
        name = Path(src[0]).name
        rot = Path(f"/sys/block/{re.sub(r'p?[0-9]+$', '', name)}/queue/rotational")
        if not rot.exists():
            rot = Path(f"/sys/block/{name}/queue/rotational")
        with contextlib.suppress(OSError):
            flag = rot.read_text().strip()
            disk += f", rotational flag {flag}"
            if name.startswith("vd"):
                disk += " (a virtio disk: the flag says little about the real medium)"
    try:
        aiomqtt_v = metadata.version("aiomqtt")
    except metadata.PackageNotFoundError:
        aiomqtt_v = "?"
    return [
        ("CPU", model[1].strip() if model else platform.processor() or "unknown"),
        ("Cores", f"{os.cpu_count()} logical"),
        ("RAM", f"{mem_kb / 1024 / 1024:.1f} GiB" if mem_kb else "unknown"),
        ("Disk (gateway data dir)", disk),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("SQLite", apsw.sqlite_lib_version()),  # the queue's (apsw brings its own)
        ("Broker", broker.describe()),
        ("aiomqtt", aiomqtt_v),
        ("Date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
    ]


def _n(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**not met**")


def soak_summary(ph: Phase | None) -> dict | None:
    if ph is None:
        return None
    ws, we = ph.load["window_start"], ph.load["window_end"]
    window = [(t, kb) for t, kb in ph.rss_kb if ws <= t <= we]
    if len(window) < 2:
        return None
    start, end = window[0][1], window[-1][1]
    peak = max(kb for _, kb in window)
    return {
        "start_kb": start, "end_kb": end, "max_kb": peak, "samples": len(window),
        "change": (end - start) / start, "max_over_start": (peak - start) / start,
        "seconds": window[-1][0] - window[0][0],
    }


def rss_max(b: Bench, system: str) -> int | None:
    """Highest VmRSS (kB) sampled for a system over the whole run."""
    samples = b.rss.samples.get(system, [])
    return max((kb for _, kb in samples), default=None)


def build_report(b: Bench, machine: list[tuple[str, str]], command: str) -> str:
    a = b.args
    g_max, g_paced = b.phase("gateway", "max"), b.phase("gateway", "paced")
    n_max, n_paced = b.phase("naive", "max"), b.phase("naive", "paced")
    soak = soak_summary(b.phase("gateway", "soak"))
    gateway_rss = rss_max(b, "gateway")
    rss_max_mb = gateway_rss / 1024 if gateway_rss else None
    ratio = (g_max.e2e_per_s / n_max.e2e_per_s) if g_max and n_max and n_max.e2e_per_s else None
    lines = [
        *section_head(BEGIN, "Gateway benchmark", command, machine),
        "## Load", "",
        (f"{a.nodes} simulated nodes (bench/loadgen.py, CPython, the real wire codec: HMAC on "
        f"every frame, one TCP connection per node), batches of {a.batch} readings, at most "
        f"{a.window} frames in flight per node. Two loads per system: **max** (each node sends "
        f"as fast as its ACKs come back) and **paced** ({a.rate:,.0f} readings/s over all "
        f"nodes, spread evenly). {a.duration:g} s per phase, the first "
        f"{min(a.warmup, a.duration / 2):g} s left out of every figure. End to end = readings "
        "an MQTT subscriber on `kinhbac/#` received from the broker within the same window "
        "as the node-side figures. Everything runs on this one machine: broker, system under "
        "test, load generator and subscriber share its cores."),
        "",
        "## Results against the targets", "",
        "| Measure | Gateway | Naive forwarder | Target | |",
        "|---|---:|---:|---|---|",
    ]
    g_e2e = g_max.e2e_per_s if g_max else None
    lines.append(
        f"| Readings/s end to end, max load | {_n(g_e2e)} | {_n(n_max and n_max.e2e_per_s)} "
        f"| gateway >= {TARGET_E2E:,} | {_met(None if g_e2e is None else g_e2e >= TARGET_E2E)} |")
    lines.append(
        f"| Readings/s acked at the nodes, max load | {_n(g_max and g_max.acked_per_s)} | "
        f"{_n(n_max and n_max.acked_per_s)} | | |")
    lines.append(
        f"| Ratio gateway / naive (end to end) | {_n(ratio, 1)}x | 1x | >= {TARGET_RATIO:g}x | "
        f"{_met(None if ratio is None else ratio >= TARGET_RATIO)} |")
    for label, gp, np_ in (("max load", g_max, n_max), (f"{a.rate:,.0f} readings/s", g_paced,
                                                         n_paced)):
        lines.append(
            f"| ACK latency p50 / p99, {label} (ms) | "
            f"{_n(gp and gp.latency('p50'), 1)} / {_n(gp and gp.latency('p99'), 1)} | "
            f"{_n(np_ and np_.latency('p50'), 1)} / {_n(np_ and np_.latency('p99'), 1)} | "
            + (f"p99 < {TARGET_P99_MS:g} ms at 5,000/s | "
               + _met(None if gp is None or gp.latency("p99") is None or a.rate != 5000
                      else gp.latency("p99") < TARGET_P99_MS) + " |"
               if label != "max load" else "| |"))
    if g_paced or n_paced:
        lines.append(
            f"| Readings/s acked, paced phase | {_n(g_paced and g_paced.acked_per_s)} | "
            f"{_n(n_paced and n_paced.acked_per_s)} | {a.rate:,.0f} offered | |")
    naive_rss = rss_max(b, "naive")
    lines.append(
        f"| RSS, max over the run (MB) | {_n(rss_max_mb, 1)} | "
        f"{_n(naive_rss and naive_rss / 1024, 1)} | gateway < {TARGET_RSS_MB:g} MB | "
        f"{_met(None if rss_max_mb is None else rss_max_mb < TARGET_RSS_MB)} |")
    if soak is not None:
        drift = max(abs(soak["change"]), soak["max_over_start"])
        lines.append(
            f"| Gateway RSS over a {soak['seconds']:.0f} s soak: start / end / max (MB), change | "
            f"{soak['start_kb'] / 1024:.1f} / {soak['end_kb'] / 1024:.1f} / "
            f"{soak['max_kb'] / 1024:.1f}, {100 * soak['change']:+.1f}% | | within "
            f"{100 * TARGET_RSS_DRIFT:g}% | {_met(drift <= TARGET_RSS_DRIFT)} |")
    else:
        lines.append(f"| Gateway RSS flat over a soak | - | | within {100 * TARGET_RSS_DRIFT:g}%"
                     f" over 5 min | not measured{' (--soak 0)' if a.soak == 0 else ''} |")
    busy = [ph for ph in b.phases if (ph.others_cpu_pct or 0) > 25]
    if busy:
        worst = max(ph.others_cpu_pct or 0 for ph in busy)
        lines += ["", (f"**This run shared the machine with other work** (up to {worst:.0f}% of "
                  f"a core outside the benchmark, in {len(busy)} of {len(b.phases)} phases: "
                  "see 'others' below). Its figures are pessimistic; for the record, run it on "
                  "a quiet machine.")]
    lines += ["", "## Every phase", "",
              ("| System | Phase | Acked/s | End to end/s | ACK p50 / p90 / p99 / max (ms) | "
              "Latency samples | Delivered / acked (after drain) | Drain (s) | CPU % of a "
              "core: system, broker, loadgen, subscriber, others | Machine busy | RSS end (MB) |"),
              "|---|---|---:|---:|---|---:|---|---:|---|---:|---:|"]
    for ph in b.phases:
        lat = ph.load["latency_ms"]
        rss_end = ph.rss_kb[-1][1] / 1024 if ph.rss_kb else None
        lines.append(
            f"| {ph.system} | {ph.name} | {_n(ph.acked_per_s)} | {_n(ph.e2e_per_s)} | "
            f"{_n(lat['p50'], 1)} / {_n(lat['p90'], 1)} / {_n(lat['p99'], 1)} / "
            f"{_n(lat['max'], 1)} | {ph.load['latency_samples']:,} | "
            f"{ph.delivered_after_drain:,} / {ph.load['acked_total']:,} | "
            f"{_n(ph.drain_wait_s, 1)} | {_n(ph.sut_cpu_pct)}, {_n(ph.broker_cpu_pct)}, "
            f"{_n(ph.loadgen_cpu_pct)}, {_n(ph.sub_cpu_pct)}, {_n(ph.others_cpu_pct)} | "
            f"{_n(ph.machine_busy_pct)}% | {_n(rss_end, 1)} |")
    lines += ["", "## Notes", ""]
    notes = [
        ("The naive forwarder (bench/naive_forwarder.py) verifies every frame like the gateway, "
        "then publishes each reading as its own QoS 1 message, awaiting each PUBACK in order, "
        "and only then acknowledges the batch. It has **no durability at all**: nothing "
        "touches the disk, and an ACK it sends covers readings that the broker holds but that "
        "a crash of the broker would lose. The gateway acknowledges only readings fsynced to "
        "its SQLite queue. The comparison flatters the baseline."),
        ("The naive forwarder shares one aiomqtt client between all node connections, with "
        "the gateway's default of 64 QoS 1 messages in flight (its rate barely changes between "
        "20 and 200). Its cost is CPU per message in aiomqtt/paho (including a per-publish scan "
        "of all pending publishes in aiomqtt 2.5), which is what batching readings per message "
        "removes."),
        ("Latency at max load is queueing by construction: every node keeps "
        f"{a.window} frames of {a.batch} readings in flight, so p50 is about "
        f"{a.nodes * a.window * a.batch:,} readings divided by the throughput. The paced "
        "phase is the latency figure; when a system cannot sustain the paced rate, its frames "
        "queue the same way and its latency grows with the phase's length."),
        ("The subscriber (paho-mqtt on a thread of the harness, QoS 0) counts readings as "
         "mosquitto delivers them. mosquitto drops messages for a subscriber that falls too "
         "far behind, at QoS 0 and 1 alike (counted in $SYS); 'delivered / acked' compares "
         "what reached the subscriber, once the broker had gone quiet, with what the nodes "
         "had acknowledged, so a loss shows there."),
    ]
    if b.gateway_skipped:
        notes.insert(0, f"**The gateway was not measured**: {b.gateway_skipped}.")
    for ph in b.phases:
        if ph.name == "paced" and ph.load["late_sends"]:
            notes.append(f"{ph.system} paced: {ph.load['late_sends']:,} frames went out more "
                         f"than 10 ms late (at most {ph.load['max_send_lag_ms']:,.0f} ms): the "
                         "window of frames in flight was full, i.e. the system fell behind.")
    g_metrics = (b.phase("gateway", "soak") or g_paced or g_max)
    if g_metrics and g_metrics.metrics:
        m = g_metrics.metrics
        cnt, total = m.get("kinhbac_gateway_commit_seconds_count"), m.get(
            "kinhbac_gateway_commit_seconds_sum")
        if cnt:
            notes.append(f"Gateway group commits over the run: {cnt:,.0f}, "
                         f"{1000 * total / cnt:.2f} ms each on average (fsync included).")
    notes += b.notes
    notes += [f"ERROR {e}" for e in b.errors]
    lines += [f"- {n}" for n in notes]
    if g_metrics and g_metrics.metrics:
        lines += ["", "<details><summary>Gateway metrics at the end of the run</summary>", "",
                  "```"]
        lines += [f"{k} {v:g}" for k, v in sorted(g_metrics.metrics.items())]
        lines += ["```", "", "</details>"]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_results(path: Path, section: str) -> None:
    """Replace the gateway section of path (between the markers), keeping anything else."""
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        new = head + section + ("\n" + tail if tail else "")
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + section
    path.write_text(new)


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gateway_bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=20.0, help="seconds per phase (20)")
    p.add_argument("--warmup", type=float, default=3.0,
                   help="seconds at the start of a phase left out of the figures (3)")
    p.add_argument("--soak", type=float, default=300.0,
                   help="seconds of the gateway RSS soak (300; 0 skips it)")
    p.add_argument("--soak-rate", type=float, default=0.0,
                   help="readings/s during the soak (0, the default: max load)")
    p.add_argument("--nodes", type=int, default=200, help="simulated nodes (200)")
    p.add_argument("--batch", type=int, default=50, help="readings per frame (50)")
    p.add_argument("--window", type=int, default=4, help="frames in flight per node (4)")
    p.add_argument("--rate", type=float, default=5000.0,
                   help="readings/s of the paced phase (5000)")
    p.add_argument("--skip", action="append", default=[], choices=["naive", "gateway"],
                   help="leave a system out (repeatable)")
    p.add_argument("--results", type=Path, default=RESULTS, help="report file (bench/RESULTS.md)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the broker, gateway data and logs go (default: run/bench/...)")
    p.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    a = p.parse_args(argv)
    if a.duration <= 0 or a.soak < 0 or a.nodes < 1 or a.rate <= 0 or a.window < 1:
        p.error("--duration, --nodes, --rate, --window must be positive and --soak >= 0")
    if not 1 <= a.batch <= 192:
        p.error("--batch must be 1..192")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench.gateway_bench" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:]) else "")
    if args.workdir is not None:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        base = REPO / "run" / "bench"
        base.mkdir(parents=True, exist_ok=True)
        workdir = base / time.strftime("gateway-%Y%m%d-%H%M%S")
        workdir.mkdir()
    failed = False
    try:
        try:
            b = asyncio.run(run_bench(args, workdir))
        except BenchError as e:
            failed = True
            print(f"[bench] ERROR: {e}", file=sys.stderr)
            return 1
        failed = bool(b.errors)
        machine = describe_machine(workdir, b.broker)
        report = build_report(b, machine, command)
        write_results(args.results, report)
        print(f"[bench] wrote {args.results}", flush=True)
        return 1 if failed else 0
    finally:
        if args.keep or failed:
            print(f"[bench] work folder kept: {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
