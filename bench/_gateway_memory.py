"""``gateway run`` with tracemalloc on, to see where the memory of idle sessions goes.

``python bench/_gateway_memory.py CONFIG FRAMES``: the same start-up as the CLI's ``run``
(reactor first, then settings, logging, Gateway), with ``tracemalloc.start(FRAMES)`` before
anything is imported. Commands on stdin, one per line, answered on stdout as ``PROBE {json}``
(read by ``_common.ProbeClient``):

- ``trim``: collect garbage and give free heap pages back to the system (glibc
  ``malloc_trim``), so that an RSS reading taken next is not lowered by memory freed earlier
  and reused later (answers VmRSS);
- ``snapshot``: collect garbage, then keep a tracemalloc snapshot (answers the traced size);
- ``diff``: the largest differences between the last two snapshots, by allocating line and by
  the call stack (up to FRAMES frames), with sizes and object counts.

FRAMES 0 runs without tracemalloc (only ``trim``). Used by ``bench/imap_bench.py --idle-only``.
Tracing costs time and memory of its own, so RSS figures are taken from runs without it.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import tracemalloc
from pathlib import Path
from typing import Any

TOP = 30


def trim() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def main(config: str, frames: int) -> int:
    if frames:
        tracemalloc.start(frames)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import asyncio

    from _child import run_gateway

    snapshots: list[tracemalloc.Snapshot] = []
    ignore = (tracemalloc.Filter(False, tracemalloc.__file__),)

    def say(**fields: object) -> None:
        import json

        sys.stdout.write("PROBE " + json.dumps(fields) + "\n")
        sys.stdout.flush()

    def diff() -> dict:
        old, new = snapshots[-2], snapshots[-1]
        lines = new.compare_to(old, "lineno")[:TOP]
        stacks = new.compare_to(old, "traceback")[:TOP]
        return {
            "lines": [[str(s.traceback[0]), s.size_diff, s.count_diff] for s in lines],
            "stacks": [[[str(f) for f in s.traceback], s.size_diff, s.count_diff] for s in stacks],
            "total": sum(s.size_diff for s in new.compare_to(old, "filename")),
        }

    async def serve(loop: asyncio.AbstractEventLoop) -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = line.decode().strip()
            if command == "trim":
                trim()
                with open("/proc/self/status") as status:
                    rss = next(int(x.split()[1]) for x in status if x.startswith("VmRSS:"))
                say(VmRSS=rss)
            elif command == "snapshot":
                gc.collect()
                snapshots.append(tracemalloc.take_snapshot().filter_traces(ignore))
                say(traced=tracemalloc.get_traced_memory()[0])
            elif command == "diff":
                say(**diff())

    async def beside(gateway: object, loop: asyncio.AbstractEventLoop) -> Any:
        commands = asyncio.create_task(serve(loop))
        say(ready=True)
        return commands.cancel

    return run_gateway(config, beside)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
