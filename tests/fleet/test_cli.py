"""The functions behind `kinhbac fleet create-admin` and `kinhbac fleet serve`."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from kinhbac.fleet.cli import FleetCliError, create_admin
from kinhbac.fleet.db import make_engine
from kinhbac.fleet.models import AuditEntry, Role, User
from kinhbac.fleet.security import verify_password

from .utils import SECRET_KEY


@pytest.fixture
def environment(monkeypatch, tmp_path):
    """A production configuration on a SQLite file that does not exist yet."""
    url = f"sqlite:///{tmp_path}/fleet.sqlite3"
    monkeypatch.setenv("KINHBAC_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("KINHBAC_DATABASE_URL", url)
    monkeypatch.delenv("KINHBAC_ENV", raising=False)
    return url


def test_create_admin_migrates_a_new_database_and_makes_an_admin(environment):
    user_id = create_admin("Root@Example.org", "a long password")
    engine = make_engine(environment)
    with Session(engine) as session:
        user = session.exec(select(User)).one()
        assert (str(user.id), user.email, user.role) == (user_id, "root@example.org", Role.admin)
        assert verify_password(user.password_hash, "a long password")
        [entry] = session.exec(select(AuditEntry)).all()
        assert (entry.action, entry.actor_kind) == ("user.create", "cli")
    engine.dispose()


def test_create_admin_refuses_clearly(environment, monkeypatch):
    create_admin("root@example.org", "a long password")
    with pytest.raises(FleetCliError, match="root@example.org already exists"):
        create_admin("root@example.org", "another password")
    with pytest.raises(FleetCliError, match="^email: 'nope' is not an e-mail address$"):
        create_admin("nope", "a long password")
    with pytest.raises(FleetCliError, match="^password: "):
        create_admin("new@example.org", "short")
    monkeypatch.setenv("KINHBAC_SECRET_KEY", "changethis")
    with pytest.raises(FleetCliError, match="^KINHBAC_SECRET_KEY is a placeholder"):
        create_admin("new@example.org", "a long password")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_migrates_then_answers_on_its_port(environment, tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c",
         f"from kinhbac.fleet.cli import serve; serve(port={port}, log_level='warning')"],
        env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "the service did not answer within 30 s"
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=2) as r:
            assert b"/api/devices/{device_id}/reprovision" in r.read()
    finally:
        server.terminate()
        server.wait(timeout=10)
    engine = make_engine(environment)
    assert "device" in sa.inspect(engine).get_table_names()
    engine.dispose()


def test_serve_with_a_placeholder_key_stops_before_listening(environment, monkeypatch):
    monkeypatch.setenv("KINHBAC_SECRET_KEY", "changethis")
    from kinhbac.fleet.cli import serve

    with pytest.raises(FleetCliError, match="KINHBAC_SECRET_KEY is a placeholder"):
        serve(port=_free_port())
