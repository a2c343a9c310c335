"""The gateway's supervisor: any of its tasks that dies ends the gateway (exit status 1, one log
line naming the task and the error), so that systemd restarts it; a node's broken connection
never does. systemd hears READY=1 once nodes can connect, WATCHDOG=1 from the event loop itself
(so a hung loop is restarted) and STOPPING=1 when the gateway stops.

Faults are injected in-process (the gateway's own objects, patched by the test) or, for the
real `kinhbac gateway run`, through tests/helpers/faulty_gateway.py. Deadlines are generous:
two cores, shared with other test runs.
"""

import asyncio
import struct
import ctypes
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers.gateway import GatewayProcess

from kinhbac.gateway import daemon
from kinhbac.gateway.config import load_settings
from kinhbac.gateway.keys import FetchError
from kinhbac.gateway.queue import QueueError, Stored

START_S = 30.0  # the gateway listens and its uplink runs within this
END_S = 30.0  # a dying task ends the gateway within this (it needs well under 10 s)
STATUS_TOPIC = "kinhbac/testsite/gateway/gw1/status"
FAULTY_GATEWAY = Path(__file__).parent / "helpers" / "faulty_gateway.py"


def gateway_settings(tmp_path, broker, **overrides):
    values = {
        "site": "testsite",
        "gateway_id": "gw1",
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "data_dir": tmp_path / "data",
        "metrics_port": 0,
        "commit_window_ms": 1.0,
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "backoff_min_s": 0.2,
                 "backoff_max_s": 1.0},
    }
    if "fleet_url" not in overrides:
        key_file = tmp_path / "keys.json"
        key_file.write_text('{"devices": []}')
        values["key_file"] = key_file
    return load_settings(None, **(values | overrides))


async def started(gateway) -> asyncio.Task:
    """gateway.run() as a task, once it serves."""
    run = asyncio.create_task(gateway.run(), name="gateway")
    ready = asyncio.create_task(gateway.ready.wait())
    await asyncio.wait({run, ready}, timeout=START_S, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if run.done():
        run.result()  # raises why it did not start
    assert gateway.ready.is_set(), "the gateway did not start"
    return run


async def failure_of(run: asyncio.Task):
    """The GatewayFailed that ends run()."""
    done, _ = await asyncio.wait({run}, timeout=END_S)
    assert done, "the gateway kept running after one of its tasks died"
    error = run.exception()
    assert isinstance(error, daemon.GatewayFailed), repr(error)
    return error


def assert_one_reason(caplog, reason: str) -> None:
    """Exactly one CRITICAL line says why the gateway stopped, and it names the task."""
    lines = [r.getMessage() for r in caplog.records
             if r.name == "kinhbac.gateway" and r.levelno == logging.CRITICAL]
    assert len(lines) == 1, lines
    assert lines[0].startswith("gateway stopped: ") and reason in lines[0], lines[0]
    assert "\n" not in lines[0]


# ----- each task, made to crash, ends the gateway -----


def test_a_crashed_housekeeping_task_ends_the_gateway_naming_it_and_marks_it_offline(
        tmp_path, broker, collector, caplog, monkeypatch):
    gateway = daemon.Gateway(gateway_settings(tmp_path, broker))

    async def broken_maintain():
        raise RuntimeError("injected fault")

    async def scenario():
        run = await started(gateway)
        await asyncio.wait_for(gateway.uplink.connected.wait(), START_S)
        monkeypatch.setattr(gateway.queue, "maintain", broken_maintain)
        return await failure_of(run)

    failure = asyncio.run(scenario())
    assert failure.task == "housekeeping"
    assert_one_reason(caplog, "task housekeeping failed: RuntimeError: injected fault")
    # Not left "online" on the broker while it is down (a clean disconnect drops the will).
    collector.wait_for(lambda: collector.retained.get(STATUS_TOPIC, {}).get("state")
                       == "offline", timeout=END_S, what="the gateway's status offline")


def test_a_failing_queue_maintenance_is_logged_once_and_retried_without_ending_the_gateway(
        tmp_path, broker, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="kinhbac.gateway")
    gateway = daemon.Gateway(gateway_settings(tmp_path, broker))
    real_maintain = gateway.queue.maintain
    calls = 0

    async def flaky_maintain():
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise QueueError("maintain failed: disk I/O error")
        return await real_maintain()

    monkeypatch.setattr(gateway.queue, "maintain", flaky_maintain)

    async def scenario():
        run = await started(gateway)
        deadline = time.monotonic() + END_S
        while calls < 5:  # three failed rounds, then two good ones
            assert not run.done(), run.exception()
            assert time.monotonic() < deadline, f"housekeeping stopped after {calls} rounds"
            await asyncio.sleep(0.1)
        gateway.stop()
        await asyncio.wait_for(run, END_S)  # a graceful stop: returns, raises nothing

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "kinhbac.gateway"]
    failed = [m for m in messages if "queue maintenance failed" in m]
    assert len(failed) == 1 and "disk I/O error" in failed[0], messages
    assert "queue maintenance works again" in messages


