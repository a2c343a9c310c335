"""Kinhbac wire codec: authenticated binary frames between a node and its gateway.

Written in the common subset of MicroPython and CPython. On a node this file is /lib/wire.py
(imported as `wire`); on CPython it is `kinhbac.wire`. It imports nothing from kinhbac.
The byte layout, the MAC, the replay rules and the order of checks are specified in
docs/protocol.md; the golden frames in tests/vectors/ pin the bytes.

A node decodes downlink frames and encodes uplink ones only: what only the gateway needs sits
between `# gateway only {` and `# } gateway only` lines, which the node's build of this file
leaves out (kinhbac/firmware.py, node_wire_source), saving about 4.5 KB of an ESP32's heap.

Subset notes: no `raise ... from` (MicroPython prints a warning for it; CPython chains the
context anyway), `%` formatting, no int.from_bytes/bytes.hex, integers range-checked before
struct.pack because MicroPython's struct truncates silently.
"""

import hashlib
import json
import struct

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


# ---- Layout constants (docs/protocol.md) ----------------------------------------------------

VERSION = const(1)
DEVICE_ID_SIZE = const(8)
HEADER_SIZE = const(22)  # version, type, length, device id, key id, boot, counter
MAC_SIZE = const(16)  # HMAC-SHA256 truncated: 128 bits is ample against online forgery
MIN_FRAME = const(38)  # HEADER_SIZE + MAC_SIZE: an empty payload
MAX_FRAME = const(1400)  # below the 1460-byte TCP MSS of Ethernet/WiFi: one frame, one segment
MAX_PAYLOAD = const(1362)  # MAX_FRAME - MIN_FRAME

READINGS_HEAD_SIZE = const(18)  # readings boot, first seq, flags, base ms, count
READING_SIZE = const(7)  # sensor index u8, offset ms u16, value float32
MAX_READINGS = const(192)  # (MAX_FRAME - MIN_FRAME - READINGS_HEAD_SIZE) // READING_SIZE
MAX_OFFSET_MS = const(65535)  # a batch spans at most 65.535 s after its base time
ACK_SIZE = const(17)

MAX_U16 = const(0xFFFF)
MAX_U32 = 0xFFFFFFFF  # not const: a big int on a 32-bit port
MAX_U64 = 0xFFFFFFFFFFFFFFFF
# Downlink counters are uplink_counter * 16 + n; the product must fit the u32 counter field.
DOWNLINK_ANSWERS = const(16)
MAX_UPLINK_COUNTER = 0x0FFFFFFF

_HEADER_FMT = ">BBH8sHII"
_READINGS_HEAD_FMT = ">IIBQB"
_READING_FMT = ">BHf"
_ACK_FMT = ">BIIQ"
_ERROR_HEAD_FMT = ">BI"
_FAILURES_FMT = ">II"  # HELLO's failure counts of one sensor: could not read, out of range
# Floats are heap objects on the node: keep the ones add() compares with ready-made.
_MAX_F32 = 3.4028234663852886e38
_MIN_F32 = -3.4028234663852886e38
_INF = float("inf")
_NEG_INF = float("-inf")

# ---- Frame types: bit 7 set = downlink (gateway -> node) ------------------------------------

HELLO = const(0x01)
READINGS = const(0x02)
CLAIM = const(0x03)  # a node with only its site's claim key asks for an identity
ERROR_UP = const(0x04)
OTA_CHUNK_REQUEST = const(0x11)  # the node asks for a chunk of an offered release
OTA_RESULT = const(0x13)  # the node reports where its update stands
ACK = const(0x83)
ERROR_DOWN = const(0x84)
CONFIG = const(0x85)
IDENTITY = const(0x86)  # answer to an approved CLAIM: the key id the node is to use
OTA_OFFER = const(0x90)  # a release for the node: its files' paths, sizes and SHA-256
OTA_CHUNK = const(0x92)  # bytes of one offered file, answering an OTA_CHUNK_REQUEST
DOWNLINK_BIT = const(0x80)

TYPE_NAMES = {
    HELLO: "HELLO",
    READINGS: "READINGS",
    CLAIM: "CLAIM",
    ERROR_UP: "ERROR_UP",
    OTA_CHUNK_REQUEST: "OTA_CHUNK_REQUEST",
    OTA_RESULT: "OTA_RESULT",
    ACK: "ACK",
    ERROR_DOWN: "ERROR_DOWN",
    CONFIG: "CONFIG",
    IDENTITY: "IDENTITY",
    OTA_OFFER: "OTA_OFFER",
    OTA_CHUNK: "OTA_CHUNK",
}
UPLINK_TYPES = (HELLO, READINGS, CLAIM, ERROR_UP, OTA_CHUNK_REQUEST, OTA_RESULT)
DOWNLINK_TYPES = (ACK, ERROR_DOWN, CONFIG, IDENTITY, OTA_OFFER, OTA_CHUNK)

# CLAIM frames, and the gateway's ERROR answers to them, are signed with the site's claim key
# under this key id; device keys never use it.
CLAIM_KEY_ID = const(0xFFFF)
CLAIM_NONCE_SIZE = const(16)

# ---- Reason codes: carried by FrameError and by ERROR frames --------------------------------

BAD_LENGTH = const(1)
BAD_VERSION = const(2)
BAD_TYPE = const(3)
UNKNOWN_DEVICE = const(4)
UNKNOWN_KEY = const(5)
BAD_MAC = const(6)
STALE_BOOT = const(7)
REPLAY = const(8)
BAD_PAYLOAD = const(9)
BUSY = const(10)
INTERNAL = const(11)
UNSUPPORTED = const(12)
CLAIM_PENDING = const(13)  # the claim is waiting for an admin: ask again later
CLAIM_REJECTED = const(14)  # an admin rejected the claim: this board is kept out
BAD_KEY_ID = const(15)  # the claim key id on a frame it may not sign, or a CLAIM without it

