"""Outbound HTTPS to the providers: one place that decides whom we trust and how we connect.

The configured ``ca_bundle`` must win over whatever the environment says. ``requests`` (under
MSAL and google-auth) lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's own
``verify``, and httpx reads SSL_CERT_FILE when given ``verify=True``; machines often set these.
So every client here gets its trust explicitly: httpx an ``ssl.SSLContext``, requests a session
with ``trust_env=False`` (proxies are then copied from the environment explicitly, since
corporate networks need them).
"""

from __future__ import annotations

import ssl
import urllib.request
from pathlib import Path

import certifi
import httpx
import requests

from .config import UpstreamServer

# Debian/Ubuntu, Fedora/RHEL, then the bundle that ships with certifi.
_SYSTEM_BUNDLES = (
    Path("/etc/ssl/certs/ca-certificates.crt"),
    Path("/etc/pki/tls/certs/ca-bundle.crt"),
)
USER_AGENT = "mail-oauth-gateway"


def system_ca_file() -> Path:
    for candidate in _SYSTEM_BUNDLES:
        if candidate.is_file():
            return candidate
    return Path(certifi.where())


def trust_file(state_dir: Path, extra: Path | None) -> Path:
    """The PEM file of every CA we trust outbound: the system's plus the configured extra ones.

    ``requests`` takes a single file, so the two are concatenated into the state directory at
    start-up (rewritten each time, so a changed ``ca_bundle`` takes effect on restart).
    """
    system = system_ca_file()
    if extra is None:
        return system
    combined = state_dir / "tls" / "outbound-ca.pem"
    combined.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    combined.write_bytes(system.read_bytes() + b"\n" + extra.read_bytes())
    return combined


def ssl_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def async_client(ca_file: Path, timeout: float = 60.0) -> httpx.AsyncClient:
    """The one httpx client factory for provider APIs."""
    return httpx.AsyncClient(
        verify=ssl_context(ca_file),
        timeout=httpx.Timeout(timeout, connect=15.0),
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
    )


def requests_session(ca_file: Path) -> requests.Session:
    """A requests session for MSAL and google-auth whose trust the environment cannot change."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(ca_file)
    session.proxies.update(urllib.request.getproxies())
    session.headers["User-Agent"] = USER_AGENT
    return session


def upstream_context(server: UpstreamServer, trust: Path) -> ssl.SSLContext:
    """TLS to an upstream SMTP/IMAP/POP3 server: the outbound trust plus the server's own
    ``ca_file`` (a private CA); hostnames are verified."""
    context = ssl.create_default_context(cafile=str(trust))
    if server.ca_file is not None:
        context.load_verify_locations(cafile=str(server.ca_file))
    return context
