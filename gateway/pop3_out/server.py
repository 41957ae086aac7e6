"""The POP3 listeners (plain and implicit TLS), on Twisted's POP3 server.

Mailbox access is not wired up yet. PASS already checks the local password and answers with
what the admin can act on (see :mod:`gateway.imap_out.server`). ``twisted.mail.pop3`` imports
the global reactor at import time, so it is imported inside :func:`serve`, after the asyncio
reactor has been installed.
"""

from __future__ import annotations

from typing import Any

from ..imap_out.server import LoginCheck
from ..runtime import ConnectionRegistry, RunningListener, as_deferred, listen_twisted


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
            if self._userIs is None:
                self.failResponse(b"USER required before PASS")
                return
            user, self._userIs = self._userIs, None
            secret = b" ".join((password, *words)).decode("utf-8", "replace")
            username = user.decode("utf-8", "replace")
            client = self.transport.getPeer().host
            deferred = as_deferred(self.factory.login(username, secret, client))
            deferred.addCallback(self._answer)
            deferred.addErrback(self._failed)

        def _answer(self, sentence: str | None) -> None:
            if sentence is None:
                self.failResponse(b"[AUTH] Wrong username or password")
            else:
                self.failResponse(b"[SYS/TEMP] " + sentence.encode("utf-8"))

        def _failed(self, failure: Any) -> None:
            self.factory.log_failure(failure)
            self.failResponse(b"[SYS/TEMP] Internal error, please retry")

    return GatewayPOP3


async def serve(
    name: str, host: str, port: int, tls_context: Any, implicit_tls: bool, login: LoginCheck
) -> RunningListener:
    from twisted.internet.protocol import Factory

    from ..logs import get_logger

    log = get_logger(__name__)
    factory = Factory.forProtocol(_protocol_class())
    factory.connections = ConnectionRegistry()
    factory.noisy = False
    factory.login = login
    factory.log_failure = lambda failure: log.error("pop3.login_error", error=str(failure.value))
    return await listen_twisted(name, factory, host, port, tls_context if implicit_tls else None)
