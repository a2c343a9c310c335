"""What every answer says about caching and framing, and how large a request may be."""

from kinhbac.fleet.http_hygiene import MAX_BODY_BYTES
from kinhbac.fleet.models import Role

from ..utils import KIT, bearer, make_user


def test_every_answer_forbids_caching_sniffing_and_framing(client, session):
    admin = bearer(make_user(session, Role.admin)[1])
    site = client.post("/api/sites", headers=admin, json={
        "name": "Old quarter", "slug": "old-quarter", "sensor_kit": KIT})
    profile = client.get(f"/api/sites/{site.json()['id']}/profile", headers=admin)
    for response in (client.get("/api/health"), profile, client.get("/api/nothing-here"),
                     client.get("/api/auth/me")):
        assert response.headers["cache-control"] == "no-store", response.url
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def test_api_pages_that_load_a_cdn_are_off_in_production(client):
    assert client.get("/docs").status_code == 404
    assert client.get("/openapi.json").status_code == 200


def test_a_body_past_the_limit_is_refused_before_it_is_read(client, session):
    admin = bearer(make_user(session, Role.admin)[1])
    declared = client.post("/api/devices/bulk", headers={**admin, "content-type": "text/csv"},
                           content=b"x" * (MAX_BODY_BYTES + 1))
    assert declared.status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"y" * 65536

    streamed = client.post("/api/devices/bulk", headers={**admin, "content-type": "text/csv"},
                           content=chunks())
    assert streamed.status_code == 413
    assert "larger than" in streamed.json()["detail"]
