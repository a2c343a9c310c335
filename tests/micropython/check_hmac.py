# Runs under the micropython binary: the codec's own HMAC-SHA256 (no hmac module on
# MicroPython) must reproduce every RFC 4231 vector.
# Usage: micropython check_hmac.py <rfc4231.json>. Last line: "HMAC PASSED <n>".
import json
import sys
from binascii import hexlify, unhexlify

import wire

with open(sys.argv[1]) as f:
    vectors = json.load(f)["hmac_sha256"]
bad = 0
for v in vectors:
    want = v["hmac"]
    got = hexlify(wire.hmac_sha256(unhexlify(v["key"]), unhexlify(v["data"]))).decode()
    got = got[: len(want)]  # case 5 is truncated to 128 bits
    if got != want:
        bad += 1
        print("FAIL case", v["case"], got)
    else:
        print("ok case", v["case"])
if bad:
    print("HMAC FAILED", bad)
    sys.exit(1)
print("HMAC PASSED", len(vectors))
