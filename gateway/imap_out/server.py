"""The IMAP listeners (STARTTLS and implicit TLS), on Twisted's IMAP4 server.

Mailbox access is not wired up yet: the server greets, offers STARTTLS and answers LOGIN with a
clear NO, so a legacy client shows the admin a readable reason instead of a timeout.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.mail import imap4

from ..runtime import ConnectionRegistry, RunningListener, listen_twisted

NOT_READY = b"[UNAVAILABLE] This gateway does not serve mailboxes yet"


class _GatewayIMAP4Server(imap4.IMAP4Server):
    IDENT = b"mail gateway IMAP4rev1 ready"

    def connectionMade(self) -> None:
        self.factory.connections.add(self, self.transport.loseConnection)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.factory.connections.discard(self)
        super().connectionLost(reason)

    def do_LOGIN(self, tag: bytes, user: bytes, passwd: bytes) -> None:
        self.sendNegativeResponse(tag, NOT_READY)

    unauth_LOGIN = (do_LOGIN, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_finalastring)


class _IMAPFactory(Factory):
    noisy = False  # one log line per listener comes from the app, not two per factory

    def __init__(self, tls_for_starttls: Any) -> None:
        self.connections = ConnectionRegistry()
        self._tls = tls_for_starttls

    def buildProtocol(self, addr: Any) -> _GatewayIMAP4Server:
        # chal={} on purpose: with PLAIN registered here Twisted would accept AUTHENTICATE PLAIN
        # in clear text on the STARTTLS port (see docs/protocol-servers.md).
        protocol = _GatewayIMAP4Server(chal={}, contextFactory=self._tls)
        protocol.factory = self
        return protocol


async def serve(
    name: str, host: str, port: int, tls_context: Any, implicit_tls: bool
) -> RunningListener:
    """Start one IMAP listener; ``implicit_tls`` selects IMAPS, otherwise STARTTLS is offered."""
    factory = _IMAPFactory(None if implicit_tls else tls_context)
    return await listen_twisted(name, factory, host, port, tls_context if implicit_tls else None)
