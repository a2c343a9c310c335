"""Login benchmark: what 60 clients sending wrong passwords at once do to the fleet service's
memory and to an unrelated request (GET /api/health).

    python -m bench.login_bench                             # 15 s idle, then 40 s, 20 s, 20 s
    python -m bench.login_bench --idle 5 --duration 10 --one 5 --lifted 0   # a quick look

The service is the real one (`kinhbac fleet serve`, its default settings) on a fresh
PostgreSQL database (KINHBAC_BENCH_POSTGRES, as bench/fleet_ingest_bench.py; `--sqlite`, or
PostgreSQL not answering, takes SQLite), with one admin. Throughout, the harness sends GET
/api/health 20 times a second on a schedule (a new connection each, as a load balancer does;
a slow answer does not delay the next probe) and samples the server's RSS every 50 ms.
Each load runs on an instance of its own, after --idle seconds of probes alone on it (the
baseline, measured in the same run):

1. **60 addresses**: 60 clients, each from its own loopback address (127.0.1.x), each sending
   a wrong password as soon as its previous answer came, every attempt for a new account
   (every tenth for the admin's): the per-address and per-account limits hold back as little
   as they can, so password hashing runs for the whole phase.
2. **one address**: 60 clients from one address (127.0.2.1): the per-address limit.
3. **limits lifted** (--lifted seconds, 0 skips it): load 1 against an instance whose limits
   are set as high as the settings allow (64 hashes at once, 10^6 failures per address and
   account): what the service did before the limits, measured in the same run.

The load generator is a process of its own (raw HTTP/1.1 over keep-alive connections). Results
go to bench/RESULTS.md (the login section). A missed target is reported, not an error: the exit
status is non-zero only when something failed to run.
"""

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.gateway_bench import Proc, cpu_s, free_port, machine_cpu, rss_kb, wait_port
from bench.report import command_output, machine_rows, replace_section, section_head

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN = "<!-- login-bench:begin (written by python -m bench.login_bench) -->"
END = "<!-- login-bench:end -->"

CLIENTS = 60  # the figure: 60 concurrent wrong logins
PROBES_PER_S = 20.0
PROBE_TIMEOUT_S = 30.0  # a probe slower than this counts as failed
LOGIN_TIMEOUT_S = 60.0  # a login answer slower than this counts as an error
RSS_EVERY_S = 0.05  # an Argon2id hash holds its 64 MiB for about 0.1 s here
SETTLE_S = 3.0  # between phases, so that one's stragglers do not land in the next
ADMIN = "admin@example.org"
ADMIN_EVERY = 10  # of each client's attempts (60 addresses), one in ten is for the admin
RSS_BOUND_MIB = 192  # over idle: 2 hashes of 64 MiB at once, and 64 MiB of room
TARGET_P99_MS = 1000.0  # health under attack; a load balancer gives up after a few seconds
LIFTED = {  # as high as the settings allow: the service before the limits
    "KINHBAC_LOGIN_CONCURRENT_HASHES": "64",
    "KINHBAC_LOGIN_FAILURES_PER_ADDRESS": "1000000",
    "KINHBAC_LOGIN_FAILURES_PER_ACCOUNT": "1000000",
}


class BenchError(Exception):
    """Something failed to run (not a missed target)."""


# ---- the load generator (a process of its own) -----------------------------------------------


