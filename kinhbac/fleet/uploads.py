"""Receiving a multipart/form-data upload straight to disk, part by part, within limits.

Starlette's `request.form()` parses the whole body before the route sees any of it, keeps up to
1 MiB of each file in memory and has no say over what a part may hold. Here each file part is
written to an artifact store's incoming file as it arrives, so a request holds one network
chunk in memory whatever its size, and a part that breaks a rule (an unknown field, too many
files, a file too large for what it is) ends the request at that byte, not after the body.
The request's total size is bounded before this runs (kinhbac/fleet/http_hygiene.py).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from kinhbac.fleet.artifacts import ArtifactStore, Incoming

MAX_FIELD_BYTES = 1024  # a text field (a kind, a version); files are the only large parts
MAX_FILENAME_BYTES = 1024  # a board path is at most 255; longer is refused by name, not here


class UploadRefused(Exception):
    """The upload breaks a rule; `status` is the HTTP answer, `field` the form field."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


@dataclass
class ReceivedFile:
    name: str  # the part's filename, as sent
    incoming: Incoming

    @property
    def size(self) -> int:
        return self.incoming.size

    @property
    def sha256(self) -> str:
        return self.incoming.sha256


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[ReceivedFile] = field(default_factory=list)

    def discard(self) -> None:
        for received in self.files:
            received.incoming.discard()


# Called with the text fields received so far, a file part's name and its size so far, as each
# piece of it arrives; raises UploadRefused to end the upload there.
FileCheck = Callable[[dict[str, str], str, int], None]


class _Receiver:
    """python-multipart's callbacks: each part to a text field or an incoming file."""

    def __init__(self, store: ArtifactStore, *, fields: frozenset[str], file_field: str,
                 max_files: int, check_file: FileCheck) -> None:
        self.store = store
        self.allowed = fields
        self.file_field = file_field
        self.max_files = max_files
        self.check_file = check_file
        self.upload = Upload()
        self.ended = False
        self._disposition = b""
        self._header_name = b""
        self._header_value = b""
        self._name = ""
        self._text: bytearray | None = None
        self._file: ReceivedFile | None = None

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._text = None
        self._file = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        kind, options = parse_options_header(self._disposition)
        if kind != b"form-data" or b"name" not in options:
            raise UploadRefused(422, "body", "every part needs Content-Disposition: form-data "
                                "with a name")
        name = _text(options[b"name"], "a part's name", "body")
        self._name = name
        if b"filename" in options:
            if name != self.file_field:
                raise UploadRefused(422, name, f"{name!r} is not a file field: send files as "
                                    f"{self.file_field!r}")
            if len(self.upload.files) >= self.max_files:
                raise UploadRefused(422, name, f"at most {self.max_files} files in one upload")
            filename = _text(options[b"filename"], "a file's name", name)
            if len(filename.encode()) > MAX_FILENAME_BYTES:
                raise UploadRefused(422, name, f"a file's name is at most {MAX_FILENAME_BYTES} "
                                    "bytes")
            self._file = ReceivedFile(filename, self.store.incoming())
            self.upload.files.append(self._file)  # discarded with the upload if it fails
            self.check_file(self.upload.fields, filename, 0)
        else:
            if name == self.file_field:
                raise UploadRefused(422, name, f"{name!r} must be a file (a part with a "
                                    "filename)")
            if name not in self.allowed:
                raise UploadRefused(422, name, f"unknown field {name!r}: the fields are "
                                    f"{', '.join(sorted(self.allowed | {self.file_field}))}")
            if name in self.upload.fields:
                raise UploadRefused(422, name, f"{name!r} is given twice")
            self._text = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.incoming.write(data[start:end])
            self.check_file(self.upload.fields, self._file.name, self._file.size)
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > MAX_FIELD_BYTES:
                raise UploadRefused(422, self._name, f"{self._name!r} is longer than "
                                    f"{MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self._text is not None:
            self.upload.fields[self._name] = _text(bytes(self._text), repr(self._name),
                                                   self._name)
        self._text = None
        self._file = None

    def on_end(self) -> None:
        self.ended = True


def _text(raw: bytes, what: str, field: str) -> str:
    """A field's value or a header parameter (the header's own bytes): UTF-8, as browsers,
    curl and httpx send them."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UploadRefused(422, field, f"{what} is not UTF-8") from None
    if "\x00" in text:
        raise UploadRefused(422, field, f"{what} contains a NUL character")
    return text


async def receive(request: Request, store: ArtifactStore, *, fields: frozenset[str],
                  file_field: str, max_files: int, check_file: FileCheck) -> Upload:
    """The request's multipart body: its text `fields` and its `file_field` parts, the files
    already on disk (incoming, not kept). UploadRefused for a body that breaks a rule; nothing
    is left on disk then."""
    media_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise UploadRefused(415, "body", "send the upload as multipart/form-data (this "
                            f"request's Content-Type is {media_type.decode() or 'missing'!r})")
    receiver = _Receiver(store, fields=fields, file_field=file_field, max_files=max_files,
                         check_file=check_file)
    callbacks = {name: getattr(receiver, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end",
        "on_headers_finished", "on_part_data", "on_part_end", "on_end")}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            if chunk:
                # The callbacks write to disk: on a worker thread, never the event loop's.
                await run_in_threadpool(parser.write, chunk)
        if not receiver.ended:
            raise UploadRefused(422, "body", "the multipart body ended before its closing "
                                "boundary")
    except BaseException as exc:
        # On this thread: closing and unlinking (no fsync) is quick, and a cancelled request
        # could not wait for a worker thread.
        receiver.upload.discard()
        if isinstance(exc, ValueError):  # python-multipart's MultipartParseError
            raise UploadRefused(422, "body", f"not a well-formed multipart body ({exc})") \
                from exc
        raise  # UploadRefused, ClientDisconnect (cut by the body limit), cancellation
    return receiver.upload
