"""The DATA reader (gateway.smtp_in.data) against aiosmtpd's line-by-line reading.

``read_data`` reads large pieces up to the end of data; the reference below is the reading it
replaced (aiosmtpd's loop of one ``readuntil(b"\\r\\n")`` per line, with the same limits).
Both read the same bytes, arriving in random pieces, and must pass on the same content, answer
the same problem, and leave what follows the end of data (a pipelined command) in the reader.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.smtp_in import replies
from gateway.smtp_in.data import BATCH, read_data

LINE_LIMIT = 1001  # aiosmtpd's line_length_limit, which is also its reader's limit
NEXT = b"NOOP\r\n"


async def _line_by_line(
    reader: asyncio.StreamReader, size_limit: int | None, line_limit: int
) -> tuple[bytes, str | None]:
    """The reference: one line per read, as aiosmtpd's smtp_DATA (1.4.6) does."""
    kept: list[bytes] = []
    total = 0
    problem: str | None = None
    mid_line = False
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
        if problem is None:
            kept.append(line[1:] if line[:1] == b"." else line)
    return (b"" if problem else b"".join(kept)), problem


async def _fed(stream: bytes, pieces: list[int]) -> asyncio.StreamReader:
    """A reader like aiosmtpd's (limit = line length limit) that gets ``stream`` in pieces of
    the given sizes, one per loop iteration, in the background."""
    reader = asyncio.StreamReader(limit=LINE_LIMIT)

    async def feed() -> None:
        at = 0
        for size in pieces:
            reader.feed_data(stream[at : at + size])
            at += size
            await asyncio.sleep(0)
        reader.feed_data(stream[at:])

    asyncio.get_running_loop().create_task(feed())
    await asyncio.sleep(0)
    return reader


async def _both(
    stream: bytes, pieces: list[int], size_limit: int | None = None
) -> tuple[tuple[bytes, str | None], tuple[bytes, str | None], list[bytes]]:
    """(read_data's content and problem, the reference's, read_data's batches); both must
    leave ``NEXT`` in the reader."""
    batches: list[bytes] = []

    async def deliver(batch: bytes) -> None:
        batches.append(batch)

    reader = await _fed(stream, pieces)
    problem = await read_data(reader, deliver, size_limit, LINE_LIMIT)
    assert await asyncio.wait_for(reader.readuntil(b"\r\n"), 5) == NEXT
    reference_reader = await _fed(stream, pieces)
    reference = await _line_by_line(reference_reader, size_limit, LINE_LIMIT)
    assert await asyncio.wait_for(reference_reader.readuntil(b"\r\n"), 5) == NEXT
    content = b"" if problem else b"".join(batches)
    return (content, problem), reference, batches


_TRICKY_LINES = [
    b"",
    b".",
    b"..",
    b"...",
    b".x",
    b"..x",
    b"From: a@example.org",
    b"text\r",
    b"\n",
    b"\n.\n",
    b"\r.\r",
    b"a.\r",
    b"\r\n.x",  # a line that begins with a dot the client did not double
    b"x" * 998,
    b"x" * 999,
    b"x" * 1000,
    b"y" * 3000,
]


def _random_message(rng: random.Random) -> bytes:
    lines = [rng.choice(_TRICKY_LINES) for _ in range(rng.randint(0, 12))]
    # What a client sends: every line that begins with "." gets another (RFC 5321 4.5.2),
    # except now and then, as a careless client might (but a lone "." ends the data).
    sent = [
        b"." + line if line[:1] == b"." and (line == b"." or rng.random() < 0.9) else line
        for line in lines
    ]
    return b"".join(line + b"\r\n" for line in sent)


def _random_pieces(rng: random.Random, length: int) -> list[int]:
    pieces = []
    while sum(pieces) < length:
        pieces.append(rng.choice([1, 2, 3, 4, 5, 7, 64, 1000, 1004, 1006, 5000]))
    return pieces


async def test_same_content_and_problems_as_line_by_line_reading() -> None:
    rng = random.Random(13)
    for _ in range(600):
        message = _random_message(rng)
        stream = message + b".\r\n" + NEXT
        size_limit = rng.choice([None, None, 50, 2000])
        new, reference, batches = await _both(stream, _random_pieces(rng, len(stream)), size_limit)
        assert new[0] == reference[0], stream
        if new[1] != reference[1]:
            # A message past both limits: which reply aiosmtpd's reading gives depends on how
            # the bytes arrived; ours names the first line's own problem (its length) first.
            assert {new[1], reference[1]} == {replies.LINE_TOO_LONG, replies.too_big(size_limit)}
            assert size_limit and len(message) > size_limit
            assert max(len(line) for line in message.split(b"\r\n")) + 2 > LINE_LIMIT
        assert all(batch.endswith(b"\r\n") for batch in batches)


@pytest.mark.parametrize(
    ("message", "content"),
    [
        (b"", b""),  # an empty message: ".\r\n" right after the 354
        (b"\r\n", b"\r\n"),
        (b"\r\n\r\n", b"\r\n\r\n"),
        (b"..\r\n", b".\r\n"),
        (b"..\r\n..\r\n", b".\r\n.\r\n"),
        (b"a\r\n..b\r\n", b"a\r\n.b\r\n"),
        (b"a\r\n.\rb\r\n", b"a\r\n\rb\r\n"),  # "." then a bare CR: not the end
        (b".\r\r\n", b"\r\r\n"),
    ],
)
async def test_edges_at_the_start_and_end(message: bytes, content: bytes) -> None:
    stream = message + b".\r\n" + NEXT
    for pieces in ([len(stream)], [1] * len(stream), [3, 2, 1000]):
        (got, problem), reference, _ = await _both(stream, pieces)
        assert (got, problem) == (content, None) == reference


async def test_large_message_goes_out_in_batches_ending_with_crlf() -> None:
    line = b"The quick brown fox jumps over the lazy dog, message body line padding.\r\n"
    message = line * (3 * BATCH // len(line) + 1)
    stream = message + b".\r\n" + NEXT
    (got, problem), reference, batches = await _both(stream, [65536] * (len(stream) // 65536))
    assert (got, problem) == (message, None) == reference
    assert len(batches) >= 3 and all(len(b) >= BATCH for b in batches[:-1])


async def test_limits_read_to_the_end_and_keep_nothing() -> None:
    too_long = b"a\r\n" + b"x" * 5000 + b"\r\nb\r\n"
    too_big = b"y" * 998 + b"\r\n"
    for message, size_limit, reply in (
        (too_long, None, replies.LINE_TOO_LONG),
        (too_big * 30, 20_000, replies.too_big(20_000)),
    ):
        stream = message + b".\r\n" + NEXT
        (got, problem), reference, _ = await _both(stream, [700] * 100, size_limit)
        assert (got, problem) == (b"", reply) == reference
