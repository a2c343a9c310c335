"""Running code and moving files on a MicroPython board through its raw REPL.

The protocol (MicroPython docs, reference/repl.rst): Ctrl-A enters raw mode; the host sends
code ending in Ctrl-D; the board answers "OK", the code's output up to Ctrl-D, its error text up
to Ctrl-D, then ">". Raw-paste mode adds flow control so that code can be sent at full speed.

Every file operation is expressed as code run on the board, so the same class serves any link
that can carry bytes: a USB serial port, or an emulated board's pty.
"""

import ast
import time
from collections.abc import Callable
from typing import Protocol

CTRL_A = b"\x01"
CTRL_B = b"\x02"
CTRL_C = b"\x03"
CTRL_D = b"\x04"
RAW_PROMPT = b"raw REPL; CTRL-B to exit\r\n>"
SOFT_REBOOT = b"soft reboot\r\n"

# Plain raw mode has no flow control: send in small pieces, pausing, as mpremote does.
PLAIN_CHUNK = 256
PLAIN_PAUSE_S = 0.01
# Files travel as bytes literals in code; this size keeps each exec small for a 100 KB heap.
FILE_CHUNK = 512


class Link(Protocol):
    """A byte pipe to the board (serial port, pty)."""

    def write(self, data: bytes) -> int | None: ...

    def read(self, size: int = 1) -> bytes: ...

    @property
    def in_waiting(self) -> int: ...

    def reset_input_buffer(self) -> None: ...


class TransportError(Exception):
    """The board did not answer as the raw REPL protocol says it should."""


class RemoteError(TransportError):
    """Code run on the board raised an exception; `traceback` holds the board's text."""

    def __init__(self, message: str, traceback: str) -> None:
        super().__init__(message)
        self.traceback = traceback


