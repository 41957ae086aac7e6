"""Give the heap a large message used back to the system (glibc ``malloc_trim``).

Why: a large message passes through big temporary buffers (aiosmtpd's DATA lines, the Graph
draft's base64 pieces, httpx's request chunks). CPython frees them, but glibc keeps freed
memory inside its arenas unless it lies at the very top of the heap: the RSS a 30 MB message
took stays with the process, and successive large messages fragment the arenas further, so RSS
creeps up (issue 13 measured 84 → 308 → 386 → 421 MiB over three messages to Graph).
``malloc_trim(0)`` returns every free page of every arena with ``madvise(MADV_DONTNEED)``.

It walks the whole heap, which takes milliseconds for a large one, so it runs in a worker thread
(it takes each arena's lock in turn, as any malloc call may), and only after a message of at
least ``LARGE`` bytes. Without glibc (musl, macOS) it does nothing: those allocators behave
differently and the call does not exist.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

from ..logs import get_logger

log = get_logger(__name__)

LARGE = 4 * 1024 * 1024  # bytes: a message at least this large is followed by a trim


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_trim = _load_trim()


def available() -> bool:
    """Whether this process's C library has ``malloc_trim`` (glibc)."""
    return _trim is not None


async def give_back(size: int) -> bool:
    """After a message of ``size`` bytes: trim the heap if it was large. Whether it trimmed."""
    if _trim is None or size < LARGE:
        return False
    await asyncio.to_thread(_trim, 0)
    return True
