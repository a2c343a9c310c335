# Over-the-air updates, the node's side (docs/ota.md, "The node's part"). Loaded only while an
# offer is worked on, so that the idle node's heap does not hold it.
#
# A bundle's files go to the app folder that is not running (/a or /b; the base is /lib, as
# flashed), each chunk appended to its file on flash as it comes: no file is ever held in RAM.
# /ota.json keeps the offer (ref, kind, version, files) so that a node that lost its power or
# its link asks again from its files' sizes. Each file's SHA-256 is computed from flash after
# its last byte; when every file is there and checked, /app.json (main.py's pointer) is
# replaced atomically and the board resets into the new app on trial. node/app.py confirms it;
# main.py rolls it back.
import asyncio
import esp32
import hashlib
import os
import machine
from micropython import const

import wire
from node import forget, log
from node.app import APP_PATH, read_json, write_json
from node.trial import send_request, send_result

JOB_PATH = "/ota.json"
_MAX_MISMATCHES = const(3)  # a file whose SHA-256 is wrong this often: the release is failed
_READ = const(512)  # bytes read at a time to hash a file on flash
_BLOCK = const(4096)  # a littlefs block: what a file takes at least
_DIR = const(0x4000)
_ERASE = const(6)  # Partition.ioctl: erase one 4 KiB block
_SAVE_EVERY = const(16384)  # image bytes between two progress saves: what a power cut re-asks


def _size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return -1


def _blocks(n):
    return (n + _BLOCK - 1) // _BLOCK * _BLOCK


def _remove_tree(path):
    try:
        entries = list(os.ilistdir(path))
    except OSError:
        return
    for entry in entries:
        child = path + "/" + entry[0]
        if entry[1] == _DIR:
            _remove_tree(child)
        else:
            os.remove(child)
    os.rmdir(path)


def _make_parents(path):
    at = ""
    for part in path.split("/")[1:-1]:
        at += "/" + part
        try:
            os.mkdir(at)
        except OSError:
            pass  # there already


def _sha256_hex(path, scratch):
    # `scratch`: the link's frame buffer, free between two frames (the chunk in it is on flash
    # by now): the emulated ESP32 heap had no 512-byte block to spare for a buffer of our own.
    digest = hashlib.sha256()
    view = memoryview(scratch)[:_READ]
    with open(path, "rb") as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            digest.update(view[:n])
    return digest.digest().hex()


def _update_partition():
    return esp32.Partition(esp32.Partition.RUNNING).get_next_update()


