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

import base64
import mmap
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.utils import formataddr, getaddresses

from ..delivery import Envelope

# The spool hands API senders its file mapped read-only (``reads_mapped_files``): slicing and
# regular expressions work on it as on bytes, and a piece is copied only when it is sent.
Message = bytes | bytearray | mmap.mmap
_PAGE = mmap.PAGESIZE
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_STREAM_PIECE = 3 * 64 * 1024  # a multiple of 3, so the pieces' base64 joins into the whole's
_RECIPIENT_FIELDS = ("to", "cc", "bcc")
_FOLD_AT = 78


@dataclass(frozen=True)
class Prepared:
    """The message as the provider must get it: ``head`` + ``raw[body_offset:]``."""

    head: bytes  # the rebuilt header block, ending with the blank line
    raw: Message  # the original message
    body_offset: int  # where the body (after the blank line) starts in ``raw``
    from_address: str | None  # the header From's address, lower-cased
    dropped: tuple[str, ...]  # header recipients left out because they were not in the envelope

    @property
    def size(self) -> int:
        return len(self.head) + len(self.raw) - self.body_offset

    def chunks(self, size: int) -> Iterator[bytes]:
        """The message in pieces of at most ``size`` bytes; only one piece is copied at a time."""
        yield from _pieces(self.head, size)
        for start in range(self.body_offset, len(self.raw), size):
            # no view kept: a mapped file can close (bytes() of a bytes slice is the same object)
            piece = bytes(self.raw[start : start + size])
            drop_pages(self.raw, start, start + size)
            yield piece

    def range(self, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of the message as sent."""
        head = self.head[start:end]
        offset = self.body_offset - len(self.head)
        body_start, body_end = max(start, len(self.head)), max(end, len(self.head))
        body = self.raw[body_start + offset : body_end + offset]
        drop_pages(self.raw, body_start + offset, body_end + offset)
        return head + body

    def joined(self) -> bytes:
        """The whole message as one bytes object (for the small-message paths)."""
        return self.head + self.raw[self.body_offset :]

    def body(self, *, as_base64: bool = False) -> StreamedBody:
        """The message as an HTTP request body read a piece at a time (raw, or base64)."""
        return StreamedBody(self, as_base64)


class StreamedBody:
    """A request body streamed from the message, never joined; re-iterable, because
    ``Api.call`` sends a request twice after a 401. Give ``len(body)`` as Content-Length."""

    def __init__(self, prepared: Prepared, as_base64: bool) -> None:
        self.prepared = prepared
        self.as_base64 = as_base64

    def __len__(self) -> int:
        size = self.prepared.size
        return 4 * -(-size // 3) if self.as_base64 else size

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        if not self.as_base64:
            for piece in self.prepared.chunks(_STREAM_PIECE):
                yield piece
            return
        carry = b""
        for piece in self.prepared.chunks(_STREAM_PIECE):
            data = carry + piece if carry else piece
            cut = len(data) - len(data) % 3
            yield base64.b64encode(data[:cut])
            carry = data[cut:]
        if carry:
            yield base64.b64encode(carry)


def drop_pages(raw: Message, start: int, end: int) -> None:
    """Unmap the pages of ``raw[start:end]`` once read, if ``raw`` is a mapped file.

    A mapped page read counts in the process's RSS until it is unmapped, so reading a 30 MB
    file from start to end would hold all of it; dropped, a page is read again from the page
    cache if it is needed again. The partial pages at either end are dropped too (refetching
    them is cheap). Bytes in memory are left alone.
    """
    if not isinstance(raw, mmap.mmap) or raw.closed:
        return
    first = start - start % _PAGE
    end = min(end, len(raw))
    if end > first:
        raw.madvise(mmap.MADV_DONTNEED, first, end - first)


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


def split_head(raw: Message) -> tuple[bytes, int, bytes]:
    """(header block without the blank line, offset of the body, the message's line ending)."""
    blank = _BLANK_LINE.search(raw)
    newline = b"\r\n" if b"\r\n" in raw[:1000] else b"\n"
    if blank is None:
        return bytes(raw), len(raw), newline
    return bytes(raw[: blank.start()]), blank.end(), newline


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


def prepare(raw: Message, envelope: Envelope) -> Prepared:
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