REASON_NAMES = {
    BAD_LENGTH: "BAD_LENGTH",
    BAD_VERSION: "BAD_VERSION",
    BAD_TYPE: "BAD_TYPE",
    UNKNOWN_DEVICE: "UNKNOWN_DEVICE",
    UNKNOWN_KEY: "UNKNOWN_KEY",
    BAD_MAC: "BAD_MAC",
    STALE_BOOT: "STALE_BOOT",
    REPLAY: "REPLAY",
    BAD_PAYLOAD: "BAD_PAYLOAD",
    BUSY: "BUSY",
    INTERNAL: "INTERNAL",
    UNSUPPORTED: "UNSUPPORTED",
    CLAIM_PENDING: "CLAIM_PENDING",
    CLAIM_REJECTED: "CLAIM_REJECTED",
    BAD_KEY_ID: "BAD_KEY_ID",
}

# ---- HELLO vocabularies ---------------------------------------------------------------------

# Wire codes for the reset cause; firmware maps machine.reset_cause() by name, because the
# numbers of machine.*_RESET differ between MicroPython ports.
RESET_UNKNOWN = const(0)
RESET_POWER_ON = const(1)
RESET_HARD = const(2)
RESET_WATCHDOG = const(3)
RESET_DEEP_SLEEP = const(4)
RESET_SOFT = const(5)
RESET_BROWNOUT = const(6)
RESET_NAMES = {
    RESET_UNKNOWN: "UNKNOWN",
    RESET_POWER_ON: "POWER_ON",
    RESET_HARD: "HARD",
    RESET_WATCHDOG: "WATCHDOG",
    RESET_DEEP_SLEEP: "DEEP_SLEEP",
    RESET_SOFT: "SOFT",
    RESET_BROWNOUT: "BROWNOUT",
}

# Positions in HELLO's counter list (`drops`), cumulative since provisioning. A node may send
# more counters than a receiver names; receivers keep them by position.
DROP_BUFFER_FULL = const(0)  # readings dropped by the full-buffer policy
DROP_STORAGE_ERROR = const(1)  # readings lost to a flash write/read error
DROP_SENSOR_ERROR = const(2)  # scheduled readings not taken: the sensor failed
DROP_OUT_OF_RANGE = const(3)  # readings skipped: outside what the sensor can measure
DROP_SAFE_MODE = const(4)  # times the node entered safe mode
DROP_WATCHDOG_RESETS = const(5)  # boots that began with a watchdog reset
DROP_CRASHES = const(6)  # boots ended by an unexpected exception
# Their names, by position, as the gateway's device status shows them (docs/mqtt.md).
DROP_NAMES = ("buffer_full", "storage_error", "sensor_error", "out_of_range", "safe_mode",
              "watchdog_resets", "crashes")

# An ERROR_UP with ref 0 refuses no frame: the node reports its own state. Its safe-mode report
# is reason INTERNAL with this before the reason it gives (node/safe.py).
SAFE_MODE_REPORT = "safe mode: "

READINGS_UNSYNCED = const(0x01)  # READINGS flags: base time is ms since boot, not Unix ms
# READINGS flags: taken before the node's clock was synced; the Unix times were reconstructed
# from the boot's monotonic clock at its first sync. Never together with UNSYNCED.
READINGS_PRE_SYNC = const(0x02)
ACK_HAS_READINGS = const(0x01)  # ACK flags: readings boot / through seq are meaningful
ACK_HAS_TIME = const(0x02)  # ACK flags: the gateway's clock is synced, time is meaningful

# ---- OTA (docs/ota.md) ----------------------------------------------------------------------

OTA_BUNDLE = const(1)  # OTA_OFFER kinds: the firmware's files, for the inactive app folder
OTA_IMAGE = const(2)  # one MicroPython image, for the inactive OTA partition
OTA_MAX_CHUNK = const(1024)  # a chunk the node holds in RAM at once: 1 KiB of its heap
# OTA_RESULT states: the node's steps of docs/ota.md's device state machine. Receivers accept
# codes they do not know.
OTA_DOWNLOADING = const(1)
OTA_VERIFYING = const(2)
OTA_INSTALLED = const(3)
OTA_REBOOTING = const(4)
OTA_CONFIRMED = const(5)
OTA_FAILED = const(6)
OTA_ROLLED_BACK = const(7)
# gateway only {
# Their names, as the fleet's device states spell them.
OTA_STATE_NAMES = {
    OTA_DOWNLOADING: "downloading",
    OTA_VERIFYING: "verifying",
    OTA_INSTALLED: "installed",
    OTA_REBOOTING: "rebooting",
    OTA_CONFIRMED: "confirmed",
    OTA_FAILED: "failed",
    OTA_ROLLED_BACK: "rolled_back",
}
# } gateway only
# Release ref, then a u8 and a u32: OTA_CHUNK's file index and offset, OTA_RESULT's state and
# bytes so far; OTA_CHUNK_REQUEST adds its length (u16).
_OTA_HEAD_FMT = ">IBI"
_OTA_FILE_FMT = ">I32s"  # an offered file after its path: size, SHA-256


def reason_name(reason):
    """Name of a reason code, for logs and metrics ("REASON_<n>" when unknown)."""
    name = REASON_NAMES.get(reason)
    return name if name is not None else "REASON_%d" % reason


def type_name(frame_type):
    """Name of a frame type code ("TYPE_0x<nn>" when unknown)."""
    name = TYPE_NAMES.get(frame_type)
    return name if name is not None else "TYPE_0x%02x" % frame_type


class FrameError(Exception):
    """A frame refused, or a frame that cannot be encoded; `.reason` is a reason code.

    `.header` is (type, device_id, key_id, boot, counter) once decode() has read the header
    (None before). Up to BAD_MAC that header is unauthenticated; STALE_BOOT, REPLAY and
    BAD_PAYLOAD refuse frames whose MAC verified.
    """

    def __init__(self, reason, message, header=None):
        super().__init__("%s: %s" % (reason_name(reason), message))
        self.reason = reason
        self.message = message
        self.header = header

    @property
    def name(self):
        return reason_name(self.reason)


