"""FETCH rendering from raw bytes and the linear sequence-set parser.

The expected strings are Dovecot 2.3's answers for the same messages (the reference the
integration test ``test_imap_compat`` compares with live); ``CORPUS`` is shared with that test.
"""

from __future__ import annotations

import time

import pytest
from twisted.mail.imap4 import IllegalIdentifierError, parseIdList

from gateway.imap_out import _render
from gateway.imap_out._seqset import parse_seqset
from gateway.mailbox import crlf_form, header_of


def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


CORPUS: dict[str, bytes] = {
    "alternative": _crlf(
        """Received: from a by b; Mon, 2 Jan 2023 10:00:00 +0000
Received: from c by d; Mon, 2 Jan 2023 09:59:00 +0000
From: "Doe, John" <john@example.com>
To: alice@example.org, Bob <bob@example.net>
Cc: undisclosed-recipients:;
Subject: Alternative test
Date: Mon, 2 Jan 2023 10:00:00 +0000
Message-Id: <alt-1@example.com>
MIME-Version: 1.0
X-Custom-Header: yes
Content-Type: multipart/alternative; boundary="b1"

This is a MIME message.
--b1
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Hello plain =C3=A9
second line
--b1
Content-Type: text/html; charset="utf-8"

<p>Hello html</p>
--b1--
epilogue
"""
    ),
    "attachment": _crlf(
        """From: sender@example.com
To: rcpt@example.com
Subject: With attachment
Date: Tue, 3 Jan 2023 11:00:00 +0100
Message-ID: <att-1@example.com>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: text/plain

See attached.
--outer
Content-Type: application/pdf; name="A;B Report.PDF"
Content-Disposition: attachment; filename="A;B Report.PDF"
Content-Transfer-Encoding: base64
Content-Description: the report

JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSL0ZpbHRlci9GbGF0
ZURlY29kZT4+CnN0cmVhbQp4nDPQM1Qo5ypUMFAw0DMwslAwtTTVMzIxV0gx5CrkAgBM6AVJ
--outer
Content-Type: text/plain; name=notes.txt
Content-Disposition: attachment; filename="notes.txt"

notes
--outer--
"""
    ),
    "nested": _crlf(
        """From: outer@example.com
To: rcpt@example.com
Subject: Fwd: inner
Date: Wed, 4 Jan 2023 12:00:00 -0500
Message-ID: <nested-1@example.com>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="nb"

--nb
Content-Type: text/plain; charset=us-ascii

Forwarded below.
--nb
Content-Type: message/rfc822

From: Inner Person <inner@example.com>
To: outer@example.com
Subject: inner
Date: Tue, 3 Jan 2023 08:00:00 +0000
Message-ID: <inner-1@example.com>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="ib"

--ib
Content-Type: text/plain

inner plain
--ib
Content-Type: text/html

<b>inner</b>
--ib--

--nb--
"""
    ),
    "headers": _crlf(
        """From: =?utf-8?q?J=C3=B6rg?= <joerg@example.com>
Reply-To: replies@example.com
To: Jürgen Müller <juergen@example.de>
Subject: This is a long folded
\tsubject line with =?utf-8?b?w6TDtsO8?= encoded words
Subject-Raw: Grüße aus Köln
Date: Thu, 5 Jan 2023 13:00:00 +0000
Message-ID: <hdr-1@example.com>
In-Reply-To: <parent@example.com>
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Grüße
"""
    ),
    "japanese": _crlf(
        """From: =?ISO-2022-JP?B?GyRCOzNFRBsoQg==?= <yamada@example.jp>
To: tanaka@example.jp
Subject: =?UTF-8?B?5pel5pys6Kqe44Gu5Lu25ZCN?=
Date: Fri, 6 Jan 2023 09:00:00 +0900
Message-ID: <jp-1@example.jp>
MIME-Version: 1.0
Content-Type: text/plain; charset="UTF-8"
Content-Transfer-Encoding: 8bit

こんにちは、世界。
日本語の本文です。
"""
    ),
    "semicolon": _crlf(
        """From: a@example.com
To: b@example.com
Subject: trailing semicolon
Date: Sat, 7 Jan 2023 10:00:00 +0000
Message-ID: <semi-1@example.com>
Content-Type: text/plain;

body
"""
    ),
    "no-content-type": _crlf(
        """From: a@example.com
To: b@example.com
Subject: no content type
Date: Sun, 8 Jan 2023 10:00:00 +0000
Message-ID: <noct-1@example.com>

plain old body
two lines
"""
    ),
    "oddities": _crlf(
        """From: "Quote \\"Q\\" Name" <q@example.com> (comment)
Sender: sender@example.com (The Sender)
Reply-To: Group: a@example.com, "B" <b@example.com>;, c@example.com
To: =?utf-8?q?caf=C3=A9?= <cafe@example.com>
Bcc: hidden@example.com
Subject: UPPER case types
Date: Mon, 9 Jan 2023 10:00:00 +0000
Message-ID: <odd-1@example.com>
MIME-Version: 1.0
Content-Type: MULTIPART/Mixed; BOUNDARY="=_odd"; Foo=Bar

--=_odd
Content-Type: TEXT/PLAIN; CHARSET=ISO-8859-1
Content-Transfer-Encoding: QUOTED-PRINTABLE
Content-ID: <cid-1@example.com>
Content-Language: en, de
Content-Location: http://example.com/a

caf=E9
--=_odd
Content-Type: application/octet-stream; name*=UTF-8''na%C3%AFve.bin
Content-Disposition: INLINE; filename*=UTF-8''na%C3%AFve.bin; size=3

AAA=
--=_odd
Content-Type: multipart/digest; boundary=dg

--dg

From: d@example.com
Subject: digest child

digest body
--dg--
--=_odd
Content-Type: text/plain; name="Grüße.txt"

empty next
--=_odd
Content-Type: text/plain

--=_odd--"""
    ),
    "no-final-newline": b"From: a@example.com\r\nSubject: x\r\n\r\nno newline",
    "inner-single": _crlf(
        """From: a@example.com
Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= \t and "quotes" \\ backslash
Subject: duplicate subject
Content-Type: multipart/mixed; boundary=zz

preamble only text
--zz
Content-Type: message/rfc822; name=fwd.eml
Content-Disposition: attachment; filename="=?utf-8?q?f=C3=BCr.eml?="

From: inner@example.com
Subject: single inner

inner body line
--zz
Content-Type: image/png
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--zz--
"""
    ),
    "header-only": b"From: a@example.com\r\nSubject: only headers\r\n",
    "utf8-subject": _crlf(
        """From: Jörg Groß <joerg@example.de>
To: "Zoë" <zoe@example.org>, Ünter <u@example.org>
Subject: Grüße aus Köln – 日本
Date: Tue, 10 Jan 2023 10:00:00 +0000
Message-ID: <utf8-1@example.de>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="u8"

--u8
Content-Type: text/plain; charset="utf-8" (a comment)
Content-Transfer-Encoding: 8Bit

Grüße
--u8
Content-Type: application/octet-stream
Content-Disposition: attachment; filename="Überblick 日本.pdf"
Content-Description: Übersicht

AAAA
--u8--
"""
    ),
    "lf-only": (
        b"From: a@example.com\nSubject: lf only\nContent-Type: text/plain\n\nline 1\nline 2\n"
    ),
    # RFC 2231 continuations: plain, encoded, a lone name*, out of order, and a missing index.
    "rfc2231": _crlf(
        """From: a@example.org
To: b@example.org
Subject: continuations
Date: Mon, 2 Mar 2026 23:30:00 -0800
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="c"

--c
Content-Type: text/plain; name*=iso-8859-1'en'caf%E9.txt; charset=us-ascii

x
--c
Content-Type: application/octet-stream;
 name*0="very long ";
 name*1="file.pdf"
Content-Disposition: attachment;
 filename*0*=UTF-8''%E6%97%A5%E6%9C%AC;
 filename*1*=%E8%AA%9E.txt
Content-Transfer-Encoding: base64

AAAA
--c
Content-Type: text/plain; title*1="b"; title*0="a"; name*0*=utf-8''a%20b;
 name*1=".txt x"; gap*0="a"; gap*2="c"

y
--c--
"""
    ),
    # A NUL byte in the body: RFC 3501 forbids it in a literal; Dovecot sends 0x80.
    "nul-byte": b"From: a@example.org\r\nSubject: nul\r\nDate: Tue, 3 Mar 2026 00:30:00 +0900\r\n"
    b"\r\nab\x00cd\r\n",
    # Folded ENVELOPE fields: a TAB and double blanks in Subject, a Date folded mid-value, a
    # Message-ID on its continuation line, trailing blanks, a name with two spaces.
    "folded-envelope": (
        b'From: "A  B" <a@example.org>\r\nTo: "Folded\r\n Name" <b@example.org>\r\n'
        b"Subject: folded\r\n\tsubject  here \r\nMessage-ID:\r\n <x@example.org>\r\n"
        b"In-Reply-To: <p@example.org>\r\n  \r\nDate: Wed, 4 Mar 2026\r\n 10:00:00 +0000\r\n"
        b"\r\nbody\r\n"
    ),
}


