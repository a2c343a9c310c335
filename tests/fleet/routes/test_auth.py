"""Logging in, and the tokens that stop working: expired, revoked, of a deactivated user."""

from datetime import datetime, timedelta

from fastapi.testclient import TestClient
from sqlmodel import select

from kinhbac.fleet.models import AuditEntry, Role, utcnow

from ..utils import PASSWORD, bearer, make_token, make_user


def test_login_returns_a_token_that_acts_as_the_user(client, session):
    user, _ = make_user(session, Role.technician, email="lan@example.org")
    response = client.post("/api/auth/login",
                           data={"username": "LAN@example.org", "password": PASSWORD})
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["access_token"].startswith("kbt_")
    me = client.get("/api/auth/me", headers=bearer(body["access_token"])).json()
    assert (me["id"], me["role"]) == (str(user.id), "technician")


def test_wrong_password_and_unknown_user_get_the_same_401(client, session):
    make_user(session, Role.admin, email="admin@example.org")
    wrong = client.post("/api/auth/login",
                        data={"username": "admin@example.org", "password": "not it at all"})
    unknown = client.post("/api/auth/login",
                          data={"username": "nobody@example.org", "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json() == {"detail": "wrong e-mail or password"}


def test_login_without_a_password_is_a_422_naming_it(client):
    response = client.post("/api/auth/login", data={"username": "a@example.org"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "password"]


def test_deactivated_user_cannot_log_in_and_its_tokens_stop(client, session):
    user, token = make_user(session, Role.technician, email="gone@example.org")
    _, admin = make_user(session, Role.admin)
    assert client.get("/api/auth/me", headers=bearer(token)).status_code == 200
    client.patch(f"/api/users/{user.id}", headers=bearer(admin), json={"is_active": False})

    assert client.get("/api/auth/me", headers=bearer(token)).status_code == 401
    assert client.post("/api/auth/login", data={"username": "gone@example.org",
                                                "password": PASSWORD}).status_code == 401


def test_expired_token_is_a_401_saying_so(client, session):
    user, _ = make_user(session, Role.viewer)
    token, _ = make_token(session, user, expires_at=utcnow() - timedelta(seconds=1))
    response = client.get("/api/auth/me", headers=bearer(token))
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


def test_deleted_api_token_stops_working(client, session):
    _, admin = make_user(session, Role.admin)
    user, _ = make_user(session, Role.viewer)
    issued = client.post("/api/tokens", headers=bearer(admin),
                         json={"user_id": str(user.id), "name": "survey", "expires_in_days": 30})
    assert issued.status_code == 201
    token = issued.json()["token"]
    assert client.get("/api/auth/me", headers=bearer(token)).status_code == 200
    assert "token" not in client.get("/api/tokens", headers=bearer(admin)).json()["items"][0]

    client.delete(f"/api/tokens/{issued.json()['id']}", headers=bearer(admin))

    assert client.get("/api/auth/me", headers=bearer(token)).status_code == 401


def test_an_api_token_carries_its_users_current_role(client, session):
    _, admin = make_user(session, Role.admin)
    user, _ = make_user(session, Role.viewer)
    token = client.post("/api/tokens", headers=bearer(admin),
                        json={"user_id": str(user.id), "name": "tool"}).json()["token"]
    register = {"mac": "24:0a:c4:00:00:09"}
    assert client.post("/api/devices", headers=bearer(token), json=register).status_code == 403

    client.patch(f"/api/users/{user.id}", headers=bearer(admin), json={"role": "technician"})

    assert client.post("/api/devices", headers=bearer(token), json=register).status_code == 201


def test_a_malformed_authorization_header_is_a_401(client):
    for header in ("Basic YWRtaW46YWRtaW4=", "Bearer", "kbt_abc"):
        response = client.get("/api/auth/me", headers={"Authorization": header})
        assert response.status_code == 401


def test_text_with_a_nul_character_is_a_422_not_a_server_error(client, session):
    # PostgreSQL cannot store NUL in text; the fuzz test runs on SQLite, so this pins it here.
    _, admin = make_user(session, Role.admin)
    login = client.post("/api/auth/login", data={"username": "a\x00b@example.org",
                                                 "password": PASSWORD})
    listing = client.get("/api/devices", params={"tag": "x\x00y"}, headers=bearer(admin))
    site = client.post("/api/sites", json={"name": "Ri\x00ver", "slug": "river"},
                       headers=bearer(admin))
    assert login.status_code in (401, 422)  # SQLite finds no such user; PostgreSQL refuses
    assert listing.status_code == 422 and "NUL" in listing.text
    assert site.status_code != 500


# ---- guessing passwords, from the attacker's side


def test_failed_logins_from_one_address_get_429_with_retry_after_and_are_audited(
        app, session):
    make_user(session, Role.admin, email="admin@example.org")
    limit = app.state.settings.login_failures_per_address
    attacker = TestClient(app, client=("203.0.113.7", 4000))  # no lifespan: the app runs
    for i in range(limit):  # a different account each time: the address's limit counts
        wrong = attacker.post("/api/auth/login",
                              data={"username": f"guess{i}@example.org", "password": "guess"})
        assert wrong.status_code == 401
    refused = attacker.post("/api/auth/login",
                            data={"username": "admin@example.org", "password": PASSWORD})
    assert refused.status_code == 429  # even the right password: no oracle left
    assert 1 <= int(refused.headers["Retry-After"]) <= 900
    assert "address" in refused.json()["detail"]
    someone_else = TestClient(app, client=("198.51.100.2", 4000))
    assert someone_else.post("/api/auth/login", data={
        "username": "admin@example.org", "password": PASSWORD}).status_code == 200
    session.expire_all()
    failures = session.exec(select(AuditEntry).where(
        AuditEntry.action == "user.login_failed")).all()
    assert {f.actor for f in failures} == {"203.0.113.7"}
    # The account tried is kept, the password never.
    assert sorted(f.after["email"] for f in failures) == sorted(
        f"guess{i}@example.org" for i in range(limit))
    assert all(set(f.after) == {"email"} for f in failures)


def test_guessing_one_account_from_many_addresses_is_refused_for_that_account(app, session):
    make_user(session, Role.admin, email="admin@example.org")
    make_user(session, Role.viewer, email="viewer@example.org")
    limit = app.state.settings.login_failures_per_account
    for i in range(limit):
        bot = TestClient(app, client=(f"192.0.2.{i + 1}", 4000))
        assert bot.post("/api/auth/login", data={"username": "admin@example.org",
                                                 "password": f"guess {i}"}).status_code == 401
    bot = TestClient(app, client=("192.0.2.200", 4000))
    refused = bot.post("/api/auth/login",
                       data={"username": "ADMIN@example.org", "password": "guess"})
    assert refused.status_code == 429 and "account" in refused.json()["detail"]
    # Other accounts are not held up by it.
    assert bot.post("/api/auth/login", data={"username": "viewer@example.org",
                                             "password": PASSWORD}).status_code == 200


def test_password_checks_at_once_are_bounded():
    import anyio

    from kinhbac.fleet.login_limits import LoginLimiter, TooManyAttempts

    limiter = LoginLimiter(per_address=5, per_account=5, window_s=60, concurrent_hashes=2,
                           hash_wait_s=0.2)

    async def main():
        release = anyio.Event()
        holding = 0

        async def hold():
            nonlocal holding
            async with limiter.hashing():
                holding += 1
                await release.wait()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(hold)
            tasks.start_soon(hold)
            while holding < 2:
                await anyio.sleep(0.01)  # two checks are running
            try:
                async with limiter.hashing():
                    raise AssertionError("a third password check ran alongside two")
            except TooManyAttempts as exc:
                assert exc.retry_after == 1
            release.set()
        async with limiter.hashing():  # free again
            pass

    anyio.run(main)


def test_logins_waiting_for_a_password_check_leave_other_requests_their_threads(
        client, session, monkeypatch):
    """60 concurrent wrong logins used to take all 40 worker threads (each waiting up to 5 s
    for one of the 2 hash slots) and the database pool: health and the gateways' key refresh
    stopped answering. Here the two checks are held until the attacker's logins have piled up;
    the service must still answer a request that needs a thread and a database session."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from kinhbac.fleet import accounts

    limiter = client.app.state.login_limiter
    monkeypatch.setattr(limiter, "_hash_wait_s", 60.0)
    checking = threading.Semaphore(0)
    release = threading.Event()
    real_verify = accounts.verify_password

    def slow_verify(stored, password):  # a hash that takes as long as the test says
        checking.release()
        release.wait(60)
        return real_verify(stored, password)

    monkeypatch.setattr(accounts, "verify_password", slow_verify)
    viewer, viewer_token = make_user(session, Role.viewer)
    attackers = 60
    with ThreadPoolExecutor(attackers + 1) as pool:  # one thread for the user's request
        logins = [pool.submit(client.post, "/api/auth/login", data={
            "username": f"guess{i}@example.org", "password": "wrong password"})
            for i in range(attackers)]
        try:
            for _ in range(2):  # both slots taken; the other 58 are waiting for one
                assert checking.acquire(timeout=30)
            answers = pool.submit(client.get, "/api/auth/me", headers=bearer(viewer_token))
            # Before: no thread came free until a login gave up, 5 s later (never, here).
            assert answers.result(timeout=30).status_code == 200
        finally:
            release.set()
        codes = [f.result(timeout=60).status_code for f in logins]
    # And the address's limit (20 failures) holds for the logins that waited: it is checked
    # again once a slot is theirs. The two checks running when the 20th failure lands may both
    # have passed it: 21 at most, where all 60 were tried before.
    assert 20 <= codes.count(401) <= 21 and codes.count(429) == attackers - codes.count(401)


def test_logout_ends_the_token_and_a_password_change_ends_every_session(client, session):
    user, _ = make_user(session, Role.technician, email="lan@example.org")
    admin = bearer(make_user(session, Role.admin)[1])

    def log_in():
        return bearer(client.post("/api/auth/login", data={
            "username": "lan@example.org", "password": PASSWORD}).json()["access_token"])

    laptop, phone = log_in(), log_in()
    assert client.post("/api/auth/logout", headers=laptop).status_code == 204
    assert client.get("/api/auth/me", headers=laptop).status_code == 401
    assert client.get("/api/auth/me", headers=phone).status_code == 200
    script = bearer(client.post("/api/tokens", headers=admin, json={
        "user_id": str(user.id), "name": "survey script"}).json()["token"])

    # The password leaked with the laptop: changing it ends every token of the old one.
    changed = client.patch(f"/api/users/{user.id}", headers=admin,
                           json={"password": "a brand new password"})
    assert changed.status_code == 200
    for stolen in (phone, script):
        assert client.get("/api/auth/me", headers=stolen).status_code == 401


def test_api_tokens_expire_by_default(client, session, app):
    user, _ = make_user(session, Role.viewer)
    admin = bearer(make_user(session, Role.admin)[1])
    issued = client.post("/api/tokens", headers=admin, json={
        "user_id": str(user.id), "name": "survey script"}).json()
    expires = datetime.fromisoformat(issued["expires_at"])
    days = app.state.settings.api_token_days
    assert utcnow() + timedelta(days=days - 1) < expires <= utcnow() + timedelta(days=days)
