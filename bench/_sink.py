"""The reference: a bare aiosmtpd server whose handler answers 250 and keeps nothing.

``python bench/_sink.py --port P [--probe]``. AUTH PLAIN/LOGIN is offered in clear and any
credentials pass (so clients run the same dialogue as against the gateway, minus the password
check); no TLS, no spool, no policy, no delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from _probe import Probe
from aiosmtpd.smtp import SMTP, AuthResult


class Sink:
    async def handle_DATA(self, server, session, envelope) -> str:
        return "250 2.0.0 OK"


def _accept_all(server, session, envelope, mechanism, auth_data) -> AuthResult:
    return AuthResult(success=True)


async def main(port: int, probe: bool) -> None:
    loop = asyncio.get_running_loop()
    handler = Sink()

    def build() -> SMTP:
        return SMTP(
            handler,
            hostname="localhost",
            data_size_limit=35 * 1024 * 1024,
            enable_SMTPUTF8=True,
            authenticator=_accept_all,
            auth_require_tls=False,
            loop=loop,
        )

    server = await loop.create_server(build, "127.0.0.1", port)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    monitor = Probe()
    if probe:
        await monitor.start()
        monitor.say(ready=True)
    await stop.wait()
    monitor.stop()
    server.close()


if __name__ == "__main__":
    import logging

    logging.getLogger("mail.log").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--probe", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.port, args.probe))