def test_bodystructure_matches_dovecot_for_nested_message() -> None:
    assert _render.bodystructure(_render.index(CORPUS["nested"])) == (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 16 0 NIL NIL NIL NIL)'
        b'("message" "rfc822" NIL NIL NIL "7bit" 327 ("Tue, 3 Jan 2023 08:00:00 +0000" "inner" '
        b'(("Inner Person" NIL "inner" "example.com")) (("Inner Person" NIL "inner" "example.com"))'
        b' (("Inner Person" NIL "inner" "example.com")) ((NIL NIL "outer" "example.com")) NIL NIL'
        b' NIL "<inner-1@example.com>") (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 11 0'
        b' NIL NIL NIL NIL)("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 12 0 NIL NIL NIL'
        b' NIL) "alternative" ("boundary" "ib") NIL NIL NIL) 17 NIL NIL NIL NIL) "mixed" '
        b'("boundary" "nb") NIL NIL NIL)'
    )


def test_quoted_semicolon_and_dispositions_match_dovecot() -> None:
    assert _render.bodystructure(_render.index(CORPUS["attachment"])) == (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 13 0 NIL NIL NIL NIL)'
        b'("application" "pdf" ("name" "A;B Report.PDF") NIL "the report" "base64" 146 NIL '
        b'("attachment" ("filename" "A;B Report.PDF")) NIL NIL)'
        b'("text" "plain" ("name" "notes.txt" "charset" "us-ascii") NIL NIL "7bit" 5 0 NIL '
        b'("attachment" ("filename" "notes.txt")) NIL NIL) "mixed" ("boundary" "outer")'
        b" NIL NIL NIL)"
    )
    assert _render.bodystructure(_render.index(CORPUS["attachment"]), extended=False) == (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 13 0)'
        b'("application" "pdf" ("name" "A;B Report.PDF") NIL "the report" "base64" 146)'
        b'("text" "plain" ("name" "notes.txt" "charset" "us-ascii") NIL NIL "7bit" 5 0) "mixed")'
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "semicolon",
            b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 6 1 NIL NIL NIL NIL)',
        ),
        (
            "no-content-type",
            b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 27 2 NIL NIL NIL NIL)',
        ),
        ("japanese", b'("text" "plain" ("charset" "UTF-8") NIL NIL "8bit" 58 2 NIL NIL NIL NIL)'),
    ],
)
def test_rfc3501_defaults_and_malformed_content_type(name: str, expected: bytes) -> None:
    assert _render.bodystructure(_render.index(CORPUS[name])) == expected


