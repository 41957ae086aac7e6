"""The IMAP listeners (STARTTLS and implicit TLS), on Twisted's IMAP4 server, over the INBOX.

Login: ``login(username, password, client)`` checks the local password through the login gate
and returns the account name, or a :class:`~gateway.login_gate.Refused`: a wrong password is
answered ``NO [AUTHENTICATIONFAILED]``, a throttled one ``NO [UNAVAILABLE]`` with a sentence.
``mailbox_for(account)`` returns its :class:`MailboxView`, or the sentence saying why it cannot
be served (e.g. the mailbox must be connected again on the admin page), answered
``NO [UNAVAILABLE] <sentence>``. The same path serves
``LOGIN`` and ``AUTHENTICATE PLAIN/LOGIN``, offered together: over TLS (after STARTTLS, or on the
implicit-TLS port), and in clear text only where ``reading.plaintext_auth`` allows the client
(LOGINDISABLED elsewhere). What a session sees is in :mod:`._mailbox`.
"""

from __future__ import annotations

import binascii
from base64 import b64decode, b64encode
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.mail import imap4
from twisted.python.failure import Failure

from ..admission import Admission, ConnectionLimits
from ..cleartext import plaintext_auth_allowed
from ..login_gate import LoginCheck, Refused
from ..logs import get_logger
from ..mailbox import MailboxView
from ..runtime import RunningListener, TwistedListenerFactory, as_deferred
from ._compat import CompatIMAP4Server
from ._contract import GatewayMailbox
from ._mailbox import InboxAccount

MailboxFor = Callable[[str], Awaitable[MailboxView | str]]
"""``mailbox_for(account)``: the account's view, or a sentence saying why it is unavailable."""

log = get_logger(__name__)

_WRONG = b"[AUTHENTICATIONFAILED] Wrong username or password"


