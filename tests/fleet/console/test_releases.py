"""The Releases pages: the list, a release with its signed manifest and its fit to the caller's
boards, and the upload form calling the API's own create_release, tried from the attacker's
side too: other roles, forged forms, hostile stored text, bodies too large."""

import asyncio
import hashlib
import json
import re
from collections.abc import Iterator

import pytest
from sqlmodel import func, select

from kinhbac import release_manifest
from kinhbac.fleet import releases
from kinhbac.fleet.models import (
    AuditEntry,
    Device,
    Release,
    ReleaseFile,
    Role,
    Rollout,
    RolloutTargetKind,
)

from ..utils import bearer, make_device, make_release, make_site, make_user
from .conftest import ORIGIN, form_token, log_in

EN = {"Accept-Language": "en"}
BUNDLE = {"app.mpy": b"app v2 " + bytes(range(256)) * 20, "wire.mpy": b"wire"}
_LISTED = re.compile(r'<a href="/console/releases/([0-9a-f-]{36})"><code>([^<]+)</code>')
_NEXT = re.compile(r'<a href="([^"]+)" rel="next">')


def an_image(size: int = 4096) -> bytes:
    """Bytes shaped like an ESP32 app image as far as the fleet looks: the header's magic."""
    return bytes([releases.IMAGE_MAGIC]) + bytes(size - 1)


def as_user(browser, session, role: Role) -> str:
    """Log in as a new user of `role`; the CSRF token of its forms."""
    user, _ = make_user(session, role)
    log_in(browser, user.email)
    return form_token(browser.get("/console/"))


def send(browser, token: str | None, *, kind: str = "bundle", version: str = "0.2.0",
         folder: str = "/lib/node", files: dict[str, bytes] | None = None,
         origin: str | None = ORIGIN, **kwargs):
    """The upload form as a browser sends it: the token first, then the fields, the files."""
    data = {"csrf_token": token} if token is not None else {}
    data |= {"kind": kind, "version": version, "folder": folder}
    files = BUNDLE if files is None else files
    headers = {"Origin": origin, **EN} if origin else dict(EN)
    return browser.post("/console/releases/new", data=data, headers=headers,
                        files=[("file", (name, body)) for name, body in files.items()],
                        follow_redirects=False, **kwargs)


def stored(session) -> int:
    return session.exec(select(func.count()).select_from(Release)).one()


def incoming(app) -> list:
    folder = app.state.artifacts.root / "incoming"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_an_admin_uploads_a_bundle_and_lands_on_its_signed_release(browser, session, app):
    token = as_user(browser, session, Role.admin)
    assert '<a href="/console/releases">Releases</a>' in browser.get("/console/", headers=EN).text
    form = browser.get("/console/releases/new", headers=EN)
    assert form.status_code == 200 and "<title>Upload a release ·" in form.text
    assert 'enctype="multipart/form-data"' in form.text
    # The script is ours, from the console's own address; the page allows no other.
    [script] = re.findall(r'<script src="([^"]+)"', form.text)
    assert script == "/console/static/upload.js"
    assert "script-src 'self'" in form.headers["content-security-policy"]
    code = browser.get(script)
    assert code.status_code == 200 and "XMLHttpRequest" in code.text and "http" not in \
        code.text.replace("XMLHttpRequest", "")
    # Every field has its label.
    for field in re.findall(r'<input id="([^"]+)"', form.text):
        assert f'<label for="{field}">' in form.text, field

    answer = send(browser, token)

    assert answer.status_code == 303, answer.text
    release = session.exec(select(Release)).one()
    assert answer.headers["location"] == f"/console/releases/{release.id}"
    assert [(f.path, f.size) for f in release.file_rows] == [
        ("/lib/node/app.mpy", len(BUNDLE["app.mpy"])), ("/lib/node/wire.mpy", 4)]
    page = browser.get(answer.headers["location"], headers=EN)
    assert page.status_code == 200 and "<title>Release 0.2.0 ·" in page.text
    for path, body in BUNDLE.items():
        assert f"/lib/node/{path}" in page.text
        assert hashlib.sha256(body).hexdigest() in page.text
    signature = release_manifest.b64(release.signature)
    assert signature in page.text
    assert release_manifest.fingerprint(release.signing_key) in page.text
    # The manifest as signed, indented for reading.
    shown = json.loads(re.search(r'<pre class="manifest">(.*?)</pre>', page.text,
                                 re.S).group(1).replace("&#34;", '"'))
    assert shown == release_manifest.verify(release.manifest, signature, release.signing_key)
    assert incoming(app) == []


