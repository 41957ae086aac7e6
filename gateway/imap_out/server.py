"""The IMAP listeners (STARTTLS and implicit TLS), on Twisted's IMAP4 server.

Mailbox access is not wired up yet. LOGIN already checks the local password, and answers with
the one thing the admin can act on: a mailbox that must be connected (again) on the admin page
is named with the page's address; otherwise the reply says the INBOX is not served yet.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.protocol import Factory
from twisted.mail import imap4

from ..runtime import ConnectionRegistry, RunningListener, as_deferred, listen_twisted
from ._compat import CompatIMAP4Server

# (username, password, client address) -> None for a wrong password (or a throttled client),
# else the sentence to answer NO with.
LoginCheck = Callable[[str, str, str], Awaitable[str | None]]
NOT_READY = "This gateway does not serve mailboxes yet"


class _GatewayIMAP4Server(CompatIMAP4Server):
    IDENT = b"mail gateway IMAP4rev1 ready"

    def connectionMade(self) -> None:
        self.factory.connections.add(self, self.transport.loseConnection)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.factory.connections.discard(self)
        super().connectionLost(reason)

    def do_LOGIN(self, tag: bytes, user: bytes, passwd: bytes) -> None:
        if b"LOGINDISABLED" in self.capabilities():  # a STARTTLS port before STARTTLS
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] Use STARTTLS first")
            return
        client = self.transport.getPeer().host
        deferred = as_deferred(self.factory.login(_text(user), _text(passwd), client))
        deferred.addCallback(self._answer_login, tag)
        deferred.addErrback(self._login_failed, tag)

    unauth_LOGIN = (do_LOGIN, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_finalastring)

    def _answer_login(self, sentence: str | None, tag: bytes) -> None:
        if sentence is None:
            self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] Wrong username or password")
        else:
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] " + sentence.encode("utf-8"))

    def _login_failed(self, failure: Any, tag: bytes) -> None:
        self.factory.log_failure(failure)
        self.sendNegativeResponse(tag, b"[UNAVAILABLE] Internal error, please retry")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class _IMAPFactory(Factory):
    noisy = False  # one log line per listener comes from the app, not two per factory

    def __init__(self, tls_for_starttls: Any, login: LoginCheck, log_failure: Any) -> None:
        self.connections = ConnectionRegistry()
        self._tls = tls_for_starttls
        self.login = login
        self.log_failure = log_failure

    def buildProtocol(self, addr: Any) -> _GatewayIMAP4Server:
        # chal={} on purpose: with PLAIN registered here Twisted would accept AUTHENTICATE PLAIN
        # in clear text on the STARTTLS port (see docs/protocol-servers.md).
        protocol = _GatewayIMAP4Server(chal={}, contextFactory=self._tls)
        protocol.factory = self
        return protocol


async def serve(
    name: str, host: str, port: int, tls_context: Any, implicit_tls: bool, login: LoginCheck
) -> RunningListener:
    """Start one IMAP listener; ``implicit_tls`` selects IMAPS, otherwise STARTTLS is offered."""
    from ..logs import get_logger

    log = get_logger(__name__)
    factory = _IMAPFactory(
        None if implicit_tls else tls_context,
        login,
        lambda failure: log.error("imap.login_error", error=str(failure.value)),
    )
    return await listen_twisted(name, factory, host, port, tls_context if implicit_tls else None)