def test_envelope_unfolds_and_writes_8bit_as_literals() -> None:
    assert _render.envelope(_render.index(CORPUS["headers"])) == (
        b'("Thu, 5 Jan 2023 13:00:00 +0000" {74}\r\n'
        b"This is a long folded subject line with =?utf-8?b?w6TDtsO8?= encoded words "
        b'(("=?utf-8?q?J=C3=B6rg?=" NIL "joerg" "example.com")) '
        b'(("=?utf-8?q?J=C3=B6rg?=" NIL "joerg" "example.com")) '
        b'((NIL NIL "replies" "example.com")) (({15}\r\n'
        + "Jürgen Müller".encode()
        + b' NIL "juergen" "example.de")) NIL NIL "<parent@example.com>" "<hdr-1@example.com>")'
    )


def test_envelope_groups_and_quoted_names() -> None:
    env = _render.envelope(_render.index(CORPUS["alternative"]))
    assert b'(("Doe, John" NIL "john" "example.com"))' in env
    assert b'((NIL NIL "alice" "example.org")("Bob" NIL "bob" "example.net"))' in env
    assert b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))' in env


def test_sections_are_byte_exact() -> None:
    raw = CORPUS["alternative"]
    root = _render.index(raw)
    assert _render.section(root, [], "") == raw
    header = raw[: raw.index(b"\r\n\r\n") + 4]
    assert _render.section(root, [], "HEADER") == header
    assert header.count(b"Received:") == 2
    assert _render.section(root, [], "TEXT") == raw[len(header) :]
    assert _render.section(root, [], "HEADER.FIELDS", ["SUBJECT", "x-custom-header", "From"]) == (
        b'From: "Doe, John" <john@example.com>\r\nSubject: Alternative test\r\n'
        b"X-Custom-Header: yes\r\n\r\n"
    )
    not_fields = _render.section(root, [], "HEADER.FIELDS.NOT", ["Received", "SUBJECT"])
    assert not_fields.startswith(b"From:") and b"Message-Id: <alt-1" in not_fields
    assert not_fields.endswith(b'boundary="b1"\r\n\r\n')
    assert _render.section(root, [1], "") == b"Hello plain =C3=A9\r\nsecond line"
    assert _render.section(root, [2], "MIME") == b'Content-Type: text/html; charset="utf-8"\r\n\r\n'


