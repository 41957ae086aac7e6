"""The head of a spooled message file: its format, where the message begins, its first state.

A message is committed as one file, ``queue/<id>.eml``. Its first page holds a magic line that
names the format and the offset of the message's bytes, then the record (envelope and initial
state) as one JSON line; zeros pad it to ``CONTENT_OFFSET``, where the message itself starts.
Why one file: on this project's machine (ext4 without a journal) creating a file costs
0.15-0.8 ms of kernel CPU, and the intake created two per message, the bytes and a state file
(issue 13; bench/README.md). Why page-aligned: the API senders ``mmap`` the message, and an
mmap offset must be a multiple of ``mmap.ALLOCATIONGRANULARITY`` (the page size on Linux).

The magic line begins with a NUL byte: a message the spool stored before this format begins
with a header line (the Received or Message-ID header it adds), never with NUL, so such a file
reads as a message at offset 0 whose state is in ``<id>.json`` only.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

MAGIC = b"\x00gateway-spool 2 "  # then the content offset in decimal and a newline
CONTENT_OFFSET = max(4096, mmap.ALLOCATIONGRANULARITY)  # where a new message's bytes begin
HEAD_BYTES = 4096  # the magic line and the state line always fit in this first page


@dataclass(frozen=True)
class Prefix:
    """What a message file's first page says."""

    offset: int  # where the message's bytes begin; 0 in a file written before this format
    state: bytes | None  # the record's JSON as committed; None when it is in <id>.json only


def fits(state: bytes) -> bool:
    """Whether record JSON ``state`` fits in the head (not with very many recipients)."""
    return b"\n" not in state and len(_magic_line()) + len(state) + 1 <= HEAD_BYTES


def encode(state: bytes | None) -> bytes:
    """The head to write at offset 0, with the record's JSON ``state`` if it :func:`fits`;
    without (None), the state is in ``<id>.json`` only and the committer writes that too."""
    return _magic_line() + (state or b"") + b"\n"


def _magic_line() -> bytes:
    return MAGIC + str(CONTENT_OFFSET).encode() + b"\n"


def parse(head: bytes) -> Prefix:
    """Read a message file's first ``HEAD_BYTES``. A state line that is empty or incomplete
    (no newline before the page ends) is no state."""
    if not head.startswith(MAGIC):
        return Prefix(0, None)
    magic_end = head.find(b"\n", len(MAGIC))
    offset_text = head[len(MAGIC) : magic_end] if magic_end > 0 else b""
    if not offset_text.isdigit():
        raise ValueError("a spool file with a damaged head")
    state_end = head.find(b"\n", magic_end + 1)
    state = head[magic_end + 1 : state_end] if state_end > magic_end + 1 else None
    return Prefix(int(offset_text), state)
