"""Fixtures of the claim tests (test_claims, test_claim_limits, test_claim_key_rotation)."""

import pytest

from kinhbac.fleet.models import Role

from ..utils import bearer, make_gateway, make_site, make_user


@pytest.fixture
def site_gateway(session, box):
    """A site and its gateway's bearer header."""
    site = make_site(session, box)
    _, token = make_gateway(session, site)
    return site, bearer(token)


@pytest.fixture
def admin(session):
    return bearer(make_user(session, Role.admin)[1])
