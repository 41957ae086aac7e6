"""The POP3 listeners (plain with STLS, and implicit TLS) over the account's INBOX view.

Built on Twisted's ``POP3`` line protocol for framing, timeouts and pipelining, but every
command is ours: Twisted's handlers turn CRLF into CRCRLF when sending a message, drop the
connection when DELE raises ``ValueError(str)``, keep DELE'd messages in LIST/UIDL (#9094),
answer ``UIDL n`` without the message number (#9104), advertise joke capabilities and have no
STLS. ``twisted.mail.pop3`` imports the global reactor at import time, so it is imported inside
:func:`_protocol_class`, after the asyncio reactor has been installed.

Login: ``login(username, password, client)`` checks the password through the login gate (a
wrong one is answered ``-ERR [AUTH]``, a throttled one ``-ERR [SYS/TEMP]`` with a sentence).
Without ``mailbox_for`` the string it returns is a sentence telling the client why it cannot
have the mailbox (``-ERR [SYS/TEMP] …``). With ``mailbox_for`` the string is the account name,
and ``mailbox_for(account)`` returns its :class:`MailboxView` — or a sentence, when the mailbox
cannot be served (e.g. it must be reconnected on the admin page).
The view is synced at PASS and the session works on that snapshot, as POP3 requires.

Cleartext passwords: on the plain port USER is advertised in CAPA only after STLS or to a
loopback client, so well-behaved clients upgrade first; USER/PASS are still accepted without TLS
(a legacy program on the LAN keeps working), which an admin can avoid by using POP3S.

Errors never drop the connection: anything unexpected is logged with its details and answered
``-ERR [SYS/TEMP]`` with a sentence.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ..admission import Admission, ConnectionLimits
from ..cleartext import plaintext_auth_allowed
from ..imap_out.server import LoginCheck
from ..login_gate import Refused
from ..logs import get_logger
from ..mailbox import MailboxUnavailable, MailboxView
from ..runtime import ConnectionRegistry, RunningListener, as_deferred, listen_twisted
from ._session import NoSuchMessage, Pop3Session, top_of

log = get_logger(__name__)

MailboxFor = Callable[[str], Awaitable[MailboxView | str]]
"""``mailbox_for(account)``: the account's view, or a sentence saying why it is unavailable."""

_AUTHORIZATION = {b"CAPA", b"USER", b"PASS", b"STLS", b"QUIT", b"APOP", b"AUTH"}
_TRANSACTION = {
    b"CAPA", b"STAT", b"LIST", b"UIDL", b"TOP", b"RETR", b"DELE", b"RSET", b"NOOP", b"QUIT"
}  # fmt: skip
_INTERNAL = b"-ERR [SYS/TEMP] Internal error, please retry\r\n"


def ok(text: bytes = b"") -> bytes:
    return b"+OK " + text + b"\r\n" if text else b"+OK\r\n"


def err(text: bytes) -> bytes:
    return b"-ERR " + text + b"\r\n"


def multiline(first: bytes, body: bytes) -> bytes:
    """A multi-line reply: ``body`` dot-stuffed and terminated (RFC 1939 section 3)."""
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\r\n.", b"\r\n..")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return ok(first) + body + b".\r\n"


def _number(word: bytes) -> int:
    """A message number or line count argument; NoSuchMessage for anything else."""
    if not word.isdigit():
        raise NoSuchMessage(f"Invalid number: {word.decode('ascii', 'replace')[:20]}")
    return int(word)