def test_nested_and_missing_sections() -> None:
    root = _render.index(CORPUS["nested"])
    assert _render.section(root, [2, 1], "") == b"inner plain"
    assert _render.section(root, [2], "HEADER").startswith(b"From: Inner Person")
    assert _render.section(root, [2], "TEXT").startswith(b"--ib\r\n")
    assert _render.section(root, [2], "MIME") == b"Content-Type: message/rfc822\r\n\r\n"
    assert _render.section(root, [3], "") == b""
    single = _render.index(CORPUS["semicolon"])
    assert _render.section(single, [1], "") == b"body\r\n"
    assert _render.section(single, [1], "MIME") == single.header  # as Dovecot
    assert _render.section(single, [2], "MIME") == b""


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"no header at all",
        b"Content-Type: multipart/mixed\r\n\r\nno boundary",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nunterminated",
        b'Content-Type: text/plain; name="unterminated\r\n\r\nx',
        b"Content-Type: ;;;==\r\nContent-Disposition: ;\r\nTo: <<>>,,:;;\r\n\r\n",
        b"From: \xff\xfe <a@\xff>\r\nSubject: \x00\r\n\r\n\xff",
        b"Content-Type: message/rfc822\r\n\r\n" * 100,
    ],
)
def test_malformed_messages_never_raise(raw: bytes) -> None:
    root = _render.index(raw)
    assert _render.bodystructure(root).startswith(b"(")
    assert _render.envelope(root).startswith(b"(")
    for path in ([], [1], [2, 3]):
        for spec in ("", "HEADER", "TEXT", "MIME", "HEADER.FIELDS"):
            _render.section(root, path, spec, ["from"])


def test_index_is_cached_per_message() -> None:
    raw = CORPUS["attachment"]
    assert _render.index(raw) is _render.index(bytes(raw))


@pytest.mark.parametrize(
    "text", [b"1", b"1:3,5", b"4:2", b"*", b"3:*", b"*:3", b"1,2,3,7:9,8", b"1:*,5", b"5,1"]
)
def test_seqset_matches_twisted(text: bytes) -> None:
    assert parse_seqset(text).ranges == parseIdList(text).ranges


@pytest.mark.parametrize("text", [b"", b"0", b"1:0", b"a", b"1,,2", b"-1", b"1:2:3"])
def test_seqset_rejects_garbage(text: bytes) -> None:
    with pytest.raises(IllegalIdentifierError):
        parse_seqset(text)


def test_seqset_is_linear() -> None:
    text = b",".join(b"%d" % i for i in range(1, 40001, 2))
    started = time.perf_counter()
    assert len(parse_seqset(text).ranges) == 20000
    assert time.perf_counter() - started < 1.0  # Twisted's parseIdList: minutes


def test_address_oddities_follow_dovecot() -> None:
    env = _render.envelope(_render.index(CORPUS["oddities"]))
    assert b'(({14}\r\nQuote "Q" Name NIL "q" "example.com"))' in env  # escapes -> literal
    assert b'(("The Sender" NIL "sender" "example.com"))' in env  # comment names the address
    assert b'((NIL NIL "Group" NIL)(NIL NIL "a" "example.com")("B" NIL "b" "example.com")' in env
    assert b'(NIL NIL NIL NIL)(NIL NIL "c" "example.com"))' in env


