# The board's SPI flash: the emulator's flash image file, with NOR semantics (an erase sets a
# 4 KiB sector to 0xFF; programming can only clear bits), so that code which writes without
# erasing fails here as it would on a chip. Each sector erase stalls the CPU for the chip's
# typical erase time (45 ms: Winbond W25Q32JV datasheet, tSE typ 45 ms, max 400 ms; the
# emulated flash answers that chip's JEDEC id), with the cache off: no Python runs meanwhile
# and each pin's interrupt keeps one edge (_hw.stall_us). Page programming (0.4 ms a page)
# is not timed.
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
    sectors = 0
    while length > 0:
        n = min(length, SECTOR)
        _f.write(memoryview(_scratch)[:n])
        length -= n
        sectors += 1
    _f.flush()
    if _hw.erase_us:  # a running board; the factory tool programs the image without a CPU
        _hw.stall_us(_hw.erase_us * sectors)


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
