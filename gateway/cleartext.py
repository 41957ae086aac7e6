"""Where a password may cross the network in clear text: one rule for SMTP, IMAP and POP3.

Legacy programs often cannot do TLS, and on the same machine nothing crosses a wire, so the
default is ``loopback``: clear-text AUTH/LOGIN/USER only from 127.0.0.0/8 and ::1, everything
else only after STARTTLS/STLS or on the implicit-TLS ports.
"""

from __future__ import annotations

import ipaddress


def is_loopback(peer_host: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped loopback (a dual-stack socket's view of 127.0.0.1)."""
    try:
        address = ipaddress.ip_address(peer_host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def plaintext_auth_allowed(policy: str, peer_host: str, tls_active: bool) -> bool:
    """Whether a password may be sent here: always under TLS, else per the ``plaintext_auth``
    setting (never, loopback or always)."""
    if tls_active or policy == "always":
        return True
    return policy == "loopback" and is_loopback(peer_host)
