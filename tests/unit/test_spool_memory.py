"""The allocator settings that give a large message's memory back (issue 13)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: in a long test session the heap already holds free chunks of
# every size, and glibc serves a new buffer from one of those before it considers mmap at all,
# whatever the threshold. A fresh process shows the threshold's effect alone.
_PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, json
    from gateway.spool import _memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2

    def mapped():  # glibc's count of bytes in blocks that have their own mmap
        return int(mallinfo2().hblkhd)

    fixed = _memory.map_big_buffers()
    bigger = bytearray(8 * 1024 * 1024)
    del bigger
    before = mapped()
    buffer = bytearray(1024 * 1024)
    during = mapped()
    del buffer
    print(json.dumps({"fixed": fixed, "grew": during - before, "after": mapped() - before}))
    """
)


def test_big_buffers_keep_their_own_mapping_after_a_bigger_one_was_freed() -> None:
    """By default glibc raises its mmap threshold to the size of each mapped block freed, so
    after one 8 MiB buffer a 1 MiB one comes from an arena, where it stays in RSS when freed.
    With the threshold fixed, it is mapped on its own and unmapped when freed."""
    answer = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    seen = json.loads(answer.stdout)
    assert seen["fixed"], "glibc's mallopt is available on the machines this runs on"
    assert seen["grew"] >= 1024 * 1024 and seen["after"] == 0


async def test_after_a_large_message_the_cycles_holding_its_buffers_are_collected() -> None:
    """httpx's responses form reference cycles that keep their requests' upload pieces alive
    until a full collection: give_back collects them after a large message, not after a small
    one (where a collection would cost more than it frees)."""
    from gateway.spool import _memory

    class Piece:
        def __init__(self) -> None:
            self.body = bytes(_memory.LARGE)
            self.me = self  # a cycle, as httpx's response and its stream

    gc.disable()  # no collection but the one under test
    try:
        piece = Piece()
        alive = weakref.ref(piece)
        del piece
        assert not await _memory.give_back(_memory.LARGE - 1)
        assert alive() is not None  # a small message: nothing collected
        assert await _memory.give_back(_memory.LARGE)
        assert alive() is None
    finally:
        gc.enable()


def test_gateway_run_freezes_its_start_up_objects_out_of_the_collector() -> None:
    """Full collections walked every start-up object (17-45 ms pauses in a burst): frozen, a
    collection walks only what came later. In a fresh interpreter: freezing the test
    session's own objects would keep its garbage forever."""
    code = (
        "import gc; from gateway.runtime import freeze_startup_objects; "
        "before = gc.get_freeze_count(); freeze_startup_objects(); "
        "print(before, gc.get_freeze_count())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert before == 0 and after > 10_000  # the modules' objects, at least
