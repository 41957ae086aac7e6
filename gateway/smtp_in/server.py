"""The SMTP listeners (STARTTLS submission and implicit TLS), on aiosmtpd and the shared loop.

Each listener is one asyncio server; both share one :class:`SmtpFront` (accounts, spool,
throttle, connection count). Build the front once and call :func:`serve` per port.
"""

from __future__ import annotations

import asyncio
import ssl

from ..runtime import ConnectionRegistry, RunningListener
from .front import AccountState, SmtpFront
from .handler import SubmissionHandler
from .protocol import GatewaySMTP

__all__ = ["AccountState", "SmtpFront", "serve"]


async def serve(
    name: str,
    host: str,
    port: int,
    hostname: str,
    tls: ssl.SSLContext,
    implicit_tls: bool,
    front: SmtpFront,
) -> RunningListener:
    """Start one SMTP listener. ``implicit_tls`` selects SMTPS; otherwise STARTTLS is offered."""
    registry = ConnectionRegistry()
    handler = SubmissionHandler(front, hostname)
    loop = asyncio.get_running_loop()

    def build() -> GatewaySMTP:
        return GatewaySMTP(
            front,
            registry,
            implicit_tls,
            handler=handler,
            hostname=hostname,  # without it aiosmtpd resolves the FQDN per connection, blocking
            ident="mail gateway ESMTP",
            tls_context=None if implicit_tls else tls,
            data_size_limit=front.size_limit,
            enable_SMTPUTF8=True,
            # We decide where AUTH is allowed (policy.plaintext_auth_allowed); aiosmtpd's own
            # rule cannot see implicit TLS and would refuse AUTH on SMTPS.
            auth_require_tls=False,
            loop=loop,
        )

    server = await loop.create_server(build, host, port, ssl=tls if implicit_tls else None)

    async def close() -> None:
        server.close()
        registry.close_all()
        await server.wait_closed()

    return RunningListener(name, server.sockets[0].getsockname(), close)
