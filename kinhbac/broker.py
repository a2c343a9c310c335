"""A private MQTT broker on 127.0.0.1 for tests and `make demo`.

Mosquitto wherever its binary is installed (DESIGN.md: real parts, embedded defaults); otherwise
the embedded amqtt broker, which covers a plain broker only. Each `LocalBroker` owns a work
folder (config, password file, persistence, log) and a port that it keeps across restarts, so a
test can take the broker away and bring it back where its clients expect it.

    with LocalBroker(tmp_path / "broker", persistence=True) as broker:
        ...  # connect to broker.host, broker.port
        broker.stop()
        broker.start()  # same port, retained messages and persistent sessions kept
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

__all__ = [
    "BrokerError",
    "BrokerStartFailed",
    "BrokerUnavailable",
    "LocalBroker",
    "TlsFiles",
    "find_mosquitto",
    "find_mosquitto_passwd",
    "mosquitto_password_hash",
    "write_password_file",
]

_log = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0  # mosquitto listens within milliseconds; this only bounds a wedged start
STOP_TIMEOUT_S = 10.0  # mosquitto writes its persistence file on SIGTERM: give it time to finish
LOG_TAIL_LINES = 20  # enough of the log to show why a start failed
REQUIRE_ENV = "KINHBAC_REQUIRE_MOSQUITTO"
# The hash mosquitto 2's own mosquitto_passwd writes: PBKDF2-HMAC-SHA512, 101 rounds, 12-byte salt.
PBKDF2_ITERATIONS = 101
PBKDF2_SALT_BYTES = 12

_RUNNING_LINE = re.compile(rb"mosquitto version \S+ running")
_MOSQUITTO_FALLBACK_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_MOSQUITTO_PASSWD_FALLBACK_PATHS = ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd")


class BrokerError(Exception):
    """Base class of this module's errors."""


class BrokerUnavailable(BrokerError):
    """The broker asked for cannot run here; `missing` names what is missing."""

    def __init__(self, msg: str, *, missing: str) -> None:
        super().__init__(msg)
        self.missing = missing


