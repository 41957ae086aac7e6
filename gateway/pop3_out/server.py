"""The POP3 listeners (plain and implicit TLS), on Twisted's POP3 server.

Mailbox access is not wired up yet: PASS gets a clear -ERR naming the reason.
``twisted.mail.pop3`` imports the global reactor at import time, so it is imported inside
:func:`serve`, after the asyncio reactor has been installed.
"""

from __future__ import annotations

from typing import Any

from ..runtime import ConnectionRegistry, RunningListener, listen_twisted

NOT_READY = b"[SYS/TEMP] This gateway does not serve mailboxes yet"


def _protocol_class() -> type:
    from twisted.mail import pop3

    class GatewayPOP3(pop3.POP3):
        # No <timestamp> in the greeting: we offer no APOP, and clients try it when they see one.
        magic = b"mail gateway POP3 ready"

        def connectionMade(self) -> None:
            self.factory.connections.add(self, self.transport.loseConnection)
            super().connectionMade()

        def connectionLost(self, reason: Any) -> None:
            self.factory.connections.discard(self)
            super().connectionLost(reason)

        def do_PASS(self, password: bytes, *words: bytes) -> None:
            self._userIs = None
            self.failResponse(NOT_READY)

    return GatewayPOP3


async def serve(
    name: str, host: str, port: int, tls_context: Any, implicit_tls: bool
) -> RunningListener:
    from twisted.internet.protocol import Factory

    factory = Factory.forProtocol(_protocol_class())
    factory.connections = ConnectionRegistry()
    factory.noisy = False
    return await listen_twisted(name, factory, host, port, tls_context if implicit_tls else None)
