"""The start-up the benchmarks' gateway children share: the CLI's ``run`` (reactor first, then
settings, logging, Gateway) with something of the benchmark's own beside the gateway, on its
loop, until SIGINT or SIGTERM. Used by ``_gateway_probe.py`` and ``_gateway_memory.py``.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Given the started gateway and the loop; starts the benchmark's part and returns how to stop it.
Beside = Callable[[Any, Any], Awaitable[Callable[[], None]]]


def run_gateway(config: str, beside: Beside) -> int:
    import asyncio

    from gateway.runtime import freeze_startup_objects, new_loop_with_reactor

    loop = new_loop_with_reactor()
    from gateway.app import Gateway
    from gateway.config import load_settings
    from gateway.logs import configure_logging

    settings = load_settings(Path(config))
    configure_logging(settings.logging.level, settings.logging.format)

    async def run() -> None:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        gateway = Gateway(settings)
        await gateway.start()
        freeze_startup_objects()  # as ``gateway run`` does once it serves
        stop_beside = await beside(gateway, loop)
        try:
            await stop.wait()
        finally:
            stop_beside()
            await gateway.stop()

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    return 0
