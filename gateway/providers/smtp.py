"""Upstream SMTP sender for ``upstream`` accounts: the original envelope, the stored password.

Each account has a :class:`~gateway.providers._smtp_pool.SessionPool` of logged-in sessions
(``upstream.smtp.max_sessions``, closed after ``idle_seconds`` unused), so a burst pays the
TLS handshake and AUTH once per session, not once per message. smtplib does the connecting,
TLS and AUTH; a message's transaction is written here on top of it, because smtplib cannot
pipeline: where the server offers PIPELINING (RFC 2920), RSET (on a used session), MAIL, the
RCPTs and DATA go out in one write, and the replies are read in order.

The upstream server's own reply is passed on: 4xx → Temporary, 5xx → Permanent with its code
and text, refused credentials → the mail is held (the admin must fix the stored password)
rather than bounced. A session that ends before the message's final dot has sent nothing: on a
used session the pool tries once more on a new one. One that ends after the dot, before the
reply, leaves the outcome unknown (``Temporary.outcome_unknown``).
"""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Sequence
from pathlib import Path

from ..config import AccountSettings, UpstreamSmtpServer
from ..delivery import DeliveryResult, Envelope, Permanent, ReauthRequired, Temporary
from ..outbound import upstream_context
from ._mime import Message
from ._smtp_pool import Session, SessionDropped, SessionPool

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s")
_PERIODS = re.compile(rb"(?m)^\.")  # a line starting with "." is sent as ".." (RFC 5321 4.5.2)

Reply = tuple[int, bytes]


def _reply(code: int, text: bytes | str) -> tuple[str, str]:
    """(enhanced status, text) of an upstream reply, for our own reply and the dead letter."""
    message = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    message = " ".join(message.split())
    found = _ENHANCED.match(message)
    status = found.group(1) if found else f"{str(code)[0]}.0.0"
    return status, message


def _failure(code: int, text: bytes | str, host: str) -> Exception:
    status, message = _reply(code, text)
    reason = f"upstream {host} answered {code} {message}"
    if 400 <= code < 500:
        return Temporary(reason)
    return Permanent(reason, code, status)


class UpstreamSender:
    def __init__(self, system_ca_file: Path, timeout: float = 60.0) -> None:
        self.system_ca_file = system_ca_file
        self.timeout = timeout
        self._pools: dict[str, tuple[UpstreamSmtpServer, SessionPool]] = {}

    def concurrency(self, account: AccountSettings) -> int:
        """One message per pooled session: the spool sends ``max_sessions`` at once."""
        server = account.upstream.smtp if account.upstream else None
        return server.max_sessions if server is not None else 1

    async def send(
        self, account: AccountSettings, envelope: Envelope, message: Message
    ) -> DeliveryResult:
        # No ``reads_mapped_files`` here: the spool hands this sender bytes, which bytes()
        # returns as they are (smtplib's transaction needs bytes, not a mapped file).
        message = bytes(message)
        server = account.upstream.smtp if account.upstream else None
        if server is None:
            raise Permanent(f"account {account.username} has no upstream.smtp server configured")
        pool = await self.pool(account.username, server)
        try:
            return await pool.run(lambda session: _transaction(session, envelope, message, server))
        except SessionDropped as dropped:
            if dropped.reply is not None:
                raise _failure(*dropped.reply, server.host) from dropped
            raise Temporary(f"upstream {server.host}: {dropped}") from dropped

    async def already_sent(self, account: AccountSettings, message_id: str) -> bool | None:
        return None  # SMTP has no "sent mail" to look in

    async def pool(self, username: str, server: UpstreamSmtpServer) -> SessionPool:
        """The account's session pool; a new one (the old one closed) if its server changed."""
        known = self._pools.get(username)
        if known is not None and known[0] == server:
            return known[1]
        pool = SessionPool(
            lambda: self._open(server),
            max_sessions=server.max_sessions,
            idle_seconds=server.idle_seconds,
            name=f"smtp-{username}",
        )
        self._pools[username] = (server, pool)
        if known is not None:
            await known[1].close()
        return pool

    async def close(self) -> None:
        """Say QUIT on every pooled session (at gateway stop)."""
        pools, self._pools = self._pools, {}
        for _, pool in pools.values():
            await pool.close()

    def _context(self, server: UpstreamSmtpServer) -> ssl.SSLContext:
        return upstream_context(server, self.system_ca_file)

    def _connect(self, server: UpstreamSmtpServer) -> smtplib.SMTP:
        port = server.port_for("smtp")
        if server.security == "tls":
            return smtplib.SMTP_SSL(
                server.host, port, timeout=self.timeout, context=self._context(server)
            )
        client = smtplib.SMTP(server.host, port, timeout=self.timeout)
        if server.security == "starttls":
            client.starttls(context=self._context(server))
        return client

    def _open(self, server: UpstreamSmtpServer) -> Session:
        """Connect, EHLO and log in (in a worker thread); failures classified."""
        host = server.host
        try:
            return self._login(server)
        except smtplib.SMTPAuthenticationError as error:
            _, text = _reply(error.smtp_code, error.smtp_error)
            raise ReauthRequired(
                f"upstream {host} refused the stored credentials ({error.smtp_code} {text}); "
                "fix upstream.smtp username/password in the config, then `gateway reload`"
            ) from error
        except smtplib.SMTPResponseException as error:
            raise _failure(error.smtp_code, error.smtp_error, host) from error
        except smtplib.SMTPNotSupportedError as error:
            raise Permanent(f"upstream {host}: {error}", 553, "5.6.7") from error
        except (OSError, smtplib.SMTPException) as error:
            raise Temporary(f"upstream {host}: {type(error).__name__}: {error}") from error

    def _login(self, server: UpstreamSmtpServer) -> Session:
        client = self._connect(server)
        try:
            client.ehlo()
            if server.username and server.password is not None:
                client.login(server.username, server.password.value)
        except BaseException:
            client.close()
            raise
        return Session(client, pipelining=client.has_extn("pipelining"))


