"""SecretBox encryption and secret-key loading."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.store import KEY_ENV_VAR, SecretBox, StoreError, load_or_create_key

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
PLAINTEXT = b"refresh-token-0123456789"


def test_round_trip() -> None:
    box = SecretBox(KEY)
    assert box.decrypt(box.encrypt(PLAINTEXT, "alice"), "alice") == PLAINTEXT


def test_format_is_version_nonce_ciphertext_tag() -> None:
    blob = SecretBox(KEY).encrypt(PLAINTEXT, "alice")
    assert blob[0] == 1
    assert len(blob) == 1 + 12 + len(PLAINTEXT) + 16
    assert PLAINTEXT not in blob


def test_nonce_is_random() -> None:
    box = SecretBox(KEY)
    assert box.encrypt(PLAINTEXT, "alice") != box.encrypt(PLAINTEXT, "alice")


def test_other_context_fails() -> None:
    box = SecretBox(KEY)
    with pytest.raises(StoreError, match="does not match"):
        box.decrypt(box.encrypt(PLAINTEXT, "alice"), "bob")


def test_wrong_key_fails_without_leaking() -> None:
    blob = SecretBox(KEY).encrypt(PLAINTEXT, "alice")
    with pytest.raises(StoreError, match="secret key does not match") as caught:
        SecretBox(OTHER_KEY).decrypt(blob, "alice")
    message = str(caught.value)
    assert "'alice'" in message
    assert PLAINTEXT.decode() not in message
    assert base64.urlsafe_b64encode(OTHER_KEY).decode() not in message


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]), id="flipped-tag-bit"),
        pytest.param(lambda blob: blob[:20], id="truncated"),
        pytest.param(lambda blob: b"\x02" + blob[1:], id="unknown-version"),
        pytest.param(lambda blob: b"", id="empty"),
    ],
)
def test_damaged_ciphertext_fails(mangle: Callable[[bytes], bytes]) -> None:
    box = SecretBox(KEY)
    with pytest.raises(StoreError, match="'alice'"):
        box.decrypt(mangle(box.encrypt(PLAINTEXT, "alice")), "alice")


def test_repr_hides_key() -> None:
    text = repr(SecretBox(KEY))
    assert text == "SecretBox(key=<hidden>)"
    assert KEY.hex() not in text


def test_key_must_be_32_bytes() -> None:
    with pytest.raises(StoreError, match="32 bytes"):
        SecretBox(b"short")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_created_private_and_reused(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    key = load_or_create_key(state_dir, environ={})
    assert len(key) == 32
    key_file = state_dir / "secret.key"
    assert _mode(key_file) == 0o600
    assert _mode(state_dir) == 0o700
    assert base64.urlsafe_b64decode(key_file.read_text().strip()) == key
    assert load_or_create_key(state_dir, environ={}) == key
    assert [p.name for p in state_dir.iterdir()] == ["secret.key"]  # no stray temporary file


def test_key_file_differs_between_state_dirs(tmp_path: Path) -> None:
    assert load_or_create_key(tmp_path / "a", environ={}) != load_or_create_key(
        tmp_path / "b", environ={}
    )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    load_or_create_key(tmp_path, environ={})
    key_file = tmp_path / "secret.key"
    os.chmod(key_file, mode)
    with pytest.raises(StoreError) as caught:
        load_or_create_key(tmp_path, environ={})
    assert f"chmod 600 {key_file}" in str(caught.value)


@pytest.mark.parametrize(
    "content", ["", "not base64 at all!", base64.b64encode(b"x" * 16).decode()]
)
def test_malformed_key_file_refused(tmp_path: Path, content: str) -> None:
    key_file = tmp_path / "secret.key"
    key_file.write_text(content)
    key_file.chmod(0o600)
    with pytest.raises(StoreError, match="does not contain a valid key") as caught:
        load_or_create_key(tmp_path, environ={})
    assert str(key_file) in str(caught.value)


@pytest.mark.parametrize(
    "encoded",
    [
        base64.urlsafe_b64encode(OTHER_KEY).decode(),
        base64.urlsafe_b64encode(OTHER_KEY).decode().rstrip("="),
        base64.urlsafe_b64encode(OTHER_KEY).decode() + "\n",
    ],
    ids=["padded", "unpadded", "trailing-newline"],
)
def test_env_key_used_and_no_file_written(tmp_path: Path, encoded: str) -> None:
    assert load_or_create_key(tmp_path, environ={KEY_ENV_VAR: encoded}) == OTHER_KEY
    assert not (tmp_path / "secret.key").exists()


def test_env_key_wins_over_key_file(tmp_path: Path) -> None:
    load_or_create_key(tmp_path, environ={})
    encoded = base64.urlsafe_b64encode(OTHER_KEY).decode()
    assert load_or_create_key(tmp_path, environ={KEY_ENV_VAR: encoded}) == OTHER_KEY


@pytest.mark.parametrize(
    "value",
    ["", "definitely-not-a-key", base64.urlsafe_b64encode(b"k" * 31).decode(), "#" * 44],
    ids=["empty", "garbage", "31-bytes", "bad-alphabet"],
)
def test_invalid_env_key_refused_with_generator_hint(tmp_path: Path, value: str) -> None:
    with pytest.raises(StoreError) as caught:
        load_or_create_key(tmp_path, environ={KEY_ENV_VAR: value})
    message = str(caught.value)
    assert KEY_ENV_VAR in message
    assert "base64.urlsafe_b64encode(secrets.token_bytes(32))" in message
    if value:
        assert value not in message
