"""Releases from the attacker's side: who may upload and read them, what an upload may carry, the
signing key's file and where its private half never goes, and that what a gateway verifies
is what was signed."""

import asyncio
import base64
import hashlib
import os
import stat
import tracemalloc
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from sqlmodel import func, select

from kinhbac import release_manifest
from kinhbac.fleet import releases
from kinhbac.fleet.models import AuditEntry, Release, Role
from kinhbac.fleet.signing import KEY_FILE, ReleaseSigner, SigningKeyError

from ..utils import bearer, make_callers, make_gateway, make_release, make_site, make_user

BUNDLE = {"/lib/node/app.mpy": b"app v2 " + bytes(range(256)) * 20, "/lib/wire.mpy": b"wire"}


def an_image(size: int = 4096) -> bytes:
    """Bytes shaped like an ESP32 app image as far as the fleet looks: the header's magic."""
    return bytes([releases.IMAGE_MAGIC]) + bytes(size - 1)


def upload(client, headers, kind="bundle", version="0.2.0", files=None, **kwargs):
    files = BUNDLE if files is None else files
    return client.post("/api/releases", headers=headers,
                       data={"kind": kind, "version": version},
                       files=[("file", (name, data)) for name, data in files.items()], **kwargs)


def refusal(response) -> tuple[str, str]:
    """A 422's field and message."""
    [problem] = response.json()["detail"]
    return problem["loc"][-1], problem["msg"]


def incoming(app) -> list[str]:
    folder = app.state.artifacts.root / "incoming"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def releases_stored(session) -> int:
    return session.exec(select(func.count()).select_from(Release)).one()