# ---- HMAC-SHA256 (MicroPython has no hmac module) -------------------------------------------

_BLOCK = const(64)
# CPython's hash objects can be copied: precompute the keyed inner/outer states once per secret.
_HAS_COPY = hasattr(hashlib.sha256(), "copy")


class Signer:
    """HMAC-SHA256 under one secret, with the padded keys precomputed."""

    def __init__(self, secret):
        if not isinstance(secret, (bytes, bytearray)):
            raise FrameError(BAD_PAYLOAD, "secret must be bytes")
        if len(secret) > _BLOCK:
            secret = hashlib.sha256(secret).digest()
        k = bytes(secret) + bytes(_BLOCK - len(secret))
        self._ipad = bytes([b ^ 0x36 for b in k])
        self._opad = bytes([b ^ 0x5C for b in k])
        self._inner = None
        self._outer = None
        if _HAS_COPY:
            self._inner = hashlib.sha256(self._ipad)
            self._outer = hashlib.sha256(self._opad)

    def digest(self, data):
        """Full 32-byte HMAC-SHA256 of data (bytes, bytearray or memoryview)."""
        if self._inner is not None:
            h = self._inner.copy()
            h.update(data)
            o = self._outer.copy()
            o.update(h.digest())
            return o.digest()
        h = hashlib.sha256(self._ipad)
        h.update(data)
        o = hashlib.sha256(self._opad)
        o.update(h.digest())
        return o.digest()

    def mac(self, data):
        """The MAC_SIZE-byte truncated tag of data."""
        return self.digest(data)[:MAC_SIZE]

    def verify(self, data, tag):
        """True when tag is the MAC of data; compares in constant time."""
        if len(tag) != MAC_SIZE:
            return False
        m = self.mac(data)
        r = 0
        for i in range(MAC_SIZE):
            r |= m[i] ^ tag[i]
        return r == 0


def hmac_sha256(secret, data):
    """HMAC-SHA256(secret, data), 32 bytes."""
    return Signer(secret).digest(data)


class Key:
    """A device's identity on the wire and its secret: what every encoder signs with."""

    def __init__(self, device_id, key_id, secret):
        if not isinstance(device_id, (bytes, bytearray)) or len(device_id) != DEVICE_ID_SIZE:
            raise FrameError(BAD_PAYLOAD, "device id must be %d bytes" % DEVICE_ID_SIZE)
        _check_int(key_id, MAX_U16, "key id")
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
            raise FrameError(BAD_PAYLOAD, "secret must be at least 16 bytes")
        self.device_id = bytes(device_id)
        self.key_id = key_id
        self.signer = Signer(secret)

    def __repr__(self):
        return "Key(%s, %d)" % (device_hex(self.device_id), self.key_id)


def claim_secret(claim_key, device_id, nonce):
    """The secret of a device approved through a claim: both ends derive it, so it never
    crosses the network. HMAC-SHA256(claim key, "kinhbac-claim-v1" | device id | nonce)."""
    if len(nonce) != CLAIM_NONCE_SIZE:
        raise FrameError(BAD_PAYLOAD, "claim nonce must be %d bytes" % CLAIM_NONCE_SIZE)
    return hmac_sha256(claim_key, b"kinhbac-claim-v1" + bytes(device_id) + bytes(nonce))


def device_hex(device_id):
    """The device id as 16 lowercase hex digits, the form used in logs and topics."""
    return "".join(["%02x" % b for b in device_id])


def lookup_for(key):
    """A secret lookup that knows just one Key: what a node passes to decode()."""

    def lookup(device_id, key_id):
        if device_id != key.device_id:
            return None
        if key_id != key.key_id:
            return UNKNOWN_KEY
        return key

    return lookup


# ---- Encoding ---------------------------------------------------------------------------------


def _check_int(value, top, what):
    # MicroPython's struct silently truncates out-of-range integers: check before packing.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > top:
        raise FrameError(BAD_PAYLOAD, "%s must be an integer in 0..%d" % (what, top))


def _check_counter(frame_type, counter):
    _check_int(counter, MAX_U32, "counter")
    if counter == 0:
        raise FrameError(REPLAY, "frame counters start at 1")
    if not frame_type & DOWNLINK_BIT and counter > MAX_UPLINK_COUNTER:
        raise FrameError(REPLAY, "uplink counter exhausted: start a new boot")


def _put_header(buf, frame_type, length, key, boot, counter):
    _check_int(boot, MAX_U32, "boot")
    _check_counter(frame_type, counter)
    struct.pack_into(
        _HEADER_FMT, buf, 0, VERSION, frame_type, length, key.device_id, key.key_id, boot, counter
    )


def _str8(text, what):
    if isinstance(text, str):
        data = text.encode("utf-8")
    else:
        raise FrameError(BAD_PAYLOAD, "%s must be a string" % what)
    if len(data) > 255:
        raise FrameError(BAD_PAYLOAD, "%s longer than 255 bytes" % what)
    return bytes([len(data)]) + data


def _frame(frame_type, key, boot, counter, payload):
    length = MIN_FRAME + len(payload)
    if length > MAX_FRAME:
        raise FrameError(BAD_LENGTH, "frame of %d bytes exceeds MAX_FRAME" % length)
    buf = bytearray(length)
    _put_header(buf, frame_type, length, key, boot, counter)
    buf[HEADER_SIZE : length - MAC_SIZE] = payload
    mv = memoryview(buf)
    buf[length - MAC_SIZE :] = key.signer.mac(mv[: length - MAC_SIZE])
    return bytes(buf)


