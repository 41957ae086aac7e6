"""The SMTP listeners (STARTTLS submission and implicit TLS), on aiosmtpd.

Mail delivery is not wired up yet: every transaction is refused with a *temporary* error, so a
legacy program keeps its mail queued and retries, instead of bouncing it.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from ..logs import get_logger
from ..runtime import ConnectionRegistry, RunningListener

log = get_logger(__name__)

NOT_READY = "451 4.3.2 This gateway does not deliver mail yet; keep the message and retry later"


class _NotReadyHandler:
    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        return NOT_READY


class _GatewaySMTP(SMTP):
    def __init__(self, registry: ConnectionRegistry, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._registry = registry

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._registry.add(self, transport.close)

    def connection_lost(self, error: Exception | None) -> None:
        self._registry.discard(self)
        super().connection_lost(error)


async def serve(
    name: str, host: str, port: int, hostname: str, tls: ssl.SSLContext, implicit_tls: bool
) -> RunningListener:
    """Start one SMTP listener. ``implicit_tls`` selects SMTPS; otherwise STARTTLS is offered."""
    registry = ConnectionRegistry()

    def build() -> SMTP:
        return _GatewaySMTP(
            registry,
            handler=_NotReadyHandler(),
            hostname=hostname,  # without it aiosmtpd resolves the FQDN per connection, blocking
            ident="mail gateway ESMTP",
            tls_context=None if implicit_tls else tls,
            enable_SMTPUTF8=True,
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(build, host, port, ssl=tls if implicit_tls else None)

    async def close() -> None:
        server.close()
        registry.close_all()
        await server.wait_closed()

    return RunningListener(name, server.sockets[0].getsockname(), close)
