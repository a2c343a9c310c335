"""The console benchmark (bench/console_bench.py) at a tiny size against the real PostgreSQL and
the real fleet service: its seeding fills what the pages read, every page it measures answers
with what it must show (the bench checks each answer and fails otherwise), and its section of
the results is written. Timings are not asserted: they are what the bench reports."""

import re
import uuid

import httpx
import psycopg
import pytest

from bench import console_bench
from fleet.backends import POSTGRES_DSN, postgres_or_skip


def test_the_bench_seeds_measures_and_writes_its_section_at_a_tiny_size(tmp_path, capsys):
    postgres_or_skip()
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nAnother bench's section stays.\n")
    database = f"kinhbac_console_bench_{uuid.uuid4().hex[:8]}"
    status = console_bench.main(["--devices", "300", "--sites", "2", "--requests", "3",
                                 "--warm-up", "1", "--postgres", POSTGRES_DSN,
                                 "--database", database, "--results", str(results)])
    assert status == 0, capsys.readouterr().err
    text = results.read_text()
    assert text.startswith("# Results\n\nAnother bench's section stays.\n")
    section = text.split(console_bench.BEGIN, 1)[1].split(console_bench.END, 1)[0]
    assert "2 sites with a gateway each, 300 devices" in section
    # Every page measured has its row, for its user, with three figures and a verdict.
    for who, page in (("admin", "overview"), ("admin", "devices, first page"),
                      ("admin", "devices: a site + offline"),
                      ("admin", "devices: search 6 hex digits of a MAC"),
                      ("admin", "a device's page"), ("admin", "pending, first page"),
                      ("technician", "overview"), ("technician", "devices, first page"),
                      ("technician", "a device's page"), ("technician", "pending, first page"),
                      ("-", "GET /api/health (baseline)")):
        row = re.search(rf"^\| {re.escape(who)} \| {re.escape(page)} \|"
                        r" ([\d.,]+) \| ([\d.,]+) \| ([\d.,]+) \| [\d,]+ \| (met|missed|) \|$",
                        section, re.MULTILINE)
        assert row, f"no row for {who} {page}"
        assert (row[4] == "") == (who == "-")
    assert re.search(r"`pg_database_size`: \*\*[\d.,]+ MiB\*\*", section)
    assert re.search(r"^\| device \| [\d,]+ \|", section, re.MULTILINE)
    assert "| ix_device" in section or "| uq_device" in section or "| pk_device" in section
    # The database is the bench's own, dropped afterwards.
    with psycopg.connect(POSTGRES_DSN) as admin:
        assert admin.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                             (database,)).fetchone() is None


def test_an_answer_without_what_the_page_must_show_fails_the_bench():
    page = console_bench.Page("admin", "a device's page", ["/console/devices/x"],
                              ["6b62aabbccddeeff"])
    shown = httpx.Response(200, text="<p>6b62aabbccddeeff</p>")
    console_bench.check(page, page.paths[0], page.expect[0], shown)
    with pytest.raises(console_bench.BenchError, match="does not show"):
        console_bench.check(page, page.paths[0], page.expect[0],
                            httpx.Response(200, text="<p>another device</p>"))
    with pytest.raises(console_bench.BenchError, match="answered 404"):
        console_bench.check(page, page.paths[0], page.expect[0],
                            httpx.Response(404, text="6b62aabbccddeeff"))
    listing = console_bench.Page("admin", "devices", ["/console/devices"], ["6b62"], rows=2)
    one_row = httpx.Response(200, text=f'6b62 <a href="/console/devices/{uuid.uuid4()}">')
    with pytest.raises(console_bench.BenchError, match="shows 1 devices, not 2"):
        console_bench.check(listing, "/console/devices", "6b62", one_row)