def encode_hello(key, boot, counter, fw_version, reset_cause, drops, sensors, failures=None,
                 free_flash=None):
    """HELLO: firmware version, reset cause, drop counters (u32 list), sensors [(name, unit)],
    and optionally failures: per sensor, (could not read, out of range) counts, then
    free_flash: the flash bytes an update may use (u32; it needs the failures before it)."""
    _check_int(reset_cause, 255, "reset cause")
    if len(drops) > 255 or len(sensors) > 255:
        raise FrameError(BAD_PAYLOAD, "at most 255 drop counters and 255 sensors")
    parts = [bytes([reset_cause]), _str8(fw_version, "firmware version"), bytes([len(drops)])]
    for d in drops:
        _check_int(d, MAX_U32, "drop counter")
        parts.append(struct.pack(">I", d))
    parts.append(bytes([len(sensors)]))
    for name, unit in sensors:
        parts.append(_str8(name, "sensor name"))
        parts.append(_str8(unit, "sensor unit"))
    if failures is not None:
        if len(failures) != len(sensors):
            raise FrameError(BAD_PAYLOAD, "one pair of failure counts per sensor")
        parts.append(bytes([len(failures)]))
        for failed, out in failures:
            _check_int(failed, MAX_U32, "failure count")
            _check_int(out, MAX_U32, "failure count")
            parts.append(struct.pack(_FAILURES_FMT, failed, out))
    if free_flash is not None:
        # Sections are told apart by position only: this one must follow the failure counts.
        if failures is None:
            raise FrameError(BAD_PAYLOAD, "free flash follows the failure counts: give both")
        _check_int(free_flash, MAX_U32, "free flash")
        parts.append(struct.pack(">I", free_flash))
    return _frame(HELLO, key, boot, counter, b"".join(parts))


# gateway only {
def encode_ack(key, boot, counter, readings_boot=None, through_seq=None, gateway_time_ms=None):
    """ACK (downlink): readings of readings_boot with seq <= through_seq are durable; clock.

    counter is a downlink counter (see downlink_counter()); None fields are left out (flag clear).
    """
    flags = 0
    if (readings_boot is None) != (through_seq is None):
        raise FrameError(BAD_PAYLOAD, "readings boot and through seq go together")
    if readings_boot is not None:
        _check_int(readings_boot, MAX_U32, "readings boot")
        _check_int(through_seq, MAX_U32, "through seq")
        flags |= ACK_HAS_READINGS
    else:
        readings_boot = through_seq = 0
    if gateway_time_ms is not None:
        _check_int(gateway_time_ms, MAX_U64, "gateway time")
        flags |= ACK_HAS_TIME
    else:
        gateway_time_ms = 0
    payload = struct.pack(_ACK_FMT, flags, readings_boot, through_seq, gateway_time_ms)
    return _frame(ACK, key, boot, counter, payload)
# } gateway only


def encode_error(key, boot, counter, reason, ref=0, detail="", downlink=True):
    """ERROR: a reason code, a reference number (docs/protocol.md), a short text."""
    _check_int(reason, 255, "reason")
    _check_int(ref, MAX_U32, "ref")
    payload = struct.pack(_ERROR_HEAD_FMT, reason, ref) + _str8(detail, "detail")
    return _frame(ERROR_DOWN if downlink else ERROR_UP, key, boot, counter, payload)


# gateway only {
def encode_config(key, boot, counter, settings):
    """CONFIG (downlink): settings as a JSON object."""
    if not isinstance(settings, dict):
        raise FrameError(BAD_PAYLOAD, "settings must be a dict")
    try:
        payload = json.dumps(settings, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError):
        raise FrameError(BAD_PAYLOAD, "settings are not JSON-serialisable")  # noqa: B904
    return _frame(CONFIG, key, boot, counter, payload)
# } gateway only


def encode_claim(claim_key, boot, counter, nonce, fw_version):
    """CLAIM: the node's nonce and firmware version, signed with the site's claim key.

    claim_key is a Key whose key id is CLAIM_KEY_ID and whose secret is the site's claim key.
    """
    if claim_key.key_id != CLAIM_KEY_ID:
        raise FrameError(BAD_PAYLOAD, "a CLAIM is signed under key id %d" % CLAIM_KEY_ID)
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != CLAIM_NONCE_SIZE:
        raise FrameError(BAD_PAYLOAD, "claim nonce must be %d bytes" % CLAIM_NONCE_SIZE)
    payload = bytes(nonce) + _str8(fw_version, "firmware version")
    return _frame(CLAIM, claim_key, boot, counter, payload)


# gateway only {
def encode_identity(key, boot, counter):
    """IDENTITY (downlink): signed with the device's own key (claim_secret() under the key id
    the fleet issued), which only a node holding the claimed nonce can verify. No payload."""
    if key.key_id == CLAIM_KEY_ID:
        raise FrameError(BAD_PAYLOAD, "an IDENTITY is signed with the device's own key")
    return _frame(IDENTITY, key, boot, counter, b"")
# } gateway only


def _check_offer(kind, n):
    # A bundle of 1..255 files, or an image: one file.
    if n < 1 or n > 255 or (kind != OTA_BUNDLE and (kind != OTA_IMAGE or n > 1)):
        raise FrameError(BAD_PAYLOAD, "kind %r with %d files" % (kind, n))


def _check_chunk(offset, n):
    # 1..OTA_MAX_CHUNK bytes, none past 2**32 - 1: file sizes are u32.
    if n < 1 or n > OTA_MAX_CHUNK or offset + n - 1 > MAX_U32:
        raise FrameError(BAD_PAYLOAD, "chunk of %d bytes at %d" % (n, offset))


