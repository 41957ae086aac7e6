"""IMAP strings (RFC 3501 §9: quoted, literal) wherever an astring or string may stand.

:mod:`._reading` reads a command whole and leaves each literal in place as
``{n}\\r\\n<n octets>``; the functions here read that form, and quoted strings with their ``\\``
escapes, for every astring argument (:meth:`~._reading.CommandReading.arg_astring`) and in the
two places that hold several: the SEARCH keys (Twisted's ``parseNestedParens`` stripped the
blanks ending a last literal and left ``\\\\`` escaped) and the header names of FETCH
``BODY[HEADER.FIELDS (...)]`` (Twisted's FETCH parser split the list on blanks, so ``"Subject"``
and ``{7}`` were taken as names, and ``()`` as the whole header).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.mail import imap4

_QUOTED = re.compile(rb'"((?:[^"\\\r\n]|\\[^\r\n])*)"')
_ESCAPED = re.compile(rb"\\(.)")
_INLINE_LITERAL = re.compile(rb"\{(\d{1,10})\}\r\n")  # as the reader hands a literal on
# ASTRING-CHAR: ATOM-CHAR or "]" (RFC 3501 §9); a header name given as an atom.
_ASTRING_CHARS = bytes(c for c in range(0x21, 0x7F) if c not in b'(){%*"\\')
_ASTRING_ATOM = re.compile(rb"[" + re.escape(_ASTRING_CHARS) + rb"]+")
# A SEARCH key, a number, a sequence set (``*`` and ``:``), a date or a flag keyword: blanks,
# parentheses and controls end it; 8-bit octets are let through, as stock did.
_SEARCH_ATOM = re.compile(rb'[^\x00-\x20\x7f()"{]+')


def string_at(line: bytes, pos: int = 0) -> tuple[bytes, int] | None:
    """The quoted string or literal starting at ``pos``: its value and the offset after it;
    None when neither starts there."""
    first = line[pos : pos + 1]
    if first == b'"':
        quoted = _QUOTED.match(line, pos)
        if quoted is None:
            raise imap4.IllegalClientResponse("Unmatched quotes")
        return _ESCAPED.sub(rb"\1", quoted[1]), quoted.end()
    if first == b"{":
        literal = _INLINE_LITERAL.match(line, pos)
        end = literal.end() + int(literal[1]) if literal is not None else len(line) + 1
        if literal is None or end > len(line):
            raise imap4.IllegalClientResponse("Malformed literal")
        return line[literal.end() : end], end
    return None


def search_keys(line: bytes) -> list[Any]:
    """SEARCH's keys as nested lists of bytes (a parenthesised group is a list), each string's
    value exactly as sent."""
    groups: list[list[Any]] = [[]]
    pos = 0
    while pos < len(line):
        char = line[pos : pos + 1]
        if char == b" ":
            pos += 1
        elif char == b"(":
            groups.append([])
            pos += 1
        elif char == b")":
            if len(groups) == 1:
                raise imap4.IllegalClientResponse("Unmatched parenthesis in SEARCH")
            group = groups.pop()
            groups[-1].append(group)
            pos += 1
        elif (string := string_at(line, pos)) is not None:
            groups[-1].append(string[0])
            pos = string[1]
        else:
            atom = _SEARCH_ATOM.match(line, pos)
            if atom is None:
                raise imap4.IllegalClientResponse("Invalid characters in SEARCH")
            groups[-1].append(atom[0])
            pos = atom.end()
    if len(groups) != 1:
        raise imap4.IllegalClientResponse("Unmatched parenthesis in SEARCH")
    return groups[0]


def header_list(line: bytes) -> tuple[list[bytes], bytes, int]:
    """A FETCH header-list (``(`` header-fld-name *(SP header-fld-name) ``)``, each name an
    astring) opening ``line``: the names upper-cased, the list as the response labels it
    (Dovecot's form: atoms as sent, strings quoted; ``NIL`` is a string there too), and the
    offset after the ``)``."""
    if line[:1] != b"(":
        raise imap4.IllegalClientResponse("Header list must begin with (")
    names: list[bytes] = []
    labels: list[bytes] = []
    pos = 1
    while line[pos : pos + 1] != b")":
        if names:
            if line[pos : pos + 1] != b" ":
                raise _not_a_name(line, pos)
            pos += 1
        string = string_at(line, pos)
        if string is not None:
            name, pos = string[0].upper(), string[1]
            labels.append(_quoted_label(name))
        else:
            atom = _ASTRING_ATOM.match(line, pos)
            if atom is None:
                raise _not_a_name(line, pos)
            name, pos = atom[0].upper(), atom.end()
            labels.append(_quoted_label(name) if name == b"NIL" else name)
        names.append(name)
    if not names:  # RFC 3501: at least one name (stock answered the whole HEADER)
        raise imap4.IllegalClientResponse("Header list is empty")
    return names, b"(" + b" ".join(labels) + b")", pos + 1


def _not_a_name(line: bytes, pos: int) -> imap4.IllegalClientResponse:
    """Why no header name starts at ``pos``, in Dovecot's words."""
    if pos >= len(line):
        return imap4.IllegalClientResponse("Header list must end with )")
    if line[pos] >= 0x80:
        return imap4.IllegalClientResponse("8bit data in atom")
    return imap4.IllegalClientResponse("Invalid characters in atom")


def _quoted_label(name: bytes) -> bytes:
    """A name given as a string, quoted as Dovecot's ``imap_append_quoted`` writes it: CR, LF
    and 8-bit octets left out (a quoted string cannot hold them), ``"`` and ``\\`` escaped."""
    kept = bytes(c for c in name if c not in b"\r\n" and c < 0x80)
    return b'"' + kept.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class FetchItems(imap4._FetchParser):
    """Twisted's FETCH parser with the header names read as astrings (:func:`header_list`).
    ``header.labels`` holds the list as the response names it."""

    def state_header_list(self, s: bytes) -> int:
        names, labels, used = header_list(s)
        header: Any = self.pending_body.header  # a Header here: state_section set it
        header.fields, header.labels = names, labels
        return used
