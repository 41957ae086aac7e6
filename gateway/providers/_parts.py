"""Find the attachments of a large message by offsets, and stream their decoded bytes.

Graph's large-message path needs the message *without* its big attachments (a draft under the
4 MB request cap) and each attachment's bytes in ≤ 3 MiB pieces. Parsing a 30 MB message with
``email`` would hold several decoded copies; here the structure is found by scanning for MIME
boundaries in the original bytes, only header blocks are parsed, and attachment bodies are
decoded a piece at a time.

The message may be the spool file mapped read-only (``_mime.Message``): it is scanned in place,
never copied whole into the heap, and every window read is unmapped again (``drop_pages``), so
the scan and the upload hold a few MiB of the message at a time, not all of it.
"""

from __future__ import annotations

import binascii
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

from ._mime import Message, drop_pages

_PARSER = BytesParser(policy=policy.default)
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_WHITESPACE = b" \t\r\n"
_WINDOW = 4 * 1024 * 1024  # bytes of the message scanned or copied at a time


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

    def decoded(self, raw: Message, piece: int) -> Iterator[bytes]:
        """The attachment's bytes in pieces of exactly ``piece`` bytes (the last may be shorter);
        ``piece`` is a multiple of 3, so a piece is a whole number of base64 groups."""
        if piece % 3:
            raise ValueError(f"piece size {piece} is not a multiple of 3")
        if self.encoding == "base64":
            yield from self._base64(raw, piece)
        elif self.encoding == "quoted-printable":
            data = quopri.decodestring(raw[self.body_start : self.body_end])
            drop_pages(raw, self.body_start, self.body_end)
            for start in range(0, len(data), piece):
                yield data[start : start + piece]
        else:
            for start in range(self.body_start, self.body_end, piece):
                stop = min(start + piece, self.body_end)
                data = bytes(raw[start:stop])  # the same object for bytes and a mapped file
                drop_pages(raw, start, stop)
                yield data

    def _base64(self, raw: Message, piece: int) -> Iterator[bytes]:
        """Each piece decoded from just the encoded text it needs: read a window, strip the
        line breaks, decode exactly ``piece // 3 * 4`` characters; what is left over (less than
        one window's line breaks' worth) starts the next piece."""
        want = piece // 3 * 4
        clean = bytearray()
        position = self.body_start
        while True:
            while len(clean) < want and position < self.body_end:
                # enough for the characters still wanted with 76-character lines, and more
                stop = min(self.body_end, position + (want - len(clean)) * 80 // 76 + 4)
                window = raw[position:stop]
                drop_pages(raw, position, stop)
                clean += window.translate(None, _WHITESPACE)
                del window
                position = stop
            if len(clean) < want:  # the last piece
                clean += b"=" * (-len(clean) % 4)
                if data := binascii.a2b_base64(clean):
                    yield data
                return
            with memoryview(clean) as view, view[:want] as text:
                data = binascii.a2b_base64(text)  # no copy of the text to decode
            del clean[:want]
            yield data


def attachments(raw: Message, body_offset: int, head: EmailMessage) -> list[Attachment]:
    """Every leaf attachment of a multipart message, at any depth; [] for a single part."""
    found: list[Attachment] = []
    counter = [0]
    _walk(raw, body_offset, len(raw), head, found, counter)
    return found


def _walk(
    raw: Message,
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
        opening = raw[part_start : min(part_start + 2, part_end)]
        if opening.startswith((b"\r\n", b"\n")):  # a part without headers
            header_end, body_start = part_start, raw.find(b"\n", part_start) + 1
        elif (blank := _BLANK_LINE.search(raw, part_start, part_end)) is None:
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
    raw: Message, start: int, end: int, boundary: bytes
) -> Iterator[tuple[int, int, int]]:
    """(cut start, content start, content end) of each body part between the delimiters.

    The line break before a delimiter belongs to the delimiter (RFC 2046 §5.1.1), so a part's
    content ends before it, and cutting from that line break to the next one removes the part.
    """
    delimiter = b"--" + boundary
    previous: tuple[int, int] | None = None  # (cut start, content start) of the open part
    position = start
    while True:
        index = _find(raw, delimiter, position, end)
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


def _find(raw: Message, sub: bytes, start: int, end: int) -> int:
    """``raw.find(sub, start, end)``, a window at a time with each window's pages dropped, so
    searching a mapped 30 MB body does not map all of it at once."""
    position = start
    while position < end:
        stop = min(position + _WINDOW, end)
        found = raw.find(sub, position, min(stop + len(sub) - 1, end))
        drop_pages(raw, position, stop)
        if found >= 0:
            return found
        position = stop
    return -1


def _decoded_size(raw: Message, start: int, end: int, encoding: str) -> int:
    if encoding == "base64":
        spaces = 0
        for position in range(start, end, _WINDOW):
            stop = min(position + _WINDOW, end)
            window = raw[position:stop]
            drop_pages(raw, position, stop)
            spaces += sum(window.count(c) for c in (b" ", b"\t", b"\r", b"\n"))
        tail = raw[max(start, end - 8) : end].rstrip(_WHITESPACE)
        padding = len(tail) - len(tail.rstrip(b"="))
        return (end - start - spaces) * 3 // 4 - padding
    if encoding == "quoted-printable":
        size = len(quopri.decodestring(raw[start:end]))
        drop_pages(raw, start, end)
        return size
    return end - start
