"""Local passwords: salted scrypt hashes in a self-describing string.

The format is PHC-like, ``$scrypt$ln=15,r=8,p=1$<salt>$<hash>`` (base64 without padding), so the
cost can be raised later without breaking existing hashes: verification reads the parameters from
the string. scrypt comes with Python's hashlib, so no extra native dependency is needed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Hashable
from dataclasses import dataclass

# 2**15: 32 MiB and ~50-100 ms per check; slow for attackers, fine for logins.
_DEFAULT_LOG2_N = 15
_DEFAULT_R = 8
_DEFAULT_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32
_PATTERN = re.compile(
    r"^\$scrypt\$ln=(?P<ln>\d{1,2}),r=(?P<r>\d{1,2}),p=(?P<p>\d{1,2})"
    r"\$(?P<salt>[A-Za-z0-9+/]{16,})\$(?P<hash>[A-Za-z0-9+/]{32,})$"
)


class MalformedHash(ValueError):
    """The string is not a password hash this gateway can verify."""


@dataclass(frozen=True)
class ScryptHash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def derive(self, password: str) -> bytes:
        n = 1 << self.log2_n
        return hashlib.scrypt(
            password.encode("utf-8"),
            salt=self.salt,
            n=n,
            r=self.r,
            p=self.p,
            maxmem=256 * n * self.r + (1 << 20),
            dklen=len(self.digest),
        )


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def parse_hash(text: str) -> ScryptHash:
    """Parse and sanity-check a stored hash; the error says what is wrong in a sentence."""
    match = _PATTERN.match(text.strip())
    if not match:
        raise MalformedHash("not a $scrypt$ password hash")
    log2_n, r, p = int(match["ln"]), int(match["r"]), int(match["p"])
    if not 10 <= log2_n <= 20 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise MalformedHash(f"scrypt parameters ln={log2_n},r={r},p={p} are out of range")
    return ScryptHash(log2_n, r, p, _b64decode(match["salt"]), _b64decode(match["hash"]))


def hash_password(password: str, *, log2_n: int = _DEFAULT_LOG2_N) -> str:
    """Return a new salted hash of ``password`` for the config file."""
    if not password:
        raise ValueError("an empty password cannot be hashed")
    salt = secrets.token_bytes(_SALT_BYTES)
    params = ScryptHash(log2_n, _DEFAULT_R, _DEFAULT_P, salt, b"\0" * _HASH_BYTES)
    digest = params.derive(password)
    return (
        f"$scrypt$ln={log2_n},r={_DEFAULT_R},p={_DEFAULT_P}${_b64encode(salt)}${_b64encode(digest)}"
    )


def verify_password(password: str, stored: ScryptHash) -> bool:
    """Constant-time check. CPU-heavy by design: call it through ``asyncio.to_thread``."""
    return hmac.compare_digest(stored.derive(password), stored.digest)


class VerifiedLogins:
    """Credentials that passed a scrypt check, remembered as HMAC-SHA256 tags under a random key
    made for this process, so a program that logs in every few minutes is recognised in
    microseconds instead of ~100 ms of scrypt.

    Nothing here can be turned back into a password: the key never leaves memory and dies with
    the process. An entry holds the digest of the hash it was verified against, so it no longer
    matches once the account's password (its hash) changes; a restart drops them all. Only the
    login gate fills it, and only after a right password: a wrong one never reaches it.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._tags: dict[Hashable, tuple[bytes, bytes]] = {}  # user -> (tag, hash digest)

    def _tag(self, user: Hashable, password: str) -> bytes:
        # repr() of the key and a length prefix keep (user, password) pairs unambiguous.
        name = repr(user).encode("utf-8")
        message = len(name).to_bytes(4, "big") + name + password.encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def matches(self, user: Hashable, password: str, stored: ScryptHash) -> bool:
        """Whether this exact password was verified for ``user`` against ``stored``."""
        entry = self._tags.get(user)
        if entry is None or not hmac.compare_digest(entry[1], stored.digest):
            return False
        return hmac.compare_digest(entry[0], self._tag(user, password))

    def remember(self, user: Hashable, password: str, stored: ScryptHash) -> None:
        """Call only after ``verify_password(password, stored)`` said yes."""
        self._tags[user] = (self._tag(user, password), stored.digest)
