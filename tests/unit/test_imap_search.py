"""SEARCH BODY/TEXT match the decoded text, as Dovecot does, not the transfer encoding."""

from __future__ import annotations

from datetime import date

import pytest

from gateway.imap_out._search import Candidate, compile_query, message_text, needs_text

QP = (
    b"Subject: =?UTF-8?B?6KuL5rGC5pu4?=\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"Invoice n=C2=B0 42: gr=C3=BC=C3=9Fe\r\n"
)
MIXED = (
    b"Subject: report\r\nX-Raw: caf\xc3\xa9\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain; charset=iso-2022-jp\r\n\r\n"
    b"\x1b$BF|K\\8l\x1b(B\r\n"
    b"--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"c2VjcmV0IGluIGEgcGRm\r\n"
    b"--b\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"PHA+UXVhcnRlcmx5IG51bWJlcnM8L3A+\r\n--b--\r\n"
)
BROKEN = b"Subject: x\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\nplain words\r\n"


def search(raw: bytes, *keys: bytes) -> bool:
    texts: dict[bool, str] = {}

    def text(with_header: bool) -> str:
        return texts.setdefault(with_header, message_text(raw, with_header))

    test = compile_query(list(keys), 1, 1)
    return test(Candidate(1, 1, frozenset(), date(2026, 1, 1), None, text))


@pytest.mark.parametrize(
    ("raw", "keys", "found"),
    [
        (QP, (b"BODY", b"n\xc2\xb0 42"), True),  # quoted-printable undone
        (QP, (b"BODY", b"GR\xc3\x9cSSE"), True),  # case-folded: ß matches SS
        (QP, (b"BODY", b"=C3"), False),  # never the encoded form
        (QP, (b"TEXT", "請求書".encode()), True),  # RFC 2047 header, TEXT only
        (QP, (b"BODY", "請求書".encode()), False),
        (MIXED, (b"BODY", "日本語".encode()), True),  # ISO-2022-JP decoded
        (MIXED, (b"BODY", b"quarterly numbers"), True),  # base64 text/html
        (MIXED, (b"BODY", b"secret in a pdf"), False),  # not text: not searched
        (MIXED, (b"TEXT", "café".encode()), True),  # raw 8-bit header as UTF-8
        (MIXED, (b"NOT", b"BODY", b"quarterly"), False),
        (BROKEN, (b"BODY", b"plain words"), True),  # unknown charset: still searchable
    ],
)
def test_body_and_text_match_decoded_text(raw: bytes, keys: tuple, found: bool) -> None:
    assert search(raw, *keys) is found


def test_only_body_and_text_need_the_message() -> None:
    assert needs_text([b"OR", b"UNSEEN", [b"TEXT", b"x"]])
    assert not needs_text([b"UNSEEN", b"SUBJECT", b"x"])