def _kind(status: int, body: bytes) -> str:
    """What an answer was: 401, or which limit said 429."""
    if status != 429:
        return str(status)
    text = body.decode(errors="replace")
    for word, kind in (("address", "429 address"), ("account", "429 account"),
                       ("busy", "429 busy")):
        if word in text:
            return kind
    return "429 other"


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                request: bytes) -> tuple[int, bytes, bool]:
    """Send one request on a keep-alive connection: (status, body, connection still open)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    headers = {k.strip().lower(): v.strip().lower() for k, v in headers.items()}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body, headers.get("connection") != "close"


async def _client(index: int, config: dict[str, Any], results: list[tuple[float, str, float]],
                  deadline: float) -> None:
    host, port = "127.0.0.1", config["port"]
    source = config["addresses"][index % len(config["addresses"])]
    reader = writer = None
    attempt = 0
    while time.time() < deadline:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port,
                                                               local_addr=(source, 0))
            except OSError as exc:
                results.append((time.time(), f"error {type(exc).__name__}", 0.0))
                await asyncio.sleep(0.1)
                continue
        attempt += 1
        account = (ADMIN if config["admin_every"] and attempt % config["admin_every"] == 0
                   else f"{config['tag']}-{index}-{attempt}@example.org")
        form = f"username={account}&password=wrong-{secrets.token_hex(4)}".encode()
        request = (b"POST /api/auth/login HTTP/1.1\r\nHost: fleet\r\n"
                   b"Content-Type: application/x-www-form-urlencoded\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(form), form))
        started = time.time()
        try:
            async with asyncio.timeout(LOGIN_TIMEOUT_S):
                status, body, keep = await _http(reader, writer, request)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            results.append((time.time(), f"error {type(exc).__name__}", time.time() - started))
            writer.close()
            reader = writer = None
            continue
        results.append((time.time(), _kind(status, body), time.time() - started))
        if not keep:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _load(config: dict[str, Any]) -> dict[str, Any]:
    results: list[tuple[float, str, float]] = []
    start = time.time()
    deadline = start + config["duration"]
    await asyncio.gather(*(_client(i, config, results, deadline)
                           for i in range(config["clients"])))
    return {"start": start, "end": time.time(), "answers": results}


def load_process(config: dict[str, Any]) -> None:
    """Run the clients for the phase's duration; print when, and every answer (time, kind,
    latency)."""
    print(json.dumps(asyncio.run(_load(config))))


# ---- the harness -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RssSampler:
    """The server's RSS every RSS_EVERY_S, on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_EVERY_S):
            kb = rss_kb(self.pid)
            if kb is not None:
                self.samples.append((time.time(), kb))

    def between(self, t0: float, t1: float) -> list[int]:
        return [kb for t, kb in self.samples if t0 <= t <= t1]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _own_cpu_s() -> float:
    """CPU seconds of this harness and of its finished children (the load generators)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def peak_rss_kb(pid: int) -> int | None:
    """The process's high-water mark (VmHWM): every peak, even between samples."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


async def _probe(port: int, probes: list[tuple[float, float | None]]) -> None:
    started = time.time()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                status, _, _ = await _http(reader, writer, b"GET /api/health HTTP/1.1\r\n"
                                           b"Host: fleet\r\nConnection: close\r\n\r\n")
            finally:
                writer.close()
        probes.append((started, time.time() - started if status == 200 else None))
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        probes.append((started, None))


class Prober:
    """GET /api/health PROBES_PER_S times a second on a fixed schedule, each on its own."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.probes: list[tuple[float, float | None]] = []  # (sent, seconds or None: failed)
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            task = asyncio.create_task(_probe(self.port, self.probes))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            next_at += 1 / PROBES_PER_S
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=PROBE_TIMEOUT_S + 5)

    def between(self, t0: float, t1: float) -> list[float | None]:
        return [latency for sent, latency in self.probes if t0 <= sent < t1]


@dataclass
class Phase:
    name: str
    server: str  # "defaults" or "limits lifted"
    clients: int
    addresses: int
    t0: float = 0.0
    t1: float = 0.0
    answers: list[tuple[float, str, float]] = field(default_factory=list)
    health: list[float | None] = field(default_factory=list)
    health_hashing: list[float | None] = field(default_factory=list)  # up to the last 401
    rss_kb: list[int] = field(default_factory=list)
    hwm_kb: int | None = None
    server_cpu_s: float | None = None
    machine_busy: float | None = None
    others_cpu_s: float | None = None  # neither the server nor this harness and its loads

    def count(self, kind: str) -> int:
        return sum(1 for _, k, _ in self.answers if k == kind)

    @property
    def kinds(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for _, kind, _ in self.answers:
            found[kind] = found.get(kind, 0) + 1
        return found

    @property
    def last_401(self) -> float | None:
        times = [t for t, kind, _ in self.answers if kind == "401"]
        return max(times) if times else None

    def login_latency(self, kind: str, q: float) -> float | None:
        return percentile([s for _, k, s in self.answers if k == kind], q)


class Server:
    """`kinhbac fleet serve` on a free port, with its RSS sampled."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.env = env
        self.port = free_port()
        self.proc = Proc(f"fleet ({name})", [
            str(Path(sys.executable).parent / "kinhbac"), "fleet", "serve", "--port",
            str(self.port)], workdir / f"fleet-{name.replace(' ', '-')}.log")
        self.rss: RssSampler | None = None

    async def start(self) -> None:
        saved = dict(os.environ)
        os.environ.update(self.env)  # Proc passes os.environ on
        try:
            await self.proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        await wait_port(self.port, 60.0, self.proc)
        assert self.proc.pid is not None
        self.rss = RssSampler(self.proc.pid)

    async def stop(self) -> None:
        if self.rss is not None:
            self.rss.stop()
        await self.proc.stop()


