"""SEARCH over every RFC 3501 search key (6.4.4): flags and keywords, UIDs, sequence numbers,
dates, sizes, header fields and text.

Legacy pollers search for ``UNSEEN``, ``UID n:*`` or ``SINCE <date>``; these are answered from
the listing, so such a SEARCH never downloads a message. FROM/TO/CC/BCC/SUBJECT/HEADER and
SENTBEFORE/SENTON/SENTSINCE need the header section (which the view keeps), LARGER/SMALLER the
exact RFC822.SIZE (stored once learnt), and BODY/TEXT the whole message, so the mailbox loads
them only when :func:`needs_headers` / :func:`needs_size` / :func:`needs_text` say so.

The results are Dovecot's (measured against Dovecot 2.3 by ``test_gateway_differential``):
strings match as a case-insensitive substring of the unfolded, RFC 2047-decoded header value,
and for BODY/TEXT of the decoded text of every text/* part (quoted-printable, base64 and the
part's charset undone); SENT* compare the date part of the Date: header in the header's own
timezone, a message without a parseable Date: counting as sent on 1-Jan-1970; KEYWORD compares
keywords without case and never matches a system flag (``KEYWORD \\Seen`` is a keyword named
so, which no message has); \\Recent is never set here, so RECENT and NEW match nothing and
OLD everything. A malformed key raises :class:`UnsupportedSearch`, answered with BAD.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from email.header import decode_header, make_header
from email.utils import parsedate_tz

from twisted.mail import imap4

from ._seqset import parse_seqset

_MONTHS = {
    name: number
    for number, name in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1
    )
}
_FLAG_KEYS = {
    "SEEN": ("\\Seen", True),
    "UNSEEN": ("\\Seen", False),
    "FLAGGED": ("\\Flagged", True),
    "UNFLAGGED": ("\\Flagged", False),
    "DELETED": ("\\Deleted", True),
    "UNDELETED": ("\\Deleted", False),
    "ANSWERED": ("\\Answered", True),
    "UNANSWERED": ("\\Answered", False),
    "DRAFT": ("\\Draft", True),
    "UNDRAFT": ("\\Draft", False),
}


class UnsupportedSearch(imap4.MailboxException):
    """A search key this gateway cannot answer from the listing (answered BAD)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One message as SEARCH sees it."""

    seq: int
    uid: int
    flags: frozenset[str]
    day: date  # INTERNALDATE's date (UTC), what SINCE/BEFORE/ON compare
    headers: Callable[[str], list[bytes]] | None = None  # raw values of a field, when loaded
    text: Callable[[bool], str] | None = None  # decoded text (with the header?), when loaded
    size: int | None = None  # RFC822.SIZE, when loaded


_ADDRESS_KEYS = {"FROM", "TO", "CC", "BCC", "SUBJECT"}
_SENT_KEYS = {"SENTBEFORE", "SENTON", "SENTSINCE"}
_EPOCH = date(1970, 1, 1)  # Dovecot's sent date of a message without a valid Date:


def _uses(query: list, keys: set[bytes]) -> bool:
    return any(
        _uses(token, keys) if isinstance(token, list) else token.upper() in keys for token in query
    )


def needs_headers(query: list) -> bool:
    """Whether any key needs the message header (then the bodies must be fetched)."""
    keys = _ADDRESS_KEYS | _SENT_KEYS | {"HEADER"}
    return _uses(query, {k.encode() for k in keys})


def needs_size(query: list) -> bool:
    """Whether any key compares RFC822.SIZE (LARGER, SMALLER)."""
    return _uses(query, {b"LARGER", b"SMALLER"})


def needs_text(query: list) -> bool:
    """Whether any key needs the message text (BODY, TEXT)."""
    return _uses(query, {b"BODY", b"TEXT"})


def message_text(raw: bytes, with_header: bool) -> str:
    """The case-folded text BODY (``with_header`` False) or TEXT searches: every text/* part
    decoded (transfer encoding and charset), plus the decoded header fields for TEXT."""
    # EmailMessage is what policy.default builds anyway; naming it types get_content().
    message = email.message_from_bytes(raw, email.message.EmailMessage, policy=email.policy.default)
    pieces = []
    if with_header:  # from the bytes: 8-bit header values stay searchable as UTF-8
        head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
        pieces = [_decoded(field) for field in _FIELD_START.split(head)]
    for part in message.walk():
        if part.get_content_maintype() == "text":
            pieces.append(_part_text(part).casefold())
    return "\n".join(pieces)


_FIELD_START = re.compile(rb"\r?\n(?![ \t])")  # a line break that does not fold


def _part_text(part: email.message.EmailMessage) -> str:
    try:
        return str(part.get_content())
    except (LookupError, ValueError, UnicodeError, AssertionError):  # unknown charset, bad data
        payload = part.get_payload(decode=True)
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


def _text_test(needle: bytes, with_header: bool) -> Test:
    wanted = needle.decode("utf-8", "replace").casefold()
    return lambda c: c.text is not None and wanted in c.text(with_header)


def _decoded(value: bytes) -> str:
    """Unfolded, RFC 2047-decoded, case-folded: what a SEARCH string is compared with."""
    text = value.decode("utf-8", "replace").replace("\r\n", "").replace("\n", "")
    # Malformed encoded-words: compare the text as it is.
    with contextlib.suppress(ValueError, LookupError, UnicodeError):
        text = str(make_header(decode_header(text)))
    return text.casefold()


def _header_test(name: str, needle: bytes) -> Test:
    wanted = needle.decode("utf-8", "replace").casefold()

    def test(c: Candidate) -> bool:
        if c.headers is None:
            return False
        values = c.headers(name.lower())
        # RFC 3501: HEADER <name> "" matches every message that has the field.
        return any(wanted in _decoded(v) for v in values)

    return test


Test = Callable[[Candidate], bool]


_MAX_DEPTH = 64  # nested NOT/OR/parentheses: real clients use a handful


def compile_query(query: list, last_seq: int, last_uid: int, depth: int = 0) -> Test:
    """Turn Twisted's parsed search keys (nested lists of bytes) into one predicate (AND)."""
    tokens = list(query)
    tests: list[Test] = []
    while tokens:
        tests.append(_one(tokens, last_seq, last_uid, depth))
    return lambda c: all(test(c) for test in tests)


def _one(tokens: list, last_seq: int, last_uid: int, depth: int = 0) -> Test:
    if not tokens:
        raise UnsupportedSearch("SEARCH NOT and OR need a search key after them")
    if depth > _MAX_DEPTH:
        raise UnsupportedSearch(f"SEARCH nests more than {_MAX_DEPTH} levels")
    token = tokens.pop(0)
    if isinstance(token, list):
        return compile_query(token, last_seq, last_uid, depth + 1)
    key = token.decode("ascii", "replace").upper()
    if key == "ALL":
        return lambda c: True
    if key in _FLAG_KEYS:
        flag, wanted = _FLAG_KEYS[key]
        return lambda c: (flag in c.flags) == wanted
    if key == "NEW" or key == "RECENT":
        return lambda c: False  # the gateway never reports \Recent
    if key == "OLD":
        return lambda c: True
    if key == "NOT":
        inner = _one(tokens, last_seq, last_uid, depth + 1)
        return lambda c: not inner(c)
    if key == "OR":
        left = _one(tokens, last_seq, last_uid, depth + 1)
        right = _one(tokens, last_seq, last_uid, depth + 1)
        return lambda c: left(c) or right(c)
    if key == "UID":
        within = _within(_argument(tokens, key), last_uid)
        return lambda c: within(c.uid)
    if key in ("SINCE", "BEFORE", "ON"):
        day = _day(_argument(tokens, key))
        if key == "SINCE":
            return lambda c: c.day >= day
        if key == "BEFORE":
            return lambda c: c.day < day
        return lambda c: c.day == day
    if key in _SENT_KEYS:
        day = _day(_argument(tokens, key))
        if key == "SENTSINCE":
            return lambda c: _sent_day(c) >= day
        if key == "SENTBEFORE":
            return lambda c: _sent_day(c) < day
        return lambda c: _sent_day(c) == day
    if key in ("LARGER", "SMALLER"):
        limit = _number(_argument(tokens, key), key)
        if key == "LARGER":
            return lambda c: c.size is not None and c.size > limit
        return lambda c: c.size is not None and c.size < limit
    if key in ("KEYWORD", "UNKEYWORD"):
        keyword = _argument(tokens, key).decode("utf-8", "replace").lower()
        wanted = key == "KEYWORD"
        return lambda c: _has_keyword(c, keyword) == wanted
    if key in _ADDRESS_KEYS:
        return _header_test(key, _argument(tokens, key))
    if key in ("BODY", "TEXT"):
        return _text_test(_argument(tokens, key), key == "TEXT")
    if key == "HEADER":
        field = _argument(tokens, key).decode("ascii", "replace")
        return _header_test(field, _argument(tokens, key))
    if key[:1].isdigit() or key[:1] == "*":
        within = _within(token, last_seq)
        return lambda c: within(c.seq)
    raise UnsupportedSearch(f"SEARCH {key} is not supported by this gateway")


def _argument(tokens: list, key: str) -> bytes:
    if not tokens or isinstance(tokens[0], list):
        raise UnsupportedSearch(f"SEARCH {key} needs an argument")
    return tokens.pop(0)


def _number(token: bytes, key: str) -> int:
    """RFC 3501 ``number``: unsigned 32-bit."""
    text = token.decode("ascii", "replace")
    if not text.isdigit() or int(text) > 0xFFFFFFFF:
        raise UnsupportedSearch(f"SEARCH {key} needs a number, not {text!r}")
    return int(text)


def _has_keyword(c: Candidate, keyword: str) -> bool:
    """A keyword, compared without case; a system flag name is never a keyword."""
    return any(not f.startswith("\\") and f.lower() == keyword for f in c.flags)


def _sent_day(c: Candidate) -> date:
    """The date part of the first Date: field in its own timezone, as Dovecot compares it."""
    values = c.headers("date") if c.headers is not None else []
    if not values:
        return _EPOCH
    text = values[0].decode("latin-1").replace("\r", "").replace("\n", "")
    try:
        parsed = parsedate_tz(text)
        return date(parsed[0], parsed[1], parsed[2]) if parsed else _EPOCH
    except (ValueError, TypeError, OverflowError):
        return _EPOCH


def _within(token: bytes, last: int) -> Callable[[int], bool]:
    """Membership in a sequence set; ``n:*`` beyond the last number still includes the last."""
    try:
        ranges = parse_seqset(token).ranges
    except imap4.IllegalIdentifierError as error:
        raise UnsupportedSearch(f"Bad sequence set {token!r}") from error
    bounds = []
    for low, high in ranges:
        low = last if low is None else low
        high = last if high is None else high
        bounds.append((min(low, high), max(low, high)))
    return lambda n: any(low <= n <= high for low, high in bounds)


def _day(token: bytes) -> date:
    """RFC 3501 ``date``: ``1-Feb-2026`` (optionally quoted)."""
    text = token.decode("ascii", "replace").strip('"')
    try:
        day, month, year = text.split("-")
        return date(int(year), _MONTHS[month.lower()], int(day))
    except (ValueError, KeyError) as error:
        raise UnsupportedSearch(f"Bad date {text!r}") from error
