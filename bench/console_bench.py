"""Console benchmark: the console's pages over a city-sized registry in PostgreSQL (issue 14).

    python -m bench.console_bench                              # 1,000,000 devices, 500 sites
    python -m bench.console_bench --devices 20000 --sites 50   # a quick look

A fresh database (KINHBAC_BENCH_POSTGRES's server, as bench/fleet_ingest_bench.py; named
kinhbac_console_bench, dropped and made again each run) is migrated by the fleet's own Alembic
migrations, then filled by SQL on the server (INSERT ... SELECT over generate_series, not the
ORM a row at a time): the sites and the users through the fleet's own functions (the sites'
claim keys sealed with the service key, real password hashes), then the devices and what the
pages read about them:

- devices spread over the sites, in the overview's states (most active and heard within the
  offline silence, some silent for hours to weeks, a few never heard; ~0.3% pending; a few
  registered, revoked, rejected), five firmware versions, a third with one or two tags, last
  seen spread over a month, created over a year;
- the status a gateway published for each device it heard, a gateway per site with its status
  (a few disconnected or with a backlog);
- for each pending device its claim as the fleet audits it (`device.claim`, from its gateway),
  one in ten with a refused claim under another nonce (`device.claim_conflict`);
- a running rollout at one site (its devices offered, downloading, confirmed), so "updating"
  is counted as on a real fleet;
- one audit entry for every fifth device, over a year, and the recent readings (two sensors,
  100 readings) of the devices whose page is measured.

Then `kinhbac fleet serve` (production settings, its own process) is asked each page over real
HTTP by a logged-in console session, for an administrator (city-wide) and a technician limited
to one site: --requests answers each after --warm-up ones, p50/p95/max. Every answer must be a
200 holding what that page must show (a device's wire id on its page, a filtered list's rows),
or the run fails. The baseline, in the same run: GET /api/health and the login page (no
database work but the page's own). The overview keeps its counts a few seconds
(KINHBAC_CONSOLE_COUNTS_MAX_AGE_S); its visits with the counts cold (each counting every site,
as the first visit after they are too old does) are measured on a second fleet started with
that setting at 0, after the first has stopped: --cold-requests of them. Results go to bench/RESULTS.md (the console section) with
the database's size and its biggest tables and indexes. A missed target is reported, not an
error: the exit status is non-zero only when something failed to run or answered wrongly.
"""

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

from bench.gateway_bench import Proc, free_port, wait_port
from bench.report import command_output, machine_rows, replace_section, section_head
from kinhbac.fleet.settings import Settings

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN = "<!-- console-bench:begin (written by python -m bench.console_bench) -->"
END = "<!-- console-bench:end -->"
POSTGRES_DSN = os.environ.get(
    "KINHBAC_BENCH_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=test")
DATABASE = "kinhbac_console_bench"

TARGET_P95_MS = 300.0  # the figure, on this machine
# How long the fleet keeps the overview's counts by default (KINHBAC_CONSOLE_COUNTS_MAX_AGE_S).
COUNTS_MAX_AGE_S = Settings.model_fields["console_counts_max_age_s"].default
PASSWORD = "bench-" + secrets.token_urlsafe(12)
ADMIN = "admin@bench.example.org"
TECHNICIAN = "tech@bench.example.org"
PAGE_SIZE = 50  # the console's lists (kinhbac/fleet/console/devices.py)
DEEP_PAGE = 200  # "deep": this many pages in, as a cursor 200 "Next page" clicks give
CHARTED = 20  # devices given readings; their pages are the ones measured
READINGS = 100  # per charted device, the ingest's default window
OFFLINE_AFTER_S = 180  # the ingest's default: a status older than this is offline
# Firmware versions in use, each with its cumulative share of the devices that report one.
FIRMWARE = (("1.4.2", 0.55), ("1.4.1", 0.80), ("1.3.0", 0.92), ("1.2.7", 0.98),
            ("1.5.0rc1", 1.0))
TAGS = ("street-light", "pump", "river-level", "school", "market", "north", "south")
OUIS = ("240ac4", "30aea4", "a4cf12", "7c9ebd")  # Espressif's


class BenchError(Exception):
    """Something failed to run, or a page answered wrongly (not a missed target)."""


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---- the database ----------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(server: str, name: str, keep: bool) -> Iterator[str]:
    """The bench's database on `server` (a libpq DSN), dropped and made again; its SQLAlchemy
    URL."""
    try:
        with psycopg.connect(server, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            url = (f"postgresql+psycopg://{admin.info.user}@{admin.info.host}:"
                   f"{admin.info.port}/{name}")
    except psycopg.OperationalError as exc:
        raise BenchError(f"PostgreSQL at {server!r}: {str(exc).strip()}") from exc
    try:
        yield url
    finally:
        if not keep:
            with psycopg.connect(server, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))


def libpq_dsn(url: str) -> str:
    """psycopg's DSN for the bench database's SQLAlchemy URL."""
    found = re.match(r"postgresql\+psycopg://([^@]+)@([^:/]+):(\d+)/(.+)$", url)
    assert found, url
    return (f"host={found[2]} port={found[3]} user={found[1]} dbname={found[4]}")


