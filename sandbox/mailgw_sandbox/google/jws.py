"""RS256 JSON Web Signatures: Google signs id_tokens with it, service accounts their grants.

Written against ``cryptography`` directly (a few lines) so the sandbox checks exactly what Google
checks: the algorithm, the signature over ``header.payload``, and nothing it does not.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


class InvalidJws(Exception):
    """The token is not a well-formed RS256 JWT signed by the expected key."""


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding (JWTs drop it, Gmail keeps it)."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as error:
        raise InvalidJws("not base64url") from error


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: rsa.RSAPrivateKey) -> str:
    """PKCS#8 PEM, the form Google puts in a service-account key file."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def sign(key: rsa.RSAPrivateKey, claims: dict[str, Any], key_id: str) -> str:
    header = {"alg": "RS256", "kid": key_id, "typ": "JWT"}
    signing_input = ".".join(
        b64url_encode(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url_encode(signature)}"


def verify(token: str, public_key: rsa.RSAPublicKey) -> dict[str, Any]:
    """Return the claims of ``token`` if ``public_key`` signed it with RS256."""
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidJws("a JWT has three parts")
    header, claims = (_json_part(part) for part in parts[:2])
    if header.get("alg") != "RS256":
        raise InvalidJws("only RS256 is accepted")
    try:
        public_key.verify(
            b64url_decode(parts[2]),
            f"{parts[0]}.{parts[1]}".encode("ascii"),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except (InvalidSignature, UnicodeEncodeError) as error:
        raise InvalidJws("bad signature") from error
    return claims


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload, unchecked: only to learn which key should have signed it."""
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidJws("a JWT has three parts")
    return _json_part(parts[1])


def _json_part(part: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(part))
    except ValueError as error:
        raise InvalidJws("not JSON") from error
    if not isinstance(value, dict):
        raise InvalidJws("not a JSON object")
    return value
