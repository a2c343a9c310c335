"""The fleet service as end-to-end tests run it: over HTTP on a free port (uvicorn on a thread,
so the app's imports are paid once per test run), SQLite in a folder of its own, a real
service key, and its MQTT ingest reading the test's private broker."""

import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from argon2 import PasswordHasher

from helpers.gateway import free_port
from kinhbac.fleet import cli as fleet_cli
from kinhbac.fleet import security
from kinhbac.fleet.app import create_app
from kinhbac.fleet.settings import load_settings


def wait_until(condition, timeout: float, what: str) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


class FleetServer:
    """The fleet service; its database in `workdir` is kept across stop() and start()."""

    def __init__(self, workdir: Path, broker_port: int | None,
                 database_url: str | None = None) -> None:
        """`broker_port`: the broker its ingest reads; None: no ingest. `database_url`: an
        empty database of its own; None: SQLite in `workdir`."""
        workdir.mkdir(parents=True, exist_ok=True)
        database_url = database_url or f"sqlite:///{workdir / 'fleet.sqlite3'}"
        self.config = workdir / "fleet.toml"
        ingest = (
            f'ingest_enabled = true\nmqtt_port = {broker_port}\n'
            f'mqtt_client_id = "fleet-{uuid.uuid4().hex[:8]}"\ningest_batch_interval_s = 0.05\n'
        ) if broker_port is not None else ""
        self.config.write_text(
            f'env = "production"\nsecret_key = "{secrets.token_urlsafe(32)}"\n'
            f'database_url = "{database_url}"\n' + ingest
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    def create_admin(self, email: str, password: str) -> None:
        """What `kinhbac fleet create-admin` does (it migrates the new database first)."""
        fleet_cli.create_admin(email, password, config=self.config)

    def start(self, timeout: float = 30.0) -> None:
        app = create_app(load_settings(self.config))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="fleet", daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, timeout, "the fleet serving")

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(15)
            assert not self.thread.is_alive(), "the fleet did not stop"
            self.server = None

    def close(self) -> None:
        self.stop()
        self.http.close()

    def login(self, email: str, password: str) -> str:
        answer = self.http.post("/api/auth/login", data={"username": email, "password": password})
        assert answer.status_code == 200, answer.text
        return answer.json()["access_token"]

    def call(self, method: str, path: str, token: str, expect: int = 200,
             **kwargs: Any) -> Any:
        answer = self.http.request(method, path, headers={"Authorization": f"Bearer {token}"},
                                   **kwargs)
        assert answer.status_code == expect, (method, path, answer.status_code, answer.text)
        return answer.json()


@contextmanager
def running_fleet(workdir: Path, broker_port: int | None, monkeypatch,
                  admin: tuple[str, str]) -> Iterator[FleetServer]:
    """A started fleet with one admin, stopped afterwards. Argon2id runs at its cheapest, as in
    tests/fleet: the same code path and hash format, without the deliberate slowness."""
    monkeypatch.setattr(security, "_hasher",
                        PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    server = FleetServer(workdir, broker_port)
    server.create_admin(*admin)
    server.start()
    try:
        yield server
    finally:
        server.close()
