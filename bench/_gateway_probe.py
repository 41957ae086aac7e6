"""``gateway run`` with bench/_probe.py inside: the same start-up as the CLI's ``run`` (reactor
first, then settings, logging, Gateway) plus the stall/RSS probe on the gateway's own loop.

``python bench/_gateway_probe.py CONFIG``; used by bench/large_message.py, because an event-loop
stall can only be observed from inside the process whose loop it is.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _child import run_gateway
from _probe import Probe


async def _probe_beside(gateway: Any, loop: Any) -> Any:
    probe = Probe()
    await probe.start()
    probe.say(ready=True, ports=gateway.ports)
    return probe.stop


if __name__ == "__main__":
    sys.exit(run_gateway(sys.argv[1], _probe_beside))