def test_an_admin_uploads_a_bundle_and_reads_it_back_signed(client, session, admin):
    answer = upload(client, admin)

    assert answer.status_code == 201, answer.text
    release = answer.json()
    assert (release["kind"], release["version"]) == ("bundle", "0.2.0")
    assert release["files"] == [
        {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for path, data in BUNDLE.items()]
    manifest = release_manifest.verify(release["manifest"].encode(), release["signature"],
                                       release["signing_key"])
    assert manifest["files"] == release["files"] and manifest["version"] == "0.2.0"
    assert manifest["format"] == 1
    assert manifest["min_free_bytes"] == (2 + 1) * 4096  # whole littlefs blocks, per file
    assert client.get(f"/api/releases/{release['id']}", headers=admin).json() == release
    page = client.get("/api/releases", headers=admin).json()
    assert [item["id"] for item in page["items"]] == [release["id"]] and page["total"] == 1
    [entry] = session.exec(select(AuditEntry).where(AuditEntry.action == "release.upload")).all()
    assert entry.entity_id == release["id"] and entry.after["files"] == release["files"]


@pytest.mark.parametrize("caller", ["technician", "viewer", "site technician", "site viewer",
                                    "site token technician", "gateway"])
def test_no_one_but_an_admin_uploads_or_reads_releases(client, session, box, app, caller):
    callers = make_callers(session, box)
    existing = make_release(session, app)
    headers = bearer(callers.tokens[caller])

    answer = upload(client, headers, version="6.6.6",
                    files={"/lib/node/app.mpy": b"import evil"})

    assert answer.status_code == 403, answer.text
    assert releases_stored(session) == 1 and incoming(app) == []  # refused before the body
    for path in ("/api/releases", f"/api/releases/{existing.id}"):
        assert client.get(path, headers=headers).status_code == 403
    assert b"signature" not in client.get("/api/releases", headers=headers).content


def test_without_a_token_nothing_is_uploaded_or_read(client, session, app):
    existing = make_release(session, app)
    for headers in ({}, bearer("kbt_not-a-token-the-fleet-issued")):
        assert upload(client, headers, version="6.6.6").status_code == 401
        assert client.get(f"/api/releases/{existing.id}", headers=headers).status_code == 401
        assert client.get(f"/api/gateway/releases/{existing.id}/files/0",
                          headers=headers).status_code == 401
    assert releases_stored(session) == 1


def test_gateways_fetch_the_manifest_and_files_and_nothing_else(client, session, box, app,
                                                                admin):
    site = make_site(session, box)
    _, token = make_gateway(session, site)
    release = make_release(session, app, files=BUNDLE)
    gateway = bearer(token)

    signed = client.get(f"/api/gateway/releases/{release.id}", headers=gateway).json()
    assert (signed["manifest"], signed["signature"]) == (release.manifest, release.signature)
    for index, data in enumerate(BUNDLE.values()):
        answer = client.get(f"/api/gateway/releases/{release.id}/files/{index}", headers=gateway)
        assert answer.status_code == 200 and answer.content == data
        assert answer.headers["content-type"] == "application/octet-stream"
    partial = client.get(f"/api/gateway/releases/{release.id}/files/0",
                         headers=gateway | {"Range": "bytes=10-19"})
    assert partial.status_code == 206 and partial.content == BUNDLE["/lib/node/app.mpy"][10:20]

    assert client.get(f"/api/gateway/releases/{release.id}/files/2",
                      headers=gateway).status_code == 404
    assert client.get(f"/api/gateway/releases/{release.id}/files/-1",
                      headers=gateway).status_code == 422
    assert client.get(f"/api/gateway/releases/{uuid.uuid4()}/files/0",
                      headers=gateway).status_code == 404
    # A gateway's token is not an admin's: no upload, no listing of what the fleet has.
    assert upload(client, gateway, version="6.6.6").status_code == 403
    assert client.get("/api/releases", headers=gateway).status_code == 403
    # And an admin's token is not a gateway's.
    assert client.get(f"/api/gateway/releases/{release.id}/files/0",
                      headers=admin).status_code == 403


def test_the_private_key_is_in_no_answer_and_its_file_is_0600(client, session, box, app, admin):
    site = make_site(session, box)
    _, token = make_gateway(session, site)
    answers = [upload(client, admin)]
    release_id = answers[0].json()["id"]
    answers += [
        client.get("/api/releases", headers=admin),
        client.get(f"/api/releases/{release_id}", headers=admin),
        client.get("/api/audit", headers=admin),
        client.get("/api/gateway/keys", headers=bearer(token)),
        client.get(f"/api/gateway/releases/{release_id}", headers=bearer(token)),
        client.get(f"/api/gateway/releases/{release_id}/files/0", headers=bearer(token)),
        client.get("/openapi.json"),
    ]

    key_file = app.state.settings.data_folder / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    pem = key_file.read_bytes()
    private = serialization.load_pem_private_key(pem, password=None)
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    der_body = b"".join(pem.splitlines()[1:-1])
    forms = [raw, raw.hex().encode(), base64.b64encode(raw), base64.urlsafe_b64encode(raw),
             der_body, b"PRIVATE KEY"]
    for answer in answers:
        assert answer.status_code in (200, 201), answer.text
        for form in forms:
            assert form not in answer.content, answer.request.url
        for name, value in answer.headers.items():
            assert not any(form.decode("latin-1") in value for form in forms), name


def test_a_manifest_verifies_with_the_gateways_key_and_fails_for_any_changed_byte(
        client, session, box, app):
    site = make_site(session, box)
    _, token = make_gateway(session, site)
    release = make_release(session, app, kind="image", version="1.0.0",
                           files={"micropython.bin": an_image()})
    listing = client.get("/api/gateway/keys", headers=bearer(token)).json()
    signed = client.get(f"/api/gateway/releases/{release.id}", headers=bearer(token)).json()
    manifest = signed["manifest"].encode()

    found = release_manifest.verify(manifest, signed["signature"], listing["release_public_key"])
    assert found["kind"] == "image" and found["files"][0]["path"] == "image.bin"
    data = client.get(f"/api/gateway/releases/{release.id}/files/0", headers=bearer(token))
    assert hashlib.sha256(data.content).hexdigest() == found["files"][0]["sha256"]

    for position in range(len(manifest)):
        changed = bytearray(manifest)
        changed[position] ^= 0x01
        with pytest.raises(release_manifest.ManifestError):
            release_manifest.verify(bytes(changed), signed["signature"],
                                    listing["release_public_key"])
    signature = bytearray(base64.b64decode(signed["signature"]))
    signature[0] ^= 0x80
    with pytest.raises(release_manifest.ManifestError, match="does not verify"):
        release_manifest.verify(manifest, base64.b64encode(signature).decode(),
                                listing["release_public_key"])
    another = ReleaseSigner(app.state.settings.data_folder / "another" / KEY_FILE)
    with pytest.raises(release_manifest.ManifestError, match="does not verify"):
        release_manifest.verify(manifest, signed["signature"], another.public_key())


@pytest.mark.parametrize("path", [
    "/lib/../boot.py", "/../../etc/passwd", "../lib/x.mpy", "lib/node/app.mpy", "/lib/./x.mpy",
    "/lib//x.mpy", "/lib/node/", "/", "", "\\lib\\x.mpy", "/lib/x y.mpy", "/lib/.hidden",
    "/lib/ü.mpy", "/lib/x\x00.mpy", "/" + "a" * 255,
])
def test_a_bundle_path_that_is_not_a_plain_absolute_board_path_is_refused(
        client, session, app, admin, path):
    answer = upload(client, admin, files={"/lib/wire.mpy": b"wire", path: b"x"})

    assert answer.status_code == 422, answer.text
    field, message = refusal(answer)
    assert field == "file"
    if ".." in path:
        assert "'..'" in message
    assert releases_stored(session) == 0 and incoming(app) == []


def test_an_image_larger_than_the_ota_slot_is_refused_by_name(client, session, app, admin):
    assert releases.SLOT_BYTES == 0x180000  # ESP32_GENERIC-OTA's ota_0 and ota_1

    answer = upload(client, admin, kind="image", version="1.0.0",
                    files={"micropython.bin": an_image(releases.SLOT_BYTES + 1)})

    assert answer.status_code == 422, answer.text
    field, message = refusal(answer)
    assert field == "file" and "larger than the OTA slot" in message
    assert "1,572,864 bytes" in message and "ESP32_GENERIC-OTA" in message
    # Named when the kind comes after the file, too.
    late = client.post("/api/releases", headers=admin, files=[
        ("file", ("micropython.bin", an_image(releases.SLOT_BYTES + 1))),
        ("kind", (None, "image")), ("version", (None, "1.0.0"))])
    assert late.status_code == 422 and "larger than the OTA slot" in refusal(late)[1]
    assert releases_stored(session) == 0 and incoming(app) == []

    fits = upload(client, admin, kind="image", version="1.0.0",
                  files={"micropython.bin": an_image(releases.SLOT_BYTES)})
    assert fits.status_code == 201, fits.text


def test_a_bundle_a_node_could_never_be_offered_is_refused_by_name(client, session, admin):
    # An offer is one frame (docs/protocol.md): 25 files with 17-byte paths fill it.
    files = {f"/lib/node/m{i:02}.mpy": b"x" for i in range(40)}

    answer = upload(client, admin, files=files)

    assert answer.status_code == 422, answer.text
    field, message = refusal(answer)
    assert field == "file" and "OTA_OFFER would take 2,172 bytes" in message
    assert "a frame carries 1,362" in message
    assert releases_stored(session) == 0
    fits = upload(client, admin, files=dict(list(files.items())[:20]))
    assert fits.status_code == 201, fits.text


def test_what_is_not_an_app_image_is_refused_by_name(client, admin):
    combined = bytearray(an_image(0x8000 + 4096))
    combined[0x7000:0x7002] = b"\xaa\x50"  # MicroPython's firmware.bin: the table at 0x8000
    for data, words in ((b"\x00" * 4096, "not an ESP32 app image"),
                        (bytes(combined), "whole-flash image"), (b"", "empty")):
        answer = upload(client, admin, kind="image", version="1.0.0",
                        files={"firmware.bin": data})
        assert answer.status_code == 422 and words in refusal(answer)[1], answer.text
    two = upload(client, admin, kind="image", version="1.0.0",
                 files={"a.bin": an_image(), "b.bin": an_image()})
    assert two.status_code == 422 and "one file" in refusal(two)[1]


def test_the_same_version_twice_is_refused_as_versions_compare(client, session, admin):
    assert upload(client, admin, version="0.2.0").status_code == 201

    for same in ("0.2.0", "0.2", "v0.2.0", "0.2.0.0"):
        again = upload(client, admin, version=same)
        assert again.status_code == 409, same
        assert "bundle 0.2.0 is released already" in again.json()["detail"]
    # Another kind, and versions that only string comparison would confuse, are new.
    assert upload(client, admin, kind="image", version="0.2.0",
                  files={"micropython.bin": an_image()}).status_code == 201
    assert upload(client, admin, version="0.10.0").status_code == 201
    assert upload(client, admin, version="0.2.0rc1").status_code == 201
    assert releases_stored(session) == 4
    found = client.get("/api/releases", headers=admin, params={"version": "0.2"}).json()
    assert sorted(item["kind"] for item in found["items"]) == ["bundle", "image"]


@pytest.mark.parametrize("version", ["", "latest", "1.0-beta-final", "1" * 33, "1.0 ; rm"])
def test_a_version_that_is_not_a_version_is_refused(client, session, admin, version):
    answer = upload(client, admin, version=version)
    assert answer.status_code == 422 and refusal(answer)[0] == "version", answer.text
    assert releases_stored(session) == 0


def test_the_longest_version_a_node_can_announce_is_taken(client, session, admin):
    longest = "1." + "2" * 30  # 32 characters: the HELLO's room for it (firmware/node/table.py)
    assert upload(client, admin, version=longest).status_code == 201
    assert releases_stored(session) == 1


def test_an_upload_that_is_not_a_release_is_refused_and_leaves_nothing(client, session, app,
                                                                       admin):
    empty = client.post("/api/releases", headers=admin,
                        files=[("kind", (None, "bundle")), ("version", (None, "0.2.0"))])
    assert empty.status_code == 422 and refusal(empty) == (
        "file", "no files: send the image, or the bundle's files each with its board path as "
        "its file name")
    twice = client.post("/api/releases", headers=admin, data={"kind": "bundle", "version": "1"},
                        files=[("file", ("/lib/wire.mpy", b"a")),
                               ("file", ("/lib/wire.mpy", b"b"))])
    assert twice.status_code == 422 and "given twice" in refusal(twice)[1]
    unknown = client.post("/api/releases", headers=admin, data={
        "kind": "bundle", "version": "1", "uploaded_by": "someone else"},
        files=[("file", ("/lib/wire.mpy", b"a"))])
    assert unknown.status_code == 422 and refusal(unknown)[0] == "uploaded_by"
    kind = upload(client, admin, kind="firmware")
    assert kind.status_code == 422 and refusal(kind)[0] == "kind"
    json_body = client.post("/api/releases", headers=admin, json={"kind": "bundle"})
    assert json_body.status_code == 415
    cut = client.post("/api/releases", headers=admin | {
        "Content-Type": "multipart/form-data; boundary=xyz"},
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="/a.mpy"\r\n'
                b"\r\nhalf a file")
    assert cut.status_code == 422 and "ended before" in refusal(cut)[1]
    too_many = {f"/lib/m{i}.mpy": b"" for i in range(release_manifest.MAX_FILES + 1)}
    many = upload(client, admin, files=too_many)
    assert many.status_code == 422 and "at most 255 files" in refusal(many)[1]
    assert releases_stored(session) == 0 and incoming(app) == []


# ---- size: bounded by the limit, streamed to disk, never held whole in memory

BOUNDARY = b"kinhbac-test-boundary"
CHUNK = 64 * 1024


def _part(name: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return b"--" + BOUNDARY + f"\r\nContent-Disposition: {disposition}\r\n\r\n".encode()


def _streamed(fields: dict[str, str], file_bytes: int | None) -> Iterator[bytes]:
    """A multipart body made as it is sent: `fields`, then a file of `file_bytes` (None: one
    that never ends), so that the test holds no more of it than the app does."""
    for name, value in fields.items():
        yield _part(name) + value.encode() + b"\r\n"
    yield _part("file", "micropython.bin")
    sent = 0
    while file_bytes is None or sent < file_bytes:
        size = CHUNK if file_bytes is None else min(CHUNK, file_bytes - sent)
        chunk = bytes(size)
        yield bytes([releases.IMAGE_MAGIC]) + chunk[1:] if sent == 0 else chunk
        sent += size
    yield b"\r\n--" + BOUNDARY + b"--\r\n"


def _call(app, token: str, body: Iterable[bytes],
          length: int | None = None) -> tuple[int, bytes, int]:
    """POST the body to the app as a server would, a chunk at a time: the answer's status and
    body, and how many bytes the app pulled in."""
    chunks = iter(body)
    pulled = 0
    answer: dict[str, object] = {"body": b""}

    async def receive() -> dict:
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    headers = [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode()),
               (b"content-type", b"multipart/form-data; boundary=" + BOUNDARY)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/api/releases",
             "raw_path": b"/api/releases", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    return answer["status"], answer["body"], pulled


def test_a_huge_upload_is_refused_at_the_limit_without_reading_on(session, app):
    _, token = make_user(session, Role.admin)
    limit = app.state.settings.release_max_upload_bytes
    assert limit == 2 * 1024 * 1024  # the default: what the reverse proxies in deploy/ pass

    # No kind (nothing to refuse it by earlier) and no end: only the limit stops it.
    status, body, pulled = _call(app, token, _streamed({"version": "9.9.9"}, None))

    assert status == 413, body
    assert limit < pulled <= limit + CHUNK + 1024  # the chunk that crossed it, no more
    assert releases_stored(session) == 0 and incoming(app) == []

    # Announced in advance: refused before a byte is read.
    status, _, pulled = _call(app, token, _streamed({"version": "9.9.9"}, None),
                              length=10 * 1024**3)
    assert (status, pulled) == (413, 0)


@pytest.mark.parametrize("role", [Role.technician, Role.viewer])
def test_a_non_admins_upload_is_refused_before_a_byte_of_it_is_read(session, app, role):
    _, token = make_user(session, role)

    status, _, pulled = _call(app, token, _streamed({"kind": "image"}, None))

    assert (status, pulled) == (403, 0)


def test_an_image_is_refused_at_the_first_byte_past_the_slot(session, app):
    _, token = make_user(session, Role.admin)

    status, body, pulled = _call(app, token, _streamed(
        {"kind": "image", "version": "9.9.9"}, 100 * releases.SLOT_BYTES))

    assert status == 422 and b"larger than the OTA slot" in body
    assert pulled <= releases.SLOT_BYTES + CHUNK + 1024
    assert incoming(app) == []


def test_an_upload_goes_to_disk_as_it_arrives_not_into_memory(session, app):
    _, token = make_user(session, Role.admin)
    _call(app, token, _streamed({"kind": "image", "version": "0.0.1"}, 4096))  # warm up

    tracemalloc.start()
    try:
        status, body, _ = _call(app, token, _streamed({"kind": "image", "version": "0.0.2"},
                                                      releases.SLOT_BYTES))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert status == 201, body
    assert peak < releases.SLOT_BYTES / 2  # a 1.5 MiB image held whole would be above


# ---- the signing key's file


@contextmanager
def signing_with(app, path: Path) -> Iterator[None]:
    """The app signs with the key file at `path` meanwhile (as an instance set up so would)."""
    kept = app.state.release_signer
    app.state.release_signer = ReleaseSigner(path)
    try:
        yield
    finally:
        app.state.release_signer = kept


def test_a_signing_key_file_others_may_read_is_refused_clearly(client, session, app, admin,
                                                               tmp_path):
    path = tmp_path / "data" / KEY_FILE
    ReleaseSigner(path).public_key()  # made on first use
    path.chmod(0o644)

    with signing_with(app, path):
        answer = upload(client, admin)

    assert answer.status_code == 503
    assert "may be read or changed by others (mode 0644)" in answer.json()["detail"]
    assert f"chmod 600 {path}" in answer.json()["detail"]
    assert releases_stored(session) == 0
    with pytest.raises(SigningKeyError, match="mode 0644"):
        ReleaseSigner(path).sign(b"anything")
    path.chmod(0o600)
    with signing_with(app, path):
        assert upload(client, admin).status_code == 201


def test_the_key_file_is_made_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        signer = ReleaseSigner(tmp_path / "fresh" / KEY_FILE)
        signer.sign(b"first use")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "fresh" / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == [KEY_FILE]  # no temporary left
    # Made once: a second signer (another instance on the same folder) uses the same key.
    assert ReleaseSigner(tmp_path / "fresh" / KEY_FILE).public_key() == signer.public_key()


def test_an_instance_with_another_signing_key_refuses_to_sign(client, session, app, admin,
                                                              tmp_path):
    assert upload(client, admin).status_code == 201

    with signing_with(app, tmp_path / KEY_FILE):
        answer = upload(client, admin, version="0.3.0")

    assert answer.status_code == 503
    assert "every instance needs the same key file" in answer.json()["detail"]
    assert releases_stored(session) == 1
