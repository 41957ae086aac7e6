"""Give the heap a large message used back to the system (glibc ``mallopt``, ``malloc_trim``).

Why: a large message passes through big temporary buffers (aiosmtpd's DATA lines, the Graph
draft's base64 pieces, httpx's request chunks). CPython frees them, but glibc keeps freed
memory inside its arenas unless it lies at the very top of the heap: the RSS a 30 MB message
took stays with the process, and successive large messages fragment the arenas further, so RSS
creeps up (issue 13 measured 84 → 308 → 386 → 421 MiB over three messages to Graph).
``malloc_trim(0)`` returns every free page of every arena with ``madvise(MADV_DONTNEED)``.

The buffers are big because of the message, not the arenas' business: :func:`map_big_buffers`
(run once as the spool starts) fixes glibc's ``M_MMAP_THRESHOLD`` at ``BIG``, so every buffer of
at least that size gets its own ``mmap`` and is unmapped the moment it is freed. By default the
threshold is *dynamic*: glibc raises it to the size of each mmapped block freed (up to 32 MiB),
so after the first 4 MiB buffer every later one is carved out of an arena, one per worker
thread, where it fragments; with the threshold set, that adjustment is off (mallopt(3)).

It walks the whole heap, which takes milliseconds for a large one, so it runs in a worker thread
(it takes each arena's lock in turn, as any malloc call may), and only after a message of at
least ``LARGE`` bytes. Without glibc (musl, macOS) there is no trim: those allocators behave
differently and the call does not exist (the garbage collection in :func:`give_back` still
runs).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
from collections.abc import Callable

from ..logs import get_logger

log = get_logger(__name__)

LARGE = 4 * 1024 * 1024  # bytes: a message at least this large is followed by a trim
BIG = 256 * 1024  # bytes: a buffer this large is mapped on its own (a streamed piece's base64)
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (<malloc.h>)


def _load(name: str, argtypes: list[type], restype: type) -> Callable[..., int] | None:
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


_trim = _load("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
_mallopt = _load("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)


def map_big_buffers() -> bool:
    """Fix the mmap threshold at ``BIG`` (see the module docstring); whether it was set.
    Process-wide and idempotent; without glibc it does nothing."""
    return _mallopt is not None and _mallopt(M_MMAP_THRESHOLD, BIG) == 1


def available() -> bool:
    """Whether this process's C library has ``malloc_trim`` (glibc)."""
    return _trim is not None


async def give_back(size: int) -> bool:
    """After a message of ``size`` bytes: if it was large, collect the garbage cycles that
    still hold its buffers, then trim the heap. Whether it did.

    Why collect: httpx builds a reference cycle per response (the response and its stream
    refer to each other), and each cycle keeps its request alive, with the upload piece it
    carried: a large message's pieces stayed in memory until the next full collection, which
    made RSS after successive 30 MB messages wander between 90 and 122 MiB (issue 13,
    ``bench/large_message.py --count 10``; with the collection it stays flat). ``gateway run``
    freezes its start-up objects (``runtime.freeze_startup_objects``), so this walks only what
    came later: a few milliseconds, once per large message.
    """
    if size < LARGE:
        return False
    gc.collect()
    if _trim is not None:
        await asyncio.to_thread(_trim, 0)
    return True