def _transaction(
    session: Session, envelope: Envelope, message: bytes, server: UpstreamSmtpServer
) -> DeliveryResult:
    """One message on ``session`` (in its worker thread): MAIL, RCPTs, DATA, the dot."""
    host = server.host
    client = session.client
    used_before = session.transactions > 0
    session.transactions += 1
    options = [f"SIZE={len(message)}"] if client.has_extn("size") else []
    if envelope.smtputf8:
        if not client.has_extn("smtputf8"):
            raise Permanent(f"upstream {host}: SMTPUTF8 not supported by server", 553, "5.6.7")
        options.append("SMTPUTF8")
    if client.has_extn("8bitmime") and not message.isascii():
        options.append("BODY=8BITMIME")
    encoding = "utf-8" if envelope.smtputf8 else "ascii"
    mail = f"MAIL FROM:{smtplib.quoteaddr(envelope.mail_from)}"
    commands = [" ".join([mail, *options])]
    commands += [f"RCPT TO:{smtplib.quoteaddr(rcpt)}" for rcpt in envelope.rcpt_tos]
    try:
        lines = [c.encode(encoding) + b"\r\n" for c in [*commands, "DATA"]]
    except UnicodeEncodeError as error:
        raise Permanent(
            f"upstream {host}: a non-ASCII address needs SMTPUTF8", 553, "5.6.7"
        ) from error
    try:
        # Whatever the session's last transaction left behind, a used one starts afresh.
        replies = _exchange(session, lines, rset=used_before)
        mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        refused = {
            rcpt: reply
            for rcpt, reply in zip(envelope.rcpt_tos, rcpt_replies, strict=False)
            if reply[0] not in (250, 251)
        }
        failure = _refusal(mail_reply, refused, len(envelope.rcpt_tos), data_reply, host)
        if failure is not None:
            if data_reply[0] == 354:  # accepted DATA without a recipient: end it empty
                client.send(b".\r\n")
                client.getreply()
            raise failure
        client.send(_data(message))
    except (OSError, smtplib.SMTPServerDisconnected) as error:
        session.broken = True
        raise SessionDropped(f"the session ended before the message was sent ({error})") from error
    try:
        code, text = client.getreply()
    except (OSError, smtplib.SMTPServerDisconnected) as error:
        session.broken = True
        raise Temporary(
            f"upstream {host}: no reply after the message was sent ({error})",
            outcome_unknown=True,
        ) from error
    if code != 250:
        if code == 421:
            session.broken = True
        raise _failure(code, text, host)
    detail = f"upstream {host} accepted {len(envelope.rcpt_tos) - len(refused)} recipient(s)"
    if refused:
        detail += "; refused: " + ", ".join(
            f"{rcpt} ({code} {_reply(code, text)[1]})" for rcpt, (code, text) in refused.items()
        )
    return DeliveryResult(detail)


def _refusal(
    mail: Reply, refused: dict[str, Reply], recipients: int, data: Reply, host: str
) -> Exception | None:
    """The error for a transaction the server refused before the message, or None.

    MAIL's refusal first; then, if no recipient was accepted, the first temporary refusal (the
    message may yet go), or else the first; then DATA's.
    """
    if mail[0] != 250:
        return _failure(*mail, host)
    if len(refused) == recipients:
        replies = list(refused.values())
        code, text = next((r for r in replies if 400 <= r[0] < 500), replies[0])
        return _failure(code, text, host)
    if data[0] != 354:
        return _failure(*data, host)
    return None


def _exchange(session: Session, lines: Sequence[bytes], rset: bool) -> list[Reply]:
    """Send RSET (if ``rset``), MAIL, the RCPTs and DATA; one reply per line of ``lines``.

    Pipelined where the server offers it. Without PIPELINING, lines that earlier replies made
    pointless (after a refused MAIL; DATA without a recipient) are not sent and count as
    refused (503). A refused RSET or a 421 means the session is over before anything was sent:
    :class:`SessionDropped`.
    """
    client = session.client
    if rset:
        lines = [b"RSET\r\n", *lines]
    if session.pipelining:
        client.send(b"".join(lines))
    replies: list[Reply] = []
    for index, line in enumerate(lines):
        if not session.pipelining:
            skipped = _skipped(replies[1:] if rset else replies, last=index == len(lines) - 1)
            if skipped:
                replies.append((503, b"5.5.1 not sent: " + skipped))
                continue
            client.send(line)
        reply = client.getreply()
        if reply[0] == 421 or (rset and index == 0 and reply[0] != 250):
            session.broken = True
            raise SessionDropped(f"the server answered {reply[0]} before the message", reply)
        replies.append(reply)
    return replies[1:] if rset else replies


def _skipped(replies: list[Reply], last: bool) -> bytes:
    """Why the next line need not go out without pipelining (b"" when it must).

    ``replies`` so far, MAIL's first.
    """
    if not replies:
        return b""
    if replies[0][0] != 250:
        return b"MAIL FROM was refused"
    if last and all(code not in (250, 251) for code, _ in replies[1:]):
        return b"no recipient was accepted"
    return b""


def _data(message: bytes) -> bytes:
    """The DATA body as sent: dot-stuffed, ending in CRLF, then the final dot."""
    body = _PERIODS.sub(b"..", message)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"