@dataclass
class Seeded:
    """What the measurements ask for, and what the pages must show."""

    sites: int
    devices: int
    pending: int
    seconds: float
    home_slug: str = ""  # the technician's one site
    home_name: str = ""
    wide_slug: str = ""  # another site, for the administrator's filtered list
    wide_name: str = ""
    charted: list[tuple[str, str, int]] = field(default_factory=list)  # (id, wire id, site)
    home_charted: list[tuple[str, str]] = field(default_factory=list)
    fragment: str = ""  # six hex digits of a MAC, for the search
    home_fragment: str = ""
    # Deep pages (_deep): the unfiltered list's, FIRMWARE[2]'s, the technician's site's.
    deep: "Deep | None" = None
    deep_firmware: "Deep | None" = None
    deep_site: "Deep | None" = None
    newest_pending: str = ""  # the wire id the pending page shows first
    home_newest_pending: str = ""
    home_pending: int = 0


def create_sites_and_users(url: str, sites: int, secret_key: str) -> None:
    """The sites through the fleet's own create_site (claim keys sealed with the service key,
    audited) and the two users through create_user (real password hashes)."""
    from sqlmodel import Session

    from kinhbac.fleet import accounts
    from kinhbac.fleet import sites as fleet_sites
    from kinhbac.fleet.audit import CLI
    from kinhbac.fleet.crypto import SecretBox
    from kinhbac.fleet.db import make_engine, upgrade
    from kinhbac.fleet.models import Role, SiteCreate, UserCreate

    engine = make_engine(url)
    try:
        upgrade(engine)
        box = SecretBox(secret_key)
        with Session(engine) as session:
            first = None
            for n in range(sites):
                site = fleet_sites.create_site(session, box, CLI, SiteCreate(
                    slug=f"ward-{n:03d}", name=f"Ward {n:03d}", wifi_ssid=f"kb-ward-{n:03d}",
                    wifi_password=secrets.token_urlsafe(12), gateway_host=f"gw{n}.kinhbac.lan",
                    gateway_port=1883, sensor_kit=[
                        {"name": "temperature", "kind": "bme280", "field": "temperature",
                         "unit": "C"},
                        {"name": "level", "kind": "adc", "pin": 34, "unit": "m"}]))
                first = first or site
            accounts.create_user(session, CLI, UserCreate(
                email=ADMIN, password=PASSWORD, role=Role.admin, full_name="Bench admin"))
            assert first is not None
            accounts.create_user(session, CLI, UserCreate(
                email=TECHNICIAN, password=PASSWORD, role=Role.technician,
                full_name="Bench technician", site_ids=[first.id]))
    finally:
        engine.dispose()


def _fw_case(column: str) -> str:
    """SQL: the firmware version for a uniform random number in `column`."""
    arms = " ".join(f"WHEN {column} < {share} THEN '{version}'" for version, share in FIRMWARE)
    return f"CASE {arms} END"


