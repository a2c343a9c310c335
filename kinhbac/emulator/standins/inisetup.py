# The ESP32 port's inisetup.py (MicroPython v1.24.1, ports/esp32/modules/inisetup.py), which
# its _boot.py imports when the "vfs" partition does not mount. A partition whose first block
# is blank is formatted (littlefs) and given the default boot.py; any other content is taken
# for a corrupted filesystem and the board says so every 3 s for ever, never reaching boot.py
# or main.py. Written again for the emulator with the same behaviour and the same words; the
# block device is passed in (the port imports it from flashbdev.py). Only littlefs on "vfs":
# TinyUF2's "ffat" (inisetup.py:43-45) is on ESP32-S2/S3 boards, not in this flash.
import vfs
from micropython import const

_IOCTL_BLOCK_SIZE = const(5)  # the port's comment says "SEC_SIZE"; it is the block size, 4096
_ERASED = const(0xFF)

# inisetup.py:50-54, byte for byte.
BOOT_PY = """\
# This file is executed on every boot (including wake-boot from deepsleep)
#import esp
#esp.osdebug(None)
#import webrepl
#webrepl.start()
"""

# inisetup.py:28-31; print() adds the newline after the last one.
CORRUPTED = """\
The filesystem appears to be corrupted. If you had important data there, you
may want to make a flash snapshot to try to recover it. Otherwise, perform
factory reprogramming of MicroPython firmware (completely erase flash, followed
by firmware programming).
"""


def first_block_blank(bdev):
    # inisetup.py:6-12: one block (ioctl 5), block 0 of the partition, all 0xFF. Nothing else
    # of the partition is looked at.
    buf = bytearray(bdev.ioctl(_IOCTL_BLOCK_SIZE, 0))
    bdev.readblocks(0, buf)
    for b in buf:
        if b != _ERASED:
            return False
    return True


def check_bootsec(bdev):
    # inisetup.py:5-15
    if first_block_blank(bdev):
        return True
    fs_corrupted()


def fs_corrupted():
    # inisetup.py:18-34: Ctrl-C ends the loop (a KeyboardInterrupt out of _boot.py); nothing
    # else does.
    import time
    import micropython

    micropython.kbd_intr(3)
    while 1:
        print(CORRUPTED)
        time.sleep(3)


def setup(bdev):
    # inisetup.py:37-57. The port writes "boot.py" relative to the new mount, which is "/".
    check_bootsec(bdev)
    print("Performing initial setup")
    vfs.VfsLfs2.mkfs(bdev)
    fs = vfs.VfsLfs2(bdev)
    vfs.mount(fs, "/")
    with open("/boot.py", "w") as f:
        f.write(BOOT_PY)
    return fs
