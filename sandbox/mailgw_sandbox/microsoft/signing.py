"""JSON Web Tokens both ways: id_tokens the sandbox signs, client assertions it verifies.

id_tokens are real RS256 JWTs with a key published at the tenant's ``jwks_uri``, so a client
that validates them can. Client assertions are what MSAL sends instead of a secret when an app
authenticates with a certificate: RS256 with an ``x5t`` (SHA-1 thumbprint) header when the caller
gives a thumbprint, PS256 with ``x5t#S256`` when it gives the certificate.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@functools.cache
def _signing_key() -> rsa.RSAPrivateKey:
    """One key per process: generating RSA keys is slow and every test starts a sandbox."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_id() -> str:
    der = (
        _signing_key()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return b64url(hashlib.sha256(der).digest()[:20])


def sign(claims: dict[str, Any]) -> str:
    """An RS256 JWT over ``claims``, with the ``kid`` the JWKS lists."""
    header = {"typ": "JWT", "alg": "RS256", "kid": _key_id()}
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = _signing_key().sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def jwks() -> dict[str, Any]:
    numbers = _signing_key().public_key().public_numbers()

    def integer(value: int) -> str:
        return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))

    key = {"kty": "RSA", "use": "sig", "kid": _key_id()}
    return {"keys": [{**key, "n": integer(numbers.n), "e": integer(numbers.e)}]}


class AssertionRefused(ValueError):
    """A client assertion was refused; ``code`` is the AADSTS number to answer with."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code


@dataclass(frozen=True)
class Certificate:
    """A certificate an app registered (its public key is what matters)."""

    sha1: bytes
    sha256: bytes
    public_key: rsa.RSAPublicKey

    @classmethod
    def from_pem(cls, pem: bytes) -> Certificate:
        certificate = x509.load_pem_x509_certificate(pem)
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("Entra accepts RSA certificates for client assertions")
        return cls(
            certificate.fingerprint(hashes.SHA1()),  # noqa: S303 - x5t is defined as SHA-1
            certificate.fingerprint(hashes.SHA256()),
            key,
        )


def verify_assertion(
    assertion: str,
    client_id: str,
    audiences: Collection[str],
    certificates: list[Certificate],
    now: float,
) -> None:
    """Check a client assertion as Entra does: registered key, signature, iss/sub, aud, time."""
    try:
        header_b64, payload_b64, signature_b64 = assertion.split(".")
        header = json.loads(b64url_decode(header_b64))
        claims = json.loads(b64url_decode(payload_b64))
        signature = b64url_decode(signature_b64)
    except ValueError:
        header = claims = None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise AssertionRefused(50027, "JWT token is invalid or malformed.")
    certificate = _find_certificate(header, certificates)
    _verify_signature(header.get("alg"), certificate, f"{header_b64}.{payload_b64}", signature)
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        raise AssertionRefused(
            700021, "Client assertion application identifier doesn't match 'client_id' parameter."
        )
    if claims.get("aud") not in audiences:
        raise AssertionRefused(
            700212, f"The audience '{claims.get('aud')}' of the client assertion is not valid."
        )
    if not isinstance(claims.get("exp"), int | float) or claims["exp"] <= now:
        raise AssertionRefused(700024, "Client assertion is not within its valid time range.")


def _find_certificate(header: dict[str, Any], certificates: list[Certificate]) -> Certificate:
    """By ``x5t#S256`` or ``x5t`` (MSAL keeps the base64 padding; the JOSE spec drops it)."""
    sha256 = str(header.get("x5t#S256", "")).rstrip("=")
    sha1 = str(header.get("x5t", "")).rstrip("=")
    for certificate in certificates:
        if sha256 == b64url(certificate.sha256) or sha1 == b64url(certificate.sha1):
            return certificate
    raise AssertionRefused(
        700027,
        "Client assertion failed signature validation. (Reason - The key was not found., "
        f"Thumbprint of key used by client: '{sha256 or sha1}'.)",
    )


def _verify_signature(
    algorithm: object, certificate: Certificate, signed: str, signature: bytes
) -> None:
    if algorithm == "RS256":
        scheme: padding.AsymmetricPadding = padding.PKCS1v15()
    elif algorithm == "PS256":
        scheme = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    else:
        raise AssertionRefused(5002738, f"'{algorithm}' is not a supported signature algorithm.")
    try:
        certificate.public_key.verify(signature, signed.encode(), scheme, hashes.SHA256())
    except InvalidSignature:
        raise AssertionRefused(
            700027,
            "Client assertion failed signature validation. (Reason - The signature is invalid.)",
        ) from None
