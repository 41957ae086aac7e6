"""DATA read line by line and passed on in batches, never held whole (issue 13).

aiosmtpd's own ``smtp_DATA`` keeps every line, joins them and hands over two more copies
(about 4x the message in memory, docs/protocol-servers.md section 5). Here the dot-unstuffed
lines go out in batches of ``BATCH`` bytes (each ending with CRLF) to the spool file, with the
same limits and replies as aiosmtpd: a line longer than the server's ``line_length_limit`` and
a message over ``data_size_limit`` are read to the end, discarded and answered then
(RFC 5321 4.2.5 implies the reply waits for the end of the data).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from . import replies

BATCH = 64 * 1024


async def read_data(
    reader: asyncio.StreamReader,
    deliver: Callable[[bytes], Awaitable[None]],
    size_limit: int | None,
    line_limit: int,
) -> str | None:
    """Read up to the lone dot, passing the content on; None, or the reply for bad data."""
    batch: list[bytes] = []
    batched = total = 0
    problem: str | None = None
    mid_line = False  # the last piece read did not end a line (it overran the reader's limit)
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as error:
            problem = problem or replies.LINE_TOO_LONG
            line = await reader.read(error.consumed)
        if not mid_line and line == b".\r\n":
            break
        mid_line = not line.endswith(b"\r\n")
        total += len(line)
        if problem is None and size_limit and total > size_limit:
            problem = replies.too_big(size_limit)
        if problem is None and len(line) > line_limit:
            problem = replies.LINE_TOO_LONG
        if problem is not None:
            batch, batched = [], 0  # read on to the end, keep nothing
            continue
        if line[:1] == b".":
            line = line[1:]  # RFC 5321 4.5.2 transparency
        batch.append(line)
        batched += len(line)
        if batched >= BATCH:
            await deliver(b"".join(batch))
            batch, batched = [], 0
    if problem is None and batch:
        await deliver(b"".join(batch))
    return problem
