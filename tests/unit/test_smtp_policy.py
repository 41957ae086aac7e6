"""The SMTP front's rules, one function at a time: AUTH exposure, content checks, replies,
login throttling."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.accounts import Accounts
from gateway.cleartext import plaintext_auth_allowed
from gateway.config import AccountSettings, SendingSettings
from gateway.smtp_in import replies
from gateway.smtp_in.handler import content_refusal
from gateway.smtp_in.policy import (
    HeaderSender,
    header_senders,
    normalize_line_endings,
    received_header,
)
from tests.helpers import PASSWORD_HASH

# -- where AUTH may be offered -------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "peer", "tls", "allowed"),
    [
        ("loopback", "127.0.0.1", False, True),
        ("loopback", "127.20.30.40", False, True),
        ("loopback", "::1", False, True),
        ("loopback", "::ffff:127.0.0.1", False, True),
        ("loopback", "192.0.2.7", False, False),
        ("loopback", "2001:db8::7", False, False),
        ("loopback", "not-an-address", False, False),
        ("loopback", "192.0.2.7", True, True),
        ("never", "127.0.0.1", False, False),
        ("never", "192.0.2.7", True, True),
        ("always", "192.0.2.7", False, True),
    ],
)
def test_plaintext_auth_follows_policy_and_peer(
    policy: str, peer: str, tls: bool, allowed: bool
) -> None:
    assert plaintext_auth_allowed(policy, peer, tls) is allowed


# -- message content -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "normalized"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"", b""),
        (b"a\nb\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\r\n.\n", b"a\r\n.\r\n"),
        (b"a\n.\r\n", b"a\r\n.\r\n"),
        (b"a\r\r\n", b"a\r\n\r\n"),
        (b"a\r\n\n", b"a\r\n\r\n"),
    ],
)
def test_bare_line_endings_become_crlf(content: bytes, normalized: bytes) -> None:
    assert normalize_line_endings(content) == normalized


def test_header_senders_reads_every_from_and_sender_and_ignores_the_body() -> None:
    content = (
        "From: =?utf-8?q?Ann_=E2=9C=93?= <ann@example.org>, bob@example.org\r\n"
        'Sender: "Zoë" <zoe@例子.广告>\r\n'
        "From: carl@example.org\r\n"
        "\r\nFrom: body@example.org\r\n"
    ).encode()
    assert [(s.header, s.address) for s in header_senders(content)] == [
        ("From", "ann@example.org"),
        ("From", "bob@example.org"),
        ("From", "carl@example.org"),
        ("Sender", "zoe@例子.广告"),
    ]


@pytest.mark.parametrize(
    "header", ["From: undisclosed\r\n", "From: <a@b@c>\r\n", "From:\r\n", "From: \xff\xfe\r\n"]
)
def test_unreadable_from_is_reported_as_such(header: str) -> None:
    content = header.encode("utf-8", "surrogateescape") + b"\r\nbody\r\n"
    assert header_senders(content) == [HeaderSender("From", None)]


def test_message_without_sender_headers_has_none() -> None:
    assert header_senders(b"Subject: hi\r\n\r\nbody\r\n") == []
    assert header_senders(b"") == []


ACCOUNT = AccountSettings(
    username="crm",
    password_hash=PASSWORD_HASH,
    provider="microsoft",
    address="crm@contoso.example",
    sending=SendingSettings(allowed_from=("sales@contoso.example",)),
)


@pytest.mark.parametrize(
    ("content", "reply_start"),
    [
        (b"From: crm@contoso.example\r\n\r\nhi\r\n", None),
        (b"From: Sales <SALES@contoso.example>\r\n\r\nhi\r\n", None),
        (b"Subject: no From, the provider fills it in\r\n\r\nhi\r\n", None),
        (b"From: ceo@contoso.example\r\n\r\nhi\r\n", "550 5.7.1 The From header <ceo@"),
        # A bare CR hiding a second From: after normalization it is a second From header.
        (b"From: crm@contoso.example\rFrom: ceo@contoso.example\r\n\r\n", "550 5.7.1"),
    ],
)
def test_content_refusal(content: bytes, reply_start: str | None) -> None:
    normalized = normalize_line_endings(content)
    refusal = content_refusal(Accounts([ACCOUNT]), ACCOUNT, normalized)
    if reply_start is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.startswith(reply_start)


# The tricks the From check sees through, each in a resent block (RFC 5322 3.6.6).
RESENT_TRICKS = [
    pytest.param("ceo@contoso.example", ["ceo@contoso.example"], id="plain"),
    pytest.param(
        "crm@contoso.example, ceo@contoso.example",
        ["crm@contoso.example", "ceo@contoso.example"],
        id="several-addresses",
    ),
    pytest.param(
        "=?utf-8?q?crm=40contoso.example?= <ceo@contoso.example>",
        ["ceo@contoso.example"],
        id="encoded-word-name-that-looks-allowed",
    ),
    pytest.param(
        "team: crm@contoso.example, ceo@contoso.example;",
        ["crm@contoso.example", "ceo@contoso.example"],
        id="group",
    ),
    pytest.param(
        "ceo@contoso.example (crm@contoso.example)", ["ceo@contoso.example"], id="comment"
    ),
    pytest.param(
        '"crm@contoso.example" <ceo@contoso.example>', ["ceo@contoso.example"], id="quoted-name"
    ),
    pytest.param("undisclosed-recipients:;", [None], id="empty-group"),
    pytest.param("<a@b@c>", [None], id="malformed"),
]


@pytest.mark.parametrize("header", ["Resent-From", "Resent-Sender"])
@pytest.mark.parametrize(("value", "addresses"), RESENT_TRICKS)
def test_resent_headers_are_read_like_from(
    header: str, value: str, addresses: list[str | None]
) -> None:
    content = f"From: crm@contoso.example\r\n{header}: {value}\r\n\r\nbody\r\n".encode()
    assert header_senders(content) == [
        HeaderSender("From", "crm@contoso.example"),
        *(HeaderSender(header, address) for address in addresses),
    ]


@pytest.mark.parametrize(
    ("resent", "reply"),
    [
        ("Resent-From: Sales <sales@CONTOSO.example>\r\n", None),
        (
            "Resent-From: ceo@contoso.example\r\n",
            "550 5.7.1 The Resent-From header <ceo@contoso.example> is not an address",
        ),
        (
            "Resent-Sender: team: crm@contoso.example, ceo@contoso.example;\r\n",
            "550 5.7.1 The Resent-Sender header <ceo@contoso.example>",
        ),
        # Every resent block counts, not only the newest one.
        (
            "Resent-From: crm@contoso.example\r\nResent-Date: x\r\n"
            "Resent-From: ceo@contoso.example\r\n",
            "550 5.7.1 The Resent-From header <ceo@",
        ),
        ("resent-sender: undisclosed:;\r\n", "550 5.7.1 The Resent-Sender header cannot be read"),
    ],
)
def test_resent_senders_are_refused_like_from(resent: str, reply: str | None) -> None:
    content = f"From: crm@contoso.example\r\n{resent}\r\nbody\r\n".encode()
    refusal = content_refusal(Accounts([ACCOUNT]), ACCOUNT, content)
    if reply is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.startswith(reply)


def test_received_header_names_no_recipient_and_cleans_the_helo_name() -> None:
    when = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
    header = received_header(
        "evil\r\nBcc: x", "::1", "gw.local", tls=True, smtputf8=True, when=when
    )
    assert header == (
        b"Received: from evilBcc:x ([IPv6:::1])\r\n"
        b"\tby gw.local with UTF8SMTPSA;\r\n"
        b"\tSun, 29 Nov 2026 03:00:00 +0000\r\n"
    )
    plain = received_header(None, "127.0.0.1", "gw", tls=False, smtputf8=False, when=when)
    assert plain.startswith(b"Received: from unknown ([127.0.0.1])\r\n\tby gw with ESMTPA;")


# -- replies -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
        ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
        ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
        (
            "555 MAIL FROM parameters not recognized",
            "555 5.5.4 MAIL FROM parameters not recognized",
        ),
        ('500 Error: command "FROB" not recognized', "500 5.5.1 Command not recognized"),
        ("500 Line too long (see RFC5321 4.5.3.1.6)", replies.LINE_TOO_LONG),
        ("552 Error: Too much mail data", "552 5.3.4 Message too big: the limit is 35 MB"),
        ("599 Something new", "599 5.0.0 Something new"),
        (
            "535 5.7.8 Authentication credentials invalid",
            "535 5.7.8 Authentication credentials invalid",
        ),
        ("220 gw.local mail gateway ESMTP", "220 gw.local mail gateway ESMTP"),
        ("250-SIZE 36700160", "250-SIZE 36700160"),
        ("250 PIPELINING", "250 PIPELINING"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ],
)
def test_standardize_gives_enhanced_codes_but_leaves_greeting_and_ehlo(
    raw: str, expected: str
) -> None:
    assert replies.standardize(raw, 35 * 2**20) == expected


_TRICKY_HEADERS = [
    "FROM: a@example.org\r\nfrom:\r\n\tb@example.org\r\n",  # any case, folded
    "From: Team: ann@example.org, bob@example.org;\r\n",  # a group
    "From: (comment) ann@example.org (Ann)\r\n",
    "From: =?iso-8859-1?q?J=F6rg?= <jorg@example.org>\r\nResent-Sender: x@example.org\r\n",
    "From: \xff <ff@example.org>\r\nSender: <broken\r\n",
    "From: ann@example.org\r\n folded-on@example.org\r\n",
]


@pytest.mark.parametrize("head", _TRICKY_HEADERS)
def test_header_senders_read_what_the_default_policy_parser_reads(head: str) -> None:
    """Issue 13: the block is split by the compat32 parser and only sender headers are parsed
    as addresses; the answer must be what reading them from an EmailMessage gives."""
    import email.policy
    from email.parser import Parser

    content = head.encode("utf-8", "surrogateescape") + b"\r\nbody\r\n"
    message = Parser(policy=email.policy.default).parsestr(head, headersonly=True)
    expected: list[HeaderSender] = []
    for name in ("From", "Sender", "Resent-From", "Resent-Sender"):
        for value in message.get_all(name, []):
            try:
                addresses = [a.addr_spec for a in value.addresses]
                readable = not value.defects and addresses and all("@" in a for a in addresses)
            except Exception:  # the email package raises many types on hostile input
                readable = False
            if readable:
                expected += [HeaderSender(name, a) for a in addresses]
            else:
                expected.append(HeaderSender(name, None))
    assert header_senders(content) == expected
    assert header_senders(content) == expected  # and again, from the parsed-value cache


def test_the_parsed_header_cache_stays_small() -> None:
    from gateway.smtp_in import policy

    for number in range(policy._PARSED_CACHE_SIZE + 50):
        assert header_senders(f"From: u{number}@example.org\r\n\r\n".encode()) == [
            HeaderSender("From", f"u{number}@example.org")
        ]
    assert len(policy._parsed) == policy._PARSED_CACHE_SIZE
    long_name = "x" * policy._PARSED_VALUE_LIMIT
    content = f"From: {long_name} <long@example.org>\r\n\r\n".encode()
    assert header_senders(content) == [HeaderSender("From", "long@example.org")]
    assert all(len(raw) <= policy._PARSED_VALUE_LIMIT for _, raw in policy._parsed)


def test_a_header_the_email_package_cannot_even_fetch_is_unreadable() -> None:
    """``Sender: broken <`` makes the default policy's message raise IndexError when the
    header is fetched; it was an exception out of the check, it is now an unreadable sender."""
    content = b"From: a@example.org\r\nSender: broken <\r\n\r\nbody\r\n"
    assert header_senders(content) == [
        HeaderSender("From", "a@example.org"),
        HeaderSender("Sender", None),
    ]
