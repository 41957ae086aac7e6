"""TLS material for the local listeners: load the admin's pair, or make a self-signed one.

Legacy clients usually connect to ``localhost``; fetchmail and mbsync cannot verify an IP address
in a certificate, so the generated certificate names ``localhost``, the configured hostname and the
loopback addresses. It is generated once and kept in the state directory, so clients that pinned
it keep working across restarts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_VALIDITY = datetime.timedelta(days=825)  # the longest lifetime Apple clients accept


@dataclass(frozen=True)
class CertificatePair:
    cert: Path
    key: Path


def check_pair(cert: Path, key: Path) -> str | None:
    """Return why this cert/key pair cannot be used, or None if it can."""
    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except OSError as error:
        return f"cannot read certificate {cert}: {error.strerror}"
    except ValueError:
        return f"{cert} is not a PEM certificate"
    try:
        private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except OSError as error:
        return f"cannot read private key {key}: {error.strerror}"
    except (ValueError, TypeError):
        return f"{key} is not an unencrypted PEM private key"
    if certificate.public_key() != private_key.public_key():
        return f"private key {key} does not belong to certificate {cert}"
    return None


def ensure_certificate(state_dir: Path, hostname: str) -> CertificatePair:
    """Return the generated pair in ``state_dir/tls``, creating it on first use."""
    directory = state_dir / "tls"
    pair = CertificatePair(directory / "gateway.crt", directory / "gateway.key")
    if pair.cert.exists() and pair.key.exists():
        return pair
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_key = ec.generate_private_key(ec.SECP256R1())
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(pair.key, key_pem)
    certificate = _self_signed(private_key, hostname)
    pair.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return pair


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _self_signed(private_key: ec.EllipticCurvePrivateKey, hostname: str) -> x509.Certificate:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        if hostname != "localhost":
            names.append(x509.DNSName(hostname))
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )


def server_context(pair: CertificatePair) -> ssl.SSLContext:
    """An ``ssl`` server context for the asyncio listeners (aiosmtpd, the admin page)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(pair.cert, pair.key)
    return context


def twisted_context_factory(pair: CertificatePair) -> Any:
    """The same pair as a Twisted context factory, for the IMAP and POP3 listeners."""
    from twisted.internet import ssl as twisted_ssl

    chain = x509.load_pem_x509_certificates(pair.cert.read_bytes())
    return twisted_ssl.CertificateOptions(
        privateKey=serialization.load_pem_private_key(pair.key.read_bytes(), password=None),
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=twisted_ssl.TLSVersion.TLSv1_2,
    )