# gateway only {
def encode_ota_offer(key, boot, counter, ref, kind, version, files):
    """OTA_OFFER (downlink): release ref, kind (OTA_BUNDLE, or OTA_IMAGE: one file), version,
    files [(path, size, SHA-256 digest)]; FrameError(BAD_PAYLOAD) if it does not fit a frame."""
    _check_int(ref, MAX_U32, "release ref")
    _check_offer(kind, len(files))
    parts = [struct.pack(">IB", ref, kind), _str8(version, "version"), bytes([len(files)])]
    for path, size, digest in files:
        _check_int(size, MAX_U32, "file size")
        if not path or not isinstance(digest, (bytes, bytearray)) or len(digest) != 32:
            raise FrameError(BAD_PAYLOAD, "a file needs a path and a 32-byte SHA-256")
        parts.append(_str8(path, "path") + struct.pack(_OTA_FILE_FMT, size, bytes(digest)))
    payload = b"".join(parts)
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(BAD_PAYLOAD, "offer of %d bytes, over MAX_PAYLOAD" % len(payload))
    return _frame(OTA_OFFER, key, boot, counter, payload)
# } gateway only


def _ota_frame(frame_type, key, boot, counter, ref, u8, u32, tail, chunk=None):
    # The head that OTA_CHUNK_REQUEST, OTA_CHUNK and OTA_RESULT share, then their own tail.
    _check_int(ref, MAX_U32, "release ref")
    _check_int(u8, 255, "file index or state")
    _check_int(u32, MAX_U32, "offset or bytes so far")
    if chunk is not None:
        _check_chunk(u32, chunk)
    payload = struct.pack(_OTA_HEAD_FMT, ref, u8, u32) + tail
    return _frame(frame_type, key, boot, counter, payload)


def encode_ota_chunk_request(key, boot, counter, ref, file_index, offset, length):
    """OTA_CHUNK_REQUEST: length (1..OTA_MAX_CHUNK) bytes of the offer's file_index at offset."""
    _check_int(length, MAX_U16, "length")
    return _ota_frame(OTA_CHUNK_REQUEST, key, boot, counter, ref, file_index, offset,
                      struct.pack(">H", length), length)


# gateway only {
def encode_ota_chunk(key, boot, counter, ref, file_index, offset, data):
    """OTA_CHUNK (downlink): data (1..OTA_MAX_CHUNK bytes) of the offer's file_index at offset."""
    return _ota_frame(OTA_CHUNK, key, boot, counter, ref, file_index, offset, bytes(data),
                      len(data))
# } gateway only


def encode_ota_result(key, boot, counter, ref, state, bytes_done, reason=""):
    """OTA_RESULT: where the update of release ref stands (an OTA_* state), the bytes the node
    holds so far, and why, for a failure or a rollback."""
    return _ota_frame(OTA_RESULT, key, boot, counter, ref, state, bytes_done,
                      _str8(reason, "reason"))


class ReadingsWriter:
    """Builds READINGS frames in one pre-sized buffer; add() allocates nothing.

    begin() a batch, add() readings until it returns False, finish() with the frame's
    boot and counter. A resend after a lost ACK calls finish() again with a new counter:
    same readings (boot, seq), new frame.
    """

    def __init__(self, key, buf=None):
        if buf is None:
            buf = bytearray(MAX_FRAME)
        self.key = key
        self.buf = buf
        self._mv = memoryview(buf)
        room = (min(len(buf), MAX_FRAME) - MIN_FRAME - READINGS_HEAD_SIZE) // READING_SIZE
        if room < 1:
            raise FrameError(BAD_LENGTH, "buffer too small for one reading")
        self.capacity = room if room < MAX_READINGS else MAX_READINGS
        self.count = 0
        self.first_seq = 0
        self._open = False

    def begin(self, readings_boot, first_seq, base_ms, unsynced=False, pre_sync=False):
        """Start a batch: readings of boot readings_boot, seqs from first_seq, at base_ms on."""
        _check_int(readings_boot, MAX_U32, "readings boot")
        _check_int(first_seq, MAX_U32, "first seq")
        _check_int(base_ms, MAX_U64, "base time")
        if unsynced and pre_sync:
            raise FrameError(BAD_PAYLOAD, "a batch is either unsynced or pre-sync, not both")
        flags = READINGS_UNSYNCED if unsynced else (READINGS_PRE_SYNC if pre_sync else 0)
        struct.pack_into(
            _READINGS_HEAD_FMT, self.buf, HEADER_SIZE, readings_boot, first_seq, flags, base_ms, 0
        )
        self.first_seq = first_seq
        self.count = 0
        self._open = True

    def add(self, sensor, offset_ms, value):
        """Append a reading taken offset_ms after the base time; False when it does not fit.

        It does not fit when the batch is full or offset_ms is outside 0..MAX_OFFSET_MS:
        finish this batch and begin a new one. Values beyond float32 range become +-inf.
        """
        n = self.count
        if n >= self.capacity or offset_ms < 0 or offset_ms > MAX_OFFSET_MS:
            return False
        if sensor < 0 or sensor > 255 or not self._open:
            raise FrameError(BAD_PAYLOAD, "sensor index outside 0..255, or no begin()")
        if value > _MAX_F32:
            value = _INF
        elif value < _MIN_F32:
            value = _NEG_INF
        struct.pack_into(
            _READING_FMT,
            self.buf,
            HEADER_SIZE + READINGS_HEAD_SIZE + n * READING_SIZE,
            sensor,
            offset_ms,
            value,
        )
        self.count = n + 1
        return True

    def finish(self, boot, counter):
        """Seal the batch into a frame; returns a memoryview of the buffer (valid until begin)."""
        n = self.count
        if n < 1:
            raise FrameError(BAD_PAYLOAD, "a READINGS frame carries at least one reading")
        if self.first_seq + n - 1 > MAX_U32:
            raise FrameError(BAD_PAYLOAD, "reading seqs would pass 2**32-1")
        length = MIN_FRAME + READINGS_HEAD_SIZE + n * READING_SIZE
        _put_header(self.buf, READINGS, length, self.key, boot, counter)
        self.buf[HEADER_SIZE + READINGS_HEAD_SIZE - 1] = n
        end = length - MAC_SIZE
        self.buf[end:length] = self.key.signer.mac(self._mv[:end])
        return self._mv[:length]


