"""Encryption at rest for secrets (OAuth tokens, client secrets) and loading of the key.

The key comes from ``GATEWAY_SECRET_KEY`` when set (containers, secret managers) and otherwise
from ``<state_dir>/secret.key``, created on first start. Losing the key loses every stored
secret, so the file is written durably and never replaced; a key that does not fit the data is
reported, not silently regenerated.

``StoreError`` lives here because this module is the leaf of the package: the database modules
import it from here without creating an import cycle.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_ENV_VAR = "GATEWAY_SECRET_KEY"
KEY_FILE_NAME = "secret.key"
KEY_LENGTH = 32
GENERATE_KEY_COMMAND = (
    'python3 -c "import secrets,base64;'
    'print(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())"'
)

_FORMAT_VERSION = b"\x01"
_NONCE_LENGTH = 12
_TAG_LENGTH = 16


class StoreError(Exception):
    """A state-store problem explained in a sentence an operator can act on.

    Messages name the file or setting involved and the fix; they never contain key material
    or secret values, so they are safe to log and to show on the admin page.
    """


class SecretBox:
    """AES-256-GCM with a per-value context bound in as associated data.

    Stored format: one version byte, a random 12-byte nonce, then the GCM ciphertext and tag.
    The version byte lets a later release change the scheme while still reading old values.
    The context (the secret's name) is authenticated, so a ciphertext copied to another name
    fails to decrypt instead of handing one account's token to another.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LENGTH:
            raise StoreError(f"the secret key must be {KEY_LENGTH} bytes long, not {len(key)}")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(key=<hidden>)"

    def encrypt(self, plaintext: bytes, context: str) -> bytes:
        """Encrypt *plaintext* so that only :meth:`decrypt` with the same *context* opens it."""
        nonce = secrets.token_bytes(_NONCE_LENGTH)
        return _FORMAT_VERSION + nonce + self._aead.encrypt(nonce, plaintext, _aad(context))

    def decrypt(self, ciphertext: bytes, context: str) -> bytes:
        """Return the plaintext, or raise StoreError if the key, context or data do not match."""
        header = len(_FORMAT_VERSION) + _NONCE_LENGTH
        if len(ciphertext) < header + _TAG_LENGTH or not ciphertext.startswith(_FORMAT_VERSION):
            raise StoreError(
                f"the stored secret {context!r} is corrupt or was written by a newer gateway "
                "(unknown format); store it again"
            )
        nonce = ciphertext[len(_FORMAT_VERSION) : header]
        try:
            return self._aead.decrypt(nonce, ciphertext[header:], _aad(context))
        except InvalidTag:
            raise StoreError(
                f"cannot decrypt the stored secret {context!r}: the secret key does not match "
                f"the one it was written with, or the stored data is corrupt; restore the "
                f"original key ({KEY_ENV_VAR} or {KEY_FILE_NAME} in the state directory) "
                "or store the secret again"
            ) from None


def _aad(context: str) -> bytes:
    """Associated data: the format version and the context, so neither can be swapped."""
    return _FORMAT_VERSION + context.encode("utf-8")


def load_or_create_key(state_dir: Path, environ: Mapping[str, str] = os.environ) -> bytes:
    """Return the 32-byte secret key, creating ``<state_dir>/secret.key`` on first start.

    ``GATEWAY_SECRET_KEY`` wins when present (even if empty: an empty value is almost always a
    deployment mistake, and falling back to a fresh key file would hide it until secrets fail
    to decrypt). This function blocks on disk I/O and fsync; call it before the loop starts or
    through ``asyncio.to_thread``.
    """
    if KEY_ENV_VAR in environ:
        key = _decode_key(environ[KEY_ENV_VAR])
        if key is None:
            raise StoreError(
                f"{KEY_ENV_VAR} must be the urlsafe base64 encoding of exactly {KEY_LENGTH} "
                f"random bytes; generate one with: {GENERATE_KEY_COMMAND}"
            )
        return key
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / KEY_FILE_NAME
    return _read_key_file(path) if path.exists() else _create_key_file(path)


def _decode_key(text: str) -> bytes | None:
    """Decode base64 text (padding optional) to a key, or None if it is not a valid key."""
    text = text.strip()
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == KEY_LENGTH else None


def _read_key_file(path: Path) -> bytes:
    """Read an existing key file, refusing one that other users could read."""
    try:
        fd = os.open(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            content = file.read(1024)
    except OSError as exc:
        raise StoreError(f"cannot read the secret key file {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise StoreError(
            f"the secret key file {path} is accessible to other users "
            f"(mode {mode & 0o777:03o}); run: chmod 600 {path}"
        )
    key = _decode_key(content.decode("ascii", errors="replace"))
    if key is None:
        raise StoreError(
            f"the secret key file {path} does not contain a valid key (urlsafe base64 of "
            f"{KEY_LENGTH} bytes); restore it from a backup, or delete it to start with a new "
            "key if no secrets have been stored yet"
        )
    return key


def _create_key_file(path: Path) -> bytes:
    """Create the key file durably; if another process won the race, use its key.

    The key is written and fsynced under a private temporary name (O_CREAT|O_EXCL, mode 0600)
    and published with ``os.link``, which fails if the file already exists. Readers therefore
    never see a half-written key, and a crash leaves at most a stray temporary file.
    """
    key = secrets.token_bytes(KEY_LENGTH)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(base64.urlsafe_b64encode(key) + b"\n")
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, path)
    except FileExistsError:
        return _read_key_file(path)
    except OSError as exc:
        raise StoreError(f"cannot create the secret key file {path}: {exc.strerror}") from exc
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return key


def _fsync_directory(directory: Path) -> None:
    """Make the new directory entry durable, so a power cut cannot lose the key."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
