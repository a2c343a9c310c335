"""Device identity: MAC addresses and the 8-byte wire id the fleet derives from them."""

import re

WIRE_ID_PREFIX = b"kb"  # the 8-byte wire id is "kb" + the 6-byte MAC, as the emulator issues
_SEPARATED = re.compile(r"^[0-9a-f]{2}([:-])(?:[0-9a-f]{2}\1){4}[0-9a-f]{2}$")
_BARE = re.compile(r"^[0-9a-f]{12}$")


def normalise_mac(text: str) -> str:
    """`text` as aa:bb:cc:dd:ee:ff; ValueError says why it is not a device's MAC."""
    value = text.strip().lower()
    if _SEPARATED.match(value):
        digits = value.replace(value[2], "")
    elif _BARE.match(value):
        digits = value
    else:
        raise ValueError(
            f"{text!r} is not a MAC address: expected six hex bytes like aa:bb:cc:dd:ee:ff"
        )
    raw = bytes.fromhex(digits)
    if raw[0] & 0x01:
        raise ValueError(f"{text!r} is a multicast address, not a device's MAC")
    if raw == bytes(6):
        raise ValueError(f"{text!r} is the all-zero address, not a device's MAC")
    return ":".join(f"{b:02x}" for b in raw)


def wire_id_for(mac: str) -> str:
    """The device's wire id (16 hex digits) for its normalised MAC."""
    return (WIRE_ID_PREFIX + bytes.fromhex(mac.replace(":", ""))).hex()