def test_rfc2231_parameters_are_listed_last_undecoded() -> None:
    params = _render.parse_params("; filename*=UTF-8''a%20b; size=3")
    assert params == [("size", "3"), ("filename*", "UTF-8''a%20b")]


def test_rfc2231_continuations_are_joined_as_dovecot_joins_them() -> None:
    """Dovecot 2.3.19's BODYSTRUCTURE of CORPUS["rfc2231"] (measured)."""
    assert _render.bodystructure(_render.index(CORPUS["rfc2231"])) == (
        b'(("text" "plain" ("charset" "us-ascii" "name*" "iso-8859-1\'en\'caf%E9.txt") NIL NIL'
        b' "7bit" 1 0 NIL NIL NIL NIL)("application" "octet-stream" ("name" "very long file.pdf")'
        b' NIL NIL "base64" 4 NIL ("attachment" ("filename*"'
        b' "UTF-8\'\'%E6%97%A5%E6%9C%AC%E8%AA%9E.txt")) NIL NIL)("text" "plain" ("gap*0" "a"'
        b' "gap*2" "c" "name*" "utf-8\'\'a%20b.txt x" "title" "ab" "charset" "us-ascii") NIL'
        b' NIL "7bit" 1 0 NIL NIL NIL NIL) "mixed" ("boundary" "c") NIL NIL NIL)'
    )


def test_nul_in_a_literal_is_sent_as_0x80() -> None:
    root = _render.index(CORPUS["nul-byte"])
    assert _render.literal(_render.section(root, [], "TEXT")) == b"{7}\r\nab\x80cd\r\n"
    assert b"\x00" not in _render.literal(CORPUS["nul-byte"])


def test_envelope_unfolds_like_dovecot() -> None:
    """Subject and names collapse blanks (a literal when changed); Date, In-Reply-To and
    Message-ID only lose their line breaks, keeping the blanks (measured on Dovecot 2.3.19)."""
    assert _render.envelope(_render.index(CORPUS["folded-envelope"])) == (
        b'("Wed, 4 Mar 2026 10:00:00 +0000" {19}\r\nfolded subject here'
        b' (({3}\r\nA B NIL "a" "example.org")) (({3}\r\nA B NIL "a" "example.org"))'
        b' (({3}\r\nA B NIL "a" "example.org")) (("Folded Name" NIL "b" "example.org")) NIL NIL'
        b' "<p@example.org>  " " <x@example.org>")'
    )


def test_duplicate_fields_use_the_last_in_envelope_but_all_in_header() -> None:
    root = _render.index(CORPUS["inner-single"])
    assert b'"duplicate subject"' in _render.envelope(root)
    assert _render.section(root, [], "HEADER.FIELDS", ["subject"]).count(b"Subject:") == 2


def test_lf_only_messages_are_served_as_crlf() -> None:
    raw = CORPUS["lf-only"]
    assert crlf_form(raw) == raw.replace(b"\n", b"\r\n")
    assert crlf_form(CORPUS["nested"]) is CORPUS["nested"]
    root = _render.index(crlf_form(raw))
    assert _render.bodystructure(root, extended=False).endswith(b'"7bit" 16 2)')


def test_header_fields_end_like_dovecot_on_header_only_messages() -> None:
    root = _render.index(CORPUS["header-only"])
    assert _render.section(root, [], "HEADER.FIELDS", ["x-none"]) == b"\r\n"
    assert _render.section(root, [], "HEADER.FIELDS.NOT", ["subject"]) == (
        b"From: a@example.com\r\n"
    )


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_stored_headers_split_where_the_renderer_does(name: str) -> None:
    """The view keeps ``header_of`` each message for header fetches without a download; it
    must be exactly the renderer's header block, or BODY[HEADER] would differ after a restart."""
    wire = crlf_form(CORPUS[name])
    assert header_of(wire) == _render.index(wire).header
    only = _render.index(header_of(wire))
    assert only.header == _render.index(wire).header
    assert _render.envelope(only) == _render.envelope(_render.index(wire))


@pytest.mark.parametrize("wire", [b"\r\nbody only\r\n", b"Subject: no body\r\n", b""])
def test_stored_headers_of_edge_messages(wire: bytes) -> None:
    assert header_of(wire) == _render.index(wire).header