# gateway only {
def encode_readings(
    key, boot, counter, readings_boot, first_seq, base_ms, unsynced, readings, pre_sync=False
):
    """READINGS as bytes from [(sensor index, offset ms, value)]; FrameError if they don't fit."""
    w = ReadingsWriter(
        key, bytearray(MIN_FRAME + READINGS_HEAD_SIZE + READING_SIZE * len(readings))
    )
    w.begin(readings_boot, first_seq, base_ms, unsynced, pre_sync)
    for sensor, offset_ms, value in readings:
        _check_int(sensor, 255, "sensor index")
        _check_int(offset_ms, MAX_OFFSET_MS, "offset ms")
        if not w.add(sensor, offset_ms, value):
            raise FrameError(BAD_LENGTH, "more than %d readings" % w.capacity)
    return bytes(w.finish(boot, counter))


def downlink_counter(uplink_counter, n):
    """The counter of the gateway's n-th answer (0..15) to the uplink frame uplink_counter."""
    if not 1 <= uplink_counter <= MAX_UPLINK_COUNTER or not 0 <= n < DOWNLINK_ANSWERS:
        raise FrameError(
            REPLAY, "no downlink counter for uplink %r answer %r" % (uplink_counter, n)
        )
    return uplink_counter * DOWNLINK_ANSWERS + n
# } gateway only


# ---- Stream framing ---------------------------------------------------------------------------


def frame_length(header):
    """Total length of the frame whose first HEADER_SIZE bytes are given, or FrameError."""
    if len(header) < HEADER_SIZE:
        raise FrameError(BAD_LENGTH, "header needs %d bytes, got %d" % (HEADER_SIZE, len(header)))
    if header[0] != VERSION:
        raise FrameError(BAD_VERSION, "version %d, this codec speaks %d" % (header[0], VERSION))
    length = (header[2] << 8) | header[3]
    if length < MIN_FRAME or length > MAX_FRAME:
        raise FrameError(BAD_LENGTH, "length %d outside %d..%d" % (length, MIN_FRAME, MAX_FRAME))
    return length


# ---- Replay guards ----------------------------------------------------------------------------


# gateway only {
class ReplayGuard:
    """Uplink replay window per (device id, key id): the latest (boot, counter) accepted.

    A frame passes when its counter is >= 1 and (boot, counter) is above the latest:
    a newer boot with any counter, or the same boot with a higher counter.
    """

    def __init__(self):
        self._latest = {}

    def check(self, device_id, key_id, boot, counter):
        """Raise FrameError(STALE_BOOT or REPLAY) unless the frame is new; changes nothing."""
        if counter < 1:
            raise FrameError(REPLAY, "counter 0 is never valid")
        last = self._latest.get((bytes(device_id), key_id))
        if last is None:
            return
        if boot < last[0]:
            raise FrameError(STALE_BOOT, "boot %d, latest seen %d" % (boot, last[0]))
        if boot == last[0] and counter <= last[1]:
            raise FrameError(REPLAY, "counter %d, latest seen %d" % (counter, last[1]))

    def commit(self, device_id, key_id, boot, counter):
        """Record an authenticated frame; never moves the window backwards."""
        k = (bytes(device_id), key_id)
        last = self._latest.get(k)
        if last is None or (boot, counter) > last:
            self._latest[k] = (boot, counter)

    def latest(self, device_id, key_id):
        """(boot, counter) of the latest accepted frame, or None."""
        return self._latest.get((bytes(device_id), key_id))

    def forget(self, device_id, key_id):
        """Drop the window of a retired key."""
        self._latest.pop((bytes(device_id), key_id), None)

    def export_state(self):
        """The windows as JSON-friendly rows [device hex, key id, boot, counter], sorted."""
        rows = [[device_hex(d), k, b, c] for (d, k), (b, c) in self._latest.items()]
        rows.sort()
        return rows

    def import_state(self, rows):
        """Merge rows from export_state(); the later (boot, counter) wins."""
        from binascii import unhexlify

        for hex_id, key_id, boot, counter in rows:
            self.commit(unhexlify(hex_id), key_id, boot, counter)
# } gateway only


class DownlinkGuard:
    """A node's counters for one boot: allocates uplink counters, refuses replayed downlinks.

    A downlink frame passes when it is addressed to this boot, its counter is above the last
    downlink accepted, and it answers an uplink counter this node has already sent.
    """

    def __init__(self, boot):
        self.boot = boot
        self.last_sent = 0
        self.last_received = 0

    def next_counter(self):
        """The counter for the next uplink frame."""
        if self.last_sent >= MAX_UPLINK_COUNTER:
            raise FrameError(REPLAY, "uplink counter exhausted: start a new boot")
        self.last_sent += 1
        return self.last_sent

    def check(self, device_id, key_id, boot, counter):
        """Raise FrameError(STALE_BOOT or REPLAY) unless the downlink frame is new."""
        if boot != self.boot:
            raise FrameError(STALE_BOOT, "frame for boot %d, this is boot %d" % (boot, self.boot))
        if counter <= self.last_received:
            raise FrameError(REPLAY, "counter %d, latest %d" % (counter, self.last_received))
        if counter // DOWNLINK_ANSWERS > self.last_sent or counter < DOWNLINK_ANSWERS:
            raise FrameError(REPLAY, "counter %d answers no uplink sent" % counter)

    def commit(self, device_id, key_id, boot, counter):
        if counter > self.last_received:
            self.last_received = counter


# ---- Decoding ---------------------------------------------------------------------------------


class Message:
    """A decoded frame: header fields common to every type."""

    def __init__(self, frame_type, device_id, key_id, boot, counter):
        self.type = frame_type
        self.device_id = device_id
        self.key_id = key_id
        self.boot = boot
        self.counter = counter

    @property
    def type_name(self):
        return type_name(self.type)

    def __repr__(self):
        return "<%s %s key=%d boot=%d counter=%d>" % (
            self.type_name,
            device_hex(self.device_id),
            self.key_id,
            self.boot,
            self.counter,
        )