class _GatewayIMAP4Server(CompatIMAP4Server):
    IDENT = b"mail gateway IMAP4rev1 ready"

    admission: Admission  # set by the listener (gateway.runtime.listen_twisted)
    _state = "unauth"
    _sasl: tuple[Any, bytes] | None = None  # the SASL exchange waiting for the client's line

    def connectionMade(self) -> None:
        self.factory.connections.add(self, self.transport.loseConnection)
        self.admission.on_expire = self._preauth_expired
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connections.discard(self)
        self.admission.release()
        super().connectionLost(reason)

    @property
    def state(self) -> str:
        """Twisted's session state; entering ``auth`` (a login) moves the connection out of the
        unauthenticated pool, whichever path logged it in."""
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        if value in ("auth", "select"):
            self.admission.authenticated()

    def _preauth_expired(self) -> None:
        self.sendUntaggedResponse(b"BYE " + self.admission.goodbye.encode())
        self.transport.loseConnection()

    def do_STARTTLS(self, tag: bytes) -> None:
        """BAD inside TLS, implicit or negotiated: STARTTLS belongs to a cleartext connection
        (RFC 9051 section 6.2.1); stock Twisted answers NO, as if a retry could help."""
        if self.startedTLS or self.factory.implicit_tls:
            self.sendBadResponse(tag, b"TLS is already active on this connection")
            return
        super().do_STARTTLS(tag)

    unauth_STARTTLS = (do_STARTTLS,)

    # -- LOGIN and AUTHENTICATE ------------------------------------------------------------------

    def capabilities(self) -> dict[bytes, Any]:
        """LOGINDISABLED before STARTTLS unless ``reading.plaintext_auth`` allows this client
        (loopback by default). Wherever LOGIN is allowed so is AUTHENTICATE PLAIN/LOGIN, with
        SASL-IR (RFC 4959): mbsync logs in only through AUTHENTICATE. UIDPLUS for UID EXPUNGE
        (APPEND and COPY, its other half, are refused: only INBOX exists)."""
        caps = super().capabilities()
        caps[b"UIDPLUS"] = None
        if b"LOGINDISABLED" in caps and self._cleartext_allowed():
            del caps[b"LOGINDISABLED"]
        if b"LOGINDISABLED" in caps:
            caps[b"AUTH"] = []  # not listed
        else:
            caps[b"AUTH"] = list(_MECHANISMS)
            caps[b"SASL-IR"] = None
        return caps

    def _cleartext_allowed(self) -> bool:
        peer = self.admission.address
        return plaintext_auth_allowed(self.factory.plaintext_auth, peer, tls_active=False)

    def do_LOGIN(self, tag: bytes, user: bytes, passwd: bytes) -> None:
        if b"LOGINDISABLED" in self.capabilities():  # a STARTTLS port before STARTTLS
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] Use STARTTLS first")
            return
        self._sign_in(tag, _text(user), _text(passwd))

    unauth_LOGIN = (do_LOGIN, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_finalastring)

    def do_AUTHENTICATE(self, tag: bytes, mechanism: bytes, initial: bytes | None) -> None:
        """AUTHENTICATE where LOGIN is allowed, through the same check (stock needs a cred
        portal), with the initial response of RFC 4959 (``=`` for an empty one)."""
        if b"LOGINDISABLED" in self.capabilities():  # a STARTTLS port before STARTTLS
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] Use STARTTLS first")
            return
        credentials = _MECHANISMS.get(mechanism.upper())
        if credentials is None:
            self.sendNegativeResponse(tag, b"Unsupported authentication mechanism")
            return
        chal = credentials()
        if initial is None:
            self._ask_sasl(chal, tag)
            return
        chal.getChallenge()  # the (empty) challenge that the initial response answers
        self._auth_chunk(b"" if initial == b"=" else initial, chal, tag)

    def opt_initial_response(self, line: bytes | None) -> tuple[bytes | None, bytes]:
        return (line or b"").strip() or None, b""

    unauth_AUTHENTICATE = (do_AUTHENTICATE, imap4.IMAP4Server.arg_atom, opt_initial_response)

    def _ask_sasl(self, chal: Any, tag: bytes) -> None:
        """A challenge; the client's next line goes to :meth:`parse_sasl` (stock's loop used
        its private ``_pendingLiteral``), ending in :meth:`_sign_in` so replies carry response
        codes."""
        try:
            challenge = chal.getChallenge()
        except Exception:
            self.factory.log_failure("AUTHENTICATE challenge failed")
            self.sendNegativeResponse(tag, b"[SERVERBUG] Authentication failed")
            return
        self.parseState = "sasl"  # Twisted's lineReceived calls parse_<parseState>
        self._sasl = (chal, tag)
        self.sendContinuationRequest(b64encode(challenge))

    def parse_sasl(self, line: bytes) -> None:
        """The client's answer to a SASL challenge."""
        self.parseState = "command"
        waiting, self._sasl = self._sasl, None
        assert waiting is not None, "parseState is 'sasl' only while an exchange waits"
        chal, tag = waiting
        try:
            self._auth_chunk(line, chal, tag)
        except Exception:
            self._login_failed(Failure(), tag)

    def _auth_chunk(self, line: bytes, chal: Any, tag: bytes) -> None:
        if line.strip() == b"*":
            self.sendBadResponse(tag, b"AUTHENTICATE cancelled")
            return
        try:
            chal.setResponse(b64decode(line, validate=True))
        except (binascii.Error, ValueError):
            self.sendBadResponse(tag, b"AUTHENTICATE response is not base64")
            return
        except imap4.IllegalClientResponse:
            self.sendBadResponse(tag, b"AUTHENTICATE response is malformed")
            return
        if chal.moreChallenges():
            self._ask_sasl(chal, tag)
            return
        if getattr(chal, "authzid", b"") not in (b"", chal.username):
            self.sendNegativeResponse(tag, b"[AUTHORIZATIONFAILED] Cannot act as another user")
            return
        self._sign_in(tag, _text(chal.username or b""), _text(chal.password or b""))

    def _sign_in(self, tag: bytes, user: str, password: str) -> None:
        client = self.admission.address
        deferred = as_deferred(self._open_account(user, password, client))
        deferred.addCallback(self._answer_login, tag)
        deferred.addErrback(self._login_failed, tag)

    async def _open_account(self, user: str, password: str, client: str) -> InboxAccount | bytes:
        account = await self.factory.login(user, password, client)
        if isinstance(account, Refused):
            # RFC 5530: UNAVAILABLE is "temporary failure ... try again later".
            return b"[UNAVAILABLE] " + account.sentence().encode() if account.throttled else _WRONG
        view = await self.factory.mailbox_for(account)
        if isinstance(view, str):
            return b"[UNAVAILABLE] " + view.encode("utf-8")
        return InboxAccount(account, view)

    def _answer_login(self, outcome: InboxAccount | bytes, tag: bytes) -> None:
        if isinstance(outcome, bytes):
            self.sendNegativeResponse(tag, outcome)
            return
        log.info("imap.login", account=outcome.name, client=self.admission.address)
        self.account = outcome
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        self.sendPositiveResponse(tag, b"Logged in")

    def _login_failed(self, failure: Any, tag: bytes) -> None:
        self.factory.log_failure(failure)
        self.sendNegativeResponse(tag, b"[UNAVAILABLE] Internal error, please retry")

    # -- EXPUNGE and UID EXPUNGE (RFC 4315 UIDPLUS) -------------------------------------------

    def do_EXPUNGE(self, tag: bytes, uids: Any = None) -> None:
        """Stock answers BAD with Python text on failure; this answers NO with a sentence."""
        if not self.mbox.isWriteable():
            self.sendNegativeResponse(tag, b"[READ-ONLY] EXPUNGE needs SELECT, not EXAMINE")
            return
        deferred = defer.maybeDeferred(self.mbox.expunge, uids)
        deferred.addCallback(self._expunged, tag)
        deferred.addErrback(self._expunge_failed, tag)

    select_EXPUNGE = (do_EXPUNGE,)

    def do_UID(self, tag: bytes, command: bytes, line: bytes | None) -> None:
        if command.upper() != b"EXPUNGE":
            super().do_UID(tag, command, line)
            return
        try:
            uids, _ = self.arg_seqset((line or b"").strip())
        except imap4.IllegalClientResponse:
            self.sendBadResponse(tag, b"UID EXPUNGE needs a UID set")
            return
        self.do_EXPUNGE(tag, uids)

    select_UID = (do_UID, imap4.IMAP4Server.arg_atom, imap4.IMAP4Server.arg_line)

    def _expunged(self, gone: list[int], tag: bytes) -> None:
        for seq in gone:
            self.sendUntaggedResponse(b"%d EXPUNGE" % seq)
        self.sendPositiveResponse(tag, b"EXPUNGE completed")

    def _expunge_failed(self, failure: Any, tag: bytes) -> None:
        self.factory.log_failure(failure)
        self.sendNegativeResponse(tag, b"[UNAVAILABLE] EXPUNGE failed, please retry")

    # -- NOOP, CHECK and IDLE: where changes at the provider reach the client -----------------

    def do_NOOP(self, tag: bytes) -> None:
        """Sync with the provider now, then report every pending change."""
        if self.state != "select" or not isinstance(self.mbox, GatewayMailbox):
            self.sendPositiveResponse(tag, b"NOOP completed")
            return
        deferred = as_deferred(self.mbox.refresh())
        deferred.addCallback(self._refreshed, tag, b"NOOP")
        deferred.addErrback(self._refresh_failed, tag, b"NOOP")

    unauth_NOOP = (do_NOOP,)
    auth_NOOP = unauth_NOOP
    select_NOOP = unauth_NOOP

    def do_CHECK(self, tag: bytes) -> None:
        deferred = as_deferred(self.mbox.refresh())
        deferred.addCallback(self._refreshed, tag, b"CHECK")
        deferred.addErrback(self._refresh_failed, tag, b"CHECK")

    select_CHECK = (do_CHECK,)

    def _refreshed(self, _: object, tag: bytes, command: bytes) -> None:
        self._report_changes()
        self.sendPositiveResponse(tag, command + b" completed")

    def _refresh_failed(self, failure: Any, tag: bytes, command: bytes) -> None:
        """The provider could not be asked now; the session goes on with what it has."""
        self.factory.log_failure(failure)
        self._report_changes()
        self.sendPositiveResponse(tag, command + b" completed (mailbox not refreshed)")

    def _report_changes(self) -> None:
        if isinstance(self.mbox, GatewayMailbox) and not self._lost:
            for line in self.mbox.drain():
                self.sendUntaggedResponse(line)

    def mailbox_changed(self) -> None:
        """The view changed: an idling client hears it now, the others at their next NOOP."""
        if self.parseState == "idle":
            self._report_changes()

    def do_IDLE(self, tag: bytes) -> None:
        """RFC 2177: report what is pending, then every change as it arrives, until DONE.
        The view's poller asks the provider every ``reading.poll_seconds``."""
        self.sendContinuationRequest(b"idling")
        self.parseTag = tag
        self.lastState = self.parseState
        self.parseState = "idle"  # the 30-minute autologout timer goes on (RFC 2177)
        self._report_changes()

    select_IDLE = (do_IDLE,)
    auth_IDLE = select_IDLE

    def parse_idle(self, line: bytes) -> None:
        self.parseState = self.lastState
        del self.lastState
        tag, self.parseTag = self.parseTag, None
        if line.strip().upper() == b"DONE":
            self.sendPositiveResponse(tag, b"IDLE terminated")
        else:
            self.sendBadResponse(tag, b"Expected DONE to end IDLE")


