"""The node's config file (firmware/node/config.py reads it) made from a site profile and either
the identity the fleet issued or, offline, the site's claim key."""

import json
from typing import Any

from kinhbac.device.errors import DeviceToolError

IDENTITY = ("device_id", "key_id", "secret")
# Fields that come from the site profile and the identity; --set cannot replace them.
MANAGED = (*IDENTITY, "claim_key", "wifi", "gateway", "sensors")


def parse_setting(text: str) -> tuple[str, Any]:
    """`name=value` from the command line; the value is JSON when it parses as JSON (numbers,
    true/false, lists), else a string."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise DeviceToolError(f"--set {text!r}: write it as name=value, e.g. interval_ms=5000")
    if name in MANAGED:
        raise DeviceToolError(
            f"--set {name}: this comes from the site profile and the fleet; change the site "
            "in the fleet instead"
        )
    try:
        return name, json.loads(raw)
    except ValueError:
        return name, raw


def site_part(profile: dict[str, Any]) -> dict[str, Any]:
    """What every node of the site shares: WiFi, where its gateway is, its sensor kit."""
    slug = profile.get("slug", "?")
    missing = [name for name in ("wifi_ssid", "gateway_host", "gateway_port")
               if not profile.get(name)]
    if missing:
        raise DeviceToolError(
            f"site {slug!r} has no {', '.join(missing)} in the fleet: an admin sets them "
            f"(PATCH /api/sites/{profile.get('id', '<id>')}), then fetch the profile again"
        )
    return {
        "wifi": {"ssid": profile["wifi_ssid"], "password": profile.get("wifi_password") or ""},
        "gateway": {"host": profile["gateway_host"], "port": int(profile["gateway_port"])},
        "sensors": list(profile.get("sensor_kit") or []),
    }


def with_identity(profile: dict[str, Any], device: dict[str, Any],
                  settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """A node with credentials: `device` is the fleet's answer holding the secret."""
    return {
        **(settings or {}),
        **site_part(profile),
        "device_id": device["wire_id"],
        "key_id": device["key_id"],
        "secret": device["secret"],
    }


def with_claim_key(profile: dict[str, Any],
                   settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """A node that introduces itself with the site's claim key and waits to be approved."""
    claim_key = profile.get("claim_key")
    if not isinstance(claim_key, str) or not claim_key:
        raise DeviceToolError(
            f"the profile of site {profile.get('slug')!r} has no claim key: fetch it again "
            "while online"
        )
    return {**(settings or {}), **site_part(profile), "claim_key": claim_key}


def encode(config: dict[str, Any]) -> bytes:
    """The file's bytes, as kinhbac.firmware.config_file writes them for the emulator."""
    return json.dumps(config, indent=1, sort_keys=True).encode()
