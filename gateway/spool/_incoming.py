"""A message while it is being received: its bytes go to a temporary file as they arrive.

The SMTP front streams DATA here, so no copy of a large message stays in memory. Only the
header block is kept (the sender checks read it, and a message without a Message-ID gets one
before the header, which must be decided before the first byte is written). The content starts
at ``_prefix.CONTENT_OFFSET``: the file spool writes the message's head (its format and first
state) before it at commit, so a message is one file. The file is written without fsync; the
group committer (``_commit``) finishes, fsyncs and commits it.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from pathlib import Path

from ._files import message_id_header, new_id
from ._prefix import CONTENT_OFFSET
from ._spare import spare_files

HEAD_LIMIT = 1024 * 1024  # a header block larger than this is refused (see ``head_too_large``)
_FLUSH_AT = 256 * 1024  # bytes gathered in memory before they are written out, off the loop
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


class IncomingMessage:
    """``write`` the content in order, then hand it to :meth:`FileSpool.submit` or ``discard``.

    ``prologue`` (the Received header) is stored after the Message-ID header we may add and
    before the content.
    """

    def __init__(self, tmp: Path, hostname: str, prologue: bytes = b"") -> None:
        self.id = new_id()
        self.size = 0  # bytes of the message: added Message-ID and prologue in, file head out
        self.message_id = ""
        self.added = b""  # the Message-ID header line we put first, if it had none
        self.head: bytes | None = None  # the content's header block, once it is complete
        self.path = tmp / f"{self.id}.eml.{secrets.token_hex(4)}"
        self._hostname = hostname
        self._prologue = prologue
        self._gathered = bytearray()  # the content while its header block is incomplete
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._fd: int | None = None
        self._created = False  # the file exists (until committed or discarded)
        self._spares = spare_files(tmp)

    @property
    def head_too_large(self) -> bool:
        """The header block never ended within ``HEAD_LIMIT`` bytes."""
        return self.head is not None and len(self.head) > HEAD_LIMIT

    async def write(self, data: bytes) -> None:
        """Add content; every ``_FLUSH_AT`` bytes go to the file in a worker thread."""
        if self.head is None:
            searched_from = max(0, len(self._gathered) - 3)
            self._gathered += data
            blank = _BLANK_LINE.search(self._gathered, searched_from)
            if blank is None and len(self._gathered) <= HEAD_LIMIT:
                return
            self._end_head(blank.end() if blank else len(self._gathered))
        else:
            self._queue(data)
        if self._pending_size >= _FLUSH_AT:
            pieces, self._pending, self._pending_size = self._pending, [], 0
            await asyncio.to_thread(self._write_out, pieces)

    def finish(self) -> None:
        """The content is complete (a message may have no body, hence no blank line)."""
        if self.head is None:
            self._end_head(len(self._gathered))

    def _end_head(self, body_start: int) -> None:
        content = bytes(self._gathered)
        self._gathered = bytearray()
        self.head = content[:body_start]
        self.added, self.message_id = message_id_header(self.head, self._hostname)
        self._queue(self.added)
        self._queue(self._prologue)
        self._queue(content)

    def _queue(self, data: bytes) -> None:
        if data:
            self._pending.append(data)
            self._pending_size += len(data)
            self.size += len(data)

    def _write_out(self, pieces: list[bytes]) -> None:
        if self._fd is None:
            self._fd = self._spares.create(self.path)
            self._created = True
            os.lseek(self._fd, CONTENT_OFFSET, os.SEEK_SET)  # a hole until the head is written
        for piece in pieces:
            view = memoryview(piece)
            while view:
                view = view[os.write(self._fd, view) :]

    @property
    def in_memory(self) -> bool:
        """Nothing was written out yet: the whole message is in :meth:`take_content`."""
        return self._fd is None

    def take_content(self) -> list[bytes]:
        """The message's bytes, for a message still :attr:`in_memory`: what a store that
        keeps it elsewhere (a segment, a database row) writes, without a file of its own."""
        self.finish()
        assert self._fd is None
        pieces, self._pending, self._pending_size = self._pending, [], 0
        return pieces

    def write_rest(self) -> int:
        """Write what is left (blocking); the file's descriptor, for the committer to fsync
        along with the rest of its batch before :meth:`close_file`."""
        pieces, self._pending, self._pending_size = self._pending, [], 0
        self._write_out(pieces)
        assert self._fd is not None
        return self._fd

    def content(self) -> bytes:
        """Write what is left and read the message back without the room for its head
        (blocking): for a store that keeps the bytes elsewhere (the database spool)."""
        if self.in_memory:
            return b"".join(self.take_content())
        self.write_rest()
        self.close_file()
        with self.path.open("rb") as file:
            file.seek(CONTENT_OFFSET)
            return file.read()

    def close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Drop the temporary file (a refused or failed message)."""
        self._pending, self._gathered = [], bytearray()
        self.close_file()
        if self._created:
            self._created = False
            self._spares.give(self.path)