class _PlainCredentials(imap4.PLAINCredentials):
    """SASL PLAIN (RFC 4616) keeping the authorization identity, which stock drops: asking to
    act as another user must be refused, not ignored."""

    authzid = b""

    def setResponse(self, response: bytes) -> None:
        super().setResponse(response)
        self.authzid = response.split(b"\0", 1)[0]


_MECHANISMS = {b"PLAIN": _PlainCredentials, b"LOGIN": imap4.LOGINCredentials}


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


_REFUSALS = {
    "address": b"* BYE Too many connections from your address that have not logged in, "
    b"try later\r\n",
    "total": b"* BYE Too many connections, try later\r\n",
}


class _IMAPFactory(TwistedListenerFactory):
    kind = "imap"
    refusals = _REFUSALS

    def __init__(
        self,
        tls_context: Any,
        implicit_tls: bool,
        plaintext_auth: str,
        login: LoginCheck,
        mailbox_for: MailboxFor,
        log_failure: Callable[[Any], None],
    ) -> None:
        super().__init__(tls_context, implicit_tls, plaintext_auth)
        self.login = login
        self.mailbox_for = mailbox_for
        self.log_failure = log_failure

    def buildProtocol(self, addr: Any) -> _GatewayIMAP4Server:
        # AUTHENTICATE's mechanisms are _MECHANISMS, offered where LOGIN is allowed.
        protocol = _GatewayIMAP4Server(contextFactory=self.starttls)
        protocol.factory = self
        return protocol


async def serve(
    name: str,
    host: str,
    port: int,
    tls_context: Any,
    implicit_tls: bool,
    login: LoginCheck,
    mailbox_for: MailboxFor,
    plaintext_auth: str = "loopback",
    limits: ConnectionLimits | None = None,
) -> RunningListener:
    """Start one IMAP listener; ``implicit_tls`` selects IMAPS, otherwise STARTTLS is offered.
    ``plaintext_auth`` (never, loopback, always) says where LOGIN may come before STARTTLS;
    ``limits`` are the process's connection caps."""

    def log_failure(failure: Any) -> None:
        log.error("imap.error", error=str(getattr(failure, "value", failure)))

    factory = _IMAPFactory(
        tls_context, implicit_tls, plaintext_auth, login, mailbox_for, log_failure
    )
    return await factory.listen(name, host, port, limits)