def _partition_sha256_hex(part, size, scratch):
    digest = hashlib.sha256()
    view = memoryview(scratch)[:_READ]
    at = 0
    while at < size:
        n = min(_READ, size - at)
        part.readblocks(at // _BLOCK, view[:n], at % _BLOCK)
        digest.update(view[:n])
        at += n
    return digest.digest().hex()


def check_offer(msg, free):
    """Why the offer cannot be taken (text), or None; `free`: flash bytes it may use."""
    if msg.kind == wire.OTA_IMAGE:
        size = msg.files[0][1]
        try:
            room = _update_partition().info()[3]
        except OSError:
            return "this board has no OTA partition"
        if size > room:
            return "image of %d bytes, the update partition holds %d" % (size, room)
        return None
    if msg.kind != wire.OTA_BUNDLE:
        return "kind %d is not supported by this node" % msg.kind
    need = 0
    app = False
    for path, size, _ in msg.files:
        parts = path.split("/")
        if parts[:2] != ["", "lib"] or len(parts) < 3 or "" in parts[1:] or "." in parts \
                or ".." in parts:
            return "path %s is not a file under /lib" % path
        if path in ("/lib/node/app.mpy", "/lib/node/app.py"):
            app = True
        need += _blocks(size) or _BLOCK
    if not app:
        return "a bundle without /lib/node/app.mpy would not start"
    if need > free:
        return "needs %d bytes of flash, %d free" % (need, free)
    return None


# ----- what the link and the app call (this module is loaded for the call) -----


async def on_frame(link, msg, writer):
    """An OTA_OFFER or OTA_CHUNK, checked by the link (key, counter) but not yet against the
    offer the node holds."""
    node = link.node
    if node.ota is None:
        if msg.type != wire.OTA_OFFER:
            log.error("OTA chunk with no offer: ignored")
            return _drop(node)
        node.ota = Ota(node)
    try:
        if msg.type == wire.OTA_OFFER:
            busy = await node.ota.on_offer(msg, link, writer)
        else:
            busy = await node.ota.on_chunk(msg, link, writer)
    except OSError as e:
        # The flash refused something: what is staged cannot be trusted to resume from. It
        # goes, and the next offer starts the release again; the session's readings go on.
        log.error("update stopped: %s: %s", type(e).__name__, e)
        node.ota.stop()
        busy = False
    if not busy:
        _drop(node)


def _drop(node):
    node.ota = None
    forget("ota")  # their code leaves the heap
    forget("trial")


def refused(link, detail):
    """ERROR UNSUPPORTED answered one of our OTA frames: stop, drop what was staged."""
    log.info("update refused by the gateway: %s", detail)
    node = link.node
    if node.ota is not None:
        node.ota.stop()
    _drop(node)


class Ota:
    def __init__(self, node):
        self.node = node
        self.job = read_json(JOB_PATH)  # the offer being worked on, as /ota.json keeps it
        self.want = None  # (ref, file index, offset, length) of the chunk asked for
        self.ignored = 0  # chunks that answered no request: never written
        self.part = None  # an image's partition, once needed

    # ----- where things are -----

    def _target(self, index):
        return "/" + self.job["slot"] + self.job["files"][index][0]

    def _image(self):
        return self.job.get("kind") == wire.OTA_IMAGE

    def _partition(self):
        if self.part is None:
            self.part = _update_partition()
        return self.part

    def _have(self):
        if self._image():
            return self.job["done"]
        done = 0
        for i, (_, size, _) in enumerate(self.job["files"]):
            done += min(max(_size(self._target(i)), 0), size)
        return done

    def _save(self):
        write_json(JOB_PATH, self.job)

    # ----- offers -----

    async def on_offer(self, msg, link, writer):
        """Answer an offer with one OTA_RESULT, and start or resume it. False: nothing to do."""
        ref = msg.ref
        final = self._final(ref)
        if final is not None:
            await send_result(link, writer, ref, *final)
            return False
        app = read_json(APP_PATH)
        if app.get("trial"):
            log.info("release offered while %s is on trial: later", app.get("version"))
            return False
        job = self.job
        if job.get("ref") != ref:
            self._discard()
            active = app.get("slot") or ""
            job = self.job = {
                "ref": ref, "kind": msg.kind, "version": msg.version,
                "files": [[p, n, d.hex()] for p, n, d in msg.files],
                "slot": ("b" if active == "a" else "a") if msg.kind == wire.OTA_BUNDLE else "",
                "bad": 0, "ok": [], "done": 0,
            }
            # The figure this node's HELLO reports, so that what the fleet let through is
            # what the node takes; a filesystem that cannot say has nothing to spare.
            why = check_offer(msg, self.node.store.free_flash() or 0)
            if why is not None:
                return await self._fail(link, writer, why)
            if msg.kind == wire.OTA_BUNDLE:
                _remove_tree("/" + job["slot"])  # what an earlier release left there
            self._save()
            log.info("release %s offered: %d files", msg.version, len(msg.files))
        self.want = None
        await send_result(link, writer, ref, wire.OTA_DOWNLOADING, self._have())
        return await self._next(link, writer)

    def _final(self, ref):
        # (state, bytes, reason) of a ref this node is done with, or None.
        app = read_json(APP_PATH)
        back = app.get("rolled_back")
        if back and back.get("ref") == ref:
            return wire.OTA_ROLLED_BACK, 0, back.get("reason", "")
        if app.get("ref") == ref:
            state = wire.OTA_REBOOTING if app.get("trial") else wire.OTA_CONFIRMED
            return state, app.get("size", 0), ""
        job = self.job
        if job.get("ref") == ref and job.get("state") == wire.OTA_FAILED:
            return wire.OTA_FAILED, 0, job.get("reason", "")
        return None

    # ----- chunks -----

    async def on_chunk(self, msg, link, writer):
        want = self.want
        data = msg.data
        n = len(data)
        if want is None or msg.ref != want[0] or msg.file_index != want[1] \
                or msg.offset != want[2] or n > want[3]:
            self.ignored += 1  # not what was asked for: a replay, or a confused gateway
            log.error("OTA chunk ref %d file %d at %d ignored (asked: %s); %d ignored",
                      msg.ref, msg.file_index, msg.offset, want, self.ignored)
            return True
        self.want = None
        if self._image():
            # Straight to flash, no 4 KiB block in RAM: a chunk never crosses a block (see
            # _next), and a block is erased when its first chunk comes.
            at = want[2]
            part = self._partition()
            if at % _BLOCK == 0:
                part.ioctl(_ERASE, at // _BLOCK)
            part.writeblocks(at // _BLOCK, data, at % _BLOCK)
            done = self.job["done"] = at + n
            if done % _SAVE_EVERY == 0 or done == self.job["files"][0][1]:
                self._save()  # a power cut asks again from here
            return await self._next(link, writer)
        path = self._target(want[1])
        if _size(path) != want[2]:  # the file changed under us: ask again from what it holds
            return await self._next(link, writer)
        with open(path, "ab") as f:
            f.write(data)
        return await self._next(link, writer)

    async def _next(self, link, writer):
        """Ask for the next chunk, or check a finished file, or install when all are there."""
        job = self.job
        if self._image():
            return await self._next_image(link, writer)
        for i, (_, size, digest) in enumerate(job["files"]):
            if i in job["ok"]:
                continue
            path = self._target(i)
            have = _size(path)
            if have < 0:
                _make_parents(path)
                open(path, "wb").close()
                have = 0
            if have < size:
                length = min(size - have, wire.OTA_MAX_CHUNK)
                self.want = (job["ref"], i, have, length)
                await send_request(link, writer, job["ref"], i, have, length)
                return True
            await asyncio.sleep_ms(0)
            if have == size and _sha256_hex(path, link._frame) == digest:
                job["ok"].append(i)
                self._save()
                continue
            os.remove(path)  # too long, or not the offered bytes: that file from 0 again
            job["bad"] += 1
            self._save()
            log.error("OTA file %s: SHA-256 mismatch (%d)", job["files"][i][0], job["bad"])
            if job["bad"] >= _MAX_MISMATCHES:
                return await self._fail(link, writer, "%s: SHA-256 mismatch %d times" % (
                    job["files"][i][0], job["bad"]))
            return await self._next(link, writer)
        return await self._install(link, writer)

    async def _next_image(self, link, writer):
        job = self.job
        ref = job["ref"]
        path, size, digest = job["files"][0]
        done = job["done"]
        if done < size:
            length = min(size - done, wire.OTA_MAX_CHUNK, _BLOCK - done % _BLOCK)
            self.want = (ref, 0, done, length)
            await send_request(link, writer, ref, 0, done, length)
            return True
        await send_result(link, writer, ref, wire.OTA_VERIFYING, size)
        part = self._partition()
        if _partition_sha256_hex(part, size, link._frame) != digest:  # read back from flash
            job["bad"] += 1
            job["done"] = 0
            self._save()
            log.error("OTA image: SHA-256 mismatch (%d)", job["bad"])
            if job["bad"] >= _MAX_MISMATCHES:
                return await self._fail(link, writer, "image: SHA-256 mismatch %d times" % (
                    job["bad"]))
            return await self._next(link, writer)
        await send_result(link, writer, ref, wire.OTA_INSTALLED, size)
        part.set_boot()  # ESP-IDF checks the image; the bootloader boots it on trial
        label = part.info()[4]
        self._switch(size, label)
        log.info("release %s installed in %s: rebooting", job["version"], label)
        await self._reboot(link, writer, size)

    def _switch(self, total, part=None):
        # /app.json names the new release, on trial (main.py counts a bundle's trial boots;
        # the bootloader an image's). An image runs its own frozen app: no folder.
        job = self.job
        app = read_json(APP_PATH)
        write_json(APP_PATH, {
            "slot": "" if part else job["slot"], "version": job["version"], "ref": job["ref"],
            "kind": job["kind"], "size": total, "trial": True, "boots": 0, "part": part,
            "prev": {"slot": app.get("slot") or "", "version": app.get("version"),
                     "ref": app.get("ref"), "kind": app.get("kind")},
        })
        os.remove(JOB_PATH)  # done with: app.json answers offers of this ref from now on

    async def _reboot(self, link, writer, total):
        # /app.json already names the new release: the reset must come whatever happens to
        # the session meanwhile (it ends, the task is cancelled, the heap runs short), or the
        # node would go on running the old release while its pointer says it is on trial.
        try:
            await send_result(link, writer, self.job["ref"], wire.OTA_REBOOTING, total)
            await asyncio.sleep_ms(100)  # the frame on its way
        finally:
            try:
                self.node.shutdown()  # readings in RAM to /buf: nothing lost across the switch
            finally:
                machine.reset()

    async def _install(self, link, writer):
        job = self.job
        ref = job["ref"]
        total = self._have()
        await send_result(link, writer, ref, wire.OTA_VERIFYING, total)
        for i, (path, size, digest) in enumerate(job["files"]):  # all again, as they are now
            await asyncio.sleep_ms(0)
            if _size(self._target(i)) != size or _sha256_hex(self._target(i), link._frame) != digest:
                job["ok"] = []
                self._save()
                return await self._fail(link, writer, "%s changed on flash" % path)
        await send_result(link, writer, ref, wire.OTA_INSTALLED, total)
        self._switch(total)
        log.info("release %s installed in /%s: rebooting", job["version"], job["slot"])
        await self._reboot(link, writer, total)

    # ----- giving up -----

    async def _fail(self, link, writer, reason):
        job = self.job
        log.error("release %s failed: %s", job.get("version"), reason)
        self._discard()
        job["state"] = wire.OTA_FAILED
        job["reason"] = reason
        job["files"] = []
        self.job = job
        self._save()
        await send_result(link, writer, job["ref"], wire.OTA_FAILED, 0, reason)
        return False

    def _discard(self):
        """Delete what was staged for the current job."""
        slot = self.job.get("slot")
        if slot in ("a", "b") and slot != read_json(APP_PATH).get("slot"):
            _remove_tree("/" + slot)
        try:
            os.remove(JOB_PATH)
        except OSError:
            pass
        self.job = {}

    def stop(self):
        """The gateway refused this download (ERROR UNSUPPORTED): drop what was staged."""
        log.info("release %s: download stopped", self.job.get("version"))
        self.want = None
        self._discard()