def test_a_console_upload_is_stored_and_audited_as_the_apis(browser, session, app):
    user, api_token = make_user(session, Role.admin)
    log_in(browser, user.email)
    token = form_token(browser.get("/console/"))
    through_console = send(browser, token, version="1.0.0", folder="/lib/node/")
    assert through_console.status_code == 303, through_console.text
    through_api = browser.post("/api/releases", headers=bearer(api_token),
                               data={"kind": "bundle", "version": "1.0.1"},
                               files=[("file", (f"/lib/node/{name}", body))
                                      for name, body in BUNDLE.items()])
    assert through_api.status_code == 201, through_api.text

    entries = session.exec(select(AuditEntry).where(AuditEntry.action == "release.upload")
                           .order_by(AuditEntry.at)).all()
    assert len(entries) == 2
    console_entry, api_entry = entries
    assert (console_entry.actor, console_entry.actor_kind, console_entry.actor_id) == (
        api_entry.actor, api_entry.actor_kind, api_entry.actor_id)
    assert console_entry.actor == user.email

    def comparable(after: dict) -> dict:
        return {k: v for k, v in after.items() if k not in {"id", "created_at", "version"}}

    assert comparable(console_entry.after) == comparable(api_entry.after)
    rows = {r.version: r for r in session.exec(select(Release))}
    assert rows["1.0.0"].file_rows[0].sha256 == rows["1.0.1"].file_rows[0].sha256
    assert rows["1.0.0"].uploaded_by == rows["1.0.1"].uploaded_by == user.email
    manifests = [json.loads(rows[v].manifest) for v in ("1.0.0", "1.0.1")]
    assert manifests[0]["files"] == manifests[1]["files"]
    assert manifests[0]["min_free_bytes"] == manifests[1]["min_free_bytes"]


@pytest.mark.parametrize("role", [Role.technician, Role.viewer])
def test_only_an_admin_may_upload_or_read_releases(browser, session, app, role):
    make_release(session, app)
    token = as_user(browser, session, role)
    assert "/console/releases" not in browser.get("/console/").text
    for path in ("/console/releases", "/console/releases/new"):
        page = browser.get(path, headers=EN)
        assert page.status_code == 403 and "<title>" in page.text, path
    answer = send(browser, token)
    assert answer.status_code == 403
    assert answer.headers["content-type"].startswith("text/html")
    assert stored(session) == 1 and incoming(app) == []


@pytest.mark.parametrize("token, origin", [(None, ORIGIN), ("forged", ORIGIN),
                                           ("valid", "https://evil.example"), ("valid", None)])
def test_an_upload_without_the_pages_token_or_origin_stores_nothing(browser, session, app,
                                                                     token, origin):
    real = as_user(browser, session, Role.admin)
    answer = send(browser, real if token == "valid" else token, origin=origin)
    assert answer.status_code == 403, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    assert stored(session) == 0 and incoming(app) == []
    assert session.exec(select(func.count()).select_from(AuditEntry).where(
        AuditEntry.action == "release.upload")).one() == 0


def test_a_token_after_the_files_is_refused_before_a_file_is_stored(browser, session, app):
    real = as_user(browser, session, Role.admin)
    # The form puts its token first; a body that sends it last gets no file stored.
    answer = browser.post("/console/releases/new", headers={"Origin": ORIGIN}, files=[
        ("kind", (None, "bundle")), ("version", (None, "0.2.0")),
        ("file", ("app.mpy", b"x" * 10)), ("csrf_token", (None, real))],
        follow_redirects=False)
    assert answer.status_code == 403
    assert stored(session) == 0 and incoming(app) == []


@pytest.mark.parametrize("kind, version, files, status, reason", [
    ("image", "1.0.0", {"micropython.bin": an_image(releases.SLOT_BYTES + 1)}, 422,
     "larger than the OTA slot"),
    ("image", "1.0.0", {"firmware.bin": b"\x00" * 64}, 422, "not an ESP32 app image"),
    ("bundle", "not a version", None, 422, "is not a version"),
    ("bundle", "", None, 422, "Give the release's version, e.g. 0.2.0."),
    ("image", "1.0.0", {"micropython.bin": b""}, 422, "The image is empty."),
])
def test_a_refused_upload_gets_the_form_with_the_apis_reason(browser, session, app, kind,
                                                             version, files, status, reason):
    token = as_user(browser, session, Role.admin)
    answer = send(browser, token, kind=kind, version=version, files=files)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    assert "<title>Upload a release ·" in answer.text and reason in answer.text
    assert 'role="alert"' in answer.text
    assert stored(session) == 0 and incoming(app) == []


