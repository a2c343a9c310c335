# Stand-in for the ESP32 port's `esp32` module: flash partitions read from the board's
# partition table, as esp32.Partition does on a chip.
import struct
import _flash
import _hw

_TABLE_OFFSET = 0x8000
_ENTRY_SIZE = 32
_ENOENT = 2  # no partition of that label: the port raises OSError(ENOENT)


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=4096):
        if isinstance(id, str):
            found = _find(None, 0xFF, id)
            if not found:
                raise OSError(_ENOENT)
            entry = found[0]
        elif id in (Partition.BOOT, Partition.RUNNING):
            entry = _find(Partition.TYPE_APP, 0x10, None)[0]  # OTA bookkeeping comes later
        else:
            raise ValueError()
        self._take(entry, block_size)

    def _take(self, entry, block_size):
        self._type, self._subtype, self._offset, self._size, self._label = entry
        self._block_size = block_size

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
        # esp_ota_mark_app_valid_cancel_rollback() on the flash's otadata, which the emulator
        # keeps as ESP-IDF does (kinhbac/emulator/otadata.py) and counts the calls of.
        r = _hw.call(_hw.OP_MARK_APP_VALID)
        err, rewrote = struct.unpack_from("<iB", r, 0)
        if rewrote:
            _hw.stall_us(_hw.erase_us)  # the entry's sector was erased
        if err:
            # check_esp_err: OSError(-code, the code's name) (ports/esp32/mphalport.c:64-104)
            raise OSError(-err, str(bytes(r[5:]), "ascii"))

    def info(self):
        return (self._type, self._subtype, self._offset, self._size, self._label, False)

    def readblocks(self, block_num, buf, offset=0):
        _flash.read(self._offset + block_num * self._block_size + offset, buf)

    def writeblocks(self, block_num, buf, offset=None):
        addr = self._offset + block_num * self._block_size
        if offset is None:
            # The simple block protocol: erase the blocks first, as the ESP32 port does.
            _flash.erase(addr, len(buf))
            _flash.program(addr, buf)
        else:
            _flash.program(addr + offset, buf)

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self._size // self._block_size
        if op == 5:  # block size
            return self._block_size
        if op == 6:  # erase a block
            _flash.erase(self._offset + arg * self._block_size, self._block_size)
            return 0
        if op == 3:  # sync
            _flash.sync()
        return 0

    def __repr__(self):
        return "<Partition type=%d, subtype=%d, address=%d, size=%d, label=%s, encrypted=0>" % (
            self._type, self._subtype, self._offset, self._size, self._label)


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
