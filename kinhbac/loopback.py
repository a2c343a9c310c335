"""Whether a host is this machine: the one place secrets may travel without TLS.

Shared by every role (the gateway's settings, its fleet client, the technician's tools), so it
needs nothing beyond the standard library."""

import ipaddress


def is_loopback_host(host: str) -> bool:
    """True for "localhost" and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
