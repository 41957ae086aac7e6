"""DATA read in large pieces and passed on in batches, never held whole (issue 13).

aiosmtpd's own ``smtp_DATA`` keeps every line, joins them and hands over two more copies
(about 4x the message in memory, docs/protocol-servers.md section 5), and it reads one line per
``readuntil``: some 140 awaits of Python work for a 10 KB message, most of the intake's own CPU
per message after the spool's. Here the reader is asked for everything up to the end of data
(``readuntil(b"\\r\\n.\\r\\n")``, a search in C); when that is longer than the reader's limit,
it gives what it holds so far. Each piece is checked and dot-unstuffed with bytes methods over
all its complete lines at once, and goes out in batches of at least ``BATCH`` bytes, each ending
with CRLF. The limits and replies are aiosmtpd's: a line longer than the server's
``line_length_limit`` and a message over ``data_size_limit`` are read to the end, discarded and
answered then (RFC 5321 4.2.5 implies the reply waits for the end of the data).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from . import replies

BATCH = 64 * 1024
END = b"\r\n.\r\n"  # RFC 5321 4.1.1.4: the end of data, a line holding only "."
_DOT_LINE = b".\r\n"


async def read_data(
    reader: asyncio.StreamReader,
    deliver: Callable[[bytes], Awaitable[None]],
    size_limit: int | None,
    line_limit: int,
) -> str | None:
    """Read up to the lone dot, passing the content on; None, or the reply for bad data.

    Everything after the end of data (pipelined commands) stays in ``reader``.
    """
    content = _Content(deliver, size_limit, line_limit)
    start = await _read_start(reader)
    if (b"\r\n" + start).endswith(END):
        await content.add(start[: -len(_DOT_LINE)])
        return await content.finish()
    await content.add(start)
    while True:
        try:
            piece = await reader.readuntil(END)
        except asyncio.LimitOverrunError as error:
            # None of these bytes can begin the end of data (the reader searched them all).
            await content.add(await reader.read(error.consumed))
            continue
        await content.add(piece[: -len(_DOT_LINE)])  # the CRLF before the dot ends a line
        return await content.finish()


async def _read_start(reader: asyncio.StreamReader) -> bytes:
    """The first bytes of the data, read until no end of data can begin in them.

    The data starts after the DATA command's CRLF, which the reader has given out already, so
    ``readuntil(END)`` cannot see an end of data that begins with it (an empty message is
    ".\\r\\n" alone). While what was read, after that CRLF, ends with the beginning of ``END``,
    the bytes that would complete it are read (never more: the earliest end of data ends there);
    for an ordinary message that is one read of three bytes. The result ends with ``END``
    (after the CRLF) when the data ended within it.
    """
    read = b""
    while True:
        tail = (b"\r\n" + read)[-len(END) :]
        if tail == END:
            return read
        begun = next((n for n in range(len(END) - 1, 0, -1) if tail.endswith(END[:n])), 0)
        if not begun:
            return read
        read += await reader.readexactly(len(END) - begun)


class _Content:
    """The data after the end-of-data search: checked, dot-unstuffed and batched by lines."""

    def __init__(
        self,
        deliver: Callable[[bytes], Awaitable[None]],
        size_limit: int | None,
        line_limit: int,
    ) -> None:
        self._deliver = deliver
        self._size_limit = size_limit
        self._line_limit = line_limit
        self._carry = b""  # the start of a line whose CRLF has not come yet (as sent)
        self._total = 0  # bytes as sent, dot-stuffing included (aiosmtpd's count)
        self._batch: list[bytes] = []
        self._batched = 0
        self.problem: str | None = None

    async def add(self, data: bytes) -> None:
        """Take the next bytes of the data as sent; the lines they complete go on."""
        if not data:
            return
        self._total += len(data)
        if self.problem is not None:
            return  # read on to the end, keep nothing
        data = self._carry + data
        data_starts_at = self._total - len(data)  # in the message as sent
        end = data.rfind(b"\r\n") + 2
        lines, self._carry = (data[:end], data[end:]) if end > 1 else (b"", data)
        too_big = bool(self._size_limit) and self._total > (self._size_limit or 0)
        too_long = _unfinished_too_long(self._carry, self._line_limit) or (
            bool(lines) and max(map(len, lines.split(b"\r\n"))) + 2 > self._line_limit
        )
        if too_big or too_long:
            self.problem = self._first_problem(data, data_starts_at)
            self._carry, self._batch, self._batched = b"", [], 0
            return
        if not lines:
            return
        if lines[:1] == b".":  # RFC 5321 4.5.2 transparency: a line's leading dot goes
            lines = lines[1:]
        lines = lines.replace(b"\r\n.", b"\r\n")
        self._batch.append(lines)
        self._batched += len(lines)
        if self._batched >= BATCH:
            await self._flush()

    def _first_problem(self, data: bytes, total: int) -> str:
        """The reply for the first line of ``data`` (from a line start, ``total`` bytes of the
        message before it) that passes a limit: its length, else the size limit."""
        *complete, unfinished = data.split(b"\r\n")
        for line in complete:
            total += len(line) + 2
            if len(line) + 2 > self._line_limit:
                return replies.LINE_TOO_LONG
            if self._size_limit and total > self._size_limit:
                return replies.too_big(self._size_limit)
        if _unfinished_too_long(unfinished, self._line_limit):
            return replies.LINE_TOO_LONG
        assert self._size_limit
        return replies.too_big(self._size_limit)

    async def _flush(self) -> None:
        batch, self._batch, self._batched = b"".join(self._batch), [], 0
        await self._deliver(batch)

    async def finish(self) -> str | None:
        """The data has ended (its last line with it): pass on the rest; the problem, if any."""
        if self.problem is None and self._batch:
            await self._flush()
        return self.problem


def _unfinished_too_long(start: bytes, line_limit: int) -> bool:
    """Whether a line that begins with ``start`` (no CRLF yet) is too long whatever comes:
    the shortest it can be is ``start`` and its CRLF, which may have begun already."""
    return len(start) + (1 if start.endswith(b"\r") else 2) > line_limit