def seed(url: str, sites: int, devices: int, secret_key: str) -> Seeded:
    started = time.monotonic()
    say(f"migrating, {sites:,} sites and two users")
    create_sites_and_users(url, sites, secret_key)
    pending = max(5, devices * 3 // 1000)
    pending_every = max(2, devices // pending)
    pending = devices // pending_every
    seeded = Seeded(sites=sites, devices=devices, pending=pending, seconds=0.0)
    ouis = "ARRAY[" + ",".join(f"'{o}'" for o in OUIS) + "]"
    tags = "ARRAY[" + ",".join(f"'{t}'" for t in TAGS) + "]"
    with psycopg.connect(libpq_dsn(url)) as db:
        def run(what: str, statement: str, *params: object) -> None:
            t0 = time.monotonic()
            count = db.execute(statement, params or None).rowcount
            db.commit()
            say(f"  {what}: {count:,} rows, {time.monotonic() - t0:.1f} s")

        db.execute("SELECT setseed(0.14)")  # the same city every run
        db.execute("CREATE TEMP TABLE seed_site AS SELECT (row_number() OVER (ORDER BY slug))"
                   " - 1 AS n, id, slug FROM site")
        run("gateways", """
            INSERT INTO gateway (id, site_id, name, token_hash, created_at)
            SELECT gen_random_uuid(), id, 'gw-01', md5(random()::text) || md5(slug),
                   now() - interval '400 days'
            FROM seed_site""")
        # A few disconnected, a few with a backlog: the overview's attention rules have work.
        run("gateway statuses", """
            INSERT INTO gateway_status (site, gateway, state, since_at, dropped, received_at,
                                        queue_depth, oldest_queued_at)
            SELECT slug, 'gw-01', CASE WHEN n % 50 = 7 THEN 'offline' ELSE 'online' END,
                   now() - interval '3 days', '{"policy": 0, "queue_full": 2}'::json,
                   now() - (CASE WHEN n % 50 = 7 THEN interval '2 hours'
                            ELSE interval '12 seconds' END),
                   CASE WHEN n % 40 = 3 THEN 5000 ELSE 0 END,
                   CASE WHEN n % 40 = 3 THEN now() - interval '25 minutes' END
            FROM seed_site""")
        say(f"devices: {devices:,} (the longest step)")
        run("devices", f"""
            INSERT INTO device (id, mac, wire_id, site_id, firmware_version, boot_counter,
                                key_id, secret_enc, state, last_seen_at, free_flash_bytes,
                                free_flash_at, claim_nonce, claim_key_fingerprint,
                                created_at, updated_at, chip, flash_size, board)
            SELECT gen_random_uuid(), mac, '6b62' || replace(mac, ':', ''), s.id,
                   CASE WHEN state = 'registered' THEN NULL ELSE {_fw_case('r_fw')} END,
                   CASE WHEN seen IS NULL THEN NULL ELSE 1 + (g % 40) END,
                   CASE WHEN state IN ('active', 'revoked') THEN 1 ELSE 0 END,
                   CASE WHEN state IN ('active', 'revoked')
                        THEN decode(md5(mac) || md5(mac || 's') || md5(mac || 'k') || '00',
                                    'hex') END,
                   state, seen,
                   CASE WHEN seen IS NULL THEN NULL ELSE 900000 + (g % 400) * 1024 END,
                   seen,
                   CASE WHEN state = 'pending' OR g % 3 = 0 THEN md5(mac || 'nonce') END,
                   CASE WHEN state = 'pending' OR g % 3 = 0
                        THEN substr(md5(s.slug || 'key'), 1, 16) END,
                   created, created, 'ESP32-D0WD-V3', 4194304, 'kinhbac-node-v2'
            FROM (
                SELECT g, r_fw, created, substr(hex, 1, 2) || ':' || substr(hex, 3, 2) || ':'
                       || substr(hex, 5, 2) || ':' || substr(hex, 7, 2) || ':'
                       || substr(hex, 9, 2) || ':' || substr(hex, 11, 2) AS mac,
                       state,
                       CASE WHEN state IN ('active', 'revoked') THEN CASE
                            WHEN r_seen < 0.92 THEN now() - r_seen * interval '60 seconds'
                            WHEN r_seen < 0.98 THEN now() - interval '1 hour'
                                 - (r_seen - 0.92) / 0.06 * interval '30 days'
                            END END AS seen
                FROM (
                    SELECT g, random() AS r_fw, random() AS r_seen,
                           now() - random() * interval '365 days' AS created,
                           ({ouis})[1 + g % 4] || lpad(to_hex(
                               ((g::bigint * 2654435761) % 16777216)::int), 6, '0') AS hex,
                           CASE WHEN g % {pending_every} = 0 THEN 'pending'
                                ELSE (ARRAY['registered', 'revoked', 'rejected', 'active'])[
                                    CASE WHEN r < 0.01 THEN 1 WHEN r < 0.015 THEN 2
                                         WHEN r < 0.017 THEN 3 ELSE 4 END] END AS state
                    FROM (SELECT g, random() AS r FROM generate_series(1, {devices}) g) x
                ) y
            ) d
            JOIN seed_site s ON s.n = d.g % {sites}""")
        run("tags", f"""
            INSERT INTO device_tag (device_id, tag)
            SELECT id, ({tags})[1 + (h % {len(TAGS)})] FROM (
                SELECT id, abs(hashtext(wire_id)) AS h FROM device) d WHERE h % 3 = 0
            UNION
            SELECT id, ({tags})[1 + ((h / 7) % {len(TAGS)})] FROM (
                SELECT id, abs(hashtext(wire_id)) AS h FROM device) d WHERE h % 9 = 0""")
        run("device statuses", f"""
            INSERT INTO device_status (wire_id, site, gateway, last_seen_at, offline_at,
                                       firmware, boot, reset_cause, drops, sensors,
                                       sensor_failures, received_at)
            SELECT d.wire_id, s.slug, 'gw-01', d.last_seen_at,
                   d.last_seen_at + interval '{OFFLINE_AFTER_S} seconds', d.firmware_version,
                   d.boot_counter, CASE WHEN d.boot_counter % 5 = 0 THEN 'brownout'
                                        ELSE 'power_on' END,
                   '{{"queue_full": 0, "send_failed": 1}}'::json,
                   '[{{"name": "temperature", "unit": "C"}}, {{"name": "level", "unit": "m"}}]'
                   ::json,
                   '{{"temperature": {{"sensor_error": 0, "out_of_range": 0}}}}'::json,
                   d.last_seen_at
            FROM device d JOIN site s ON s.id = d.site_id
            WHERE d.last_seen_at IS NOT NULL""")
        run("claims of pending devices", """
            INSERT INTO audit_entry (id, at, actor_kind, actor_id, actor, action, entity,
                                     entity_id, before, after)
            SELECT gen_random_uuid(), d.created_at, 'gateway', g.id, s.slug || '/gw-01',
                   'device.claim', 'device', d.id::text, NULL,
                   json_build_object('id', d.id, 'mac', d.mac, 'wire_id', d.wire_id,
                                     'state', 'pending', 'site_id', d.site_id,
                                     'claim_key_fingerprint', d.claim_key_fingerprint)
            FROM device d JOIN site s ON s.id = d.site_id JOIN gateway g ON g.site_id = s.id
            WHERE d.state = 'pending'""")
        run("refused claims (another nonce)", """
            INSERT INTO audit_entry (id, at, actor_kind, actor_id, actor, action, entity,
                                     entity_id, before, after)
            SELECT gen_random_uuid(), d.created_at + interval '2 hours', 'gateway', g.id,
                   s.slug || '/gw-01', 'device.claim_conflict', 'device', d.id::text, NULL,
                   json_build_object('nonce', md5(d.mac || 'other'), 'gateway', 'gw-01',
                                     'site_id', d.site_id, 'pending_nonce', d.claim_nonce,
                                     'claim_key_fingerprint', d.claim_key_fingerprint,
                                     'pending_claim_key_fingerprint', d.claim_key_fingerprint)
            FROM device d JOIN site s ON s.id = d.site_id JOIN gateway g ON g.site_id = s.id
            WHERE d.state = 'pending' AND abs(hashtext(d.wire_id)) % 10 = 0""")
        run("audit history", """
            INSERT INTO audit_entry (id, at, actor_kind, actor_id, actor, action, entity,
                                     entity_id, before, after)
            SELECT gen_random_uuid(), d.created_at, 'user', u.id, u.email,
                   (ARRAY['device.create', 'device.update', 'device.approve',
                          'device.provision'])[1 + abs(hashtext(d.wire_id)) %% 4],
                   'device', d.id::text, NULL,
                   json_build_object('id', d.id, 'mac', d.mac, 'wire_id', d.wire_id,
                                     'state', d.state, 'site_id', d.site_id)
            FROM device d CROSS JOIN (SELECT id, email FROM fleet_user
                                      WHERE email = %s) u
            WHERE abs(hashtext(d.wire_id)) %% 5 = 1""", ADMIN)
        rollout_site = min(1, sites - 1)
        run("a release", """
            INSERT INTO release (id, kind, version, version_key, created_at, uploaded_by,
                                 size, manifest, signature, signing_key)
            VALUES (gen_random_uuid(), 'bundle', '1.5.0rc1', '1.5.0rc1',
                    now() - interval '2 days', %s, 48211, '{"files": []}'::bytea,
                    decode(repeat('ab', 64), 'hex'), repeat('A', 43) || '=')""", ADMIN)
        run("a running rollout", f"""
            INSERT INTO rollout (id, release_id, target_kind, target_value, waves,
                                 wave_started_at, success_threshold, failure_threshold,
                                 device_deadline_s, allow_downgrade, state, current_wave,
                                 failures_accepted, created_at, created_by, updated_at)
            SELECT gen_random_uuid(), r.id, 'site', to_json(s.slug), '[10, 100]'::json,
                   json_build_array(now() - interval '1 day', now() - interval '2 hours'),
                   95, 5, 86400, false, 'running', 1, 0, now() - interval '1 day', %s, now()
            FROM release r, seed_site s WHERE s.n = {rollout_site}""", ADMIN)
        run("its devices", f"""
            INSERT INTO rollout_device (rollout_id, device_id, position, wave, state, bytes,
                                        offered_at, deadline_at, updated_at)
            SELECT ro.id, d.id, row_number() OVER (ORDER BY d.wire_id),
                   CASE WHEN abs(hashtext(d.wire_id)) % 10 = 0 THEN 0 ELSE 1 END,
                   (ARRAY['confirmed', 'downloading', 'offered', 'pending'])[
                       1 + abs(hashtext(d.wire_id || 'r')) % 4],
                   abs(hashtext(d.wire_id)) % 48211, now() - interval '1 hour',
                   now() + interval '20 hours', now() - interval '5 minutes'
            FROM device d JOIN seed_site s ON s.id = d.site_id AND s.n = {rollout_site},
                 rollout ro
            WHERE d.state = 'active'""")
        # The devices whose pages are measured: heard lately, half of them at the technician's
        # site, each with readings of two sensors and a few update steps.
        for n_site, wanted in ((0, CHARTED // 2), (rollout_site, CHARTED - CHARTED // 2)):
            found = db.execute(
                "SELECT d.id::text, d.wire_id FROM device d JOIN seed_site s ON s.id = d.site_id"
                " WHERE s.n = %s AND d.state = 'active' AND d.last_seen_at IS NOT NULL"
                " ORDER BY d.wire_id LIMIT %s", (n_site, wanted)).fetchall()
            seeded.charted += [(i, w, n_site) for i, w in found]
        charted_ids = [wire for _, wire, _ in seeded.charted]
        run("recent readings", f"""
            INSERT INTO recent_reading (wire_id, boot, seq, sensor, unit, value, ts, boot_ms,
                                        pre_sync)
            SELECT w, 3, seq, CASE WHEN seq %% 2 = 0 THEN 'temperature' ELSE 'level' END,
                   CASE WHEN seq %% 2 = 0 THEN 'C' ELSE 'm' END,
                   CASE WHEN seq %% 2 = 0 THEN 24 + 4 * sin(seq / 9.0)
                        ELSE 1.2 + 0.3 * cos(seq / 7.0) END,
                   now() - (({READINGS} - seq) * interval '30 seconds'), NULL, false
            FROM unnest(%s::text[]) w, generate_series(1, {READINGS}) seq""", charted_ids)
        run("update steps", """
            INSERT INTO rollout_event (rollout_id, device_id, at, received_at, from_state,
                                       to_state, bytes, source, ignored)
            SELECT ro.id, d.id, now() - (4 - k) * interval '10 minutes',
                   now() - (4 - k) * interval '10 minutes',
                   (ARRAY['pending', 'offered', 'downloading', 'verifying'])[k],
                   (ARRAY['offered', 'downloading', 'verifying', 'installed'])[k],
                   k * 12000, CASE WHEN k = 1 THEN 'gateway' ELSE 'node' END, false
            FROM device d, rollout ro, generate_series(1, 4) k
            WHERE d.wire_id = ANY(%s)""", charted_ids)
        say("VACUUM ANALYZE (as autovacuum would, before anyone reads)")
        db.commit()
        db.autocommit = True
        t0 = time.monotonic()
        db.execute("VACUUM ANALYZE")
        say(f"  {time.monotonic() - t0:.1f} s")
        _lookups(db, seeded, rollout_site)
    seeded.seconds = time.monotonic() - started
    return seeded


@dataclass
class Deep:
    """A page deep in a filtered list: its cursor (the wire id before it), its number, and
    how many devices it shows."""

    after: str
    number: int
    rows: int
    total: int  # devices in the list

    @property
    def first_rows(self) -> int:
        return min(PAGE_SIZE, self.total)

    def url(self, query: str = "") -> str:
        after = f"after={self.after}" if self.after else ""
        return "/console/devices" + ("?" if query or after else "") + "&".join(
            part for part in (query, after) if part)


def _deep(db: psycopg.Connection, where: str, *params: object) -> Deep:
    """Page DEEP_PAGE + 1 of the devices `where` holds (over device d and site s), as
    DEEP_PAGE clicks on "Next page" reach it; the last full page of a shorter list."""
    base = f"FROM device d JOIN site s ON s.id = d.site_id WHERE {where}"
    total = db.execute(f"SELECT count(*) {base}", params or None).fetchone()[0]
    skipped = min(DEEP_PAGE, max(0, total - 1) // PAGE_SIZE) * PAGE_SIZE
    if total > PAGE_SIZE and total - skipped < PAGE_SIZE:
        skipped -= PAGE_SIZE  # a full page: the last but one, not a short last one
    after = "" if skipped == 0 else db.execute(
        f"SELECT d.wire_id {base} ORDER BY d.wire_id OFFSET %s LIMIT 1",
        (*params, skipped - 1)).fetchone()[0]
    return Deep(after, skipped // PAGE_SIZE + 1, min(PAGE_SIZE, total - skipped), total)


def _lookups(db: psycopg.Connection, seeded: Seeded, rollout_site: int) -> None:
    """What the measured pages are asked for, and must show, read back from the database."""
    def one(query: str, *params: object) -> str:
        row = db.execute(query, params or None).fetchone()
        assert row is not None, query
        return str(row[0])

    seeded.home_slug, seeded.home_name = db.execute(
        "SELECT slug, name FROM site ORDER BY slug LIMIT 1").fetchone()
    seeded.wide_slug, seeded.wide_name = db.execute(
        "SELECT slug, name FROM site ORDER BY slug OFFSET %s LIMIT 1",
        (rollout_site,)).fetchone()
    seeded.home_charted = [(i, w) for i, w, n in seeded.charted if n == 0]
    # Six hex digits from the middle of a MAC: only the substring search finds them.
    seeded.fragment = seeded.charted[-1][1][8:14]
    seeded.home_fragment = seeded.home_charted[0][1][8:14]
    seeded.deep = _deep(db, "TRUE")
    seeded.deep_firmware = _deep(db, "d.firmware_version = %s", FIRMWARE[2][0])
    seeded.deep_site = _deep(db, "s.slug = %s", seeded.home_slug)
    seeded.newest_pending = one(
        "SELECT wire_id FROM device WHERE state = 'pending' ORDER BY created_at DESC, id DESC"
        " LIMIT 1")
    seeded.home_newest_pending = one(
        "SELECT d.wire_id FROM device d JOIN site s ON s.id = d.site_id WHERE s.slug = %s"
        " AND d.state = 'pending' ORDER BY d.created_at DESC, d.id DESC LIMIT 1",
        seeded.home_slug)
    seeded.home_pending = int(one(
        "SELECT count(*) FROM device d JOIN site s ON s.id = d.site_id WHERE s.slug = %s"
        " AND d.state = 'pending'", seeded.home_slug))


@dataclass
class Size:
    database: int
    tables: list[tuple[str, int, int, int]]  # (table, rows, heap+toast bytes, index bytes)
    indexes: list[tuple[str, int]]  # the biggest, by bytes
    readings: tuple[int, int]  # recent_reading's rows, and its bytes with its indexes


def database_size(url: str) -> Size:
    with psycopg.connect(libpq_dsn(url)) as db:
        total = db.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        tables = db.execute("""
            SELECT c.relname, c.reltuples::bigint, pg_table_size(c.oid),
                   pg_indexes_size(c.oid)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r' AND n.nspname = 'public'
            ORDER BY pg_total_relation_size(c.oid) DESC LIMIT 8""").fetchall()
        indexes = db.execute("""
            SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'i' AND n.nspname = 'public'
            ORDER BY pg_relation_size(c.oid) DESC LIMIT 10""").fetchall()
        readings = db.execute("SELECT count(*), pg_total_relation_size('recent_reading')"
                              " FROM recent_reading").fetchone()
    return Size(total, [tuple(t) for t in tables], [tuple(i) for i in indexes],
                tuple(readings))


# ---- the measurements ------------------------------------------------------------------------


@dataclass
class Page:
    who: str  # admin, technician, or "-" (the baseline, no session)
    name: str  # what the page is, as the report names it
    paths: list[str]  # asked in turn (a device page: each charted device's)
    expect: list[str]  # what each answer must hold, in step with paths
    rows: int | None = None  # device rows the list must show, when known
    # Asked of a second fleet that keeps no counts (KINHBAC_CONSOLE_COUNTS_MAX_AGE_S=0): each
    # visit counts every site, as the first after the kept counts are too old does.
    cold: bool = False
    seconds: list[float] = field(default_factory=list)
    bytes: int = 0

    def p(self, q: float) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


ROW = re.compile(r'href="/console/devices/[0-9a-f-]{36}"')


def pages(s: Seeded) -> list[Page]:
    assert s.deep and s.deep_firmware and s.deep_site
    offline_state = "offline"
    fw = FIRMWARE[2][0]
    device_paths = [f"/console/devices/{i}" for i, _, _ in s.charted]
    home_paths = [f"/console/devices/{i}" for i, _ in s.home_charted]
    return [
        Page("-", "GET /api/health (baseline)", ["/api/health"], ['"ok"']),
        Page("-", "login page, no session (baseline)", ["/console/login"], ["csrf_token"]),
        Page("admin", "overview", ["/console/"], [s.wide_name]),
        Page("admin", "overview, counts cold", ["/console/"], [s.wide_name], cold=True),
        Page("admin", "devices, first page", ["/console/devices"], ["6b62"],
             s.deep.first_rows),
        Page("admin", f"devices, page {s.deep.number}", [s.deep.url()], ["6b62"],
             s.deep.rows),
        Page("admin", "devices: a site + offline",
             [f"/console/devices?site={s.wide_slug}&state={offline_state}"], [s.wide_name]),
        Page("admin", f"devices: firmware {fw}", [f"/console/devices?firmware={fw}"],
             [fw], s.deep_firmware.first_rows),
        Page("admin", f"devices: firmware {fw}, page {s.deep_firmware.number}",
             [s.deep_firmware.url(f"firmware={fw}")], [fw], s.deep_firmware.rows),
        Page("admin", "devices: search 6 hex digits of a MAC",
             [f"/console/devices?q={s.fragment}"], [s.charted[-1][1]]),
        Page("admin", "a device's page", device_paths, [w for _, w, _ in s.charted]),
        Page("admin", "pending, first page", ["/console/pending"], [s.newest_pending],
             min(PAGE_SIZE, s.pending)),
        Page("technician", "overview", ["/console/"], [s.home_name]),
        Page("technician", "overview, counts cold", ["/console/"], [s.home_name], cold=True),
        Page("technician", "devices, first page", ["/console/devices"], [s.home_name],
             s.deep_site.first_rows),
        Page("technician", f"devices: its site, page {s.deep_site.number}",
             [s.deep_site.url(f"site={s.home_slug}")], [s.home_name], s.deep_site.rows),
        Page("technician", "devices: search 6 hex digits of a MAC",
             [f"/console/devices?q={s.home_fragment}"], [s.home_charted[0][1]]),
        Page("technician", "a device's page", home_paths, [w for _, w in s.home_charted]),
        Page("technician", "pending, first page", ["/console/pending"],
             [s.home_newest_pending], min(PAGE_SIZE, s.home_pending)),
    ]


def log_in(base: str, email: str) -> httpx.Client:
    """A console session as a browser gets one: the login form's CSRF token, then the POST."""
    client = httpx.Client(base_url=base, timeout=120.0)
    form = client.get("/console/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    if form.status_code != 200 or token is None:
        raise BenchError(f"the login page answered {form.status_code} without a CSRF token")
    answer = client.post("/console/login", data={
        "username": email, "password": PASSWORD, "csrf_token": token[1]},
        headers={"Origin": base})
    if answer.status_code != 303 or answer.headers.get("location") != "/console/":
        raise BenchError(f"logging in as {email} answered {answer.status_code}")
    return client


def check(page: Page, path: str, expect: str, answer: httpx.Response) -> None:
    if answer.status_code != 200:
        raise BenchError(f"{page.who} {path} answered {answer.status_code}:\n"
                         f"{answer.text[:500]}")
    if expect not in answer.text:
        raise BenchError(f"{page.who} {path} does not show {expect!r}")
    if page.rows is not None:
        shown = len(set(ROW.findall(answer.text)))
        if shown != page.rows:
            raise BenchError(f"{page.who} {path} shows {shown} devices, not {page.rows}")


def measure(base: str, measured: list[Page], warm_up: int, requests: int) -> None:
    clients = {"-": httpx.Client(base_url=base, timeout=120.0),
               "admin": log_in(base, ADMIN), "technician": log_in(base, TECHNICIAN)}
    try:
        for page in measured:
            client = clients[page.who]
            for n in range(warm_up + requests):
                k = n % len(page.paths)
                t0 = time.perf_counter()
                answer = client.get(page.paths[k])
                elapsed = time.perf_counter() - t0
                check(page, page.paths[k], page.expect[k], answer)
                if n >= warm_up:
                    page.seconds.append(elapsed)
                    page.bytes = max(page.bytes, len(answer.content))
            say(f"  {page.who:10} {page.name:45} p50 {page.p(0.5) * 1000:7.1f} ms"
                f"  p95 {page.p(0.95) * 1000:7.1f} ms  max {max(page.seconds) * 1000:7.1f} ms")
    finally:
        for client in clients.values():
            client.close()


async def serve_and_measure(url: str, secret_key: str, measured: list[Page], workdir: Path,
                            args: argparse.Namespace) -> None:
    """The pages on the fleet as it runs (its counts kept), then the cold ones on a fleet that
    keeps none, one after the other: never two servers' requests at once."""
    await _serve_and_measure(url, secret_key, [p for p in measured if not p.cold], workdir,
                             "fleet", {"KINHBAC_CONSOLE_COUNTS_MAX_AGE_S": f"{COUNTS_MAX_AGE_S:g}"},
                             args.warm_up, args.requests)
    await _serve_and_measure(url, secret_key, [p for p in measured if p.cold], workdir,
                             "fleet-cold", {"KINHBAC_CONSOLE_COUNTS_MAX_AGE_S": "0"},
                             args.warm_up, args.cold_requests)


async def _serve_and_measure(url: str, secret_key: str, measured: list[Page], workdir: Path,
                             name: str, settings: dict[str, str], warm_up: int,
                             requests: int) -> None:
    if not measured:
        return
    port = free_port()
    env = {"KINHBAC_SECRET_KEY": secret_key, "KINHBAC_DATABASE_URL": url,
           "KINHBAC_ENV": "production", "KINHBAC_DATA_DIR": str(workdir / "data"), **settings}
    proc = Proc(name, [str(Path(sys.executable).parent / "kinhbac"), "fleet", "serve",
                       "--port", str(port)], workdir / f"{name}.log")
    saved = dict(os.environ)
    os.environ.update(env)  # Proc passes os.environ on
    try:
        await proc.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        await wait_port(port, 120.0, proc)
        say(f"the {name} serves on port {port}{' ' + str(settings) if settings else ''}: "
            f"{warm_up} warm-up and {requests} measured requests a page")
        await asyncio.to_thread(measure, f"http://127.0.0.1:{port}", measured, warm_up,
                                requests)
    finally:
        await proc.stop()


# ---- the report ------------------------------------------------------------------------------


def describe_machine(version: str) -> list[tuple[str, str]]:
    commit = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
    dirty = command_output(["git", "-C", str(REPO), "status", "--porcelain",
                            "--untracked-files=no", "kinhbac"]).strip()
    return [
        *machine_rows(),
        ("Database", f"PostgreSQL {version} on 127.0.0.1 (its default settings)"),
        ("uvicorn / FastAPI / SQLAlchemy / psycopg", " / ".join(
            metadata.version(p) for p in ("uvicorn", "fastapi", "sqlalchemy", "psycopg"))),
        ("Code", f"{commit or 'unknown'}" + (" with local changes to kinhbac/" if dirty else "")),
        ("Date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
    ]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}" if seconds < 1 else f"{seconds * 1000:,.0f}"


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:,.1f}"


def build_report(seeded: Seeded, measured: list[Page], size: Size,
                 machine: list[tuple[str, str]], args: argparse.Namespace,
                 command: str) -> str:
    console = [p for p in measured if p.who != "-" and not p.cold]
    cold = [p for p in measured if p.cold]
    worst = max(console, key=lambda p: p.p(0.95))
    missed = [p for p in console if p.p(0.95) * 1000 >= TARGET_P95_MS]
    lines = [
        *section_head(BEGIN, "Console benchmark", command, machine),
        "## The city",
        "",
        f"{seeded.sites:,} sites with a gateway each, {seeded.devices:,} devices "
        f"({seeded.pending:,} pending approval, each with its audited claim and one in ten "
        f"with a refused one), filled in {seeded.seconds:,.0f} s by SQL on the server "
        f"(`python -m bench.console_bench`'s docstring says what). The fleet service is "
        f"`kinhbac fleet serve` (uvicorn, one process, production settings) on the same "
        f"machine; each page is asked {args.requests} times after {args.warm_up} warm-up "
        f"requests, one at a time, on one keep-alive connection per user, with the user's "
        f"console session: an administrator (city-wide) and a technician limited to one site "
        f"(~{seeded.devices // seeded.sites:,} devices). Every answer was checked: a 200 "
        f"holding what the page must show (the device rows of a full page, the device "
        f"searched for, the newest pending device). Times are the client's, request sent to "
        f"body read. The baseline of the same run: `/api/health` and the login page.",
        "",
        "## Results",
        "",
        f"Target: p95 under {TARGET_P95_MS:.0f} ms for every console page. Worst p95: "
        f"{_ms(worst.p(0.95))} ms ({worst.who}, {worst.name}): "
        + ("**met**." if not missed else
           f"**missed** by {len(missed)} page(s): " + "; ".join(
               f"{p.who} {p.name}" for p in missed) + "."),
        "",
        f"The overview's counts of devices by state are taken for every site at once and kept "
        f"{COUNTS_MAX_AGE_S:g} s (`KINHBAC_CONSOLE_COUNTS_MAX_AGE_S`), each visit showing its "
        f"user's sites from them: the `overview` rows are visits reading kept counts (a "
        f"warm-up request counted them; a measured visit after they were {COUNTS_MAX_AGE_S:g} s "
        f"old counted again and is among the figures). The first visit after they are that "
        f"old counts every site, whoever makes it: the `overview, counts cold` rows, measured "
        f"on a second fleet that keeps no counts (`KINHBAC_CONSOLE_COUNTS_MAX_AGE_S=0`, so "
        f"that every visit counts), {args.cold_requests} requests after the warm-up"
        + (f": p95 {_ms(max(p.p(0.95) for p in cold))} ms" if cold else "")
        + f". That is at most one visit in {COUNTS_MAX_AGE_S:g} s for the whole service; "
        f"visits arriving while it counts wait for it and take its counts.",
        "",
        "| User | Page | p50 (ms) | p95 (ms) | max (ms) | Page size (KiB) | Target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for p in measured:
        target = "" if p.who == "-" else "cold, not a target" if p.cold else (
            "met" if p.p(0.95) * 1000 < TARGET_P95_MS else "missed")
        lines.append(f"| {p.who} | {p.name} | {_ms(p.p(0.5))} | {_ms(p.p(0.95))} | "
                     f"{_ms(max(p.seconds))} | {p.bytes / 1024:,.0f} | {target} |")
    rows, size_bytes = size.readings
    lines += [
        "",
        "## Database size",
        "",
        f"`pg_database_size`: **{_mib(size.database)} MiB** after VACUUM ANALYZE "
        f"(~{size.database / max(1, seeded.devices):,.0f} bytes a device, everything "
        f"included). Recent readings are kept for the {CHARTED} measured devices only: the "
        f"ingest keeps up to {READINGS} per device, which on a whole fleet reporting would be "
        f"the biggest table by far"
        + (f" ({READINGS * seeded.devices:,} rows, some "
           f"{size_bytes / rows * READINGS * seeded.devices / 1024 ** 3:,.0f} GiB "
           f"at this table's bytes a row with its index)." if rows else "."),
        "",
        "| Table | Rows (estimate) | Table (MiB) | Its indexes (MiB) |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {rows:,} | {_mib(table)} | {_mib(index)} |"
          for name, rows, table, index in size.tables),
        "",
        "| Biggest indexes | MiB |",
        "|---|---:|",
        *(f"| {name} | {_mib(n)} |" for name, n in size.indexes),
        "",
        END,
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.console_bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=1_000_000, help="devices (1,000,000)")
    p.add_argument("--sites", type=int, default=500, help="sites (500)")
    p.add_argument("--requests", type=int, default=50, help="measured requests a page (50)")
    p.add_argument("--warm-up", type=int, default=5, help="requests a page first, unmeasured")
    p.add_argument("--cold-requests", type=int, default=10, help="measured requests of the "
                   "overview with its counts cold, each counting every site (10)")
    p.add_argument("--postgres", default=POSTGRES_DSN, help="the server, as a libpq DSN "
                   "(KINHBAC_BENCH_POSTGRES, else 127.0.0.1:5432 as postgres)")
    p.add_argument("--database", default=DATABASE, help=f"the database to (re)make ({DATABASE})")
    p.add_argument("--keep", action="store_true", help="keep the database afterwards")
    p.add_argument("--results", type=Path, default=RESULTS, help="file to write (RESULTS.md)")
    args = p.parse_args(argv)
    if args.sites < 2 or args.devices < max(200, 100 * args.sites):
        p.error("give at least 2 sites and 100 devices a site (200 at least)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench.console_bench" + (
        f" {' '.join(sys.argv[1:])}" if argv is None and sys.argv[1:] else
        f" {' '.join(argv)}" if argv else "")
    workdir = REPO / "run" / "bench" / f"console-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir.mkdir(parents=True, exist_ok=True)
    secret_key = secrets.token_urlsafe(32)
    try:
        with fresh_database(args.postgres, args.database, args.keep) as url:
            seeded = seed(url, args.sites, args.devices, secret_key)
            size = database_size(url)
            say(f"database: {_mib(size.database)} MiB")
            measured = pages(seeded)
            asyncio.run(serve_and_measure(url, secret_key, measured, workdir, args))
            with psycopg.connect(libpq_dsn(url)) as db:
                version = db.execute("SHOW server_version").fetchone()[0]
    except BenchError as exc:
        print(f"console bench: {exc}", file=sys.stderr)
        return 1
    replace_section(args.results, build_report(seeded, measured, size,
                                               describe_machine(version), args, command),
                    BEGIN, END)
    print(f"results written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
