"""The fleet's Prometheus metrics, on a registry per app (tests make several apps in one
process), served as text at /metrics (kinhbac/fleet/routes/metrics.py; docs/fleet.md, "Metrics").

- HTTP requests by route template, method and status, and their latency by route template.
  Labels come only from the app's own routes, never from the raw path or method a caller
  sends, so a scanner cannot grow the label set: a path no route matches is `unmatched`.
- The ingest's counters, read from IngestWorker.stats at scrape time (nothing added to the
  hot path), its lag and its transactions' time.
- Devices and rollouts by state, one GROUP BY each at scrape time, over indexed columns
  (ix_device_state, ix_rollout_state): with 1,000,000 devices on PostgreSQL 15 an index-only
  scan, 47-74 ms a scrape after a VACUUM, 134-177 ms before one (2-core machine, 2026-12-06).
"""

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine
from sqlmodel import col
from starlette.routing import compile_path

from kinhbac.fleet.models import Device, DeviceState, Rollout, RolloutState, utcnow

if TYPE_CHECKING:
    from kinhbac.fleet.ingest import Batch, IngestWorker

log = logging.getLogger(__name__)

_P = "kinhbac_fleet_"
UNMATCHED = "unmatched"  # the route label of every path no route of the app matches
# Methods a route can have; anything else a caller invents is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# API answers take milliseconds; a bulk CSV or a release upload takes seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Docs/fleet.md's benchmark: p99 0.4-0.7 s from publish to commit when the ingest keeps up;
# minutes mean a backlog in the broker's queue for the fleet's session.
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A scrape's GROUP BY queries may take this long on PostgreSQL, so that a slow database
# never holds a connection of the pool for long for a scraper.
QUERY_TIMEOUT_MS = 5000


class FleetMetrics:
    """One app's metrics and their registry."""

    def __init__(self, engine: Engine, ingest: Callable[[], "IngestWorker | None"], *,
                 with_ingest: bool) -> None:
        """`ingest()` gives the app's IngestWorker, or None while there is none. The ingest's
        series exist only `with_ingest`: an API instance that runs none has no lag to show,
        and a last commit at 0 would set off the alert on a stalled ingest."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter(_P + "http_requests", "HTTP requests answered, by route "
                                "template (unmatched: no route), method and status code",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram(_P + "http_request_duration_seconds", "Time from a "
                                         "request's arrival to the end of its answer, by route "
                                         "template", ["route"], buckets=LATENCY_BUCKETS,
                                         registry=r)
        r.register(StateCollector(engine))
        if not with_ingest:
            return
        r.register(IngestCollector(ingest))
        self.ingest_lag = Histogram(_P + "ingest_lag_seconds", "Age of the newest reading of "
                                    "each committed ingest transaction at its commit (its "
                                    "node's time to the fleet's)", buckets=LAG_BUCKETS,
                                    registry=r)
        self.ingest_batch_seconds = Histogram(_P + "ingest_batch_seconds", "Time of one ingest "
                                              "transaction", buckets=BATCH_BUCKETS, registry=r)
        self.ingest_last_commit = Gauge(_P + "ingest_last_commit_timestamp_seconds", "When the "
                                        "ingest last committed a transaction (Unix time)",
                                        registry=r)

    def ingest_committed(self, batch: "Batch", seconds: float) -> None:
        """IngestWorker's on_commit: the transaction's time and the ingest's lag."""
        # Lag is the newest reading's age, not the time from a message's arrival to its
        # commit: that one only measures the batching here (at most an interval plus the
        # transaction, seen in ingest_batch_seconds), and stays small while a backlog grows
        # in the broker's queue for the fleet's session, the failure that matters (mosquitto
        # drops past max_queued_messages). The newest, not the oldest: a gateway replaying
        # hours of its queue after an outage must not read as the fleet's lag while live
        # readings come in the same transaction. Readings stamped after they arrived (a clock
        # ahead of ours) are left out when the batch is made (ingest.py).
        self.ingest_batch_seconds.observe(seconds)
        self.ingest_last_commit.set(time.time())
        if batch.newest_reading_at is not None:
            lag = (utcnow() - batch.newest_reading_at).total_seconds()
            self.ingest_lag.observe(max(0.0, lag))