class BrokerStartFailed(BrokerError):
    """The broker process exited or never listened; `log_tail` holds the end of its log."""

    def __init__(self, msg: str, *, log_tail: str = "") -> None:
        super().__init__(f"{msg}\n--- broker log (tail) ---\n{log_tail}" if log_tail else msg)
        self.log_tail = log_tail


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS listener; require_client_cert makes clients present a cert the CA signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = False


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (PATH first, then where Debian puts it), or None."""
    return _find("mosquitto", _MOSQUITTO_FALLBACK_PATHS)


def find_mosquitto_passwd() -> str | None:
    """Path of mosquitto_passwd, or None."""
    return _find("mosquitto_passwd", _MOSQUITTO_PASSWD_FALLBACK_PATHS)


def _find(name: str, fallbacks: tuple[str, ...]) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for path in fallbacks:
        if os.access(path, os.X_OK):
            return path
    return None


def mosquitto_password_hash(password: str, *, salt: bytes | None = None) -> str:
    """The `$7$` PBKDF2-SHA512 hash that mosquitto 2 reads from a password file."""
    salt = secrets.token_bytes(PBKDF2_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def write_password_file(path: Path, users: Mapping[str, str], *, passwd_tool: str | None) -> str:
    """Write a mosquitto password file for users; returns how it was hashed (for describe()).

    With passwd_tool (mosquitto_passwd), the tool hashes the file in place (-U: one call for all
    users, and no password on a command line); without it, Python writes the same hash format.
    """
    for name, password in users.items():
        if not name or ":" in name or "\n" in name or "\n" in password:
            raise ValueError(f"user name or password unusable in a password file: {name!r}")
    if passwd_tool is None:
        lines = [f"{name}:{mosquitto_password_hash(pw)}\n" for name, pw in users.items()]
        _write_private(path, "".join(lines))
        return "hashed in Python (mosquitto_passwd not found)"
    _write_private(path, "".join(f"{name}:{pw}\n" for name, pw in users.items()))
    result = subprocess.run(
        [passwd_tool, "-U", str(path)], check=False, capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        path.unlink(missing_ok=True)  # never leave clear-text passwords behind
        raise BrokerError(f"mosquitto_passwd -U failed: {result.stderr.strip() or result.stdout}")
    return "hashed by mosquitto_passwd"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _check_port_free(port: int) -> None:
    """Refuse to start on a port someone else listens on (we would wait on their socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as brokers do: TIME_WAIT is ok
        try:
            s.bind((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BrokerStartFailed(f"port {HOST}:{port} is taken by another process") from exc
            raise


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


# Brokers still running when the interpreter exits (a test that never reached its cleanup).
_live_processes: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live_processes):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class LocalBroker:
    """A private MQTT broker on 127.0.0.1: mosquitto if installed, else the embedded amqtt."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int = 0,
        require_mosquitto: bool = False,
        prefer: Literal["mosquitto", "amqtt"] = "mosquitto",
        persistence: bool = False,
        users: Mapping[str, str] | None = None,
        acl_file: Path | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        if prefer not in ("mosquitto", "amqtt"):
            raise ValueError(f"prefer must be 'mosquitto' or 'amqtt', not {prefer!r}")
        if prefer == "amqtt" and require_mosquitto:
            raise ValueError("prefer='amqtt' contradicts require_mosquitto=True")
        self.workdir = Path(workdir).resolve()  # mosquitto's config names files in it
        self._persistence = persistence
        self._users = dict(users) if users is not None else None
        self._acl_file = Path(acl_file) if acl_file is not None else None
        self._tls = tls
        self._port = port or _free_port()  # chosen once: restarts come back on the same port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._amqtt: _AmqttThread | None = None
        self._passwords_note = ""

        binary = find_mosquitto()
        required = require_mosquitto or os.environ.get(REQUIRE_ENV, "") not in ("", "0")
        if prefer == "amqtt":
            self._kind: Literal["mosquitto", "amqtt"] = "amqtt"
            self._why = "asked for (prefer='amqtt')"
        elif binary is not None:
            self._kind = "mosquitto"
            self._why = ""
        elif required:
            why = "require_mosquitto=True" if require_mosquitto else f"{REQUIRE_ENV} is set"
            raise BrokerUnavailable(
                f"mosquitto is not installed (apt install mosquitto), and {why}",
                missing="mosquitto",
            )
        else:
            self._kind = "amqtt"
            self._why = "mosquitto is not installed (apt install mosquitto)"
        self._binary = binary
        if self._kind == "amqtt":
            self._check_amqtt_can_serve()

    def _check_amqtt_can_serve(self) -> None:
        wanted = [
            name
            for name, asked in (
                ("users", self._users is not None),
                ("acl_file", self._acl_file is not None),
                ("tls", self._tls is not None),
                ("persistence", self._persistence),
            )
            if asked
        ]
        if wanted:
            raise BrokerUnavailable(
                f"the embedded amqtt broker does not support {', '.join(wanted)} here "
                f"({self._why}); these need mosquitto (apt install mosquitto)",
                missing="mosquitto",
            )
        try:
            import amqtt.broker  # noqa: F401  (optional extra `broker`)
        except ImportError as exc:
            raise BrokerUnavailable(
                f"no MQTT broker: {self._why}, and the embedded one is not installed "
                "(pip install 'kinhbac[broker]')",
                missing="amqtt",
            ) from exc

    # -- properties ----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def kind(self) -> Literal["mosquitto", "amqtt"]:
        return self._kind

    @property
    def url(self) -> str:
        scheme = "mqtts" if self._tls is not None else "mqtt"
        return f"{scheme}://{HOST}:{self._port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / f"{self._kind}.log"

    @property
    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._amqtt is not None

    def describe(self) -> str:
        """One line: which broker runs where, and why that one."""
        where = f"{HOST}:{self._port}" + (" (TLS)" if self._tls is not None else "")
        if self._kind == "mosquitto":
            line = f"{_mosquitto_version(self._binary or 'mosquitto')} on {where}"
            if self._users is not None and find_mosquitto_passwd() is None:
                line += "; passwords hashed in Python (mosquitto_passwd not found)"
            return line
        return f"embedded amqtt {_amqtt_version()} on {where}: {self._why}"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker and return once its port accepts connections."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        _check_port_free(self._port)
        if self._kind == "mosquitto":
            self._start_mosquitto()
        else:
            self._amqtt = _AmqttThread(self._port)
            self._amqtt.start()

    def stop(self) -> None:
        """Stop the broker (SIGTERM, so mosquitto saves its persistence) and wait for it."""
        if self._amqtt is not None:
            amqtt_thread, self._amqtt = self._amqtt, None
            amqtt_thread.stop()
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=STOP_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            finally:
                _live_processes.discard(proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        """Stop, then start on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- mosquitto -----------------------------------------------------------------------

    def _start_mosquitto(self) -> None:
        assert self._binary is not None
        config = self.workdir / "mosquitto.conf"
        config.write_text(self._mosquitto_config())
        # Config errors are printed before any log_dest opens: one file catches both.
        self._log = open(self.log_file, "ab")  # noqa: SIM115  (closed in stop())
        log_start = self._log.tell()
        proc = subprocess.Popen(
            [self._binary, "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Out of the terminal's process group, as the emulated boards are: a Ctrl-C meant
            # for the demo must not take the broker away before the gateways have drained.
            start_new_session=True,
        )
        self._proc = proc
        _live_processes.add(proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                self.stop()
                raise BrokerStartFailed(
                    f"mosquitto exited with code {proc.returncode} on start",
                    log_tail=self._log_tail(),
                )
            # mosquitto opens its socket before it loads the TLS files, and may still exit after
            # a connect succeeded: it is up once it has also logged that it runs.
            if self._logged_running(log_start) and _accepts_tcp(self._port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerStartFailed(
                    f"mosquitto did not listen on {HOST}:{self._port} within {START_TIMEOUT_S} s",
                    log_tail=self._log_tail(),
                )
            time.sleep(0.01)

    def _mosquitto_config(self) -> str:
        lines = [
            "# Written by kinhbac.broker.LocalBroker; rewritten on every start.",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto would drop to the `mosquitto` user, which cannot read a
            # private test folder; stay as the user that owns the folder.
            lines.append("user root")
        if self._persistence:
            store = self.workdir / "persistence"
            store.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {store}/"]
        else:
            lines.append("persistence false")
        if self._users is not None:
            password_file = self.workdir / "passwd"
            self._passwords_note = write_password_file(
                password_file, self._users, passwd_tool=find_mosquitto_passwd()
            )
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self._acl_file is not None:
            lines.append(f"acl_file {self._acl_file.resolve()}")
        lines.append(f"listener {self._port} {HOST}")
        if self._tls is not None:
            lines += [
                f"cafile {Path(self._tls.ca_file).resolve()}",
                f"certfile {Path(self._tls.cert_file).resolve()}",
                f"keyfile {Path(self._tls.key_file).resolve()}",
                f"require_certificate {'true' if self._tls.require_client_cert else 'false'}",
            ]
        return "\n".join(lines) + "\n"

    @property
    def passwords_note(self) -> str:
        """How the password file was hashed (empty before a start with users)."""
        return self._passwords_note

    def _logged_running(self, since: int) -> bool:
        with open(self.log_file, "rb") as f:
            f.seek(since)
            return _RUNNING_LINE.search(f.read()) is not None

    def _log_tail(self) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


_version_cache: dict[str, str] = {}


def _mosquitto_version(binary: str) -> str:
    """'mosquitto 2.0.11', from the first line of `mosquitto -h`."""
    if binary not in _version_cache:
        try:
            out = subprocess.run(
                [binary, "-h"], check=False, capture_output=True, text=True, timeout=5
            ).stdout.splitlines()
            words = out[0].split() if out else []
            version = words[2] if len(words) >= 3 and words[1] == "version" else "(version unknown)"
        except (OSError, subprocess.TimeoutExpired):
            version = "(version unknown)"
        _version_cache[binary] = f"mosquitto {version}"
    return _version_cache[binary]


def _amqtt_version() -> str:
    try:
        from importlib.metadata import version

        return version("amqtt")
    except Exception:  # noqa: BLE001  (only for a description)
        return "(not installed)"


class _AmqttThread:
    """An amqtt broker on an event loop of its own, in a daemon thread."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"amqtt:{self._port}", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            self.stop()
            raise BrokerStartFailed(f"amqtt did not start within {START_TIMEOUT_S} s")
        if self._error is not None:
            error = self._error
            self.stop()
            raise BrokerStartFailed(f"amqtt failed to start on {HOST}:{self._port}: {error}")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            if loop.run_until_complete(self._serve()):
                loop.run_forever()  # until stop() has shut the broker down
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> bool:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{self._port}"}},
            # Only what a plain broker needs: no $SYS publisher, no packet logger.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        try:
            self._broker = Broker(config)
            await self._broker.start()
            return True
        except Exception as exc:  # noqa: BLE001  (handed to the starting thread)
            self._error = exc
            self._broker = None
            return False
        finally:
            self._started.set()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._broker is not None and not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
            try:
                future.result(timeout=STOP_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001  (still stop the loop below)
                _log.warning(
                    "amqtt broker on port %d did not shut down cleanly: %r", self._port, exc
                )
            self._broker = None
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            pass  # the loop has already closed (a failed start)
        thread.join(timeout=STOP_TIMEOUT_S)
        self._loop = None
        self._thread = None
