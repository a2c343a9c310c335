"""`kinhbac release ...`: upload, list and show the fleet's releases (admins). Plain output
for people, `--json` for scripts; progress and messages go to stderr so that stdout stays
parseable.

Exit codes: 0 done; 1 failed (the message says what to do next); 2 wrong usage.
"""

import hashlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kinhbac.admin.errors import AdminToolError
from kinhbac.fleet_client_setup import (
    EXIT_FAILED,
    EXIT_USAGE,
    FleetUrl,
    Json,
    command_failure,
    fleet_session,
    print_json,
)
from kinhbac.fleet_client_setup import AdminToken as Token

if TYPE_CHECKING:  # httpx is imported by the commands, not by `kinhbac`
    from kinhbac.admin.client import AdminClient, LocalFile

release_app = typer.Typer(
    help="Firmware releases in the fleet: upload, list, show (admins; admin extra).",
    no_args_is_help=True,
)


def admin_session(command: str, url: str | None, token: str | None
                  ) -> AbstractContextManager["AdminClient"]:
    """An admin's client for `kinhbac <command>`; every AdminToolError while it is open
    becomes one clear line and exit 1."""
    def connect() -> "AdminClient":
        from kinhbac.admin.client import AdminClient

        return AdminClient(url, token)

    return fleet_session(command, connect, AdminToolError, extra="admin")


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    return command_failure("release", message, code)


def _fleet(url: str | None, token: str | None) -> AbstractContextManager["AdminClient"]:
    """A fleet client; every AdminToolError inside becomes one clear line and exit 1."""
    return admin_session("release", url, token)


def when(iso: str) -> str:
    """An API time (UTC) as people read it: 2026-12-06 10:00:00Z."""
    return iso[:19].replace("T", " ") + "Z"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / 1024 / 1024:.2f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


# ----- which files go up


def _bundle_files(sources: list[str]) -> tuple[list["LocalFile"], list[Path]]:
    """The bundle's files from `sources`: a folder (each file under it goes to the same path
    under /, as the board's filesystem lays them out) or FILE=/board/path. Also the hidden
    files and __pycache__ folders left out of folders."""
    from kinhbac.admin.client import LocalFile

    files: list[LocalFile] = []
    skipped: list[Path] = []
    for source in sources:
        local, sep, board_path = source.partition("=")
        path = Path(local)
        if sep:
            if not path.is_file():
                raise _fail(f"{local}: no such file", EXIT_USAGE)
            files.append(LocalFile(path, board_path, path.stat().st_size))
        elif path.is_dir():
            for found in sorted(p for p in path.rglob("*") if p.is_file()):
                relative = found.relative_to(path)
                if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
                    skipped.append(found)
                    continue
                files.append(LocalFile(found, "/" + relative.as_posix(), found.stat().st_size))
        elif path.is_file():
            raise _fail(f"{local}: say where it goes on the board ({local}=/lib/node/"
                        f"{path.name}), or give a folder laid out as the board's filesystem",
                        EXIT_USAGE)
        else:
            raise _fail(f"{local}: no such file or folder", EXIT_USAGE)
    return files, skipped


def _image_file(sources: list[str]) -> "LocalFile":
    from kinhbac.admin.client import LocalFile

    if len(sources) != 1 or "=" in sources[0] or not Path(sources[0]).is_file():
        raise _fail("an image release is one file: the build's micropython.bin (the app, not "
                    "firmware.bin with the bootloader)", EXIT_USAGE)
    path = Path(sources[0])
    return LocalFile(path, None, path.stat().st_size)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


# ----- upload / list / show


