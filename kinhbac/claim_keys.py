"""A site claim key's fingerprint: how a gateway tells the fleet which of the site's claim keys
(the current one, or during a rotation's overlap the previous one) verified a CLAIM, without
sending the key. Both ends compute it here, so they cannot drift apart."""

import hashlib

_DOMAIN = b"kinhbac-claim-key-fingerprint-v1:"  # never equal to a hash of the key used elsewhere
FINGERPRINT_CHARS = 16  # 64 bits: tells a site's two keys apart; reveals nothing of a key


def fingerprint(claim_key: bytes) -> str:
    """16 lower-case hex digits naming `claim_key`."""
    return hashlib.sha256(_DOMAIN + bytes(claim_key)).hexdigest()[:FINGERPRINT_CHARS]
