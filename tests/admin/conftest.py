"""The admin's commands against the real fleet over HTTP (uvicorn on a thread, SQLite, no
ingest): an admin logged in, and a technician's API token to be refused with."""

import pytest
from helpers.fleet import running_fleet

ADMIN = ("admin@example.org", "admin password 1")
TECHNICIAN = ("tech@example.org", "technician password 1")


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    with running_fleet(tmp_path / "fleet", None, monkeypatch, ADMIN) as server:
        server.admin = server.login(*ADMIN)
        user = server.call("POST", "/api/users", server.admin, 201, json={
            "email": TECHNICIAN[0], "password": TECHNICIAN[1], "role": "technician"})
        server.technician = server.call("POST", "/api/tokens", server.admin, 201, json={
            "name": "technician's laptop", "user_id": user["id"]})["token"]
        yield server
