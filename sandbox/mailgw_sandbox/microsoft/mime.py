"""MIME in and out of a mailbox: what Exchange reads from a message and what it sends.

Exchange "parses the MIME content and copies relevant content to message properties, and to
the recipients and attachments tables": recipients come from To/Cc/Bcc only, never from an
envelope. Seeded messages keep their exact bytes, so ``$value`` serves what was delivered.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime, formataddr, getaddresses, parsedate_to_datetime

_PARSER = BytesParser(policy=policy.default)
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class Address:
    name: str
    address: str


@dataclass(frozen=True)
class FileAttachment:
    id: str
    name: str
    content_type: str
    content: bytes
    is_inline: bool = False
    content_id: str | None = None


@dataclass(frozen=True)
class Summary:
    """The message properties Exchange derives from the MIME."""

    subject: str
    sender: Address | None
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    message_id: str | None
    date: datetime | None
    text: str | None
    html: str | None
    has_attachments: bool


@dataclass(frozen=True)
class Draft:
    """A message built from Graph's JSON representation."""

    subject: str
    body_type: str  # "text" or "html"
    body: str
    sender: Address
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    headers: tuple[tuple[str, str], ...]
    attachments: tuple[FileAttachment, ...]


def _head(raw: bytes) -> EmailMessage:
    """Just the header block, parsed: cheap even for a message with 30 MB of attachments."""
    blank = _BLANK_LINE.search(raw)
    return _PARSER.parsebytes(raw[: blank.end()] if blank else raw, headersonly=True)


def envelope(raw: bytes) -> tuple[Address | None, tuple[str, ...]]:
    """The From and the recipients (To + Cc + Bcc, lower-cased, first occurrence kept)."""
    head = _head(raw)
    seen: dict[str, None] = {}
    for header in ("To", "Cc", "Bcc"):
        for address in _addresses(head, header):
            seen.setdefault(address.address.lower(), None)
    return next(iter(_addresses(head, "From")), None), tuple(seen)


def summarize(raw: bytes) -> Summary:
    message = _PARSER.parsebytes(raw)
    return Summary(
        subject=str(message.get("Subject", "")),
        sender=next(iter(_addresses(message, "From")), None),
        to=_addresses(message, "To"),
        cc=_addresses(message, "Cc"),
        bcc=_addresses(message, "Bcc"),
        reply_to=_addresses(message, "Reply-To"),
        message_id=str(message["Message-ID"]).strip() if message["Message-ID"] else None,
        date=_date(message),
        text=_body(message, "plain"),
        html=_body(message, "html"),
        has_attachments=message.is_multipart() and any(True for _ in message.iter_attachments()),
    )


def _addresses(message: EmailMessage, header: str) -> tuple[Address, ...]:
    values = [str(value) for value in message.get_all(header, [])]
    return tuple(Address(name, address) for name, address in getaddresses(values) if address)


def _date(message: EmailMessage) -> datetime | None:
    try:
        return parsedate_to_datetime(str(message["Date"])) if message["Date"] else None
    except (TypeError, ValueError):
        return None


def _body(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body(preferencelist=(subtype,))
    if part is None:
        return None
    try:
        return str(part.get_content())
    except (LookupError, ValueError):  # unknown charset or broken transfer encoding
        payload = part.get_payload(decode=True)
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None


def compose(draft: Draft, message_id: str, date: datetime) -> bytes:
    """The MIME Exchange would generate for a message created through JSON."""
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = formataddr((draft.sender.name, draft.sender.address))
    for header, addresses in (
        ("To", draft.to),
        ("Cc", draft.cc),
        ("Bcc", draft.bcc),
        ("Reply-To", draft.reply_to),
    ):
        if addresses:
            message[header] = ", ".join(formataddr((a.name, a.address)) for a in addresses)
    message["Subject"] = draft.subject
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    for name, value in draft.headers:
        message[name] = value
    message.set_content(draft.body, subtype="html" if draft.body_type == "html" else "plain")
    return with_attachments(message.as_bytes(), draft.attachments)


def with_attachments(raw: bytes, attachments: tuple[FileAttachment, ...]) -> bytes:
    """The message with attachments added through Graph, as multipart/mixed."""
    if not attachments:
        return raw
    message = _PARSER.parsebytes(raw)
    if message.get_content_type() != "multipart/mixed":
        message.make_mixed()
    for attachment in attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        if not subtype:
            maintype, subtype = "application", "octet-stream"
        message.add_attachment(
            attachment.content,
            maintype=maintype,
            subtype=subtype,
            filename=attachment.name,
            disposition="inline" if attachment.is_inline else "attachment",
            cid=f"<{attachment.content_id}>" if attachment.content_id else None,
        )
    return message.as_bytes(policy=policy.SMTP)


def new_message_id(domain: str) -> str:
    return f"<{secrets.token_hex(16).upper()}@{domain}>"


def ensure_headers(raw: bytes, message_id: str, date: datetime) -> bytes:
    """Add the Message-ID and Date a submitted message lacks, leaving the rest byte-exact."""
    message = _head(raw)
    first_line_end = raw.find(b"\n")
    newline = b"\r\n" if raw[first_line_end - 1 : first_line_end] == b"\r" else b"\n"
    added = b""
    if message["Message-ID"] is None:
        added += b"Message-ID: " + message_id.encode() + newline
    if message["Date"] is None:
        added += b"Date: " + format_datetime(date).encode() + newline
    return added + raw
