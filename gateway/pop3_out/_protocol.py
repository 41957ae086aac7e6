"""The POP3 protocol of one connection: every command is ours.

Built on Twisted's public ``Protocol`` and ``TimeoutMixin`` only. Twisted's ``POP3`` class was
the base before, but its handlers turn CRLF into CRCRLF when sending a message, drop the
connection when DELE raises ``ValueError(str)``, keep DELE'd messages in LIST/UIDL (#9094),
answer ``UIDL n`` without the message number (#9104), advertise joke capabilities and have no
STLS; every command was overridden, and what remained in use was private (``_longOperation``,
``_userIs``, ``blocked``). ``twisted.mail.pop3`` also imports the global reactor at import
time; this module does not, so it can be imported before the asyncio reactor is installed.

Errors never drop the connection: anything unexpected is logged with its details and answered
``-ERR [SYS/TEMP]`` with a sentence. Commands pipelined behind one that needs the provider wait
for its reply and then run in order (RFC 2449 PIPELINING).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import TimeoutMixin

from ..admission import Admission
from ..cleartext import plaintext_auth_allowed
from ..login_gate import Refused
from ..logs import get_logger
from ..mailbox import MailboxUnavailable
from ..runtime import as_deferred
from ._replies import GREETING, INTERNAL_ERROR, READ_FAILED, WRONG_PASSWORD, err, multiline, ok
from ._session import NoSuchMessage, Pop3Session, top_of

log = get_logger(__name__)

_AUTHORIZATION = {b"CAPA", b"USER", b"PASS", b"STLS", b"QUIT", b"APOP", b"AUTH"}
_TRANSACTION = {
    b"CAPA", b"STAT", b"LIST", b"UIDL", b"TOP", b"RETR", b"DELE", b"RSET", b"NOOP", b"QUIT"
}  # fmt: skip


def _number(word: bytes) -> int:
    """A message number or line count argument; NoSuchMessage for anything else."""
    if not word.isdigit():
        raise NoSuchMessage(f"Invalid number: {word.decode('ascii', 'replace')[:20]}")
    return int(word)


class GatewayPOP3(Protocol, TimeoutMixin):
    """One POP3 connection; the factory carries the listener's settings (see :func:`serve`)."""

    # Long enough for any sane command and password; longer lines get -ERR, not a drop.
    MAX_LENGTH = 8192
    delimiter = b"\r\n"
    timeOut = 300  # seconds without a command; suspended while a reply is being prepared

    factory: Any  # server._POP3Factory (which imports this module): the listener's settings
    # Twisted types it ``ITransport | None``; from makeConnection on it is the TCP or TLS
    # transport, used for what ITransport does not declare (startTLS, disconnecting, .host).
    transport: Any
    session: Pop3Session | None = None
    secure = False
    _buffer = b""  # the start of a line not yet complete
    _skipping = False  # inside an over-long line, until its end
    _after_stls = False  # STLS was answered: ignore what was sent with it in cleartext
    _user: bytes | None = None  # given by USER, waiting for PASS
    _held: list[tuple[bytes, tuple[bytes, ...]]] | None = None  # behind a long operation

    admission: Admission  # set by the listener (gateway.runtime.listen_twisted)

    def connectionMade(self) -> None:
        self.factory.connections.add(self, self.transport.loseConnection)
        self.admission.on_expire = self._preauth_expired
        self.secure = self.factory.implicit_tls
        self.client = self.admission.address  # the PROXY header's client, if any
        self.transport.write(ok(GREETING))
        self.setTimeout(self.timeOut)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connections.discard(self)
        self.admission.release()
        self.setTimeout(None)

    def _preauth_expired(self) -> None:
        code = b"[SYS/TEMP] " if self.admission.evicted else b""  # try again; not for a timeout
        self.transport.write(err(code + self.admission.goodbye.encode()))
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

    def lineReceived(self, line: bytes) -> Any:
        self.resetTimeout()
        return self._dispatch(*line.split(b" "))

    def _dispatch(self, command: bytes, *args: bytes) -> Any:
        try:
            return self.processCommand(command, *args)
        except Exception:
            log.exception("pop3.command_error", client=self.client)
            self.transport.write(INTERNAL_ERROR)
            return None

    def _hold_commands(self, deferred: Deferred) -> Deferred:
        """Hold later commands back, and the idle timeout, until ``deferred`` has fired."""
        self.setTimeout(None)
        self._held = []
        deferred.addCallback(self._run_held)
        deferred.addCallback(lambda _: self.setTimeout(self.timeOut))
        return deferred

    def _run_held(self, _: object) -> None:
        """Run the commands pipelined behind a long operation, in order."""
        commands, self._held = self._held or [], None
        while commands and self._held is None and not self._after_stls:
            command, args = commands.pop(0)
            self._dispatch(command, *args)
        if self._held is not None and not self._after_stls:
            self._held.extend(commands)

    def processCommand(self, command: bytes, *args: bytes) -> Any:
        if self._held is not None:  # a long operation is running: keep the order
            self._held.append((command, args))
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
                return err(READ_FAILED)

        deferred = as_deferred(guarded())
        deferred.addCallback(self.transport.write)
        return self._hold_commands(deferred)

    # ---- AUTHORIZATION state

    def listCapabilities(self) -> list[bytes]:
        caps = [b"TOP", b"UIDL", b"PIPELINING", b"RESP-CODES", b"AUTH-RESP-CODE"]
        if self.session is None:
            if self._password_allowed():
                caps.insert(1, b"USER")
            if not self.secure and self.factory.starttls is not None:
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
        if self.factory.starttls is None:
            self.transport.write(err(b"TLS is not available on this port"))
            return
        self.transport.write(ok(b"Begin TLS negotiation"))
        # Anything pipelined after STLS was sent in cleartext: discard it (STARTTLS
        # command injection), and forget a USER given before the upgrade.
        self._buffer, self._after_stls = b"", True
        self._user = None
        self.transport.startTLS(self.factory.starttls)
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
        self._user = b" ".join((user, *rest))
        self.transport.write(ok(b"Send PASS"))

    def do_PASS(self, password: bytes = b"", *words: bytes) -> Any:
        if self._user is None:
            self.transport.write(err(b"USER required before PASS"))
            return None
        user, self._user = self._user, None
        secret = b" ".join((password, *words)).decode("utf-8", "replace")
        return self._reply_later(self._login(user.decode("utf-8", "replace"), secret), "PASS")

    async def _login(self, username: str, secret: str) -> bytes:
        account = await self.factory.login(username, secret, self.client)
        if isinstance(account, Refused) and account.throttled:
            # RFC 3206: SYS/TEMP is a temporary problem; [AUTH] would tell the client that
            # its credentials are wrong, and a right password would be given up.
            return err(b"[SYS/TEMP] " + account.sentence().encode())
        if isinstance(account, Refused):
            return err(WRONG_PASSWORD)
        if self.factory.mailbox_for is None:
            return err(b"[SYS/TEMP] " + account.encode("utf-8"))
        view = await self.factory.mailbox_for(account)
        if isinstance(view, str):
            return err(b"[SYS/TEMP] " + view.encode("utf-8"))
        self.session = await Pop3Session.start(account, view)
        self.admission.authenticated()  # out of the pool of connections not logged in
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
