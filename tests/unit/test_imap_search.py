"""SEARCH BODY/TEXT match the decoded text, as Dovecot does, not the transfer encoding; the keys
Dovecot answers from flags, sizes and the Date: header give Dovecot's results (the
differential test compares every key with a real Dovecot on a shared corpus)."""

from __future__ import annotations

from datetime import date

import pytest

from gateway.imap_out._search import (
    Candidate,
    UnsupportedSearch,
    compile_query,
    message_text,
    needs_headers,
    needs_size,
    needs_text,
)

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


def matches(*keys: bytes, flags: tuple[str, ...] = (), date_: bytes | None = None) -> bool:
    """One message of 500 bytes with these flags and Date: value, tested against ``keys``."""
    fields = {"date": [date_] if date_ is not None else []}
    candidate = Candidate(
        1, 1, frozenset(flags), date(2026, 1, 1), lambda n: fields.get(n, []), None, 500
    )
    return compile_query(list(keys), 1, 1)(candidate)


@pytest.mark.parametrize(
    ("keys", "found"),
    [
        ((b"LARGER", b"499"), True),
        ((b"LARGER", b"500"), False),  # strictly larger, as RFC 3501 and Dovecot
        ((b"SMALLER", b"501"), True),
        ((b"SMALLER", b"500"), False),
        ((b"KEYWORD", b"$forwarded"), True),  # keywords compare without case
        ((b"KEYWORD", b"Junk"), False),
        ((b"UNKEYWORD", b"Junk"), True),
        ((b"KEYWORD", b"\\Flagged"), False),  # a system flag is not a keyword (Dovecot)
        ((b"UNKEYWORD", b"\\Flagged"), True),
        ((b"FLAGGED",), True),
        ((b"ANSWERED",), False),
        ((b"NEW",), False),  # \\Recent is never set by the gateway
        ((b"OLD",), True),
    ],
)
def test_flag_keyword_and_size_keys(keys: tuple, found: bool) -> None:
    assert matches(*keys, flags=("\\Flagged", "$Forwarded")) is found


# The Date: header's own date, not UTC: 23:30 -0800 on the 2nd is the 3rd in UTC.
LATE = b"Mon, 2 Mar 2026 23:30:00 -0800"


@pytest.mark.parametrize(
    ("keys", "value", "found"),
    [
        ((b"SENTON", b"2-Mar-2026"), LATE, True),
        ((b"SENTON", b"3-Mar-2026"), LATE, False),
        ((b"SENTBEFORE", b"3-Mar-2026"), LATE, True),
        ((b"SENTSINCE", b"2-Mar-2026"), LATE, True),
        ((b"SENTSINCE", b"3-Mar-2026"), LATE, False),
        ((b"SENTON", b"4-Mar-2026"), b"Wed, 4 Mar 2026\r\n 10:00:00 +0000", True),  # folded
        ((b"SENTBEFORE", b"1-Jan-2000"), None, True),  # no Date: 1-Jan-1970, as Dovecot
        ((b"SENTBEFORE", b"1-Jan-2000"), b"garbage", True),
        ((b"SENTON", b"1-Jan-1970"), b"garbage", True),
    ],
)
def test_sent_keys_use_the_date_header_in_its_own_zone(
    keys: tuple, value: bytes | None, found: bool
) -> None:
    assert matches(*keys, date_=value) is found


def test_malformed_keys_are_refused_not_guessed() -> None:
    for keys in ([b"LARGER", b"big"], [b"LARGER", b"4294967296"], [b"SENTON", b"yesterday"]):
        with pytest.raises(UnsupportedSearch):
            compile_query(keys, 1, 1)


def test_what_each_key_loads() -> None:
    assert needs_headers([b"NOT", [b"SENTSINCE", b"1-Jan-2026"]])
    assert not needs_headers([b"LARGER", b"10", b"KEYWORD", b"x"])
    assert needs_size([b"OR", b"SEEN", b"SMALLER", b"10"])
    assert not needs_size([b"SEEN", b"FROM", b"x"])