async def run_load(port: int, phase: Phase, duration: float, tag: str,
                   addresses: list[str]) -> None:
    config = {"port": port, "duration": duration, "clients": phase.clients, "tag": tag,
              "addresses": addresses, "admin_every": ADMIN_EVERY if len(addresses) > 1 else 0}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.login_bench", "--load", json.dumps(config), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), duration + LOGIN_TIMEOUT_S + 30)
    if proc.returncode != 0:
        raise BenchError(f"the load generator failed:\n{err.decode(errors='replace')[-2000:]}")
    report = json.loads(out)
    phase.t0, phase.t1 = report["start"], report["end"]  # the clients' window, start-up aside
    phase.answers = [tuple(answer) for answer in report["answers"]]  # type: ignore[misc]


async def measure(server: Server, prober: Prober, phase: Phase, duration: float,
                  addresses: list[str]) -> Phase:
    assert server.proc.pid is not None and server.rss is not None
    print(f"{phase.name} ({server.name}): {duration:.0f} s", flush=True)
    if server.proc.exited:
        raise BenchError(f"the fleet exited with {server.proc.returncode}\n{server.proc.tail()}")
    cpu0, busy0, own0 = cpu_s(server.proc.pid), machine_cpu(), _own_cpu_s()
    phase.t0 = time.time()
    if phase.clients:
        await run_load(server.port, phase, duration, phase.name.replace(" ", "-"), addresses)
    else:
        await asyncio.sleep(duration)
        phase.t1 = time.time()
    cpu1, busy1, own1 = cpu_s(server.proc.pid), machine_cpu(), _own_cpu_s()
    await asyncio.sleep(1.0)  # the probes sent last answer (or time out: they are counted)
    phase.health = prober.between(phase.t0, phase.t1)
    if phase.last_401 is not None:
        phase.health_hashing = prober.between(phase.t0, phase.last_401)
    phase.rss_kb = server.rss.between(phase.t0, phase.t1)
    phase.hwm_kb = peak_rss_kb(server.proc.pid)
    if cpu0 is not None and cpu1 is not None:
        phase.server_cpu_s = cpu1 - cpu0
    phase.machine_busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    busy_s = (busy1[0] - busy0[0]) / CLK_TCK
    phase.others_cpu_s = max(0.0, busy_s - (phase.server_cpu_s or 0.0) - (own1 - own0))
    await asyncio.sleep(SETTLE_S)
    return phase


async def create_admin(env: dict[str, str], workdir: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "kinhbac"), "fleet", "create-admin", ADMIN,
        env={**os.environ, **env, "KINHBAC_ADMIN_PASSWORD": secrets.token_urlsafe(16)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"create-admin failed: {out.decode(errors='replace')}")


async def warm_up(port: int) -> None:
    """One wrong login (imports, the unknown-user hash) and a few health checks."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    form = b"username=warm-up@example.org&password=wrong"
    await _http(reader, writer, b"POST /api/auth/login HTTP/1.1\r\nHost: fleet\r\nContent-Type: "
                b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\nConnection: close"
                b"\r\n\r\n%s" % (len(form), form))
    writer.close()
    for _ in range(5):
        probes: list[tuple[float, float | None]] = []
        await _probe(port, probes)


async def bench(args: argparse.Namespace, database: str, workdir: Path,
                stuck: list[str]) -> list[Phase]:
    """Each load on an instance of its own (a jammed instance cannot spoil the next load),
    after an idle phase on it; `stuck` gets those that SIGTERM did not stop within 15 s."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"KINHBAC_SECRET_KEY": secrets.token_urlsafe(32), "KINHBAC_DATABASE_URL": database,
           "KINHBAC_ENV": "production"}
    await create_admin(env, workdir)
    loads = [("defaults", "60 addresses", args.duration, [f"127.0.1.{i + 1}" for i in
                                                          range(CLIENTS)]),
             ("defaults", "one address", args.one, ["127.0.2.1"])]
    if args.lifted:
        loads.append(("limits lifted", "60 addresses", args.lifted,
                      [f"127.0.3.{i + 1}" for i in range(CLIENTS)]))
    phases: list[Phase] = []
    for number, (name, load, duration, addresses) in enumerate(loads, 1):
        server = Server(f"{number} {name}", {**env, **(LIFTED if name != "defaults" else {})},
                        workdir)
        await server.start()
        prober = Prober(server.port)
        try:
            await warm_up(server.port)
            await asyncio.sleep(SETTLE_S)
            prober.start()
            phases.append(await measure(server, prober, Phase("idle", name, 0, 0),
                                        args.idle, []))
            phases.append(await measure(
                server, prober, Phase(load, name, CLIENTS, len(addresses)), duration,
                addresses))
        finally:
            await prober.stop()
            await server.stop()
        if server.proc.returncode == -9:  # Proc.stop's SIGKILL after 15 s
            stuck.append(f"{name}, {load}")
    return phases


