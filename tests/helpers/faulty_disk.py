"""A disk that misbehaves as an ageing SD card does, under the gateway's real SQLite.

`FaultyDisk` is an SQLite VFS (through apsw) that passes every call to the real unix VFS and,
when told, makes fsyncs fail with EIO (after a stall, as a card retrying internally does), makes
writes fail with ENOSPC, or stalls fsyncs without failing them. Registered as the default VFS,
it sits under every connection the queue opens, so the gateway's own code meets the faults
where it would meet them on a Pi: in SQLite's commit.

    with FaultyDisk() as disk:
        ...start the gateway...
        disk.fail_syncs(1, stall_s=0.3)   # the next fsync stalls, then fails with EIO
        disk.fill()                        # every write of new data fails with ENOSPC
        disk.free()
"""

import threading
import time

import apsw

_NAME = "kinhbac-faulty-disk"


class FaultyDisk(apsw.VFS):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sync_failures = 0
        self._sync_stall_s = 0.0
        self._stall_only_s = 0.0
        self._full = False
        self.syncs = 0
        self.failed_syncs = 0
        self.failed_writes = 0
        super().__init__(_NAME, "unix", makedefault=True)

    # ----- what a test says -----

    def fail_syncs(self, count: int, *, stall_s: float = 0.0) -> None:
        """The next `count` fsyncs wait `stall_s`, then fail with EIO."""
        with self._lock:
            self._sync_failures = count
            self._sync_stall_s = stall_s

    def stall_syncs(self, seconds: float) -> None:
        """Every fsync takes `seconds` longer, and succeeds (0: no stall)."""
        self._stall_only_s = seconds

    def fill(self) -> None:
        """From now on, writes past the end of a file (new space) fail with ENOSPC."""
        self._full = True

    def free(self) -> None:
        self._full = False

    def __enter__(self) -> "FaultyDisk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unregister()

    # ----- the VFS -----

    def xOpen(self, name, flags):
        return _File(self, name, flags)

    def _sync(self) -> None:
        with self._lock:
            self.syncs += 1
            failing = self._sync_failures > 0
            if failing:
                self._sync_failures -= 1
                self.failed_syncs += 1
            stall = self._sync_stall_s if failing else self._stall_only_s
        if stall:
            time.sleep(stall)
        if failing:
            error = apsw.IOError("fsync: EIO (injected)")
            error.extendedresult = apsw.SQLITE_IOERR_FSYNC
            raise error


class _File(apsw.VFSFile):
    def __init__(self, disk: FaultyDisk, name, flags) -> None:
        self._disk = disk
        super().__init__("unix", name, flags)

    def xSync(self, flags):
        self._disk._sync()
        return super().xSync(flags)

    def xWrite(self, data, offset):
        if self._disk._full and offset + len(data) > self.xFileSize():
            self._disk.failed_writes += 1
            raise apsw.FullError("write: ENOSPC (injected)")
        return super().xWrite(data, offset)
