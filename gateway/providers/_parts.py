"""Find the attachments of a large message by offsets, and stream their decoded bytes.

Graph's large-message path needs the message *without* its big attachments (a draft under the
4 MB request cap) and each attachment's bytes in ≤ 3 MiB pieces. Parsing a 30 MB message with
``email`` would hold several decoded copies; here the structure is found by scanning for MIME
boundaries in the original bytes, only header blocks are parsed, and attachment bodies are
decoded a window at a time.
"""

from __future__ import annotations

import base64
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

_PARSER = BytesParser(policy=policy.default)
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_WHITESPACE = b" \t\r\n"
_WINDOW = 4 * 1024 * 1024  # encoded bytes decoded at a time (a multiple of 4)


@dataclass(frozen=True)
class Attachment:
    """One leaf part that may be lifted out of the message."""

    cut_start: int  # removing raw[cut_start:cut_end] leaves a valid multipart
    cut_end: int
    body_start: int
    body_end: int
    name: str
    content_type: str
    encoding: str  # the Content-Transfer-Encoding, lower-cased
    content_id: str | None
    inline: bool
    size: int  # decoded size in bytes
    parent: int  # index of the multipart it belongs to (to keep every multipart non-empty)
    siblings: int  # how many parts that multipart has
    boundary: bytes  # that multipart's boundary

    def decoded(self, raw: bytes | bytearray, piece: int) -> Iterator[bytes]:
        """The attachment's bytes in pieces of exactly ``piece`` bytes (the last may be shorter)."""
        pending = b""
        for data in self._decode(raw):
            pending += data
            while len(pending) >= piece:
                yield pending[:piece]
                pending = pending[piece:]
        if pending:
            yield pending

    def _decode(self, raw: bytes | bytearray) -> Iterator[bytes]:
        view = memoryview(raw)
        if self.encoding == "base64":
            carry = b""
            for start in range(self.body_start, self.body_end, _WINDOW):
                chunk = bytes(view[start : min(start + _WINDOW, self.body_end)])
                clean = carry + chunk.translate(None, _WHITESPACE)
                usable = len(clean) - len(clean) % 4
                carry = clean[usable:]
                yield base64.b64decode(clean[:usable])
            if carry:
                yield base64.b64decode(carry + b"=" * (-len(carry) % 4))
        elif self.encoding == "quoted-printable":
            yield quopri.decodestring(bytes(view[self.body_start : self.body_end]))
        else:
            for start in range(self.body_start, self.body_end, _WINDOW):
                yield bytes(view[start : min(start + _WINDOW, self.body_end)])


def attachments(raw: bytes | bytearray, body_offset: int, head: EmailMessage) -> list[Attachment]:
    """Every leaf attachment of a multipart message, at any depth; [] for a single part."""
    found: list[Attachment] = []
    counter = [0]
    _walk(raw, body_offset, len(raw), head, found, counter)
    return found


def _walk(
    raw: bytes | bytearray,
    start: int,
    end: int,
    head: EmailMessage,
    found: list[Attachment],
    counter: list[int],
) -> None:
    boundary = head.get_boundary()
    if head.get_content_maintype() != "multipart" or not boundary:
        return
    parent = counter[0]
    counter[0] += 1
    children = list(_children(raw, start, end, boundary.encode()))
    for cut_start, part_start, part_end in children:
        blank = _BLANK_LINE.search(raw, part_start, part_end)
        if raw.startswith((b"\r\n", b"\n"), part_start, part_end):  # a part without headers
            header_end, body_start = part_start, raw.index(b"\n", part_start) + 1
        elif blank is None:
            continue
        else:
            header_end, body_start = blank.start(), blank.end()
        part = _PARSER.parsebytes(raw[part_start:header_end], headersonly=True)
        if part.get_content_maintype() == "multipart":
            _walk(raw, body_start, part_end, part, found, counter)
            continue
        filename = part.get_filename()
        disposition = part.get_content_disposition()
        if filename is None and disposition != "attachment":
            continue
        encoding = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        content_id = part.get("Content-ID")
        found.append(
            Attachment(
                cut_start=cut_start,
                cut_end=part_end,
                body_start=body_start,
                body_end=part_end,
                name=filename or "attachment",
                content_type=part.get_content_type(),
                encoding=encoding,
                content_id=str(content_id).strip().strip("<>") if content_id else None,
                inline=disposition == "inline",
                size=_decoded_size(raw, body_start, part_end, encoding),
                parent=parent,
                siblings=len(children),
                boundary=boundary.encode(),
            )
        )


def _children(
    raw: bytes | bytearray, start: int, end: int, boundary: bytes
) -> Iterator[tuple[int, int, int]]:
    """(cut start, content start, content end) of each body part between the delimiters.

    The line break before a delimiter belongs to the delimiter (RFC 2046 §5.1.1), so a part's
    content ends before it, and cutting from that line break to the next one removes the part.
    """
    delimiter = b"--" + boundary
    previous: tuple[int, int] | None = None  # (cut start, content start) of the open part
    position = start
    while True:
        index = raw.find(delimiter, position, end)
        if index < 0:
            return
        at_line_start = index == start or raw[index - 1 : index] == b"\n"
        after = raw[index + len(delimiter) : index + len(delimiter) + 2]
        if not at_line_start or (after[:1] not in (b"\r", b"\n", b" ", b"\t", b"-")):
            position = index + 1
            continue
        line_break = index
        if index > start and raw[index - 1 : index] == b"\n":
            line_break = index - 2 if raw[index - 2 : index - 1] == b"\r" else index - 1
        if previous is not None:
            yield previous[0], previous[1], line_break
        if after == b"--":
            return
        line_end = raw.find(b"\n", index, end)
        if line_end < 0:
            return
        previous = (line_break, line_end + 1)
        position = line_end + 1


def _decoded_size(raw: bytes | bytearray, start: int, end: int, encoding: str) -> int:
    if encoding == "base64":
        spaces = sum(raw.count(c, start, end) for c in (b" ", b"\t", b"\r", b"\n"))
        tail = raw[max(start, end - 8) : end].rstrip(_WHITESPACE)
        padding = len(tail) - len(tail.rstrip(b"="))
        return (end - start - spaces) * 3 // 4 - padding
    if encoding == "quoted-printable":
        return len(quopri.decodestring(raw[start:end]))
    return end - start
