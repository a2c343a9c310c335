"""The demo's fleet service: its API, console and MQTT ingest in this process, and the calls an
admin and a technician would make to it over HTTP."""

import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from kinhbac.demo.errors import DemoError

HOST = "127.0.0.1"
DEFAULT_PORT = 8080  # the console at a URL worth remembering, when nothing else holds it
START_TIMEOUT_S = 60.0  # migrations on SQLite and the app's imports, on a loaded laptop
# A reserved domain: the demo's users get no real mail.
ADMIN_EMAIL = "admin@example.org"
TECHNICIAN_EMAIL = "ky-thuat@example.org"


def _bind(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        raise
    return sock


def listen_socket(port: int | None) -> socket.socket:
    """The fleet's socket: `port` if given (taken: DemoError), else 8080, else any free port."""
    if port is not None:
        try:
            return _bind(port)
        except OSError as exc:
            raise DemoError(f"port {HOST}:{port} for the fleet is taken ({exc.strerror}): "
                            "pass another --fleet-port, or 0 for any free port") from exc
    try:
        return _bind(DEFAULT_PORT)
    except OSError:
        return _bind(0)


class DemoFleet:
    """The fleet service on SQLite in `workdir` (or `database_url`), its ingest reading the
    demo's broker; served by uvicorn on a thread until stop()."""

    def __init__(self, workdir: Path, *, broker_port: int, port: int | None,
                 database_url: str | None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "fleet.toml"
        database = database_url or f"sqlite:///{workdir / 'fleet.sqlite3'}"
        # The settings a deployment would put in its file (docs/fleet.md); a fresh service key
        # each run, as the database is fresh too.
        self.config.write_text(
            f'env = "production"\nsecret_key = "{secrets.token_urlsafe(32)}"\n'
            f'data_dir = "{workdir}"\ndatabase_url = "{database}"\n'
            f'ingest_enabled = true\nmqtt_host = "{HOST}"\nmqtt_port = {broker_port}\n'
            # Seconds rather than the default batching, so the console moves with the view.
            'ingest_batch_interval_s = 0.2\n'
        )
        self.database = "SQLite in " + str(workdir / "fleet.sqlite3") if database_url is None \
            else "PostgreSQL (" + database_url.split("@")[-1] + ")"
        self.sock = listen_socket(port)
        self.port = self.sock.getsockname()[1]
        # Said on the terminal: the user may have expected the default.
        self.moved = port is None and self.port != DEFAULT_PORT
        self.url = f"http://{HOST}:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.server: Any = None
        self.thread: threading.Thread | None = None

    def create_admin(self) -> tuple[str, str]:
        """What `kinhbac fleet create-admin` does (it migrates the new database first), with a
        random password; returns the e-mail and the password."""
        from kinhbac.fleet import cli as fleet_cli

        password = secrets.token_urlsafe(12)
        try:
            fleet_cli.create_admin(ADMIN_EMAIL, password, config=self.config)
        except fleet_cli.FleetCliError as exc:
            raise DemoError(f"the fleet's database: {exc}") from exc
        return ADMIN_EMAIL, password

    def start(self) -> None:
        import uvicorn

        from kinhbac.fleet.app import create_app
        from kinhbac.fleet.settings import load_settings

        app = create_app(load_settings(self.config), prepare=False)  # create_admin migrated
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="fleet", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise DemoError("the fleet service did not start; its log is above")
            time.sleep(0.05)

    def login(self, email: str, password: str) -> str:
        """Log in through the API, as a user's tool would; returns the token."""
        answer = self.http.post("/api/auth/login",
                                data={"username": email, "password": password})
        self._check(answer, f"log in {email}")
        return str(answer.json()["access_token"])

    def technician(self, admin_token: str) -> str:
        """A technician made by the admin, as a city's admin would; returns its token."""
        password = secrets.token_urlsafe(12)
        self.call("POST", "/api/users", admin_token, json={
            "email": TECHNICIAN_EMAIL, "password": password, "role": "technician"})
        return self.login(TECHNICIAN_EMAIL, password)

    def call(self, method: str, path: str, token: str, **kwargs: Any) -> Any:
        answer = self.http.request(method, path, headers={"Authorization": f"Bearer {token}"},
                                   **kwargs)
        self._check(answer, f"{method} {path}")
        return answer.json()

    @staticmethod
    def _check(answer: httpx.Response, what: str) -> None:
        if answer.is_error:
            raise DemoError(f"the fleet refused to {what}: {answer.status_code} {answer.text}")

    def stop(self) -> None:
        self.http.close()
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True  # uvicorn's own SIGTERM path: the ingest stops too
            self.thread.join(20)
        self.sock.close()
