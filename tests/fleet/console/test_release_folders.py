"""A bundle uploaded from the console as a chosen folder (upload.js sends each file by its path
inside the folder, with paths=relative): the files land at their board paths under / and the
signed manifest lists them; a forged path is refused by name with nothing stored; the form's
token and role rules hold as for any upload. The bodies are written byte for byte here, as an
attacker would write them, rather than by an HTTP client that escapes what it sends."""

import hashlib
import json
import re

import pytest
from markupsafe import escape
from sqlmodel import func, select

from kinhbac import release_manifest
from kinhbac.fleet.models import AuditEntry, Release, Role

from ..utils import bearer, make_user
from .conftest import ORIGIN, form_token, log_in
from .test_releases import as_user, incoming, stored

BOUNDARY = "kinhbac-folder-test"
# What the script sends for a folder picked as `app/` holding main.py, lib/ and lib/node/.
FOLDER = [("main.py", b"import node\nnode.run()\n"), ("lib/wire.mpy", b"M\x06wire"),
          ("lib/node/app.mpy", b"M\x06app" + bytes(range(256)) * 20)]


def multipart(fields: list[tuple[str, str]], files: list[tuple[str, bytes]]) -> bytes:
    """A multipart/form-data body: the fields in order (the token first, as the form puts
    it), then each file as a `file` part whose filename is exactly `name`, unescaped."""
    body = b""
    for name, value in fields:
        body += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                 f"{value}\r\n").encode()
    for name, content in files:
        body += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                 ).encode() + content + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def send_folder(browser, token: str | None, files: list[tuple[str, bytes]] = FOLDER, *,
                version: str = "0.3.0", paths: str = "relative", lang: str = "en",
                origin: str = ORIGIN):
    """The form as upload.js sends a chosen folder: token, kind, version, the board folder
    (unused then), paths=relative and the files by their paths inside the folder."""
    fields = [("csrf_token", token)] if token is not None else []
    fields += [("kind", "bundle"), ("version", version), ("folder", "/lib/node"),
               ("paths", paths)]
    return browser.post("/console/releases/new", content=multipart(fields, files),
                        headers={"Origin": origin, "Accept-Language": lang,
                                 "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
                        follow_redirects=False)


def audited(session) -> int:
    return session.exec(select(func.count()).select_from(AuditEntry).where(
        AuditEntry.action == "release.upload")).one()


def test_a_folder_lands_at_its_board_paths_and_the_signed_manifest_lists_them(browser,
                                                                              session, app):
    user, api_token = make_user(session, Role.admin)
    log_in(browser, user.email)
    token = form_token(browser.get("/console/"))

    answer = send_folder(browser, token)

    assert answer.status_code == 303, answer.text
    release = session.exec(select(Release)).one()
    expected = [("/main.py", FOLDER[0][1]), ("/lib/wire.mpy", FOLDER[1][1]),
                ("/lib/node/app.mpy", FOLDER[2][1])]
    assert [(f.path, f.size, f.sha256) for f in release.file_rows] == [
        (path, len(body), hashlib.sha256(body).hexdigest()) for path, body in expected]
    # What gateways trust: the manifest as signed, with the same paths.
    signed = release_manifest.verify(release.manifest, release_manifest.b64(release.signature),
                                     release.signing_key)
    assert [f["path"] for f in signed["files"]] == [path for path, _ in expected]
    page = browser.get(answer.headers["location"], headers={"Accept-Language": "en"})
    assert re.findall(r'<th scope="row"><code>([^<]+)</code></th>', page.text) == [
        path for path, _ in expected]
    assert incoming(app) == []

    # The same files sent through the API by their board paths: the same manifest's files,
    # and an audit entry that differs only in what names the release.
    through_api = browser.post("/api/releases", headers=bearer(api_token),
                               data={"kind": "bundle", "version": "0.3.1"},
                               files=[("file", (path, body)) for path, body in expected])
    assert through_api.status_code == 201, through_api.text
    by_version = {r.version: json.loads(r.manifest) for r in session.exec(select(Release))}
    assert by_version["0.3.0"]["files"] == by_version["0.3.1"]["files"]
    assert by_version["0.3.0"]["min_free_bytes"] == by_version["0.3.1"]["min_free_bytes"]
    console_entry, api_entry = session.exec(select(AuditEntry).where(
        AuditEntry.action == "release.upload").order_by(AuditEntry.at)).all()
    assert (console_entry.actor, console_entry.actor_kind, console_entry.actor_id) == (
        api_entry.actor, api_entry.actor_kind, api_entry.actor_id) == (
        user.email, api_entry.actor_kind, api_entry.actor_id)

    def comparable(after: dict) -> dict:
        return {k: v for k, v in after.items() if k not in {"id", "created_at", "version"}}

    assert comparable(console_entry.after) == comparable(api_entry.after)


@pytest.mark.parametrize("forged, rule", [
    ("../main.py", "contains '..'"),
    ("lib/../../boot.py", "contains '..'"),
    ("lib\\..\\boot.py", "contains '..'"),
    ("lib\\node\\x.py", "each part between '/'"),
    ("lib//x.py", "each part between '/'"),
    ("lib/node/", "each part between '/'"),
    ("./main.py", "contains '.'"),
    (".git/config", "each part between '/'"),
    ("lib/n\u00f4de.py", "each part between '/'"),
    ("lib/" + "x" * 260 + ".py", "longer than 255 bytes"),
])
def test_a_folder_path_no_board_takes_is_refused_by_name_and_nothing_is_stored(
        browser, session, app, forged, rule):
    token = as_user(browser, session, Role.admin)
    answer = send_folder(browser, token, FOLDER + [(forged, b"x = 1\n")])
    assert answer.status_code == 422, answer.text
    assert "<title>Upload a release ·" in answer.text and 'role="alert"' in answer.text
    shown = forged if len(forged) < 100 else forged[:40]
    assert f"The file {escape(shown)}" in answer.text
    assert escape(rule) in answer.text
    assert stored(session) == 0 and incoming(app) == [] and audited(session) == 0


def test_an_absolute_path_from_a_folder_is_refused_by_name(browser, session, app):
    token = as_user(browser, session, Role.admin)
    # An absolute name stays as it is in a plain form post (as curl sends board paths); from a
    # folder no path is absolute, so one that is was not made by the picker.
    answer = send_folder(browser, token, FOLDER + [("/boot.py", b"import evil\n")])
    assert answer.status_code == 422, answer.text
    assert ("The file /boot.py was sent as an absolute path, not as a path inside the chosen "
            "folder") in answer.text
    assert stored(session) == 0 and incoming(app) == [] and audited(session) == 0


def test_a_refused_folder_path_is_named_in_vietnamese(browser, session, app):
    token = as_user(browser, session, Role.admin)
    answer = send_folder(browser, token, FOLDER + [("../main.py", b"")], lang="vi")
    assert answer.status_code == 422
    assert "Tệp ../main.py trong thư mục đã chọn không thể đưa lên bo mạch" in answer.text
    assert stored(session) == 0 and incoming(app) == []


def test_a_path_sent_twice_is_refused_by_name(browser, session, app):
    token = as_user(browser, session, Role.admin)
    answer = send_folder(browser, token, FOLDER + [("lib/wire.mpy", b"again")])
    assert answer.status_code == 422, answer.text
    assert "/lib/wire.mpy is given twice" in answer.text
    assert stored(session) == 0 and incoming(app) == [] and audited(session) == 0


def test_a_nul_in_a_folder_path_is_refused_before_the_file_is_stored(browser, session, app):
    token = as_user(browser, session, Role.admin)
    answer = send_folder(browser, token, FOLDER + [("lib/x.py\x00.txt", b"x")])
    assert answer.status_code == 422, answer.text
    assert "contains a NUL character" in answer.text
    assert stored(session) == 0 and incoming(app) == [] and audited(session) == 0


def test_paths_says_relative_or_nothing(browser, session, app):
    token = as_user(browser, session, Role.admin)
    answer = send_folder(browser, token, paths="absolute")
    assert answer.status_code == 422, answer.text
    assert escape("paths is 'relative' or not given, not 'absolute'") in answer.text
    assert stored(session) == 0 and incoming(app) == []


@pytest.mark.parametrize("token, origin", [(None, ORIGIN), ("forged", ORIGIN),
                                           ("valid", "https://evil.example")])
def test_a_folder_upload_without_the_pages_token_or_origin_stores_nothing(browser, session,
                                                                           app, token, origin):
    real = as_user(browser, session, Role.admin)
    answer = send_folder(browser, real if token == "valid" else token, origin=origin)
    assert answer.status_code == 403, answer.text
    assert stored(session) == 0 and incoming(app) == [] and audited(session) == 0


@pytest.mark.parametrize("role", [Role.technician, Role.viewer])
def test_only_an_admin_may_upload_a_folder(browser, session, app, role):
    token = as_user(browser, session, role)
    answer = send_folder(browser, token)
    assert answer.status_code == 403
    assert answer.headers["content-type"].startswith("text/html")
    assert stored(session) == 0 and incoming(app) == [] and audited(session) == 0


def test_the_form_offers_a_labelled_folder_picker_for_the_script_only(browser, session):
    as_user(browser, session, Role.admin)
    form = browser.get("/console/releases/new", headers={"Accept-Language": "en"}).text
    # Hidden until the script shows it: only the script sends a folder's paths, and the plain
    # form (one board folder) works without it.
    assert '<p id="folder-picker" hidden>' in form
    assert '<input id="tree" type="file" webkitdirectory>' in form
    assert '<label for="tree">' in form
    assert '<input id="file" name="file" type="file" multiple required>' in form