def test_a_database_error_in_the_uplink_ends_the_gateway_instead_of_silently_stopping_publishing(
        tmp_path, broker, caplog, monkeypatch):
    gateway = daemon.Gateway(gateway_settings(tmp_path, broker))

    async def broken_fetch(after_id, limit):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(gateway.queue, "fetch", broken_fetch)

    async def scenario():
        return await failure_of(await started(gateway))

    failure = asyncio.run(scenario())
    assert failure.task == "uplink"
    assert_one_reason(caplog, "task uplink failed: DatabaseError: database disk image is "
                              "malformed")


def test_a_bug_after_a_publish_ends_the_gateway_instead_of_stalling_that_devices_messages(
        tmp_path, broker, caplog, monkeypatch):
    """A publish task that fails with anything but an MQTT error used to end alone, and every
    later message of its device with it, silently."""
    gateway = daemon.Gateway(gateway_settings(tmp_path, broker))
    frame = Stored(id=1, device="6b62000000000001", boot=1, first_seq=1, count=1, base_ms=0,
                   flags=0, sensors_ref=1, sensors='[["t","C"]]', received_ms=0,
                   readings=struct.pack(">BHf", 0, 0, 1.0))
    rows = [[frame]]

    async def fetch(after_id, limit):
        return rows.pop() if rows and after_id == 0 else []

    def forget(ids):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(gateway.queue, "fetch", fetch)
    monkeypatch.setattr(gateway.queue, "forget", forget)

    async def scenario():
        return await failure_of(await started(gateway))

    failure = asyncio.run(scenario())
    assert failure.task == "uplink"
    assert_one_reason(caplog, "task uplink failed: RuntimeError: injected fault")


def test_a_crashed_fleet_key_refresh_ends_the_gateway(tmp_path, broker, caplog, monkeypatch):
    settings = gateway_settings(tmp_path, broker, fleet_url="http://127.0.0.1:9",
                                fleet_token="kbg_test", key_refresh_s=1)
    gateway = daemon.Gateway(settings)
    calls = 0

    def fetch():  # in place of the HTTP request: the fleet is never contacted
        nonlocal calls
        calls += 1
        if calls == 1:  # the start-up fetch: an ordinary failure, the gateway carries on
            raise FetchError("unreachable", "the fleet is unreachable: test")
        raise RuntimeError("injected fault")

    monkeypatch.setattr(gateway.keys, "fetch", fetch)

    async def scenario():
        return await failure_of(await started(gateway))

    failure = asyncio.run(scenario())
    assert failure.task == "fleet-keys"
    assert_one_reason(caplog, "task fleet-keys failed: RuntimeError: injected fault")


