# Factory programming of an emulated board's filesystem, with the board powered off: the same
# littlefs code the board runs, on the same flash image. Host side: kinhbac/emulator/site.py.
#   micropython _factory.py write <staging dir>   copy every file under the dir into the flash
#   micropython _factory.py read <path>           print the file as hex, or MISSING
# A partition that does not mount is formatted only if its first block is blank, the test the
# port's inisetup.py makes; anything else is left as it is and the tool fails saying so (exit
# 1), so that a test cannot hide a filesystem the board itself would call corrupted.
import sys
import os
import vfs
import binascii
import _flash
import esp32
import inisetup

_MOUNT = "/flash"


def _mount(format_blank):
    """Mount the vfs partition; False if it is blank and `format_blank` is not set."""
    bdev = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="vfs")[0]
    try:
        vfs.mount(bdev, _MOUNT)
        return True
    except OSError:
        pass
    if not inisetup.first_block_blank(bdev):
        print("CORRUPTED: the vfs partition holds neither a filesystem nor a blank first "
              "block; the board prints 'The filesystem appears to be corrupted' at boot. "
              "Erase the partition (board.flash.erase) first")
        sys.exit(1)
    if not format_blank:
        return False
    vfs.VfsLfs2.mkfs(bdev)
    vfs.mount(vfs.VfsLfs2(bdev), _MOUNT)
    return True


def _makedirs(path):
    parts = path.strip("/").split("/")
    here = ""
    for part in parts:
        here += "/" + part
        try:
            os.mkdir(here)
        except OSError:
            pass


def _copy_tree(src, dst):
    for name, kind, *_ in os.ilistdir(src):
        s = src + "/" + name
        d = dst + "/" + name
        if kind == 0x4000:
            _makedirs(d)
            _copy_tree(s, d)
        else:
            with open(s, "rb") as fin, open(d + ".tmp", "wb") as fout:
                while True:
                    chunk = fin.read(4096)
                    if not chunk:
                        break
                    fout.write(chunk)
            os.rename(d + ".tmp", d)  # atomic on littlefs, as the firmware's own writes are


def main():
    _flash.open_image()
    mode, arg = sys.argv[1], sys.argv[2]
    # A read leaves a blank partition blank: the board's first boot still formats it.
    mounted = _mount(format_blank=mode == "write")
    if mode == "write":
        _copy_tree(arg.rstrip("/"), _MOUNT)
        print("WROTE")
    elif mode == "read":
        if not mounted:
            print("MISSING")
            return
        try:
            with open(_MOUNT + arg, "rb") as f:
                print(binascii.hexlify(f.read()).decode())
        except OSError:
            print("MISSING")


main()
