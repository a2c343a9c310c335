# Stand-in for the ESP32 port's `esp32` module: flash partitions read from the board's
# partition table, as esp32.Partition does on a chip (ports/esp32/esp32_partition.c, v1.24.1).
# The OTA calls (boot, running and next partitions, set_boot, mark_app_valid_cancel_rollback)
# go to the emulator, which keeps otadata as ESP-IDF does (kinhbac/emulator/otadata.py).
import struct
import _flash
import _hw

_TABLE_OFFSET = 0x8000
_ENTRY_SIZE = 32
_SECTOR = 4096  # NATIVE_BLOCK_SIZE_BYTES: esp_partition_erase_range takes whole sectors
_ENOENT = 2  # esp32_partition_new(NULL): OSError(ENOENT) (esp32_partition.c:57-58)
# _hw.OP_OTA's sub-calls (board.py answers them).
_OTA_BOOT = 0
_OTA_RUNNING = 1
_OTA_NEXT = 2
_OTA_SET_BOOT = 3
_OTA_MARK_VALID = 4


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=4096):
        if isinstance(id, str):
            # An app partition of that label first, then a data one (esp32_partition.c:101-104).
            found = _find(0, 0xFF, id) or _find(1, 0xFF, id)
            if not found:
                raise OSError(_ENOENT)
            entry = found[0]
        elif id in (Partition.BOOT, Partition.RUNNING):
            # esp_ota_get_boot_partition() / esp_ota_get_running_partition()
            entry = _at(_ota(id))
        else:
            raise ValueError()
        self._take(entry, block_size)

    def _take(self, entry, block_size):
        self._type, self._subtype, self._offset, self._size, self._label = entry
        self._block_size = block_size
        # The port allocates its erase cache with the object (esp32_partition.c:63-64).
        self._cache = bytearray(_SECTOR) if block_size < _SECTOR else None

    @staticmethod
    def find(type=TYPE_APP, subtype=0xFF, label=None, block_size=4096):
        found = []
        for entry in _find(type, subtype, label):
            p = object.__new__(Partition)  # not through __init__, which takes a label or id
            p._take(entry, block_size)
            found.append(p)
        return found

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        _ota(_OTA_MARK_VALID)

    def set_boot(self):
        # esp_ota_set_boot_partition(): the image is verified first; the emulator waits out the
        # otadata sector's erase before it programs the entry, so a power cut can land there.
        _ota(_OTA_SET_BOOT, self._offset)

    def get_next_update(self):
        # esp_ota_get_next_update_partition(self), always with 4 KiB blocks (esp32_partition.c:255)
        p = object.__new__(Partition)
        p._take(_at(_ota(_OTA_NEXT, self._offset)), _SECTOR)
        return p

    def info(self):
        return (self._type, self._subtype, self._offset, self._size, self._label, False)

    def readblocks(self, block_num, buf, offset=0):
        off = block_num * self._block_size + offset
        self._check(off, len(buf), 1)
        _flash.read(self._offset + off, buf)

    def writeblocks(self, block_num, buf, offset=None):
        off = block_num * self._block_size
        n = len(buf)
        if offset is not None:
            off += offset  # an extended write: the caller erased first (esp32_partition.c:210)
        elif self._cache is None:
            self._erase(off, n)  # a simple write erases first: whole sectors, or it fails
        else:
            # Blocks under 4 KiB: each sector touched is read, erased, and the bytes outside
            # the write put back (esp32_partition.c:189-207).
            addr = off - off % _SECTOR
            o = off % _SECTOR
            top = off + n
            cache = self._cache
            while addr < top:
                if o or top < addr + _SECTOR:
                    self._check(addr, _SECTOR, 1)
                    _flash.read(self._offset + addr, cache)
                self._erase(addr, _SECTOR)
                if o:
                    _flash.program(self._offset + addr, memoryview(cache)[:o])
                if top < addr + _SECTOR:
                    _flash.program(self._offset + top, memoryview(cache)[top - addr :])
                o = 0
                addr += _SECTOR
        self._check(off, n, 1)
        _flash.program(self._offset + off, buf)

    def ioctl(self, op, arg):
        if op in (1, 2, 3):  # init, deinit, sync: nothing to do, writes are not cached
            return 0
        if op == 4:  # block count
            return self._size // self._block_size
        if op == 5:  # block size
            return self._block_size
        if op == 6:  # erase a block, only of the native size
            if self._block_size != _SECTOR:
                return -22  # -MP_EINVAL
            self._erase(arg * _SECTOR, _SECTOR)
            return 0
        return None

    def _erase(self, off, n):
        self._check(off, n, _SECTOR)
        _flash.erase(self._offset + off, n)

    def _check(self, off, n, unit):
        # esp_partition_read/write/erase_range's checks, in their order (ESP-IDF v5.2.2
        # components/esp_partition/partition_target.c:30-35, 70-75, 130-141); an offset the
        # C code took as a uint32_t from a negative int is past the partition there too.
        if off < 0 or off > self._size:
            code = 0x102
        elif off + n > self._size or n % unit:
            code = 0x104
        elif off % unit:
            code = 0x102
        else:
            return
        raise OSError(-code, "ESP_ERR_INVALID_SIZE" if code == 0x104 else "ESP_ERR_INVALID_ARG")

    def __repr__(self):
        return "<Partition type=%d, subtype=%d, address=%d, size=%d, label=%s, encrypted=0>" % (
            self._type, self._subtype, self._offset, self._size, self._label)


def _ota(call, address=0):
    # One OTA call to the emulator: its esp_err_t, a partition's address (0: none), and the
    # sectors it erased (the CPU stalls that long with the cache off, as for any erase).
    r = _hw.call(_hw.OP_OTA, call, struct.pack("<I", address))
    err, found, erased = struct.unpack_from("<iIB", r, 0)
    if erased:
        _hw.stall_us(_hw.erase_us * erased)
    if err:
        # check_esp_err: OSError(-code, the code's name) (ports/esp32/mphalport.c:64-104)
        raise OSError(-err, str(bytes(r[9:]), "ascii"))
    return found


def _at(address):
    # The partition at an address the emulator named; none is the port's NULL: ENOENT.
    for entry in _find(None, 0xFF, None):
        if address and entry[2] == address:
            return entry
    raise OSError(_ENOENT)


def _find(ptype, subtype, label):
    found = []
    entry = bytearray(_ENTRY_SIZE)
    offset = _TABLE_OFFSET
    while True:
        _flash.read(offset, entry)
        if entry[0] != 0xAA or entry[1] != 0x50:
            return found
        t, st, addr, size = struct.unpack_from("<BBII", entry, 2)
        name = bytes(entry[12:28]).rstrip(b"\x00").decode()
        if (ptype is None or t == ptype) and (subtype == 0xFF or st == subtype) and (
                label is None or name == label):
            found.append((t, st, addr, size, name))
        offset += _ENTRY_SIZE
