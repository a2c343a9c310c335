"""Users: created by admins with a hashed password; the last admin cannot be lost."""

from sqlmodel import select

from kinhbac.fleet.models import Role, User

from ..utils import bearer, make_user


def test_created_user_has_an_argon2_hash_not_the_password(client, session):
    _, admin = make_user(session, Role.admin)
    response = client.post("/api/users", headers=bearer(admin), json={
        "email": "Thu@Example.org", "password": "a long password", "role": "technician"})
    assert response.status_code == 201
    assert response.json()["email"] == "thu@example.org"
    assert "password" not in response.text
    stored = session.exec(select(User).where(User.email == "thu@example.org")).one()
    assert stored.password_hash.startswith("$argon2id$")
    assert "a long password" not in stored.password_hash


def test_duplicate_email_is_a_409_and_bad_ones_a_422(client, session):
    _, admin = make_user(session, Role.admin, email="root@example.org")
    again = client.post("/api/users", headers=bearer(admin),
                        json={"email": "ROOT@example.org", "password": "a long password"})
    assert again.status_code == 409
    assert "root@example.org" in again.json()["detail"]
    for body, field in [({"email": "no-at-sign", "password": "a long password"}, "email"),
                        ({"email": "x@example.org", "password": "short"}, "password"),
                        ({"email": "x@example.org", "password": "a long password",
                          "role": "owner"}, "role")]:
        response = client.post("/api/users", headers=bearer(admin), json=body)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", field]


def test_the_last_active_admin_cannot_demote_or_deactivate_itself(client, session):
    admin, token = make_user(session, Role.admin, email="only@example.org")
    for change in ({"role": "viewer"}, {"is_active": False}):
        response = client.patch(f"/api/users/{admin.id}", headers=bearer(token), json=change)
        assert response.status_code == 409
        assert "last active admin" in response.json()["detail"]
    make_user(session, Role.admin)
    assert client.patch(f"/api/users/{admin.id}", headers=bearer(token),
                        json={"role": "viewer"}).status_code == 200


def test_null_role_is_refused_naming_it(client, session):
    user, token = make_user(session, Role.admin)
    response = client.patch(f"/api/users/{user.id}", headers=bearer(token), json={"role": None})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "role"]
