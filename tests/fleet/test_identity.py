"""MAC addresses are normalised, bad ones named; the wire id is "kb" + MAC."""

import pytest

from kinhbac import wire
from kinhbac.fleet.identity import normalise_mac, wire_id_for


@pytest.mark.parametrize("text", ["24:0a:c4:12:34:56", "24:0A:C4:12:34:56",
                                  "24-0a-c4-12-34-56", "240AC4123456", " 24:0a:c4:12:34:56\n"])
def test_mac_spellings_normalise_to_lower_case_colons(text):
    assert normalise_mac(text) == "24:0a:c4:12:34:56"


@pytest.mark.parametrize("text, why", [
    ("24:0a:c4:12:34", "not a MAC address"),
    ("24:0a:c4:12:34:5g", "not a MAC address"),
    ("24:0a-c4:12:34:56", "not a MAC address"),
    ("25:0a:c4:12:34:56", "multicast"),
    ("00:00:00:00:00:00", "all-zero"),
])
def test_bad_macs_are_refused_saying_why(text, why):
    with pytest.raises(ValueError, match=why):
        normalise_mac(text)


def test_wire_id_is_kb_and_the_mac_as_the_emulator_issues_it():
    mac = "24:0a:c4:12:34:56"
    wire_id = wire_id_for(mac)
    assert bytes.fromhex(wire_id) == b"kb" + bytes.fromhex("240ac4123456")
    assert len(bytes.fromhex(wire_id)) == wire.DEVICE_ID_SIZE
