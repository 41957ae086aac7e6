"""``gateway run`` with its intake measured alone: the CLI's start-up (``_child.run_gateway``),
the spool's worker told to hold every delivery while messages arrive (so the process's CPU is
the intake's: SMTP, policy, spool commit, logs), and optionally cProfile on the loop's thread.

``python bench/_gateway_profile.py CONFIG [--profile OUT.prof] [--deliver]``; used by
bench/intake_cpu.py. ``--deliver`` leaves the worker as configured (deliveries during the burst,
as ``smtp_throughput.py`` measures). cProfile sees the loop's thread only: the fsync and logging
threads' CPU shows in the process's CPU time, not in the profile.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _child import run_gateway

_FOREVER = 1e9


def _beside(profile: str | None, deliver: bool) -> Any:
    async def start(gateway: Any, loop: Any) -> Any:
        if not deliver:  # the intake hold never ends: every message stays queued
            gateway.spool.intake_quiet = gateway.spool.max_defer = _FOREVER
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()

        def stop() -> None:
            if profiler is not None and profile is not None:
                profiler.disable()
                profiler.dump_stats(profile)

        return stop

    return start


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--profile", help="write the loop thread's cProfile stats here")
    parser.add_argument("--deliver", action="store_true")
    args = parser.parse_args()
    sys.exit(run_gateway(args.config, _beside(args.profile, args.deliver)))
