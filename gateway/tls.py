"""TLS material for the local listeners: load the admin's pair, or make a self-signed one.

Legacy clients usually connect to ``localhost``; fetchmail and mbsync cannot verify an IP address
in a certificate, so the generated certificate names ``localhost``, the configured hostname and the
loopback addresses. It is generated once and kept in the state directory with the CA that signed
it (``ca.crt``, the file to give clients that verify), so they keep working across restarts.
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

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2  # TLS 1.0 and 1.1 are deprecated (RFC 8996)
# TLS 1.2 suites for every listener: forward secrecy (ECDHE) and no SHA-1 MAC. AES-CBC with
# SHA-256/384 stays for older legacy programs without AES-GCM; TLS 1.3 suites (all AEAD) are
# OpenSSL's. This is Python's own server default narrowed to what Twisted can also serve.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:!aNULL:!eNULL:!SHA1:!AESCCM"


@dataclass(frozen=True)
class CertificatePair:
    cert: Path
    key: Path
    ca: Path | None = None  # the CA that clients should trust, when we made the pair ourselves


def check_pair(cert: Path, key: Path) -> str | None:
    """Return why this cert/key pair cannot be used, or None if it can."""
    try:
        certificate = x509.load_pem_x509_certificates(cert.read_bytes())[0]
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
    pair = _pair_in(state_dir / "tls", "gateway")
    if pair.cert.exists() and pair.key.exists() and pair.ca and pair.ca.exists():
        return pair
    return create_ca_signed_pair(state_dir / "tls", "gateway", hostname)


def _pair_in(directory: Path, stem: str) -> CertificatePair:
    return CertificatePair(
        directory / f"{stem}.crt", directory / f"{stem}.key", directory / "ca.crt"
    )


def create_ca_signed_pair(directory: Path, stem: str, hostname: str) -> CertificatePair:
    """Make a one-off CA and a server certificate it signs; write ``ca.crt``, STEM.crt, STEM.key.

    A separate CA, rather than one self-signed certificate, is what strict verifiers accept
    (Python 3.13 turns on OpenSSL's X509_STRICT, which rejects a CA certificate used as a leaf).
    The CA's private key is never written: nobody can mint more certificates that clients of
    this CA would trust. A new pair therefore comes with a new CA.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pair = _pair_in(directory, stem)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, hostname)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _leaf_certificate(key, hostname, ca_key, ca_cert)
    pem = serialization.Encoding.PEM
    _write_private(
        pair.key,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    pair.cert.write_bytes(leaf.public_bytes(pem) + ca_cert.public_bytes(pem))
    assert pair.ca is not None
    pair.ca.write_bytes(ca_cert.public_bytes(pem))
    return pair


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _names(hostname: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        if hostname != "localhost":
            names.append(x509.DNSName(hostname))
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    return names


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _ca_certificate(ca_key: ec.EllipticCurvePrivateKey, hostname: str) -> x509.Certificate:
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"mail gateway local CA ({hostname})")]
    )
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        _builder(name, name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(ca_key, hashes.SHA256())
    )


def _leaf_certificate(
    key: ec.EllipticCurvePrivateKey,
    hostname: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    ca_identifier = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_names(hostname)), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(ca_identifier, critical=False)
        .sign(ca_key, hashes.SHA256())
    )


@dataclass(frozen=True)
class ServerTLS:
    """One certificate pair under one protocol and cipher policy, in both forms our listeners
    need: asyncio's ``ssl`` (SMTP, SMTPS) and Twisted's pyOpenSSL factory (IMAP, IMAPS, POP3,
    POP3S, and STARTTLS/STLS on them). Build it with :func:`server_tls` so no listener can drift
    to its library's own defaults (Twisted's accept CBC suites with SHA-1 and RSA key exchange).
    """

    stdlib: ssl.SSLContext
    twisted: Any


def server_tls(pair: CertificatePair) -> ServerTLS:
    """The contexts for every local listener, all under :data:`MINIMUM_VERSION` and
    :data:`CIPHERS`."""
    return ServerTLS(server_context(pair), _twisted_options(pair))


def server_context(pair: CertificatePair) -> ssl.SSLContext:
    """An asyncio ``ssl`` server context under the listeners' policy (also the sandbox's)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(CIPHERS)
    context.load_cert_chain(pair.cert, pair.key)
    return context


def _twisted_options(pair: CertificatePair) -> Any:
    """The same pair and policy as a Twisted context factory. Twisted leaves DHE off without
    DH parameters and so does OpenSSL 3 in Python; the policy names ECDHE only, so both agree."""
    from twisted.internet import ssl as twisted_ssl

    chain = x509.load_pem_x509_certificates(pair.cert.read_bytes())
    # Twisted annotates these as pyOpenSSL's PKey/X509 but only hands them to pyOpenSSL's
    # Context.use_privatekey/use_certificate/add_extra_chain_cert, which take the
    # cryptography objects too (pyOpenSSL deprecates its own): the annotations lag.
    return twisted_ssl.CertificateOptions(
        privateKey=serialization.load_pem_private_key(  # type: ignore[arg-type]
            pair.key.read_bytes(), password=None
        ),
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=chain[1:],  # type: ignore[arg-type]
        raiseMinimumTo=twisted_ssl.TLSVersion.lookupByName(MINIMUM_VERSION.name),
        acceptableCiphers=twisted_ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
    )
