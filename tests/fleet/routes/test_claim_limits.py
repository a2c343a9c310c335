"""Claim reports are limited per gateway and per site: a claim key in the wrong hands (or a
gateway gone wrong) flooding the fleet gets 429 past the limit, and only its own site's
gateways notice."""

import time

import pytest

from kinhbac.fleet.rate_limits import ClaimLimiter, TooManyAttempts

from ..utils import a_claim, bearer, make_gateway, make_site


def test_a_claim_flood_from_one_gateway_gets_429_past_the_limit_and_another_site_is_unaffected(
        client, session, box, admin):
    flooding_site, quiet_site = make_site(session, box), make_site(session, box)
    _, flooder = make_gateway(session, flooding_site)
    _, neighbour = make_gateway(session, quiet_site)
    limit = client.app.state.settings.claims_per_gateway_per_minute
    assert limit == 60  # KINHBAC_CLAIMS_PER_GATEWAY_PER_MINUTE's default

    answers = [client.post("/api/gateway/claims", json=a_claim(), headers=bearer(flooder))
               for _ in range(limit + 5)]

    assert [a.status_code for a in answers] == [200] * limit + [429] * 5
    refused = answers[-1]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "from this gateway" in refused.json()["detail"]
    assert "KINHBAC_CLAIMS_PER_GATEWAY_PER_MINUTE" in refused.json()["detail"]
    pending = client.get("/api/devices", params={"state": "pending", "limit": 1},
                         headers=admin).json()
    assert pending["total"] == limit  # a refused report writes nothing
    other = client.post("/api/gateway/claims", json=a_claim(), headers=bearer(neighbour))
    assert other.status_code == 200 and other.json()["state"] == "pending"


def test_a_sites_gateways_share_its_limit(client, session, box):
    # (put back after the test by the session fixture)
    client.app.state.claim_limiter = ClaimLimiter(per_gateway=3, per_site=5)
    site = make_site(session, box)
    first, second = (bearer(make_gateway(session, site, name=name)[1])
                     for name in ("gw1", "gw2"))
    _, elsewhere = make_gateway(session, make_site(session, box))

    codes = [client.post("/api/gateway/claims", json=a_claim(), headers=gateway).status_code
             for gateway in (first, first, first, first, second, second, second)]

    assert codes == [200, 200, 200, 429, 200, 200, 429]
    refused = client.post("/api/gateway/claims", json=a_claim(), headers=second)
    assert "at this gateway's site" in refused.json()["detail"]
    assert "KINHBAC_CLAIMS_PER_SITE_PER_MINUTE" in refused.json()["detail"]
    assert client.post("/api/gateway/claims", json=a_claim(),
                       headers=bearer(elsewhere)).status_code == 200


def test_the_limit_frees_as_the_window_slides():
    limiter = ClaimLimiter(per_gateway=2, per_site=10, window_s=0.3)
    limiter.take("gw", "site")
    limiter.take("gw", "site")
    with pytest.raises(TooManyAttempts) as refused:
        limiter.take("gw", "site")
    assert refused.value.retry_after == 1  # whole seconds, at least one
    time.sleep(0.35)
    limiter.take("gw", "site")  # the first two left the window; refusals did not count
