"""The header changes an API sender must make, without copying the message body.

Graph and Gmail have no SMTP envelope: they send to the To/Cc/Bcc headers. So the headers must be
made to say exactly what the envelope says:

* an envelope recipient missing from the headers (a Bcc the client stripped before DATA, as
  ``smtplib.send_message`` does) is added to a ``Bcc:`` header, which both providers remove
  from the copies recipients get;
* a header recipient that is not in the envelope is *removed from the header* we send. SMTP
  semantics say only RCPT TO receives the message; a legacy program that splits one message
  into per-recipient transactions would otherwise make the provider mail everyone N times.

Only the header block is rebuilt; the body stays a slice of the original bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formataddr, getaddresses

from ..spool._types import Envelope

_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_RECIPIENT_FIELDS = ("to", "cc", "bcc")
_FOLD_AT = 78


@dataclass(frozen=True)
class Prepared:
    """The message as the provider must get it: ``head`` + ``raw[body_offset:]``."""

    head: bytes  # the rebuilt header block, ending with the blank line
    raw: bytes  # the original message
    body_offset: int  # where the body (after the blank line) starts in ``raw``
    from_address: str | None  # the header From's address, lower-cased
    dropped: tuple[str, ...]  # header recipients left out because they were not in the envelope

    @property
    def size(self) -> int:
        return len(self.head) + len(self.raw) - self.body_offset

    def chunks(self, size: int) -> Iterator[bytes]:
        """The message in pieces of at most ``size`` bytes; only one piece is copied at a time."""
        yield from _pieces(self.head, size)
        view = memoryview(self.raw)
        for start in range(self.body_offset, len(self.raw), size):
            yield bytes(view[start : start + size])

    def range(self, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of the message as sent."""
        head = self.head[start:end]
        offset = self.body_offset - len(self.head)
        body_start, body_end = max(start, len(self.head)), max(end, len(self.head))
        return head + self.raw[body_start + offset : body_end + offset]

    def joined(self) -> bytes:
        """The whole message as one bytes object (for the small-message paths)."""
        return self.head + self.raw[self.body_offset :]


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@dataclass
class _Field:
    name: str
    lines: list[bytes]  # raw lines without their line ending

    @property
    def key(self) -> str:
        return self.name.strip().lower()

    @property
    def value(self) -> str:
        text = b"\r\n".join(self.lines).decode("utf-8", "surrogateescape")
        return re.sub(r"\r\n[ \t]", " ", text.partition(":")[2]).strip()


def split_head(raw: bytes) -> tuple[bytes, int, bytes]:
    """(header block without the blank line, offset of the body, the message's line ending)."""
    blank = _BLANK_LINE.search(raw)
    newline = b"\r\n" if b"\r\n" in raw[:1000] else b"\n"
    if blank is None:
        return raw, len(raw), newline
    return raw[: blank.start()], blank.end(), newline


def _fields(head: bytes) -> list[_Field]:
    fields: list[_Field] = []
    for line in head.split(b"\n"):
        line = line.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].lines.append(line)
        elif line:
            name = line.partition(b":")[0].decode("ascii", "replace")
            fields.append(_Field(name, [line]))
    return fields


def _address_line(name: str, addresses: list[tuple[str, str]]) -> list[bytes]:
    """``Name: a, b`` folded after commas so no line passes 78 characters where avoidable."""
    lines, current = [], f"{name}:"
    for index, pair in enumerate(addresses):
        text = formataddr(pair) + ("," if index < len(addresses) - 1 else "")
        if len(current) + 1 + len(text) > _FOLD_AT and current != f"{name}:":
            lines.append(current)
            current = " " + text
        else:
            current += " " + text
    lines.append(current)
    return [line.encode("utf-8", "surrogateescape") for line in lines]


def prepare(raw: bytes, envelope: Envelope) -> Prepared:
    """Make the recipient headers match the envelope (see the module docstring)."""
    head, body_offset, newline = split_head(raw)
    wanted = {r.casefold(): r for r in envelope.rcpt_tos}
    present: set[str] = set()
    dropped: list[str] = []
    out: list[_Field] = []
    bcc: _Field | None = None
    from_address = None
    for field in _fields(head):
        if field.key == "from" and from_address is None:
            found = [a for _, a in getaddresses([field.value]) if a]
            from_address = found[0].lower() if found else None
        if field.key not in _RECIPIENT_FIELDS:
            out.append(field)
            continue
        pairs = [(n, a) for n, a in getaddresses([field.value]) if a]
        kept = [(n, a) for n, a in pairs if a.casefold() in wanted]
        dropped += [a for _, a in pairs if a.casefold() not in wanted]
        present |= {a.casefold() for _, a in kept}
        if kept and len(kept) != len(pairs):
            field = _Field(field.name, _address_line(field.name, kept))
        if kept:
            out.append(field)
            if field.key == "bcc":
                bcc = field
    missing = [(r, wanted[r]) for r in dict.fromkeys(wanted) if r not in present]
    if missing:
        extra = [("", address) for _, address in missing]
        if bcc is not None:
            merged = [(n, a) for n, a in getaddresses([bcc.value]) if a] + extra
            bcc.lines = _address_line(bcc.name, merged)
        else:
            out.append(_Field("Bcc", _address_line("Bcc", extra)))
    lines = [line for field in out for line in field.lines]
    new_head = newline.join(lines) + newline + newline
    return Prepared(new_head, raw, body_offset, from_address, tuple(dropped))
