"""How busy the event loop's thread has been lately, so that the spool holds deliveries back for
the intake only when the intake actually needs the loop.

Why: a delivery costs the loop several times what accepting a message does, so while a burst
keeps the loop busy the worker starts no new send and the clients get their 250s at the
intake's pace (issue 13: p99 within 2x a bare aiosmtpd sink). But when the loop has room (the
clients send more slowly than it can accept, or the machine has cores to spare), holding back
only delays the mail: with the upstream server on a CPU of its own the delivered rate was
0.74x of Postfix direct with an unconditional hold and 0.91-1.03x without one
(``bench/smtp_throughput.py --upstream --pin``). The measure is the loop thread's CPU time over
wall time (``time.thread_time``), in windows of ``WINDOW`` seconds; a window that was not
measured (the worker slept through it) counts as busy until the next one is.
"""

from __future__ import annotations

import time
from collections.abc import Callable

WINDOW = 0.1  # seconds over which the loop's share of CPU is measured


class LoopLoad:
    """``share(now)``: the loop thread's CPU share in the last whole window. Call it on the
    loop's thread (``time.thread_time`` is per thread), with ``time.monotonic()``."""

    def __init__(self, cpu: Callable[[], float] = time.thread_time) -> None:
        self._cpu = cpu
        self._since = -1.0  # start of the current window (monotonic); none yet
        self._cpu_since = 0.0
        self._share = 1.0  # unknown counts as busy

    def share(self, now: float) -> float:
        elapsed = now - self._since
        if self._since < 0.0 or elapsed >= WINDOW:
            cpu = self._cpu()
            measured = self._since >= 0.0 and elapsed <= 3 * WINDOW
            self._share = (cpu - self._cpu_since) / elapsed if measured else 1.0
            self._since, self._cpu_since = now, cpu
        return self._share
