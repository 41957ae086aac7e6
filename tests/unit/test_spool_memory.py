"""The allocator settings that give a large message's memory back (issue 13)."""

from __future__ import annotations

import ctypes
import ctypes.util

from gateway.spool import _memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _mapped_bytes() -> int:
    """glibc's count of bytes in blocks that have their own mmap (``hblkhd``)."""
    mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().hblkhd)


def test_big_buffers_keep_their_own_mapping_after_a_bigger_one_was_freed() -> None:
    """By default glibc raises its mmap threshold to the size of each mapped block freed, so
    after one 8 MiB buffer a 1 MiB one comes from an arena, where it stays in RSS when freed.
    With the threshold fixed, it is mapped on its own and unmapped when freed."""
    assert _memory.map_big_buffers()  # glibc on the machines this runs on
    bigger = bytearray(8 * 1024 * 1024)
    del bigger
    before = _mapped_bytes()
    buffer = bytearray(1024 * 1024)
    assert _mapped_bytes() - before >= len(buffer)
    del buffer
    assert _mapped_bytes() == before
