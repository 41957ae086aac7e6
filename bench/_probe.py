"""Measurement hooks run *inside* a benchmarked child process (gateway or sink).

A task sleeps 10 ms in a loop and records how late it wakes (the event loop's stalls); stdin
takes one command per line and stdout answers with ``PROBE {json}``:

- ``reset``: forget the largest stall so far and reset the peak RSS (``/proc/self/clear_refs``),
  answer the current RSS;
- ``report``: answer RSS (and its anonymous and file-backed parts), peak RSS (VmHWM) and the
  largest stall since the last reset.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

TICK = 0.010


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0])
    return values


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


class Probe:
    def __init__(self) -> None:
        self.max_stall = 0.0
        self.ticks = 0
        self._tasks: list[asyncio.Task] = []

    def say(self, **fields: object) -> None:
        sys.stdout.write("PROBE " + json.dumps(fields) + "\n")
        sys.stdout.flush()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._serve(reader))]

    async def _watch(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            late = time.perf_counter() - before - TICK
            self.ticks += 1
            if late > self.max_stall:
                self.max_stall = late

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            command = line.decode().strip()
            if command == "reset":
                self.max_stall, self.ticks = 0.0, 0
                reset = _reset_peak()
                self.say(reset_peak=reset, **_status())
            elif command == "report":
                stall_ms = round(self.max_stall * 1000, 1)
                self.say(max_stall_ms=stall_ms, ticks=self.ticks, **_status())

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