def test_a_reason_is_in_vietnamese_where_it_is_a_fixed_sentence(browser, session, app):
    token = as_user(browser, session, Role.admin)
    answer = browser.post("/console/releases/new", headers={"Origin": ORIGIN,
                                                            "Accept-Language": "vi"},
                          data={"csrf_token": token, "kind": "image", "version": "1.0.0"},
                          files=[("file", ("micropython.bin", b""))], follow_redirects=False)
    assert answer.status_code == 422 and "Bản image trống." in answer.text


def test_the_same_version_twice_gets_the_form_with_409(browser, session, app):
    token = as_user(browser, session, Role.admin)
    assert send(browser, token, version="0.2.0").status_code == 303
    again = send(browser, token, version="0.2.0.0")  # the same version, written out longer
    assert again.status_code == 409 and "released already" in again.text
    assert stored(session) == 1 and incoming(app) == []


def test_a_too_large_upload_is_refused_with_the_form_before_its_body_is_read(browser, session,
                                                                           app):
    token = as_user(browser, session, Role.admin)
    limit = app.state.settings.release_max_upload_bytes
    answer = send(browser, token, kind="image", files={"micropython.bin": an_image(limit + 1)})
    assert answer.status_code == 413
    assert answer.headers["content-type"].startswith("text/html")
    assert f"{limit:,} bytes at most" in answer.text
    assert stored(session) == 0 and incoming(app) == []


def test_html_in_stored_release_text_is_shown_as_text(browser, session, app):
    release = make_release(session, app)
    row = session.get(Release, release.id)
    row.uploaded_by = "<script>alert(1)</script>@x"
    session.add(row)
    first = session.get(ReleaseFile, (release.id, 0))
    first.path = "/lib/<img src=x onerror=alert(2)>.mpy"
    session.add(first)
    session.commit()
    as_user(browser, session, Role.admin)
    for path in ("/console/releases", f"/console/releases/{release.id}"):
        page = browser.get(path, headers=EN)
        assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;@x" in page.text


def test_an_image_too_large_for_the_ota_slot_is_explained(browser, session, box, app):
    site = make_site(session, box)
    for _ in range(3):
        make_device(session, box, site)
    release = make_release(session, app, kind="image", version="1.0.0",
                           files={"micropython.bin": an_image(releases.SLOT_BYTES)})
    as_user(browser, session, Role.admin)
    page = browser.get(f"/console/releases/{release.id}", headers=EN)
    assert "ESP32_GENERIC-OTA" in page.text and "1,572,864 bytes" in page.text
    assert "<td>Yes</td>" in page.text and "larger than the OTA slot" not in page.text

    # A release recorded before the slot check: its row says 1.5 MiB and 4 KiB more.
    row = session.get(Release, release.id)
    row.size = releases.SLOT_BYTES + 4096
    session.add(row)
    session.commit()
    page = browser.get(f"/console/releases/{release.id}", headers=EN)
    assert "No: the image is 4,096 bytes larger than the OTA slot." in page.text
    assert "<td>3</td>" in page.text  # the three active devices on that layout


def test_a_bundle_bigger_than_a_devices_free_flash_names_it(browser, session, box, app):
    site = make_site(session, box)
    roomy, short, silent = (make_device(session, box, site) for _ in range(3))
    release = make_release(session, app)
    needed = json.loads(session.get(Release, release.id).manifest)["min_free_bytes"]
    for provisioned, free in ((roomy, needed), (short, needed - 1), (silent, None)):
        device = session.get(Device, provisioned.id)
        device.free_flash_bytes = free
        session.add(device)
    session.commit()
    as_user(browser, session, Role.admin)
    page = browser.get(f"/console/releases/{release.id}", headers=EN)
    assert f"needs {needed:,} bytes of free flash" in page.text
    assert "Of your 3 active devices, 2 reported their free flash." in page.text
    assert "1 of them reported less free flash than that" in page.text
    assert f"{short.wire_id}: {needed - 1:,} bytes free" in page.text
    assert roomy.wire_id not in page.text and silent.wire_id not in page.text


