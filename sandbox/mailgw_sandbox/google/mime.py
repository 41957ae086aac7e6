"""RFC 822 handling as Gmail does it: header-only recipients, From rewriting, Message resources.

Edits touch the header block only and leave every body byte as sent, because the gateway's tests
compare what arrived with what was submitted.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import re
import secrets
from datetime import datetime
from email.header import decode_header, make_header
from email.message import Message
from email.utils import format_datetime, formataddr, getaddresses, parsedate_to_datetime
from typing import Any, cast

from .._directory import User

_END_OF_HEADERS = re.compile(rb"\r?\n(?=\r?\n)")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_TAGS = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
SNIPPET_LENGTH = 200
_SNIPPET_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
)


def decode_raw(value: str) -> bytes:
    """Google's JSON ``bytes`` fields accept base64url or standard base64, padded or not."""
    text = value.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError("Base64 decoding failed") from error


def encode_raw(data: bytes) -> str:
    """Gmail answers base64url *with* padding."""
    return base64.urlsafe_b64encode(data).decode("ascii")


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """Header block (with its last newline) and the rest (from the blank line on)."""
    match = _END_OF_HEADERS.search(raw)
    if match is None:
        return raw, b""
    return raw[: match.end()], raw[match.end() :]


def _fields(head: bytes) -> list[bytes]:
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def set_header(raw: bytes, name: str, value: str | None) -> bytes:
    """Replace every ``name`` field with one ``name: value`` (or drop them when value is None)."""
    head, body = _split(raw)
    newline = b"\r\n" if b"\r\n" in head else b"\n"
    if head and not head.endswith(b"\n"):
        head += newline
    fields = _fields(head)
    wanted = name.lower()
    position = next((i for i, f in enumerate(fields) if _field_name(f) == wanted), 0)
    kept = [f for f in fields if _field_name(f) != wanted]
    if value is not None:
        kept.insert(min(position, len(kept)), f"{name}: {value}".encode() + newline)
    return b"".join(kept) + body


def parse_headers(raw: bytes) -> Message:
    return email.message_from_bytes(_split(raw)[0], policy=email.policy.compat32)


def addresses(headers: Message, *names: str) -> list[tuple[str, str]]:
    """(display name, address) pairs of these header fields, in order, empty groups dropped."""
    values = [str(v) for name in names for v in headers.get_all(name, [])]
    return [(n, a) for n, a in getaddresses(values) if "@" in a]


def recipients(headers: Message) -> tuple[str, ...]:
    """To, Cc and Bcc: the only place Gmail takes recipients from (there is no envelope)."""
    found = (address.lower() for _, address in addresses(headers, "To", "Cc", "Bcc"))
    return tuple(dict.fromkeys(found))


def message_id(headers: Message) -> str | None:
    value = headers.get("Message-ID")
    return str(value).strip() if value else None


def prepare_outgoing(raw: bytes, user: User, now: datetime) -> tuple[bytes, str]:
    """What Gmail does to a message it sends: a From that is neither the primary address nor a
    verified alias becomes the primary address *without any error*, and a missing Date or
    Message-ID is added. Returns the bytes as sent and the final From address."""
    headers = parse_headers(raw)
    senders = addresses(headers, "From")
    sender = senders[0][1] if senders else ""
    if not user.may_send_as(sender):
        raw = set_header(raw, "From", formataddr((user.display_name, user.address), "utf-8"))
        sender = user.address
    if headers.get("Date") is None:
        raw = set_header(raw, "Date", format_datetime(now))
    if headers.get("Message-ID") is None:
        raw = set_header(raw, "Message-ID", f"<{secrets.token_hex(16)}@mail.gmail.com>")
    return raw, sender


def date_ms(headers: Message) -> int | None:
    """The Date header as epoch milliseconds, or None when absent or unparsable."""
    value = headers.get("Date")
    if value is None:
        return None
    try:
        parsed = parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:
        return None
    return int(parsed.timestamp() * 1000)


def snippet(raw: bytes) -> str:
    """Gmail's ``snippet``: the start of the text body, whitespace collapsed, HTML-escaped."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    body = message.get_body(preferencelist=("plain", "html"))
    if body is None:
        return ""
    try:
        text = body.get_content()
    except (LookupError, ValueError, AttributeError):
        return ""
    if body.get_content_subtype() == "html":
        text = _TAGS.sub(" ", text)
    return _SPACE.sub(" ", text).strip()[:SNIPPET_LENGTH].translate(_SNIPPET_ESCAPES)


def header_json(message: Message, only: set[str] | None = None) -> list[dict[str, str]]:
    """``[{name, value}]`` in message order, values unfolded and RFC 2047-decoded as Gmail does."""
    return [
        {"name": name, "value": _decoded(value)}
        for name, value in message.raw_items()
        if only is None or name.lower() in only
    ]


def _decoded(value: str) -> str:
    unfolded = _FOLD.sub("", value).strip()
    text = unfolded.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    try:
        return str(make_header(decode_header(text)))
    except (LookupError, ValueError, UnicodeError):
        return text


def payload(raw: bytes) -> dict[str, Any]:
    """The ``format=full`` MessagePart tree (bodies inline; no ``attachmentId`` indirection)."""
    return _part(email.message_from_bytes(raw, policy=email.policy.compat32), "")


def metadata_payload(raw: bytes, only: set[str] | None) -> dict[str, Any]:
    """``format=metadata``: the top part's type and headers, no bodies."""
    message = parse_headers(raw)
    return {
        "partId": "",
        "mimeType": message.get_content_type(),
        "filename": "",
        "headers": header_json(message, only),
        "body": {"size": 0},
    }


def _part(message: Message, part_id: str) -> dict[str, Any]:
    part: dict[str, Any] = {
        "partId": part_id,
        "mimeType": message.get_content_type(),
        "filename": message.get_filename() or "",
        "headers": header_json(message),
    }
    if message.is_multipart():
        part["body"] = {"size": 0}
        children = cast(list[Message], message.get_payload())
        part["parts"] = [
            _part(child, f"{part_id}.{index}" if part_id else str(index))
            for index, child in enumerate(children)
        ]
        return part
    data = message.get_payload(decode=True)
    data = data if isinstance(data, bytes) else b""
    part["body"] = {"size": len(data), "data": encode_raw(data)} if data else {"size": 0}
    return part