class RawRepl:
    """A raw-REPL session on one board."""

    def __init__(self, link: Link, *, default_timeout: float = 10.0) -> None:
        self.link = link
        self.default_timeout = default_timeout
        self.in_raw_repl = False
        self.use_raw_paste = True
        self._pending = bytearray()  # bytes read from the link but not yet consumed

    # ----- the protocol -----

    def _fill(self, deadline: float, waiting_for: bytes) -> None:
        if time.monotonic() > deadline:
            raise TransportError(
                f"timed out waiting for {waiting_for!r} from the board; "
                f"got {bytes(self._pending[-200:])!r}"
            )
        self._pending += self.link.read(max(1, min(self.link.in_waiting, 4096)))

    def read_until(self, ending: bytes, timeout: float | None = None) -> bytes:
        """Read up to and including `ending`; raise TransportError if it never comes."""
        deadline = time.monotonic() + (self.default_timeout if timeout is None else timeout)
        while (found := self._pending.find(ending)) < 0:
            self._fill(deadline, ending)
        end = found + len(ending)
        data = bytes(self._pending[:end])
        del self._pending[:end]
        return data

    def read_exactly(self, n: int, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self._pending) < n:
            self._fill(deadline, b"%d bytes" % n)
        data = bytes(self._pending[:n])
        del self._pending[:n]
        return data

    def discard_input(self) -> None:
        self.link.reset_input_buffer()
        self._pending.clear()

    def enter_raw_repl(self, soft_reset: bool = False) -> None:
        """Interrupt whatever runs and switch to the raw REPL."""
        self.link.write(b"\r" + CTRL_C)
        time.sleep(0.1)
        self.link.write(CTRL_C)  # a second one, for code that catches the first
        time.sleep(0.1)
        self.discard_input()
        self.link.write(b"\r" + CTRL_A)
        self.read_until(RAW_PROMPT, timeout=5)
        if soft_reset:
            self.link.write(CTRL_D)
            self.read_until(SOFT_REBOOT, timeout=10)
            # After the reboot the board is at the friendly REPL (or running main.py): re-enter.
            self.link.write(b"\r" + CTRL_C)
            time.sleep(0.1)
            self.discard_input()
            self.link.write(b"\r" + CTRL_A)
            self.read_until(RAW_PROMPT, timeout=5)
        self.in_raw_repl = True

    def exit_raw_repl(self) -> None:
        self.link.write(b"\r" + CTRL_B)
        self.in_raw_repl = False

    def _send_raw_paste(self, code: bytes) -> bool:
        """Send `code` in raw-paste mode; False if the board does not offer it."""
        self.link.write(b"\x05A\x01")
        answer = self.read_exactly(2)
        if answer == b"R\x00":
            return False
        if answer != b"R\x01":
            # A firmware without raw-paste took the request as a new raw-REPL entry: it is
            # printing the banner again. Wait for its prompt, then send in plain raw mode.
            self.read_until(b"w REPL; CTRL-B to exit\r\n>", timeout=5)
            return False
        window = int.from_bytes(self.read_exactly(2), "little")
        credit = window
        sent = 0
        while sent < len(code):
            while credit == 0 or self._pending or self.link.in_waiting:
                flag = self.read_exactly(1)
                if flag == b"\x01":
                    credit += window
                elif flag == b"\x04":
                    self.link.write(CTRL_D)  # the board stopped the transfer (syntax error)
                    return True
                else:
                    raise TransportError(f"unexpected {flag!r} during raw-paste")
            n = min(credit, len(code) - sent)
            self.link.write(code[sent : sent + n])
            sent += n
            credit -= n
        self.link.write(CTRL_D)
        self.read_until(CTRL_D, timeout=5)  # the board acknowledges the end of the code
        return True

    def _send_plain(self, code: bytes) -> None:
        for i in range(0, len(code), PLAIN_CHUNK):
            self.link.write(code[i : i + PLAIN_CHUNK])
            time.sleep(PLAIN_PAUSE_S)
        self.link.write(CTRL_D)
        if self.read_until(b"OK", timeout=5)[-2:] != b"OK":
            raise TransportError("the board did not accept the code")

    def exec_raw(self, code: str | bytes, timeout: float | None = None) -> tuple[bytes, bytes]:
        """Run code; return (stdout, error text) as the board sent them."""
        if not self.in_raw_repl:
            self.enter_raw_repl()
        data = code.encode() if isinstance(code, str) else code
        if not (self.use_raw_paste and self._send_raw_paste(data)):
            self.use_raw_paste = False
            self._send_plain(data)
        out = self.read_until(CTRL_D, timeout)[:-1]
        err = self.read_until(CTRL_D, timeout)[:-1]
        self.read_until(b">", timeout)
        return out, err

    def exec(self, code: str | bytes, timeout: float | None = None) -> bytes:
        """Run code; return its output, or raise RemoteError with the board's traceback."""
        out, err = self.exec_raw(code, timeout)
        if err:
            text = err.decode(errors="replace")
            last = text.strip().splitlines()[-1] if text.strip() else text
            raise RemoteError(f"the board raised: {last}", text)
        return out

    def eval(self, expression: str, timeout: float | None = None) -> object:
        """Evaluate an expression on the board and return its value (plain literals only)."""
        out = self.exec(f"print(repr({expression}))", timeout)
        return ast.literal_eval(out.decode().strip())

    # ----- files -----

    def fs_put(
        self,
        data: bytes,
        path: str,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Write a file atomically: into a temporary file first, then rename over the target."""
        tmp = path + ".part"
        self.exec(f"f=open({tmp!r},'wb')")
        try:
            for i in range(0, len(data), FILE_CHUNK):
                self.exec(f"f.write({data[i : i + FILE_CHUNK]!r})")
                if progress:
                    progress(min(i + FILE_CHUNK, len(data)), len(data))
            self.exec(f"f.close()\nimport os\nos.rename({tmp!r},{path!r})")
        except BaseException:
            self.exec_raw(f"f.close()\nimport os\nos.remove({tmp!r})")
            raise
        if progress and not data:
            progress(0, 0)

    def fs_get(self, path: str) -> bytes:
        """Read a whole file from the board."""
        size = self.eval(f"__import__('os').stat({path!r})[6]")
        assert isinstance(size, int)
        self.exec(f"f=open({path!r},'rb')")
        data = bytearray()
        try:
            while len(data) < size:
                chunk = self.eval(f"f.read({FILE_CHUNK})")
                if not isinstance(chunk, bytes) or not chunk:
                    break
                data += chunk
        finally:
            self.exec("f.close()")
        return bytes(data)

    def fs_listdir(self, path: str = "/") -> list[str]:
        names = self.eval(f"__import__('os').listdir({path!r})")
        assert isinstance(names, list)
        return names

    def fs_mkdir(self, path: str) -> None:
        """Create a folder and its parents; an existing folder is fine."""
        self.exec(
            "import os\n"
            f"p=''\nfor part in {path!r}.strip('/').split('/'):\n"
            " p+='/'+part\n try:\n  os.mkdir(p)\n except OSError:\n  pass"
        )

    def fs_remove(self, path: str) -> None:
        self.exec(f"import os\nos.remove({path!r})")
