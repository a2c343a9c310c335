# The emulated board's ROM and start-up code: what the ESP32 port's bootloader, _boot.py and
# pyexec do before the REPL. It mounts the littlefs in the flash image's "vfs" partition at /
# (or, as the port's inisetup.py, formats a blank one, or reports a corrupted one for ever),
# then runs boot.py and main.py from it; the REPL follows (micropython runs this file with -i).
import sys
import gc
import _hw

_hw.start()
import _flash

_flash.open_image()
# Import every stand-in now: once the flash is mounted at / the host's files are out of reach.
import machine  # noqa: E402
import network  # noqa: E402,F401
import esp32  # noqa: E402
import socket  # noqa: E402,F401
import vfs  # noqa: E402
import os  # noqa: E402

_hw.call(_hw.OP_ROM_READY)  # Ctrl-C interrupts from here, as on a chip from _boot.py


def _boot():
    # The port's frozen _boot.py (ports/esp32/modules/_boot.py:5-11), its block device from
    # flashbdev.py:4-7: mount "vfs" at /; when that fails, inisetup formats a blank partition
    # or reports a corrupted one for ever. True once a filesystem is mounted at /.
    found = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="vfs")
    bdev = found[0] if found else None
    try:
        if bdev:
            vfs.mount(bdev, "/")
            return True
    except OSError:
        import inisetup

        try:
            inisetup.setup(bdev)
        finally:
            del sys.modules["inisetup"]  # frozen on a chip, where its code takes no heap
        return True
    return False


def _run_if_exists(name):
    try:
        os.stat(name)
    except OSError:
        return True
    try:
        execfile(name, globals())  # noqa: F821 (a MicroPython builtin)
    except KeyboardInterrupt as e:
        sys.print_exception(e)
        return False
    except Exception as e:
        sys.print_exception(e)
    return True


try:
    _mounted = _boot()
except KeyboardInterrupt as e:
    # Ctrl-C out of inisetup's "corrupted" loop: the port prints it (pyexec) and goes on to
    # boot.py and main.py, which it cannot find with nothing mounted (ports/esp32/main.c:143-152).
    sys.print_exception(e)
    _mounted = False
if not _mounted:
    vfs.umount("/")  # the host's own filesystem, which the unix port mounts: a chip has none
os.chdir("/")
sys.path[:] = ["", ".frozen", "/lib"]
gc.collect()
if _run_if_exists("boot.py"):
    _run_if_exists("main.py")
del _boot, _run_if_exists, _mounted
gc.collect()