@release_app.command("upload")
def upload(
    kind: Annotated[str, typer.Argument(help="bundle (the app's files) or image (one "
                                        "MicroPython app image).", show_default=False)],
    version: Annotated[str, typer.Argument(help="Its version, e.g. 0.2.0 (compared as a "
                                           "version: 0.10.0 is after 0.9.1).",
                                           show_default=False)],
    sources: Annotated[list[str], typer.Argument(
        help="An image: its file. A bundle: a folder laid out as the board's filesystem "
        "(build/app/lib/node/app.mpy goes to /lib/node/app.mpy), or FILE=/board/path, "
        "as many as needed.", show_default=False)],
    fleet_url: FleetUrl = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Upload a release: the fleet checks it, keeps its files and signs its manifest."""
    if kind not in ("bundle", "image"):
        raise _fail(f"the kind is bundle or image, not {kind!r}", EXIT_USAGE)
    if kind == "image":
        files = [_image_file(sources)]
    else:
        files, skipped = _bundle_files(sources)
        for left_out in skipped:
            typer.echo(f"kinhbac release: left out {left_out} (hidden or __pycache__)", err=True)
        if not files:
            raise _fail("no files to upload: give a folder with the bundle's files, or "
                        "FILE=/board/path", EXIT_USAGE)
    sent_hashes = {(f.board_path, f.size): _sha256(f.source) for f in files}

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    total = sum(f.size for f in files)
    with _fleet(fleet_url, token) as fleet, Progress(
            TextColumn("uploading {task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"{kind} {version} ({_count(len(files), 'file')})",
                                 total=total)
        release = fleet.upload_release(kind, version, files,
                                       lambda sent: progress.advance(task, sent))
    # The fleet's manifest must list what was sent: a file changed on the way would be signed
    # as it arrived.
    received = {(f["path"] if kind == "bundle" else None, f["size"]): f["sha256"]
                for f in release["files"]}
    if received != sent_hashes:
        raise _fail(f"the fleet stored release {release['id']} with files other than the ones "
                    "sent (sizes or SHA-256 differ): do not roll it out; tell the fleet's "
                    "operator")
    if as_json:
        print_json(release)
        return
    typer.echo(f"released {release['kind']} {release['version']} as {release['id']}: "
               f"{_count(len(release['files']), 'file')}, {_size(release['size'])}, signed")


@release_app.command("list")
def list_releases(
    kind: Annotated[str | None, typer.Option(help="Only bundles or only images.")] = None,
    version: Annotated[str | None, typer.Option(help="Only this version.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many.")] = None,
    fleet_url: FleetUrl = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """The fleet's releases, newest first, one a line."""
    with _fleet(fleet_url, token) as fleet:
        found = fleet.releases(kind=kind, version=version, limit=limit)
    if as_json:
        print_json(found)
        return
    if not found:
        typer.echo("no releases match", err=True)
        return
    header = ("ID", "KIND", "VERSION", "FILES", "SIZE", "CREATED", "BY")
    rows = [(r["id"], r["kind"], r["version"], str(len(r["files"])), _size(r["size"]),
             when(r["created_at"]), r["uploaded_by"]) for r in found]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@release_app.command("show")
def show(
    release: Annotated[str, typer.Argument(help="The release's id, or its version.",
                                           show_default=False)],
    kind: Annotated[str | None, typer.Option(
        help="bundle or image, when both have that version.")] = None,
    fleet_url: FleetUrl = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """One release: its files, its signed manifest and the key that signed it."""
    from kinhbac.release_manifest import fingerprint

    with _fleet(fleet_url, token) as fleet:
        found = fleet.find_release(release, kind)
    if as_json:
        print_json(found)
        return
    for name, value in (
        ("id", found["id"]), ("kind", found["kind"]), ("version", found["version"]),
        ("created", when(found["created_at"])), ("uploaded by", found["uploaded_by"]),
        ("size", f"{found['size']:,} bytes"),
        ("signed by", f"key {fingerprint(found['signing_key'])} ({found['signing_key']})"),
        ("signature", found["signature"]),
    ):
        typer.echo(f"{name + ':':<13}{value}")
    typer.echo("files:")
    width = max(len(f["path"]) for f in found["files"])
    for f in found["files"]:
        typer.echo(f"  {f['path']:<{width}}  {f['size']:>9,}  {f['sha256']}")
    typer.echo(f"manifest:    {found['manifest']}")
