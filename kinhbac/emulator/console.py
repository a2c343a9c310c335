"""What a board has printed on its serial port, kept so that tests and the demo can wait on it."""

import threading
import time

MAX_KEPT = 1 << 20  # keep the last MiB: enough for any test, bounded for a long demo


class Console:
    """A thread-safe, append-only record of a board's serial output."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._dropped = 0  # bytes trimmed from the front, so that marks stay valid
        self._cond = threading.Condition()

    def append(self, chunk: bytes) -> None:
        with self._cond:
            self._data += chunk
            if len(self._data) > MAX_KEPT:
                cut = len(self._data) - MAX_KEPT
                del self._data[:cut]
                self._dropped += cut
            self._cond.notify_all()

    def mark(self) -> int:
        """A position to wait from, so that earlier output cannot satisfy a later wait."""
        with self._cond:
            return self._dropped + len(self._data)

    def text(self, since: int = 0) -> str:
        with self._cond:
            start = max(0, since - self._dropped)
            return self._data[start:].decode(errors="replace")

    def wait_for(self, pattern: str | bytes, timeout: float = 10.0, since: int = 0) -> int:
        """Block until `pattern` appears after `since`; return the position just past it."""
        needle = pattern.encode() if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                start = max(0, since - self._dropped)
                found = self._data.find(needle, start)
                if found >= 0:
                    return self._dropped + found + len(needle)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = self._data[-600:].decode(errors="replace")
                    raise TimeoutError(
                        f"board never printed {needle!r} within {timeout:.1f} s; "
                        f"its last output was:\n{tail}"
                    )
                self._cond.wait(remaining)