class InjectedThreadDeath(BaseException):
    """Raised inside the queue's database thread, as a bug there would end it."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_queue_database_thread_dying_ends_the_gateway(tmp_path, broker, caplog):
    gateway = daemon.Gateway(gateway_settings(tmp_path, broker))

    async def scenario():
        run = await started(gateway)
        thread = gateway.queue._thread
        # Raised in that thread at its next request (housekeeping sends one every second).
        hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(InjectedThreadDeath))
        assert hit == 1
        return await failure_of(run)

    failure = asyncio.run(scenario())
    assert failure.task == "queue"
    assert_one_reason(caplog, "task queue failed: QueueFailed: ")
    assert "InjectedThreadDeath" in str(failure)


def test_the_node_listener_closing_by_itself_ends_the_gateway(tmp_path, broker, caplog):
    gateway = daemon.Gateway(gateway_settings(tmp_path, broker))

    async def scenario():
        run = await started(gateway)
        await gateway.listener.stop()  # stops accepting nodes, while nobody asked to stop
        return await failure_of(run)

    failure = asyncio.run(scenario())
    assert failure.task == "listener"
    assert_one_reason(caplog, "task listener failed: TaskEnded: the node listener stopped "
                              "accepting connections")


def test_a_broken_node_connection_never_ends_the_gateway(tmp_path, broker, caplog, monkeypatch):
    """Not a fix but its guard: passed before the supervisor too. A node's connection is not a
    supervised task, or any peer on the site's WiFi could stop the gateway."""
    gateway = daemon.Gateway(gateway_settings(tmp_path, broker))

    async def broken_connection(reader, replies):
        raise RuntimeError("injected fault in one node's connection")

    async def scenario():
        run = await started(gateway)
        monkeypatch.setattr(gateway.listener, "_read_frames", broken_connection)
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.listener.port)
            assert await asyncio.wait_for(reader.read(), END_S) == b""  # that connection ends
            writer.close()
        await asyncio.sleep(1)
        assert not run.done(), run.exception()
        gateway.stop()
        await asyncio.wait_for(run, END_S)  # stops cleanly, raises nothing

    asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelno == logging.CRITICAL]


# ----- systemd: ready, watchdog, stopping -----


class NotifySocket:
    """A stand-in for systemd's notification socket, in the abstract namespace."""

    def __init__(self) -> None:
        self.address = f"@kinhbac-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])

    def receive(self, timeout: float) -> list[str] | None:
        """The next datagram's assignments, or None if none came within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode().split("\n")
        except TimeoutError:
            return None

    def wait_for(self, assignment: str, timeout: float = START_S) -> list[str]:
        """Read until a datagram holds `assignment`; returns that datagram."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and assignment in message:
                return message
        raise AssertionError(f"no {assignment} within {timeout} s")

    def drain(self) -> None:
        """Forget what has been sent so far."""
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(4096)
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(monkeypatch):
    s = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", s.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield s
    s.close()


class GatewayInThread:
    """The gateway on an event loop of its own, so that the test can hang that loop."""

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="gateway-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self.gateway.run())
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.gateway.stop)
        self.thread.join(END_S)
        assert not self.thread.is_alive(), "the gateway did not stop"
        self.loop.close()


def test_ready_is_sent_once_nodes_can_connect_and_stopping_when_the_gateway_drains(
        tmp_path, broker, notify_socket):
    gateway = daemon.Gateway(gateway_settings(tmp_path, broker))
    running = GatewayInThread(gateway)
    try:
        ready = notify_socket.wait_for("READY=1")
        # Whoever waits for READY=1 (systemd, and units ordered after this one) finds the port
        # already listening.
        socket.create_connection(("127.0.0.1", gateway.listener.port), timeout=5).close()
        assert any(a.startswith("STATUS=serving nodes on") for a in ready), ready
    finally:
        running.stop()
    notify_socket.wait_for("STOPPING=1", timeout=5)
    assert running.error is None, repr(running.error)


