"""`kinhbac fleet serve` behind a reverse proxy on the same host (docs/fleet.md, "Behind TLS"):
the login limits count the address the proxy forwards, and only a proxy on the loopback is
believed."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest

from .utils import SECRET_KEY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fleet(tmp_path):  # -> the port of a real `kinhbac fleet serve`
    port = _free_port()
    env = {**os.environ, "KINHBAC_SECRET_KEY": SECRET_KEY,
           "KINHBAC_DATABASE_URL": f"sqlite:///{tmp_path}/fleet.sqlite3",
           "KINHBAC_LOGIN_FAILURES_PER_ADDRESS": "2", "KINHBAC_ENV": "production"}
    env.pop("FORWARDED_ALLOW_IPS", None)  # uvicorn's default: 127.0.0.1 and ::1
    server = subprocess.Popen(
        [sys.executable, "-c",
         f"from kinhbac.fleet.cli import serve; serve(port={port}, log_level='warning')"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "the service did not listen within 30 s"
                time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


def wrong_login(port: int, *, source: str, forwarded_for: str, account: str) -> int:
    """The status of a wrong login sent from `source` with X-Forwarded-For."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                            source_address=(source, 0))
    try:
        body = urllib.parse.urlencode({"username": account, "password": "not the password"})
        connection.request("POST", "/api/auth/login", body, {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Forwarded-For": forwarded_for})
        response = connection.getresponse()
        json.loads(response.read())
        return response.status
    finally:
        connection.close()


def test_the_proxys_forwarded_address_is_the_one_the_login_limits_count(fleet):
    # The proxy (127.0.0.1) forwards two clients; each has its own allowance of 2.
    statuses = [wrong_login(fleet, source="127.0.0.1", forwarded_for="203.0.113.1",
                            account=f"a{n}@example.org") for n in range(3)]
    assert statuses == [401, 401, 429]
    assert wrong_login(fleet, source="127.0.0.1", forwarded_for="203.0.113.2",
                       account="b@example.org") == 401


def test_a_client_elsewhere_cannot_pick_its_address_with_the_header(fleet):
    # 127.0.0.2 is not a trusted proxy: its header is ignored, its own address counted.
    statuses = [wrong_login(fleet, source="127.0.0.2", forwarded_for=f"198.51.100.{n}",
                            account=f"c{n}@example.org") for n in range(3)]
    assert statuses == [401, 401, 429]
