"""Local password hashes: salted, slow, self-describing, and strict about their format."""

from __future__ import annotations

import pytest

from gateway.passwords import MalformedHash, hash_password, parse_hash, verify_password


def test_hash_verifies_only_the_right_password() -> None:
    stored = parse_hash(hash_password("s3cret pass", log2_n=10))
    assert verify_password("s3cret pass", stored)
    assert not verify_password("s3cret pasS", stored)
    assert not verify_password("", stored)


def test_hashes_are_salted_and_default_cost_is_slow() -> None:
    first, second = hash_password("same"), hash_password("same")
    assert first != second
    assert first.startswith("$scrypt$ln=15,r=8,p=1$")
    assert parse_hash(first).log2_n == 15


def test_non_ascii_password_round_trips() -> None:
    stored = parse_hash(hash_password("パスワード🔑", log2_n=10))
    assert verify_password("パスワード🔑", stored)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hunter2",
        "$2b$12$abcdefghijklmnopqrstuv",  # bcrypt: not ours
        "$scrypt$ln=15,r=8,p=1$c2FsdA$aGFzaA",  # salt and hash far too short
        "$scrypt$ln=40,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,  # absurd cost
    ],
)
def test_malformed_hashes_are_rejected(text: str) -> None:
    with pytest.raises(MalformedHash):
        parse_hash(text)


def test_empty_password_cannot_be_hashed() -> None:
    with pytest.raises(ValueError, match="empty"):
        hash_password("")
