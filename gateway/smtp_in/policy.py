"""Submission policy as plain functions of their inputs, so each rule is testable on its own.

Bare CR and LF: aiosmtpd ends DATA only at <CRLF>.<CRLF> (tested), so nothing can end a
message early here. What is left is the content: a "\\n.\\n" inside it could smuggle a second
message through a lenient MTA further on (an upstream SMTP account), and bare line endings make
parsers disagree about where headers end. So every bare CR or LF is *normalized* to CRLF before
anything reads the message (Postfix 3.9's default, ``smtpd_forbid_bare_newline = normalize``):
our From check, the provider and any upstream MTA then see the same lines, and the upstream
sender dot-stuffs them. Refusing instead would break the many legacy programs that write LF-only
files, which is what this gateway exists to keep working.
"""

from __future__ import annotations

import email.policy
import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from email.parser import Parser
from email.utils import format_datetime
from typing import Any

# RFC 5322 3.6.6: a resent block names who resent the message; every block counts, since a
# recipient's client may show any of them (and a forged Resent-From is as good as a forged From).
_SENDER_HEADERS = ("From", "Sender", "Resent-From", "Resent-Sender")
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.:\[\]_-]")


_LINE_END = re.compile(rb"\r\n|\r|\n")


def normalize_line_endings(content: bytes) -> bytes:
    """Every CR, LF or CRLF becomes CRLF; a message already in CRLF is returned as is."""
    crlf = content.count(b"\r\n")
    if content.count(b"\r") == crlf and content.count(b"\n") == crlf:
        return content  # the common case, decided by counting in C
    return _LINE_END.sub(b"\r\n", content)


@dataclass(frozen=True)
class HeaderSender:
    header: str  # "From", "Sender", "Resent-From" or "Resent-Sender"
    address: str | None  # None: the header could not be read as addresses


def header_senders(content: bytes) -> list[HeaderSender]:
    """Every address in every From, Sender, Resent-From and Resent-Sender header.

    Every occurrence counts (a duplicated From is a classic bypass, and a message may carry
    several resent blocks); groups, comments and encoded words are undone by the parser first.

    The header block is split by the compat32 parser, which leaves values as text, and only
    the sender headers go through ``email.policy.default``'s address parser (both policies
    split and unfold headers alike): parsing every header as the default policy's message does
    (Content-Type included) was most of this check's cost per message (issue 13).
    """
    end = content.find(b"\r\n\r\n")
    head = content[: end + 2] if end >= 0 else content
    message = Parser(policy=email.policy.compat32).parsestr(
        head.decode("utf-8", "surrogateescape"), headersonly=True
    )
    headers = [(name.lower(), value) for name, value in message.raw_items()]
    found: list[HeaderSender] = []
    for name in _SENDER_HEADERS:
        for value in (value for key, value in headers if key == name.lower()):
            found += _addresses(name, value)
    return found


_PARSED_CACHE_SIZE = 256  # a legacy application sends its mail with the same few From lines
_PARSED_VALUE_LIMIT = 1000  # longer values are parsed every time, so the cache stays small
_parsed: OrderedDict[tuple[str, str], tuple[HeaderSender, ...]] = OrderedDict()


def _addresses(name: str, raw: str) -> tuple[HeaderSender, ...]:
    """Addresses of one header, remembered for the most recent header values (the parse is a
    pure function of the name and the raw value)."""
    key = (name, raw)
    known = _parsed.get(key)
    if known is not None:
        _parsed.move_to_end(key)
        return known
    result = tuple(_parse_addresses(name, raw))
    if len(raw) <= _PARSED_VALUE_LIMIT:
        _parsed[key] = result
        if len(_parsed) > _PARSED_CACHE_SIZE:
            _parsed.popitem(last=False)
    return result


def _parse_addresses(name: str, raw: str) -> list[HeaderSender]:
    """Addresses of one header; unreadable ones (defects, no address) come back as None."""
    try:
        value: Any = email.policy.default.header_fetch_parse(name, raw)
        addresses = [a.addr_spec for a in value.addresses]
        defective = bool(value.defects)
    except Exception:  # the email package raises many types on hostile input
        return [HeaderSender(name, None)]
    if defective or not addresses or any("@" not in a for a in addresses):
        return [HeaderSender(name, None)]
    return [HeaderSender(name, address) for address in addresses]


def received_header(
    helo: str | None,
    client_host: str,
    hostname: str,
    *,
    tls: bool,
    smtputf8: bool,
    when: datetime,
) -> bytes:
    """A Received trace header (RFC 5321 4.4, protocol names from RFC 3848 and RFC 6531).

    It names no recipient ("for <...>"): with several recipients that would show a Bcc
    recipient to everyone. The account name is left out too, as Postfix does by default.
    """
    protocol = ("UTF8SMTP" if smtputf8 else "ESMTP") + ("S" if tls else "") + "A"
    helo_name = _HELO_UNSAFE.sub("", helo or "")[:255] or "unknown"
    literal = f"IPv6:{client_host}" if ":" in client_host else client_host
    return (
        f"Received: from {helo_name} ([{literal}])\r\n"
        f"\tby {hostname} with {protocol};\r\n"
        f"\t{format_datetime(when)}\r\n"
    ).encode("ascii")