def test_a_hung_event_loop_stops_the_watchdog_pings_until_it_runs_again(
        tmp_path, broker, notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    gateway = daemon.Gateway(gateway_settings(tmp_path, broker))
    running = GatewayInThread(gateway)
    blocked, release = threading.Event(), threading.Event()

    def hang() -> None:  # runs on the gateway's loop: nothing else runs there meanwhile
        blocked.set()
        release.wait(60)

    try:
        notify_socket.wait_for("READY=1")
        notify_socket.wait_for("WATCHDOG=1")
        running.loop.call_soon_threadsafe(hang)
        assert blocked.wait(10)
        notify_socket.drain()  # pings sent before the loop hung
        silence = []
        while (message := notify_socket.receive(timeout=2.0)) is not None:  # ten intervals
            silence.append(message)
        assert not [m for m in silence if "WATCHDOG=1" in m], silence
        release.set()
        notify_socket.wait_for("WATCHDOG=1", timeout=10)
    finally:
        release.set()
        running.stop()
    assert running.error is None, repr(running.error)


def test_sd_notify_follows_what_systemd_puts_in_the_environment(tmp_path):
    from kinhbac.gateway.systemd import Notifier

    assert Notifier.from_environment({}).notify("READY=1") is False  # not under systemd
    me = str(os.getpid())
    watched = Notifier.from_environment(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me})
    assert watched.ping_interval_s == 15.0
    forked = Notifier.from_environment(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert forked.ping_interval_s is None  # that watchdog is another process's
    # A socket path (AF_UNIX paths are short: not under pytest's long tmp_path).
    folder = tempfile.mkdtemp(prefix="kb-")
    path = os.path.join(folder, "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)
    try:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
        assert notifier.notify("STATUS=two\nlines", "READY=1")
        assert receiver.recv(4096) == b"STATUS=two lines\nREADY=1"
        notifier.close()
    finally:
        receiver.close()
        os.unlink(path)
        os.rmdir(folder)


# ----- the real command -----


class FaultyGatewayProcess(GatewayProcess):
    """`kinhbac gateway run` started through tests/helpers/faulty_gateway.py."""

    def start(self, timeout: float = START_S) -> "FaultyGatewayProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(FAULTY_GATEWAY), "gateway", "run", "-c", str(self.config)],
                stdout=log, stderr=log, env=dict(os.environ))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway did not start:\n{self.log()}") from None
                time.sleep(0.1)


def test_kinhbac_gateway_run_exits_1_with_one_line_naming_the_task_that_died(
        tmp_path, broker, monkeypatch):
    trigger = tmp_path / "crash-now"
    monkeypatch.setenv("KINHBAC_TEST_FAULT_FILE", str(trigger))
    key_file = tmp_path / "keys.json"
    key_file.write_text('{"devices": []}')
    gateway = FaultyGatewayProcess(tmp_path / "gw", key_file=key_file, broker_port=broker.port)
    try:
        gateway.start()
        trigger.touch()
        code = gateway.proc.wait(END_S)
    finally:
        gateway.stop()
    log = gateway.log()
    assert code == 1, log
    reasons = [line for line in log.splitlines() if "gateway stopped:" in line]
    assert len(reasons) == 1, log
    assert " CRITICAL " in reasons[0]
    assert "gateway stopped: task housekeeping failed: RuntimeError: injected fault" in reasons[0]
    # The traceback rides on the same line (the journal keeps a line whole), not below it.
    assert "Traceback (most recent call last):" in reasons[0]
    assert not [line for line in log.splitlines() if line.startswith("Traceback")], log


def test_kinhbac_gateway_run_tells_systemd_it_is_ready_pings_and_exits_0_on_sigterm(
        tmp_path, broker, notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # no WATCHDOG_PID: as systemd may leave it
    key_file = tmp_path / "keys.json"
    key_file.write_text('{"devices": []}')
    gateway = GatewayProcess(tmp_path / "gw", key_file=key_file, broker_port=broker.port)
    try:
        gateway.start(timeout=START_S)
        notify_socket.wait_for("READY=1")
        notify_socket.wait_for("WATCHDOG=1", timeout=10)
        gateway.proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1", timeout=10)
        code = gateway.proc.wait(END_S)
    finally:
        gateway.stop()
    assert code == 0, gateway.log()
    assert "stopped;" in gateway.log()
