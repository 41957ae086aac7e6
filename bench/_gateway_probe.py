"""``gateway run`` with bench/_probe.py inside: the same start-up as the CLI's ``run`` (reactor
first, then settings, logging, Gateway) plus the stall/RSS probe on the gateway's own loop.

``python bench/_gateway_probe.py CONFIG``; used by bench/large_message.py, because an event-loop
stall can only be observed from inside the process whose loop it is.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _probe import Probe


def main(config: str) -> int:
    import asyncio

    from gateway.runtime import new_loop_with_reactor

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
        probe = Probe()
        await probe.start()
        probe.say(ready=True, ports=gateway.ports)
        try:
            await stop.wait()
        finally:
            probe.stop()
            await gateway.stop()

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
