# The board's SPI flash: the emulator's flash image file, with NOR semantics (an erase sets a
# 4 KiB sector to 0xFF; programming can only clear bits), so that code which writes without
# erasing fails here as it would on a chip.
import _hw

SECTOR = 4096
_f = None
_scratch = bytearray(SECTOR)


def open_image():
    global _f
    _f = open(_hw.env("FLASH"), "r+b")


def read(addr, buf):
    _f.seek(addr)
    _f.readinto(buf)


def erase(addr, length):
    _f.seek(addr)
    for i in range(len(_scratch)):
        _scratch[i] = 0xFF
    while length > 0:
        n = min(length, SECTOR)
        _f.write(memoryview(_scratch)[:n])
        length -= n
    _f.flush()


def program(addr, buf):
    n = len(buf)
    done = 0
    while done < n:
        k = min(SECTOR, n - done)
        old = memoryview(_scratch)[:k]
        _f.seek(addr + done)
        _f.readinto(old)
        for i in range(k):
            old[i] &= buf[done + i]
        _f.seek(addr + done)
        _f.write(old)
        done += k
    _f.flush()


def sync():
    # Writes go straight to the image file (MicroPython's files are unbuffered), so a power cut
    # (SIGKILL) loses nothing that a real chip would have kept.
    _f.flush()