def test_the_list_is_newest_first_in_keyset_pages(browser, session, app, monkeypatch):
    monkeypatch.setattr("kinhbac.fleet.console.releases.PAGE_SIZE", 2)
    made = [make_release(session, app, version=f"0.{i}.0") for i in range(5)]
    as_user(browser, session, Role.admin)
    page = browser.get("/console/releases", headers=EN)
    assert page.status_code == 200 and "<title>Releases ·" in page.text
    seen = [version for _, version in _LISTED.findall(page.text)]
    while (link := _NEXT.search(page.text)) is not None:
        page = browser.get(link.group(1).replace("&amp;", "&"), headers=EN)
        seen += [version for _, version in _LISTED.findall(page.text)]
    assert seen == [r.version for r in reversed(made)]
    damaged = browser.get("/console/releases?after=nope", headers=EN)
    assert damaged.status_code == 400 and "damaged" in damaged.text


def test_an_unknown_release_is_not_found(browser, session):
    as_user(browser, session, Role.admin)
    for wanted in ("00000000-0000-0000-0000-000000000000", "not-an-id"):
        page = browser.get(f"/console/releases/{wanted}", headers=EN)
        assert page.status_code == 404 and "no release with this id" in page.text


CHUNK = 64 * 1024
BOUNDARY = b"kinhbac-console-test"


def _endless_upload(token: str) -> Iterator[bytes]:
    """The form with its token and a version but no kind (nothing refuses it before the
    limit), and a file that never ends."""
    for name, value in (("csrf_token", token), ("version", "9.9.9")):
        yield (b"--" + BOUNDARY + f'\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
               f"{value}\r\n".encode())
    yield (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; '
           b'filename="app.mpy"\r\n\r\n')
    while True:
        yield bytes(CHUNK)


def _post_raw(app, cookies: str, body: Iterator[bytes],
              length: int | None = None) -> tuple[int, str, bytes, int]:
    """POST the upload form's body to the app as a server would, a chunk at a time: the
    answer's status, content type and body, and how many bytes the app pulled in."""
    pulled = 0
    answer: dict = {"body": b"", "type": ""}

    async def receive() -> dict:
        nonlocal pulled
        chunk = next(body)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["type"] = dict(message["headers"]).get(b"content-type", b"").decode()
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    headers = [(b"host", b"testserver"), (b"origin", ORIGIN.encode()),
               (b"cookie", cookies.encode()), (b"accept-language", b"en"),
               (b"content-type", b"multipart/form-data; boundary=" + BOUNDARY)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    path = "/console/releases/new"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    return answer["status"], answer["type"], answer["body"], pulled


def test_a_huge_upload_is_cut_off_at_the_fleets_limit_not_received_whole(browser, session,
                                                                          app):
    token = as_user(browser, session, Role.admin)
    cookies = "; ".join(f"{name}={value}" for name, value in browser.cookies.items())
    limit = app.state.settings.release_max_upload_bytes

    # Announced in advance, as browsers do: the form page, before a byte is read.
    status, kind, page, pulled = _post_raw(app, cookies, _endless_upload(token),
                                           length=10 * 1024**3)
    assert (status, pulled) == (413, 0)
    assert kind.startswith("text/html") and f"{limit:,} bytes at most".encode() in page

    # Not announced: stopped at the chunk that crossed the limit, as the API's upload is.
    status, _, _, pulled = _post_raw(app, cookies, _endless_upload(token))
    assert status == 413
    assert limit < pulled <= limit + CHUNK + 1024
    assert stored(session) == 0 and incoming(app) == []


def test_the_list_counts_the_rollouts_of_each_release(browser, session, app):
    used, unused = make_release(session, app, version="0.1.0"), make_release(session, app,
                                                                             version="0.2.0")
    for _ in range(2):
        session.add(Rollout(release_id=used.id, target_kind=RolloutTargetKind.site,
                            target_value="ward7", waves=[100], wave_started_at=[None],
                            success_threshold=95, failure_threshold=5, device_deadline_s=86400,
                            created_by="cli"))
    session.commit()
    as_user(browser, session, Role.admin)
    page = browser.get("/console/releases", headers=EN).text
    rows = re.findall(r'<tr>\s*<th scope="row"><a href="/console/releases/([0-9a-f-]{36})">'
                      r'.*?<td>([^<]*)</td>\s*</tr>', page, re.S)
    assert rows == [(str(unused.id), "0"), (str(used.id), "2")]
    assert "App bundle" in page and "cli" in page
    detail = browser.get(f"/console/releases/{used.id}", headers=EN).text
    assert "<dt>Rollouts</dt><dd>2</dd>" in detail
