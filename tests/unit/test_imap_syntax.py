"""IMAP strings wherever an astring or string may stand (gateway/imap_out/_syntax.py), on the
form the command reader hands on: each literal in place as ``{n}\\r\\n<n octets>``."""

from __future__ import annotations

import pytest
from twisted.mail import imap4

from gateway.imap_out._syntax import FetchItems, header_list, search_keys, string_at


def test_string_at_reads_quoted_and_literal_and_leaves_atoms() -> None:
    assert string_at(b'x "a\\\\b\\"c" y', 2) == (b'a\\b"c', 11)
    assert string_at(b"{3}\r\na b rest") == (b"a b", 8)
    assert string_at(b"{0}\r\n") == (b"", 5)
    assert string_at(b"atom") is None
    for broken in (b'"open', b'"line\r\nbreak"', b"{3}abc", b"{x}\r\n"):
        with pytest.raises(imap4.IllegalClientResponse):
            string_at(broken)


def test_search_keys_keep_each_string_exactly() -> None:
    """Twisted's parseNestedParens stripped a last literal's blanks and kept ``\\\\``."""
    assert search_keys(b"SUBJECT {6}\r\nhello ") == [b"SUBJECT", b"hello "]
    assert search_keys(b'OR (SUBJECT "a\\\\b" 1:*) HEADER {2}\r\nTo {1}\r\n)') == [
        b"OR",
        [b"SUBJECT", b"a\\b", b"1:*"],
        b"HEADER",
        b"To",
        b")",
    ]
    assert search_keys(b"NOT (SEEN (DELETED))") == [b"NOT", [b"SEEN", [b"DELETED"]]]
    for broken in (b"(SEEN", b"SEEN)", b'SUBJECT "x', b"SUBJECT {9}\r\nshort"):
        with pytest.raises(imap4.IllegalClientResponse):
            search_keys(broken)


def test_header_list_names_and_dovecot_labels() -> None:
    names, labels, used = header_list(b'(Subject "x\\"y" {3}\r\na)b nil {2}\r\n\xc3\xa4)] rest')
    assert names == [b"SUBJECT", b'X"Y', b"A)B", b"NIL", b"\xc3\xa4"]
    assert labels == b'(SUBJECT "X\\"Y" "A)B" "NIL" "")'
    assert used == len(b'(Subject "x\\"y" {3}\r\na)b nil {2}\r\n\xc3\xa4)')
    for broken in (b"()", b'(a"b)', b"(a", b"({3}\r\nabc]", b"Subject)"):
        with pytest.raises(imap4.IllegalClientResponse):
            header_list(broken)
    with pytest.raises(imap4.IllegalClientResponse, match="8bit data in atom"):
        header_list(b"(To \xc3\xa4x)")  # as Dovecot: an 8-bit name is sent as a string


def test_fetch_items_take_literal_header_names() -> None:
    parser = FetchItems()
    parser.parseString(b'(UID BODY.PEEK[1.HEADER.FIELDS.NOT ({8}\r\nReceived "To")]<0.5>)')
    uid, body = parser.result
    assert uid.type == "uid" and body.peek and body.part == (0,)
    assert body.header.negate and body.header.fields == [b"RECEIVED", b"TO"]
    assert body.header.labels == b'("RECEIVED" "TO")'
    assert (body.partialBegin, body.partialLength) == (0, 5)
