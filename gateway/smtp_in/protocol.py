"""One SMTP connection: aiosmtpd's protocol with the gateway's authentication and limits.

aiosmtpd's ``authenticator`` callback is synchronous, and an ``async def`` one makes every AUTH
succeed (docs/protocol-servers.md section 5). So PLAIN and LOGIN are implemented here as async
mechanisms that await the password check themselves; the library's own fallback (no
authenticator configured) refuses every login, so nothing else can let a wrong password in.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import re
from base64 import b64decode
from typing import Any, AnyStr

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    Session,
    TLSSetupException,
    syntax,
)

from ..admission import Admission
from ..cleartext import plaintext_auth_allowed
from ..login_gate import MAILBOX, Refused, UserKey
from ..logs import get_logger
from ..runtime import ConnectionRegistry
from . import replies
from .front import SmtpFront

log = get_logger(__name__)

_NULL_SENDER = re.compile(r"^FROM:\s*<\s*>", re.IGNORECASE)
_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
_BAD_PLAIN = "501 5.5.2 Cannot split the PLAIN credentials"


class _Session(Session):
    """aiosmtpd's Session logs a deprecation warning whenever it sets ``login_data``, which it
    does on every successful AUTH; this one stores it silently. It also reports the moment
    aiosmtpd marks it authenticated, which moves the connection out of the unauthenticated pool.
    Both are kept in attributes of ours, not in the parent's private ones.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_login: Any) -> None:
        self._on_login = on_login
        self._gateway_authenticated: bool | None = None
        self._gateway_login_data: Any = None
        super().__init__(loop)

    @property
    def authenticated(self) -> bool | None:
        return self._gateway_authenticated

    @authenticated.setter
    def authenticated(self, value: bool | None) -> None:
        self._gateway_authenticated = value
        if value:
            self._on_login()

    @property
    def login_data(self) -> Any:
        return self._gateway_login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._gateway_login_data = value


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with our AUTH, TLS awareness, limits and reply wording."""

    def __init__(
        self,
        front: SmtpFront,
        registry: ConnectionRegistry,
        implicit_tls: bool,
        admission: Admission,
        **kwargs: Any,
    ) -> None:
        self._front = front
        self._registry = registry
        self._implicit_tls = implicit_tls
        self._admission = admission
        self._refused = False
        self._in_session = False  # counted in front's logged-in sessions
        self._connected = False  # connection_made ran once; a second call is after STARTTLS
        # aiosmtpd keeps these limits in a class-level dict that every connection mutates
        # (pinned by tests/unit/test_library_hooks.py: drop this when it is per instance).
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(**kwargs)

    # -- connection state ------------------------------------------------------------------

    def tls_active(self) -> bool:
        """aiosmtpd only knows the TLS it started (STARTTLS: the session's ``ssl``, set when
        the handshake is done), not the listener's implicit TLS."""
        return self._implicit_tls or (self.session is not None and self.session.ssl is not None)

    def peer_host(self) -> str:
        """The client's address: the socket's peer, or the client a load balancer's PROXY
        header named (gateway.acceptor), which the socket's peer would hide."""
        return self._admission.address

    def may_offer_auth(self) -> bool:
        return plaintext_auth_allowed(
            self._front.smtp.plaintext_auth, self.peer_host(), self.tls_active()
        )

    def _create_session(self) -> Session:
        """aiosmtpd's (private, pinned) factory of the session of each connection_made."""
        return _Session(self.loop, self._logged_in)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starting_tls, self._connected = self._connected, True  # a second call: after STARTTLS
        if not starting_tls:
            if not self._front.has_room():
                self._refused = True
                self._admission.release()
                log.warning("smtp.too_many_sessions", client=self._admission.address)
                transport.write(f"{replies.TOO_MANY_CONNECTIONS}\r\n".encode())  # type: ignore[attr-defined]
                transport.close()
                return
            self._registry.add(self, transport.close)
            self._admission.on_expire = self._preauth_expired
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._registry.discard(self)
        self._admission.release()
        if self._in_session:
            self._front.session_ended()
        super().connection_lost(error)

    def _logged_in(self) -> None:
        if not self._in_session:
            self._in_session = True
            self._front.session_started()
            self._admission.authenticated()

    def _preauth_expired(self) -> None:
        """The total pre-login deadline passed, or a newer connection from the same address
        took this one's place: say which (RFC 5321 4.5.3.2 allows 421) and close."""
        if self.transport is None:
            return
        seconds = self._admission.deadline_seconds
        goodbye = replies.EVICTED if self._admission.evicted else replies.preauth_timeout(seconds)
        self.transport.write(f"{goodbye}\r\n".encode())  # type: ignore[attr-defined]
        self.transport.close()

    async def push(self, status: AnyStr) -> None:
        """Every reply leaves with an enhanced status code (challenges are bytes: untouched)."""
        if isinstance(status, str):
            status = replies.standardize(status, self.data_size_limit)
        await super().push(status)

    async def handle_exception(self, error: Exception) -> str:
        """Details go to the log only; the client gets a retryable reply and a clean slate."""
        if isinstance(error, TLSSetupException):
            log.info("smtp.tls_failed", client=self.peer_host(), error=repr(error.__cause__))
        else:
            log.exception("smtp.internal_error", client=self.peer_host())
        self.envelope = Envelope()  # as RSET: the transaction is gone, the login stays
        return replies.INTERNAL_ERROR

    # -- commands --------------------------------------------------------------------------

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if not self.may_offer_auth():
            await self.push(replies.ENCRYPTION_REQUIRED)
            return
        await super().smtp_AUTH(arg)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """Refused inside TLS, implicit or negotiated: a client must not start TLS twice
        (RFC 3207 section 4.2); aiosmtpd would say 220, then die stacking TLS on TLS."""
        if self.tls_active():
            await self.push(replies.TLS_ALREADY_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.authenticated:
            await self.push(replies.AUTH_REQUIRED)
        elif arg and _NULL_SENDER.match(arg):
            await self.push(replies.NULL_SENDER)
        else:
            await super().smtp_MAIL(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's checks and replies, but the data streams into the spool through the
        handler (``SubmissionHandler.receive_data``) instead of being buffered whole."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        handler = self.event_handler
        # aiosmtpd's stream reader (private, pinned): the data is read from it as it comes.
        reply = await handler.receive_data(self, self.session, self.envelope, self._reader)
        self.envelope = Envelope()  # the next transaction starts afresh, as after aiosmtpd's DATA
        await self.push(reply)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        """Reveals nothing: the same answer for every address, known or not."""
        await self.push(replies.VRFY_NOTHING)

    async def smtp_EXPN(self, arg: str) -> None:
        await self.push(replies.EXPN_NOTHING)

    # -- AUTH mechanisms (found by aiosmtpd through their auth_ prefix) -----------------------

    async def auth_PLAIN(self, _: object, args: list[str]) -> AuthResult:
        blob = await self._initial_response(args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push(_BAD_PLAIN)
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid.lower() != login.lower():
            return await self._refuse(login, "acting for another user is not supported")
        return await self._verify(login, password)

    async def auth_LOGIN(self, _: object, args: list[str]) -> AuthResult:
        login = await self._initial_response(args, "Username:")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await self._challenge("Password:")
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._verify(login, password)

    async def _initial_response(self, args: list[str], challenge: str) -> bytes | None:
        """The credentials given on the AUTH line, or asked for; None once a reply was sent."""
        if len(args) == 1:
            return await self._challenge(challenge)
        try:
            return b64decode(args[1], validate=True)
        except binascii.Error:
            await self.push(_BAD_BASE64)
            return None

    async def _challenge(self, text: str) -> bytes | None:
        answer = await self.challenge_auth(text)
        return None if answer is MISSING else answer

    async def _verify(self, login: bytes, password: bytes) -> AuthResult:
        try:
            username, secret = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return await self._refuse(login, "credentials are not UTF-8")
        outcome = await self._front.accounts.login(
            self._front.gate, self.peer_host(), username, secret, "smtp"
        )
        if isinstance(outcome, Refused):
            reply = replies.login_throttled(outcome) if outcome.throttled else replies.AUTH_INVALID
            return AuthResult(success=False, handled=False, message=reply)
        log.info("smtp.auth_ok", client=self.peer_host(), user=outcome.username)
        return AuthResult(success=True, auth_data=outcome)

    async def _refuse(self, login: bytes, reason: str) -> AuthResult:
        """Credentials refused before any password check; they still count as a failure."""
        user = UserKey.of(MAILBOX, login.decode("utf-8", "replace"))
        await self._front.gate.record_failure(self.peer_host(), user, "smtp", reason)
        return AuthResult(success=False, handled=False, message=replies.AUTH_INVALID)
