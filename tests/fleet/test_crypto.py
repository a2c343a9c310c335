"""Sealed secrets open only with the same service key and for the row they were sealed for."""

import pytest

from kinhbac.fleet.crypto import SecretBox, SecretError

KEY = "a-service-key-of-forty-characters-------"


def test_sealed_secret_opens_for_its_context_and_hides_the_plaintext():
    box = SecretBox(KEY)
    secret = bytes(range(32))
    blob = box.seal(secret, context=b"device 1")
    assert secret not in blob
    assert box.open(blob, context=b"device 1") == secret
    assert box.seal(secret, context=b"device 1") != blob  # fresh nonce each time


def test_sealed_secret_does_not_open_for_another_row():
    box = SecretBox(KEY)
    blob = box.seal(b"secret", context=b"device 1")
    with pytest.raises(SecretError):
        box.open(blob, context=b"device 2")


def test_sealed_secret_does_not_open_with_another_service_key():
    blob = SecretBox(KEY).seal(b"secret", context=b"device 1")
    with pytest.raises(SecretError, match="does not open with this service key"):
        SecretBox(KEY + "x").open(blob, context=b"device 1")


@pytest.mark.parametrize("blob", [b"", b"\x02" + bytes(40), b"\x01short"])
def test_malformed_blobs_are_refused(blob):
    with pytest.raises(SecretError):
        SecretBox(KEY).open(blob, context=b"device 1")
