"""GET /metrics: Prometheus text for the city's monitoring (kinhbac/fleet/metrics.py).

The fleet is on the internet behind its reverse proxy, which passes every path, so the
gateway's way (listen on 127.0.0.1 only) does not fit: every request reaches the service from
the proxy's address. /metrics asks for a token of its own, KINHBAC_METRICS_TOKEN, rather than
a user's API token: the scraper gets the figures and nothing else, and its token never
expires under a running monitoring. Without the setting there is no /metrics (404, as for any
unknown path); with it, no token or a wrong one is a 401.
"""

import hmac

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter()
PATH = "/metrics"


# Not in the OpenAPI schema: Prometheus text for one scraper, not the JSON API.
@router.get(PATH, include_in_schema=False)
def metrics(request: Request) -> Response:
    """The app's metrics, for a caller with the metrics token (a sync route: the scrape's
    GROUP BY queries run on a worker thread, not the event loop)."""
    token = request.app.state.settings.metrics_token
    if token is None:
        raise HTTPException(404, "Not Found")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Compared in constant time, as bytes (compare_digest takes only ASCII str).
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.get_secret_value().encode()):
        raise HTTPException(401, "a valid metrics token is required",
                            headers={"WWW-Authenticate": "Bearer"})
    body = generate_latest(request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