# gateway only {
class HelloMessage(Message):
    """HELLO: .fw_version, .reset_cause, .drops (list of int), .sensors (list of (name, unit)),
    .failures (per sensor (could not read, out of range); None when the HELLO has none),
    .free_flash (bytes an update may use; None when the HELLO does not say)."""


class ReadingsMessage(Message):
    """READINGS: .readings_boot, .first_seq, .base_ms, .unsynced, .pre_sync, .readings.

    The i-th reading has seq first_seq + i and was taken at base_ms + its offset.
    """

    @property
    def last_seq(self):
        return self.first_seq + len(self.readings) - 1
# } gateway only


class AckMessage(Message):
    """ACK: .readings_boot and .through_seq (None: no readings acked), .gateway_time_ms or None."""


class ErrorMessage(Message):
    """ERROR: .reason, .ref (refused frame's counter; for STALE_BOOT the latest boot), .detail."""

    @property
    def reason_name(self):
        return reason_name(self.reason)


class ConfigMessage(Message):
    """CONFIG: .settings (dict)."""


# gateway only {
class ClaimMessage(Message):
    """CLAIM: .nonce (bytes), .fw_version."""
# } gateway only


class IdentityMessage(Message):
    """IDENTITY: the header's key id is the node's from now on."""


class OtaMessage(Message):
    """The four OTA frames (one class: each costs the node heap). Every one has .ref, the
    release ref, and
    - OTA_OFFER: .kind, .version, .files (list of (path, size, SHA-256 digest));
    - OTA_CHUNK_REQUEST: .file_index, .offset, .length;
    - OTA_CHUNK: .file_index, .offset, .data (a memoryview into the frame, not a copy: valid
      while the frame's buffer is, so write it out or copy it before the next frame);
    - OTA_RESULT: .state (an OTA_* state; unknown codes are kept), .bytes_done, .reason.
    """


class _Reader:
    """Bounds-checked reads within a payload (never into the MAC)."""

    def __init__(self, frame, off, end):
        self.frame = frame
        self.off = off
        self.end = end

    def take(self, n):
        off = self.off
        if n < 0 or off + n > self.end:
            raise ValueError("payload ends %d bytes early" % (off + n - self.end))
        self.off = off + n
        return off

    def u8(self):
        return self.frame[self.take(1)]

    def unpack(self, fmt, size):
        return struct.unpack_from(fmt, self.frame, self.take(size))

    def str8(self):
        n = self.u8()
        off = self.take(n)
        return str(bytes(self.frame[off : off + n]), "utf-8")

    def rest(self):
        off = self.take(self.end - self.off)
        return bytes(self.frame[off : self.end])


# gateway only {
def _parse_hello(m, r):
    m.reset_cause = r.u8()
    m.fw_version = r.str8()
    n = r.u8()
    m.drops = list(r.unpack(">%dI" % n, 4 * n)) if n else []
    m.sensors = []
    for _ in range(r.u8()):
        name = r.str8()
        m.sensors.append((name, r.str8()))
    m.failures = None  # a node before the section, or one that sends none
    if r.off < r.end:
        n = r.u8()
        if n != len(m.sensors):
            raise ValueError("failure counts for %d sensors, table of %d" % (n, len(m.sensors)))
        m.failures = [r.unpack(_FAILURES_FMT, 8) for _ in range(n)]
    m.free_flash = None  # a node before the section, or one that cannot say (safe mode)
    if r.off < r.end:
        m.free_flash = r.unpack(">I", 4)[0]  # a cut section ends early: BAD_PAYLOAD


def _parse_readings(m, r):
    boot, seq, flags, base, n = r.unpack(_READINGS_HEAD_FMT, READINGS_HEAD_SIZE)
    if flags & ~(READINGS_UNSYNCED | READINGS_PRE_SYNC) or flags == (
        READINGS_UNSYNCED | READINGS_PRE_SYNC
    ):
        raise ValueError("unknown flags 0x%02x" % flags)
    if n < 1 or r.off + n * READING_SIZE != r.end:
        raise ValueError("count %d does not match the payload length" % n)
    if seq + n - 1 > MAX_U32:
        raise ValueError("reading seqs pass 2**32-1")
    m.readings_boot = boot
    m.first_seq = seq
    m.base_ms = base
    m.unsynced = bool(flags & READINGS_UNSYNCED)
    m.pre_sync = bool(flags & READINGS_PRE_SYNC)
    m.readings = [r.unpack(_READING_FMT, READING_SIZE) for _ in range(n)]
# } gateway only


def _parse_ack(m, r):
    flags, boot, seq, t = r.unpack(_ACK_FMT, ACK_SIZE)
    if flags & ~(ACK_HAS_READINGS | ACK_HAS_TIME):
        raise ValueError("unknown flags 0x%02x" % flags)
    # Fields whose flag is clear must be zero, so that every ACK has exactly one encoding.
    if flags & ACK_HAS_READINGS:
        m.readings_boot, m.through_seq = boot, seq
    elif boot or seq:
        raise ValueError("readings fields set without their flag")
    else:
        m.readings_boot = m.through_seq = None
    if flags & ACK_HAS_TIME:
        m.gateway_time_ms = t
    elif t:
        raise ValueError("time set without its flag")
    else:
        m.gateway_time_ms = None


def _parse_error(m, r):
    m.reason, m.ref = r.unpack(_ERROR_HEAD_FMT, 5)
    m.detail = r.str8()


# gateway only {
def _parse_claim(m, r):
    off = r.take(CLAIM_NONCE_SIZE)
    m.nonce = bytes(r.frame[off : off + CLAIM_NONCE_SIZE])
    m.fw_version = r.str8()
# } gateway only