class IngestCollector(Collector):
    """The ingest worker's counters (IngestWorker.stats), as they are at scrape time; nothing
    while the app runs no ingest."""

    def __init__(self, ingest: Callable[[], "IngestWorker | None"]) -> None:
        self._ingest = ingest

    def collect(self) -> Iterable[Metric]:
        worker = self._ingest()
        if worker is None:
            return
        stats = worker.stats
        yield GaugeMetricFamily(_P + "ingest_subscribed", "1 while the ingest is connected to "
                                "the broker and subscribed", value=int(worker.subscribed.is_set()))
        for name, doc, value in (
            ("messages_received", "Messages from the broker", stats.received),
            ("messages_written", "Accepted messages whose transaction committed", stats.written),
            ("messages_dropped", "Accepted messages whose transaction failed for a reason a "
             "retry cannot mend (logged)", stats.dropped),
            ("messages_malformed", "Messages skipped: not JSON, not the documented shape, or a "
             "topic not read", stats.malformed),
            ("messages_ignored", "Empty messages (a retained status being cleared)",
             stats.ignored),
            ("readings_written", "Readings offered to the database, after merging and "
             "refusals (a duplicate of a stored one is ignored there)", stats.readings_written),
            ("batches", "Ingest transactions committed", stats.batches),
            ("write_failures", "Ingest transactions that failed (retried, or dropped)",
             stats.write_failures),
            ("update_steps_failed", "Update steps dropped because the rollout rules raised on "
             "them (a bug; logged)", stats.steps_failed),
        ):
            yield CounterMetricFamily(_P + "ingest_" + name, doc, value=value)
        refused = CounterMetricFamily(_P + "ingest_rows_refused", "Rows the ingest refused, by "
                                      "reason: site (a device under another site's topics), "
                                      "boot (a boot counter far past the device's), ota (an "
                                      "update step for no rollout of the device)",
                                      labels=["reason"])
        refused.add_metric(["site"], stats.refused_site)
        refused.add_metric(["boot"], stats.refused_boot)
        refused.add_metric(["ota"], stats.refused_ota)
        yield refused


class StateCollector(Collector):
    """Devices and rollouts by state, counted in the database at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(_P + "database_up", "1 if the scrape's state counts were read "
                               "from the database")
        try:
            with self._engine.connect() as connection:
                if connection.dialect.name == "postgresql":
                    connection.execute(sa.text(
                        f"SET LOCAL statement_timeout = {QUERY_TIMEOUT_MS}"))
                devices = _by_state(connection, col(Device.state))
                rollouts = _by_state(connection, col(Rollout.state))
        except sa.exc.SQLAlchemyError as exc:
            # Without the database the HTTP and ingest figures still count (and say why).
            log.warning("metrics: the state counts could not be read: %s",
                        str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield _family("devices", "Devices in the registry, by state", DeviceState, devices)
        yield _family("rollouts", "Rollouts, by state", RolloutState, rollouts)


def _by_state(connection: sa.Connection, column: Any) -> dict[str, int]:
    rows = connection.execute(sa.select(column, sa.func.count()).group_by(column))
    return {str(getattr(state, "value", state)): count for state, count in rows}


def _family(name: str, doc: str, states: Iterable[Any], counts: dict[str, int]) -> Metric:
    # Every state, with 0 for none: a series that vanishes cannot be alerted on.
    family = GaugeMetricFamily(_P + name, doc, labels=["state"])
    for state in states:
        family.add_metric([state.value], counts.pop(state.value, 0))
    for state, count in counts.items():  # a state stored that this code does not know
        family.add_metric([state], count)
    return family


# ---- HTTP requests

Scope = dict[str, Any]


class RequestMetrics:
    """ASGI middleware, outermost: counts every answer (a 413 of HttpHygiene's too) and times
    it, by route template."""

    def __init__(self, app: Any, *, metrics: FleetMetrics, templates: "RouteTemplates") -> None:
        self.app = app
        self.metrics = metrics
        self.templates = templates

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def noted(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noted)
        except Exception:
            status = status or 500  # ServerErrorMiddleware, outside, answers 500
            raise
        finally:
            if status is not None:  # else the client left before any answer
                method = scope["method"] if scope["method"] in METHODS else "other"
                route = self.templates.find(scope["path"], scope["method"])
                self.metrics.requests.labels(route, method, str(status)).inc()
                self.metrics.request_seconds.labels(route).observe(
                    time.perf_counter() - started)


class RouteTemplates:
    """The app's route templates (`/api/devices/{device_id}`), matched as its router matches
    them: by path and method, else by path alone (the router's 405)."""

    def __init__(self, routes: Iterable[Any]) -> None:
        # Matched here rather than read from the scope after routing: the same label for
        # answers given before routing (a 413 by Content-Length) and whatever FastAPI keeps
        # in the scope. 56 routes: under 6 us a request (measured, 2026-12-06).
        self._routes = [(compile_path(path)[0], path, methods)
                        for path, methods in _flattened(routes)]

    def find(self, path: str, method: str) -> str:
        """The template of the route that takes `method` at `path`, or UNMATCHED."""
        other_method = None
        for regex, template, methods in self._routes:
            if regex.match(path):
                if methods is None or method in methods:
                    return template
                other_method = other_method or template
        return other_method or UNMATCHED


def _flattened(routes: Iterable[Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for route in routes:
        path = getattr(route, "path", None)
        if isinstance(path, str):
            yield prefix + path, getattr(route, "methods", None)
        inner = getattr(route, "original_router", None)  # an included APIRouter (FastAPI)
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from _flattened(inner.routes, prefix + getattr(context, "prefix", ""))
