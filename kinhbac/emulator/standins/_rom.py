# The emulated board's ROM and start-up code: what the ESP32 port's bootloader, _boot.py and
# pyexec do before the REPL. It mounts the littlefs in the flash image's "vfs" partition at /,
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

_FRESH_BOOT_PY = """# This file is executed on every boot (including wake-boot from deepsleep)
#import esp
#esp.osdebug(None)
#import webrepl
#webrepl.start()
"""


def _mount_flash():
    bdev = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="vfs")[0]
    try:
        vfs.mount(bdev, "/")
    except OSError:
        # A blank flash: format it and write the default boot.py, as inisetup.py does.
        print("Performing initial setup")
        vfs.VfsLfs2.mkfs(bdev)
        vfs.mount(vfs.VfsLfs2(bdev), "/")
        with open("/boot.py", "w") as f:
            f.write(_FRESH_BOOT_PY)
    os.chdir("/")
    sys.path[:] = ["", ".frozen", "/lib"]


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


_mount_flash()
gc.collect()
if _run_if_exists("boot.py"):
    _run_if_exists("main.py")
del _mount_flash, _run_if_exists, _FRESH_BOOT_PY
gc.collect()