def _parse_identity(m, r):
    pass  # no payload; decode() refuses one under the claim key id (BAD_KEY_ID)


def _parse_config(m, r):
    settings = json.loads(str(r.rest(), "utf-8"))
    if not isinstance(settings, dict):
        raise ValueError("not a JSON object")
    m.settings = settings


def _parse_ota(m, r):
    if m.type == OTA_OFFER:
        m.ref, m.kind = r.unpack(">IB", 5)
        m.version = r.str8()
        n = r.u8()
        _check_offer(m.kind, n)
        m.files = []
        for _ in range(n):
            path = r.str8()
            if not path:
                raise ValueError("a file without a path")
            size, digest = r.unpack(_OTA_FILE_FMT, 36)
            m.files.append((path, size, digest))
        return
    m.ref, u8, u32 = r.unpack(_OTA_HEAD_FMT, 9)
    if m.type == OTA_RESULT:
        m.state, m.bytes_done, m.reason = u8, u32, r.str8()
        return
    m.file_index, m.offset = u8, u32
    if m.type == OTA_CHUNK_REQUEST:
        n = m.length = r.unpack(">H", 2)[0]
    else:
        n = r.end - r.off
        off = r.take(n)
        m.data = memoryview(r.frame)[off : off + n]
    _check_chunk(u32, n)


_PARSERS = {
    ACK: (AckMessage, _parse_ack),
    ERROR_DOWN: (ErrorMessage, _parse_error),
    CONFIG: (ConfigMessage, _parse_config),
    IDENTITY: (IdentityMessage, _parse_identity),
    OTA_OFFER: (OtaMessage, _parse_ota),
    OTA_CHUNK: (OtaMessage, _parse_ota),
    # gateway only {
    HELLO: (HelloMessage, _parse_hello),
    READINGS: (ReadingsMessage, _parse_readings),
    ERROR_UP: (ErrorMessage, _parse_error),
    CLAIM: (ClaimMessage, _parse_claim),
    OTA_CHUNK_REQUEST: (OtaMessage, _parse_ota),
    OTA_RESULT: (OtaMessage, _parse_ota),
    # } gateway only
}


def decode(frame, lookup, guard, downlink=False):
    """Verify and parse one whole frame; returns a *Message or raises FrameError.

    lookup(device_id, key_id) returns the device's Key (or Signer, or secret bytes); None or
    UNKNOWN_DEVICE when the device is unknown; UNKNOWN_KEY when the device is known but that
    key id is not.
    guard is a ReplayGuard (gateway, downlink=False) or a DownlinkGuard (node, downlink=True).
    Checks run in the order docs/protocol.md states: the replay check follows the MAC, and
    the guard is committed before the payload is parsed. No exception but FrameError escapes.
    """
    try:
        return _decode(frame, lookup, guard, downlink)
    except FrameError:
        raise
    except Exception as e:  # a bug in lookup/guard, or a non-bytes frame: still one class
        raise FrameError(INTERNAL, "%s: %s" % (type(e).__name__, e))  # noqa: B904


def _decode(frame, lookup, guard, downlink):
    size = len(frame)
    if size < HEADER_SIZE:
        raise FrameError(BAD_LENGTH, "%d bytes, shorter than a header" % size)
    version, ftype, length, device_id, key_id, boot, counter = struct.unpack_from(
        _HEADER_FMT, frame, 0
    )
    header = (ftype, device_id, key_id, boot, counter)
    if version != VERSION:
        raise FrameError(
            BAD_VERSION, "version %d, this codec speaks %d" % (version, VERSION), header
        )
    if length < MIN_FRAME or length > MAX_FRAME or length != size:
        raise FrameError(BAD_LENGTH, "length field %d, frame %d bytes" % (length, size), header)
    if ftype not in (DOWNLINK_TYPES if downlink else UPLINK_TYPES):
        raise FrameError(BAD_TYPE, "%s not accepted here" % type_name(ftype), header)
    # The site's claim key is shared by every board of a site set up offline: it may sign a
    # CLAIM (and the gateway's ERROR answer to one), nothing else, and a CLAIM needs it.
    if key_id == CLAIM_KEY_ID:
        if ftype != (ERROR_DOWN if downlink else CLAIM):
            raise FrameError(BAD_KEY_ID, "%s under the claim key id" % type_name(ftype), header)
    elif ftype == CLAIM:
        raise FrameError(BAD_KEY_ID, "CLAIM under key id %d" % key_id, header)
    found = lookup(device_id, key_id)
    if found is None or (isinstance(found, int) and found != UNKNOWN_KEY):
        raise FrameError(UNKNOWN_DEVICE, "device %s" % device_hex(device_id), header)
    if isinstance(found, int):
        why = "device %s key %d" % (device_hex(device_id), key_id)
        raise FrameError(UNKNOWN_KEY, why, header)
    if isinstance(found, Key):
        signer = found.signer
    elif isinstance(found, Signer):
        signer = found
    else:
        signer = Signer(found)
    mv = memoryview(frame)
    end = size - MAC_SIZE
    if not signer.verify(mv[:end], mv[end:]):
        raise FrameError(BAD_MAC, "MAC does not verify", header)
    try:
        guard.check(device_id, key_id, boot, counter)
    except FrameError as e:
        e.header = header
        raise
    guard.commit(device_id, key_id, boot, counter)
    cls, parse = _PARSERS[ftype]
    m = cls(ftype, device_id, key_id, boot, counter)
    r = _Reader(frame, HEADER_SIZE, end)
    try:
        parse(m, r)
    except Exception as e:  # a FrameError from a shared check: its message, not its name again
        why = "%s: %s" % (type_name(ftype), getattr(e, "message", e))
        raise FrameError(BAD_PAYLOAD, why, header)  # noqa: B904
    if r.off != end:
        why = "%s: %d trailing bytes" % (type_name(ftype), end - r.off)
        raise FrameError(BAD_PAYLOAD, why, header)
    return m
