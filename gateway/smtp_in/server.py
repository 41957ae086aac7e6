"""The SMTP listeners (STARTTLS submission and implicit TLS), on aiosmtpd and the shared loop.

Each listener is one asyncio server; both share one :class:`SmtpFront` (accounts, spool,
throttle, connection count). Build the front once and call :func:`serve` per port.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from ..admission import Admission, ConnectionLimits
from ..runtime import (
    ConnectionRegistry,
    RunningListener,
    default_limits,
    listen,
    release_if_failed,
)
from . import replies
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
    limits: ConnectionLimits | None = None,
) -> RunningListener:
    """Start one SMTP listener. ``implicit_tls`` selects SMTPS; otherwise STARTTLS is offered.
    ``limits`` are the process's connection caps (one set for every listener)."""
    registry = ConnectionRegistry()
    handler = SubmissionHandler(front, hostname)
    loop = asyncio.get_running_loop()
    limits = limits or default_limits()

    def build(admission: Admission) -> GatewaySMTP:
        return GatewaySMTP(
            front,
            registry,
            implicit_tls,
            admission,
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

    def hand_over(conn: socket.socket, admission: Admission) -> None:
        connecting = loop.create_task(
            loop.connect_accepted_socket(
                lambda: build(admission),
                conn,
                ssl=tls if implicit_tls else None,
                ssl_handshake_timeout=limits.caps.preauth_timeout if implicit_tls else None,
            )
        )
        connecting.add_done_callback(lambda task: release_if_failed(task, admission))

    async def close_connections() -> None:
        registry.close_all()

    refusals = {} if implicit_tls else _REFUSALS
    return await listen(
        name,
        "smtp",
        host,
        port,
        limits,
        refusals,
        hand_over,
        close_connections,
        proxy_protocol=True,
    )


_REFUSALS = {
    "address": f"{replies.TOO_MANY_FROM_ADDRESS}\r\n".encode(),
    "total": f"{replies.TOO_MANY_CONNECTIONS}\r\n".encode(),
}