def _protocol_class() -> type:
    from twisted.mail import pop3

    class GatewayPOP3(pop3.POP3):
        # No <timestamp> in the greeting: we offer no APOP, and clients try it when they see one.
        magic = b"mail gateway POP3 ready"
        # Long enough for any sane command and password; longer lines get -ERR, not a drop.
        MAX_LENGTH = 8192

        session: Pop3Session | None = None
        secure = False
        _skipping = False  # inside an over-long line, until its end
        _after_stls = False  # STLS was answered: ignore what was sent with it in cleartext

        admission: Admission  # set by the listener (gateway.runtime.listen_twisted)
        _mbox: Any = None

        def connectionMade(self) -> None:
            self.factory.connections.add(self, self.transport.loseConnection)
            self.admission.on_expire = self._preauth_expired
            self.secure = self.factory.implicit_tls
            self.client = self.transport.getPeer().host
            super().connectionMade()

        def connectionLost(self, reason: Any) -> None:
            self.factory.connections.discard(self)
            self.admission.release()
            super().connectionLost(reason)

        @property
        def mbox(self) -> Any:
            """Twisted's "logged in" mark; setting it moves the connection out of the
            unauthenticated pool, whichever path logged it in."""
            return self._mbox

        @mbox.setter
        def mbox(self, value: Any) -> None:
            self._mbox = value
            if value is not None:
                self.admission.authenticated()

        def _preauth_expired(self) -> None:
            seconds = self.admission.deadline_seconds
            self.transport.write(
                err(b"Timeout: no login within %g seconds of connecting" % seconds)
            )
            self.transport.loseConnection()

        # ---- dispatch: no exception may reach Twisted (it would drop the connection)

        def dataReceived(self, data: bytes) -> None:
            """LineOnlyReceiver's loop, minus its two ways of dropping the connection.

            An over-long line is answered -ERR and skipped up to its end (Twisted would
            disconnect, or let the buffer grow); after STLS the rest of the cleartext packet is
            discarded (command injection), as is anything queued behind a long operation.
            """
            self._after_stls = False
            if self._skipping:
                end = data.find(b"\n")
                if end < 0:
                    return
                data, self._skipping = data[end + 1 :], False
            lines = (self._buffer + data).split(self.delimiter)
            self._buffer = lines.pop(-1)
            for line in lines:
                if self.transport.disconnecting or self._after_stls:
                    return
                if len(line) > self.MAX_LENGTH:
                    self.transport.write(err(b"Line too long"))
                else:
                    self.lineReceived(line)
            if len(self._buffer) > self.MAX_LENGTH:
                self._buffer, self._skipping = b"", True
                self.transport.write(err(b"Line too long"))

        def state_COMMAND(self, line: bytes) -> Any:
            return self._dispatch(*line.split(b" "))

        def _dispatch(self, command: bytes, *args: bytes) -> Any:
            try:
                return self.processCommand(command, *args)
            except Exception:
                log.exception("pop3.command_error", client=self.client)
                self.transport.write(_INTERNAL)
                return None

        def _unblock(self, _: object) -> None:
            """Run the commands pipelined behind a long operation, in order."""
            commands, self.blocked = self.blocked or [], None
            while commands and self.blocked is None and not self._after_stls:
                command, args = commands.pop(0)
                self._dispatch(command, *args)
            if self.blocked is not None and not self._after_stls:
                self.blocked.extend(commands)

        def processCommand(self, command: bytes, *args: bytes) -> Any:
            if self.blocked is not None:  # a long operation is running: keep the order
                self.blocked.append((command, args))
                return None
            command = command.upper()
            allowed = _TRANSACTION if self.session is not None else _AUTHORIZATION
            handler = getattr(self, "do_" + command.decode("ascii", "replace"), None)
            if handler is None or command not in (_AUTHORIZATION | _TRANSACTION):
                self.transport.write(err(b"Unknown command"))
                return None
            if command not in allowed:
                state = b"after login" if self.session is not None else b"before login"
                self.transport.write(err(command + b" is not allowed " + state))
                return None
            try:
                return handler(*args)
            except TypeError:  # wrong number of arguments
                self.transport.write(err(b"Wrong arguments for " + command))
                return None
            except NoSuchMessage as missing:
                self.transport.write(err(str(missing).encode("utf-8")))
                return None

        def _reply_later(self, work: Coroutine[Any, Any, bytes], what: str) -> Any:
            """Run async ``work`` (which returns the reply) with later commands held back."""

            async def guarded() -> bytes:
                try:
                    return await work
                except NoSuchMessage as missing:
                    return err(str(missing).encode("utf-8"))
                except MailboxUnavailable as unavailable:
                    return err(b"[SYS/TEMP] " + str(unavailable).encode("utf-8", "replace"))
                except Exception:
                    account = self.session.account if self.session else None
                    log.exception("pop3.error", command=what, client=self.client, account=account)
                    return err(b"[SYS/TEMP] The mailbox could not be read just now, please retry")

            deferred = as_deferred(guarded())
            deferred.addCallback(self.transport.write)
            return self._longOperation(deferred)

        # ---- AUTHORIZATION state

        def listCapabilities(self) -> list[bytes]:
            caps = [b"TOP", b"UIDL", b"PIPELINING", b"RESP-CODES", b"AUTH-RESP-CODE"]
            if self.session is None:
                if self._password_allowed():
                    caps.insert(1, b"USER")
                if not self.secure and self.factory.tls is not None:
                    caps.append(b"STLS")
            return caps

        def do_CAPA(self) -> None:
            self.transport.write(multiline(b"Capability list follows", self._caps_body()))

        def _caps_body(self) -> bytes:
            return b"".join(cap + b"\r\n" for cap in self.listCapabilities())

        def do_STLS(self) -> None:
            if self.secure:
                self.transport.write(err(b"Already using TLS"))
                return
            if self.factory.tls is None:
                self.transport.write(err(b"TLS is not available on this port"))
                return
            self.transport.write(ok(b"Begin TLS negotiation"))
            # Anything pipelined after STLS was sent in cleartext: discard it (STARTTLS
            # command injection), and forget a USER given before the upgrade.
            self._buffer, self._after_stls = b"", True
            self._userIs = None
            self.transport.startTLS(self.factory.tls)
            self.secure = True

        def do_APOP(self, *args: bytes) -> None:
            self.transport.write(err(b"APOP is not supported, use USER and PASS"))

        def do_AUTH(self, *args: bytes) -> None:
            self.transport.write(err(b"No SASL mechanisms, use USER and PASS"))

        def _password_allowed(self) -> bool:
            """Under TLS, or in clear text where ``reading.plaintext_auth`` allows it."""
            policy = self.factory.plaintext_auth
            return plaintext_auth_allowed(policy, self.client, tls_active=self.secure)

        def do_USER(self, user: bytes, *rest: bytes) -> None:
            if not self._password_allowed():
                self.transport.write(err(b"[AUTH] Use STLS first: no passwords in clear text"))
                return
            self._userIs = b" ".join((user, *rest))
            self.transport.write(ok(b"Send PASS"))

        def do_PASS(self, password: bytes = b"", *words: bytes) -> Any:
            if self._userIs is None:
                self.transport.write(err(b"USER required before PASS"))
                return None
            user, self._userIs = self._userIs, None
            secret = b" ".join((password, *words)).decode("utf-8", "replace")
            return self._reply_later(self._login(user.decode("utf-8", "replace"), secret), "PASS")

        async def _login(self, username: str, secret: str) -> bytes:
            account = await self.factory.login(username, secret, self.client)
            if isinstance(account, Refused) and account.throttled:
                # RFC 3206: SYS/TEMP is a temporary problem; [AUTH] would tell the client that
                # its credentials are wrong, and a right password would be given up.
                return err(b"[SYS/TEMP] " + account.sentence().encode())
            if isinstance(account, Refused):
                return err(b"[AUTH] Wrong username or password")
            if self.factory.mailbox_for is None:
                return err(b"[SYS/TEMP] " + account.encode("utf-8"))
            view = await self.factory.mailbox_for(account)
            if isinstance(view, str):
                return err(b"[SYS/TEMP] " + view.encode("utf-8"))
            self.session = await Pop3Session.start(account, view)
            self.mbox = self.session  # Twisted's own bookkeeping reads it as "logged in"
            count = len(self.session.messages)
            log.info("pop3.login", account=account, client=self.client, messages=count)
            return ok(b"%d messages" % count)

        # ---- TRANSACTION state

        def do_STAT(self) -> Any:
            async def work() -> bytes:
                sizes = (await self._session().sizes()).values()
                return ok(b"%d %d" % (len(sizes), sum(sizes)))

            return self._reply_later(work(), "STAT")

        def do_LIST(self, number: bytes | None = None) -> Any:
            session = self._session()
            if number is not None:
                n = _number(number)
                session.info(n)

                async def one() -> bytes:
                    return ok(b"%d %d" % (n, await session.size(n)))

                return self._reply_later(one(), "LIST")

            async def every() -> bytes:
                sizes = await session.sizes()
                lines = b"".join(b"%d %d\r\n" % (n, s) for n, s in sizes.items())
                return multiline(b"%d messages" % len(sizes), lines)

            return self._reply_later(every(), "LIST")

        def do_UIDL(self, number: bytes | None = None) -> None:
            session = self._session()
            if number is not None:
                n = _number(number)
                self.transport.write(ok(b"%d %s" % (n, session.uidl(n))))
                return
            lines = b"".join(b"%d %s\r\n" % (n, session.uidl(n)) for n in session.live())
            self.transport.write(multiline(b"Unique-ID listing follows", lines))

        def do_RETR(self, number: bytes) -> Any:
            session, n = self._session(), _number(number)
            session.info(n)

            async def work() -> bytes:
                wire = await session.wire(n)
                return multiline(b"%d octets" % len(wire), wire)

            return self._reply_later(work(), "RETR")

        def do_TOP(self, number: bytes, lines: bytes) -> Any:
            session, n, count = self._session(), _number(number), _number(lines)
            session.info(n)

            async def work() -> bytes:
                return multiline(b"Top of message follows", top_of(await session.wire(n), count))

            return self._reply_later(work(), "TOP")

        def do_DELE(self, number: bytes) -> None:
            n = _number(number)
            self._session().delete(n)
            self.transport.write(ok(b"Message %d deleted" % n))

        def do_RSET(self) -> None:
            session = self._session()
            session.deleted.clear()
            self.transport.write(ok(b"%d messages" % len(session.messages)))

        def do_NOOP(self) -> None:
            self.transport.write(ok())

        def do_QUIT(self) -> Any:
            session = self.session
            if session is None or not session.deleted:
                self.transport.write(ok(b"Bye"))
                self.transport.loseConnection()
                return None

            async def update() -> bytes:
                deleted = await session.commit()
                log.info(
                    "pop3.quit",
                    account=session.account,
                    client=self.client,
                    deleted=deleted,
                    at_provider=session.view.policy.on_delete,
                )
                return ok(b"Bye, %d messages deleted" % deleted)

            deferred = self._reply_later(update(), "QUIT")
            deferred.addBoth(lambda _: self.transport.loseConnection())
            return deferred

        def _session(self) -> Pop3Session:
            assert self.session is not None, "processCommand allows this only after login"
            return self.session

    return GatewayPOP3


async def serve(
    name: str,
    host: str,
    port: int,
    tls_context: Any,
    implicit_tls: bool,
    login: LoginCheck,
    mailbox_for: MailboxFor | None = None,
    plaintext_auth: str = "loopback",
    limits: ConnectionLimits | None = None,
) -> RunningListener:
    """Start one POP3 listener; ``implicit_tls`` selects POP3S, otherwise STLS is offered.
    ``plaintext_auth`` (never, loopback, always) says where USER/PASS may come before STLS;
    ``limits`` are the process's connection caps."""
    from twisted.internet.protocol import Factory

    factory = Factory.forProtocol(_protocol_class())
    factory.connections = ConnectionRegistry()
    factory.noisy = False
    factory.login = login
    factory.mailbox_for = mailbox_for
    factory.implicit_tls = implicit_tls
    factory.tls = tls_context
    factory.plaintext_auth = plaintext_auth
    return await listen_twisted(
        name,
        factory,
        host,
        port,
        tls_context if implicit_tls else None,
        limits,
        "pop3",
        _REFUSALS,
    )


_REFUSALS = {
    "address": err(b"[SYS/TEMP] Too many connections from your address that have not logged in"),
    "total": err(b"[SYS/TEMP] Too many connections, try later"),
}