# ---- the database ----------------------------------------------------------------------------


@contextlib.contextmanager
def database(args: argparse.Namespace, workdir: Path) -> Any:
    """(URL, description): a fresh PostgreSQL database, or SQLite in the work folder."""
    if not args.sqlite:
        from bench.fleet_ingest_bench import POSTGRES_DSN, fresh_database
        from bench.fleet_ingest_bench import BenchError as IngestBenchError

        try:
            with fresh_database() as url:
                import psycopg

                with psycopg.connect(POSTGRES_DSN) as connection:
                    version = connection.execute("SHOW server_version").fetchone()[0]
                yield url, f"PostgreSQL {version} on 127.0.0.1 (a fresh database)"
                return
        except IngestBenchError as exc:
            print(f"{exc}: SQLite instead", flush=True)
            reason = "PostgreSQL did not answer"
    else:
        reason = "--sqlite"
    workdir.mkdir(parents=True, exist_ok=True)
    yield (f"sqlite:///{workdir / 'fleet.sqlite3'}",
           f"SQLite {__import__('sqlite3').sqlite_version} ({reason})")


# ---- the report ------------------------------------------------------------------------------


def describe_machine(db: str) -> list[tuple[str, str]]:
    commit = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
    dirty = command_output(["git", "-C", str(REPO), "status", "--porcelain",
                            "--untracked-files=no", "kinhbac"]).strip()
    return [
        *machine_rows(),
        ("Database", db),
        ("uvicorn / FastAPI / argon2-cffi", " / ".join(
            metadata.version(p) for p in ("uvicorn", "fastapi", "argon2-cffi"))),
        ("Code", f"{commit or 'unknown'}" + (" with local changes to kinhbac/" if dirty else "")),
        ("Date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
    ]


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return "failed"
    return f"{seconds * 1000:,.0f}" if seconds >= 1 else f"{seconds * 1000:,.1f}"


def _mb(kb: float | None) -> str:
    return "-" if kb is None else f"{kb / 1024:,.0f}"


def _health(samples: list[float | None]) -> str:
    """p50 / p99 / max, a failed probe counting as slower than any answer."""
    every = _with_failures(samples)
    failed = sum(1 for s in samples if s is None)
    text = " / ".join(_ms(value) for value in (percentile(every, 0.5), percentile(every, 0.99),
                                                max(every, default=None)))
    return text + (f" ({failed:,} of {len(samples):,} failed)" if failed else "")


def _with_failures(samples: list[float | None]) -> list[float]:
    return [math.inf if s is None else s for s in samples]


def _answers(phase: Phase) -> str:
    if not phase.answers:
        return "-"
    order = ["401", "429 address", "429 account", "429 busy", "429 other"]
    kinds = phase.kinds
    parts = [f"{kinds.pop(k):,} {k}" for k in order if k in kinds]
    parts += [f"{n:,} {k}" for k, n in sorted(kinds.items())]
    return ", ".join(parts)


def _p99(samples: list[float | None]) -> float | None:
    """A failed probe counts as slower than any answer."""
    return percentile(_with_failures(samples), 0.99)


def build_report(phases: list[Phase], machine: list[tuple[str, str]],
                 args: argparse.Namespace, command: str, stuck: list[str],
                 workdir: Path) -> str:
    idle = phases[0]
    loads = [p for p in phases if p.clients]
    ours = [p for p in loads if p.server == "defaults"]
    many = next(p for p in ours if p.addresses > 1)
    lifted = next((p for p in loads if p.server != "defaults"), None)
    idle_rss = percentile([float(kb) for kb in idle.rss_kb], 0.5) or 0.0
    rss_bound = idle_rss + RSS_BOUND_MIB * 1024
    peak = max((p.hwm_kb or 0) for p in ours)
    worst_p99 = max((_p99(p.health) or 0.0) for p in ours)
    failed = sum(1 for p in ours for s in p.health if s is None)
    probes = sum(len(p.health) for p in ours)
    lines = [
        *section_head(BEGIN, "Login benchmark", command, machine),
        "## Load",
        "",
        f"The fleet service as `kinhbac fleet serve` runs it (uvicorn, one process) with its "
        f"default settings: at most 20 failed logins per address and 10 per account in 15 "
        f"minutes, at most 2 password hashes (Argon2id, 64 MiB each) at once, a login waits "
        f"up to 5 s for one. {CLIENTS} clients, each on a keep-alive connection, send a wrong "
        f"password as soon as their previous answer came (a process of its own; an answer "
        f"slower than {LOGIN_TIMEOUT_S:.0f} s counts as an error). Meanwhile the harness sends "
        f"GET /api/health {PROBES_PER_S:.0f} times a second on a fixed schedule, each on a new "
        f"connection (a slow answer does not hold back the next probe; one slower than "
        f"{PROBE_TIMEOUT_S:.0f} s or not 200 has failed), and samples the server's RSS every "
        f"{RSS_EVERY_S * 1000:.0f} ms; 'peak' is the kernel's high-water mark (VmHWM), which "
        f"no sample can miss. Each load runs on an instance of its own, after {args.idle:.0f} s "
        f"of probes alone on it (**idle**, the baseline of the same run): **60 addresses** "
        f"({args.duration:.0f} s: each client from its own loopback address, every attempt for "
        f"a new account and every tenth for the admin's, so that the limits stop as few "
        f"hashes as they can); **one address** ({args.one:.0f} s: all "
        f"{CLIENTS} clients from one address)" + (
            f"; and the 60-address load ({args.lifted:.0f} s) on an instance with the limits "
            f"lifted as far as the settings allow (64 hashes at once, 10^6 failures per address "
            f"and account): the service before the limits, in the same run." if lifted else "."),
        "",
        "## Results against the targets",
        "",
        "| Measure | Value | Target | |",
        "|---|---:|---|---|",
        f"| Server RSS idle, median (MB) | {_mb(idle_rss)} | | |",
        (f"| Server RSS peak under bad logins, VmHWM (MB) | {_mb(peak)} | <= idle + "
        f"{RSS_BOUND_MIB} MiB = {_mb(rss_bound)} (two hashes and room) | "
        f"{'met' if peak <= rss_bound else 'missed'} |"),
    ]
    if lifted is not None:
        lines.append(f"| ... with the limits lifted (MB) | {_mb(lifted.hwm_kb)} | | |")
    lines += [
        f"| Health p99 idle (ms) | {_ms(_p99(idle.health))} | | |",
        (f"| Health p99 under bad logins, worst load (ms) | {_ms(worst_p99)} | < "
        f"{TARGET_P99_MS:,.0f} (a failed probe counts as slower) | "
        f"{'met' if worst_p99 * 1000 < TARGET_P99_MS else 'missed'} |"),
        (f"| Health probes failed under bad logins | {failed:,} of {probes:,} | none | "
        f"{'met' if not failed else 'missed'} |"),
    ]
    if lifted is not None:
        lines.append(f"| ... with the limits lifted: p99 (ms), probes failed | "
                     f"{_ms(_p99(lifted.health))}, {sum(1 for s in lifted.health if s is None):,}"
                     f" of {len(lifted.health):,} | | |")
    lines += [
        "",
        "## Every phase",
        "",
        ("| Instance | Phase | Clients / addresses | Login answers | 401s/s | Login p50 / p99 of "
        "401s (ms) | Health p50 / p99 / max (ms) | ... up to the last 401 | RSS median / max "
        "(MB) | Peak VmHWM (MB) | CPU % of a core: server, others | Machine busy |"),
        "|---|---|---|---|---:|---|---|---|---|---:|---|---:|",
    ]
    for p in phases:
        span = max(1e-9, p.t1 - p.t0)
        rss = [float(kb) for kb in p.rss_kb]
        cpu = " / ".join("-" if v is None else f"{100 * v / span:.0f}"
                         for v in (p.server_cpu_s, p.others_cpu_s))
        lines.append(
            f"| {p.server} | {p.name} | "
            + (f"{p.clients} / {p.addresses}" if p.clients else "-")
            + f" | {_answers(p)} | "
            + (f"{p.count('401') / span:,.1f}" if p.clients else "-")
            + " | "
            + (" / ".join(_ms(p.login_latency("401", q)) for q in (0.5, 0.99))
               if p.count("401") else "-")
            + f" | {_health(p.health)} | "
            + (_health(p.health_hashing) if p.health_hashing else "-")
            + f" | {_mb(percentile(rss, 0.5))} / {_mb(max(rss, default=None))} | "
            f"{_mb(p.hwm_kb)} | {cpu} | {100 * (p.machine_busy or 0):.0f}% |"
        )
    lines += ["", "## Notes", "",
              ("- 'Others' is CPU that neither the server nor this benchmark used: other work "
              "on this machine, which the figures share it with."),
              (f"- Login answers: '429 address' and '429 account' are the failure limits, "
              f"'429 busy' a login that waited 5 s for one of the 2 hash slots, 'error' no "
              f"answer within {LOGIN_TIMEOUT_S:.0f} s (or a dropped connection).")]
    one = next((p for p in ours if p.addresses == 1), None)
    if one is not None and one.answers:
        first_429 = min((t for t, k, _ in one.answers if k == "429 address"), default=None)
        lines.append(
            f"- One address: {one.count('401')} attempts were checked (401) against a limit "
            f"of 20" + (f"; the first per-address 429 came {first_429 - one.t0:.1f} s into "
                        f"the load" if first_429 else "; no per-address 429 came")
            + ". A 429 costs no hash.")
    lines.append(
        f"- 60 addresses: {CLIENTS * 20:,} failures are allowed in all before the "
        f"per-address 429s ({many.count('401'):,} were used): no limit stops the hashing "
        f"in this load.")
    for name in stuck:
        lines.append(f"- The instance of '{name}' did not stop within 15 s of SIGTERM and "
                     f"was killed.")
    errors: dict[tuple[str, str, str], int] = {}
    for log in sorted(workdir.glob("fleet-*.log")):
        for match in re.finditer(r"^(\w+(?:\.\w+)*(?:Error|Exception)): (.{0,100})",
                                 log.read_text(errors="replace"), re.MULTILINE):
            key = (log.stem.removeprefix("fleet-"), match[1], match[2].split(" (Background")[0])
            errors[key] = errors.get(key, 0) + 1
    for (instance, kind, text), count in sorted(errors.items()):
        lines.append(f"- Instance {instance.replace('-', ' ')} logged {count:,} x "
                     f"`{kind}: {text}`.")
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_results(path: Path, section: str) -> None:
    replace_section(path, section, BEGIN, END)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.login_bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--idle", type=float, default=15.0, help="seconds of probes only (15)")
    p.add_argument("--duration", type=float, default=40.0,
                   help="seconds of bad logins from 60 addresses (40)")
    p.add_argument("--one", type=float, default=20.0,
                   help="seconds of bad logins from one address (20)")
    p.add_argument("--lifted", type=float, default=20.0,
                   help="seconds of the 60-address load with the limits lifted; 0 skips (20)")
    p.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    p.add_argument("--results", type=Path, default=RESULTS, help="file to write (RESULTS.md)")
    p.add_argument("--load", help=argparse.SUPPRESS)  # the load generator's configuration
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load:
        load_process(json.loads(args.load))
        return 0
    command = "python -m bench.login_bench" + (
        f" {' '.join(sys.argv[1:])}" if argv is None and sys.argv[1:] else "")
    workdir = REPO / "run" / "bench" / f"login-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        stuck: list[str] = []
        with database(args, workdir) as (url, description):
            phases = asyncio.run(bench(args, url, workdir, stuck))
    except BenchError as exc:
        print(f"login bench: {exc}", file=sys.stderr)
        return 1
    write_results(args.results, build_report(phases, describe_machine(description), args,
                                             command, stuck, workdir))
    print(f"results written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
