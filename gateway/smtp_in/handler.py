"""The transaction policy: EHLO keywords, who may send as whom, recipients, and the hand-off.

aiosmtpd has parsed the command and checked its syntax when these hooks run; they decide and
return the reply. DATA is streamed into the spool as it arrives (``receive_data``, called by
``GatewaySMTP.smtp_DATA``); an accepted message's reply is the spool's.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session

from ..accounts import Accounts
from ..config import AccountSettings
from ..delivery import Envelope
from ..logs import get_logger
from ..spool import HEAD_LIMIT, IncomingMessage, SpoolError
from . import replies
from .data import read_data
from .front import SmtpFront
from .policy import header_senders, normalize_line_endings, received_header

if TYPE_CHECKING:
    from .protocol import GatewaySMTP

log = get_logger(__name__)

# Tested with aiosmtpd 1.4.6: it reads commands one line at a time from a buffer, so pipelined
# commands are answered in order (RFC 2920), and STARTTLS drops whatever was buffered behind it.
_EXTRA_KEYWORDS = ("ENHANCEDSTATUSCODES", "PIPELINING")


class SubmissionHandler:
    """aiosmtpd handler hooks for mail submission by authenticated local accounts."""

    def __init__(self, front: SmtpFront, hostname: str) -> None:
        self._front = front
        self._hostname = hostname

    async def handle_EHLO(
        self,
        server: GatewaySMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Offer AUTH only where the policy allows it; add our keywords; drop HELP."""
        session.host_name = hostname
        greeting, *keywords = (line[4:] for line in responses)
        offer_auth = server.may_offer_auth()
        keywords = [
            keyword
            for keyword in keywords
            if keyword != "HELP" and (offer_auth or not keyword.startswith("AUTH"))
        ]
        lines = [greeting, *keywords, *_EXTRA_KEYWORDS]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(
        self,
        server: GatewaySMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        account = _account(session)
        accounts = self._front.accounts
        if not account.can_send:
            log.warning("smtp.read_only_account", account=account.username)
            return replies.read_only_account(account.username)
        if not envelope.smtp_utf8 and not address.isascii():
            return replies.UTF8_NEEDS_SMTPUTF8
        if not accounts.may_send_as(account, address):
            log.warning("smtp.sender_refused", account=account.username, mail_from=address)
            return replies.sender_refused(
                account.username, address, accounts.allowed_senders(account)
            )
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return await self._sender_ok(account)

    async def _sender_ok(self, account: AccountSettings) -> str:
        """Mail for a mailbox that needs re-consent is accepted and held, never refused."""
        check = self._front.account_state
        problem = await check(account.username) if check else None
        if problem is None:
            return replies.SENDER_OK
        log.warning("smtp.account_needs_reconnect", account=account.username, reason=problem)
        return f"{replies.SENDER_OK}; mail is held until the mailbox is reconnected: {problem}"

    async def handle_RCPT(
        self,
        server: GatewaySMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        limit = self._front.smtp.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            return replies.too_many_recipients(limit)
        if not envelope.smtp_utf8 and not address.isascii():
            return replies.UTF8_NEEDS_SMTPUTF8
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return replies.RECIPIENT_OK

    async def receive_data(
        self,
        server: GatewaySMTP,
        session: Session,
        envelope: SmtpEnvelope,
        reader: asyncio.StreamReader,
    ) -> str:
        """Stream DATA into the spool (after the 354), check the headers, submit; the reply.

        Only the header block stays in memory (see ``spool._incoming``); the content is
        normalized (policy.normalize_line_endings) batch by batch, which gives the same bytes
        as normalizing it whole because every batch ends with CRLF.
        """
        account = _account(session)
        now = datetime.now(UTC)
        trace = received_header(
            session.host_name,
            server.peer_host(),
            self._hostname,
            tls=server.tls_active(),
            smtputf8=envelope.smtp_utf8,
            when=now,
        )
        incoming = self._front.spool.receive(trace)
        try:
            problem = await read_data(
                reader,
                lambda batch: incoming.write(normalize_line_endings(batch)),
                server.data_size_limit,
                server.line_length_limit,
            )
            incoming.finish()
            refusal = problem or self._content_refusal(account, incoming)
        except BaseException:
            incoming.discard()  # the connection was lost: no reply, nothing kept
            raise
        if refusal is not None:
            incoming.discard()
            log.warning("smtp.message_refused", account=account.username, reply=refusal)
            return refusal
        return await self._submit(server, envelope, account, incoming, now)

    def _content_refusal(self, account: AccountSettings, incoming: IncomingMessage) -> str | None:
        if incoming.head_too_large:
            return replies.header_block_too_large(HEAD_LIMIT)
        assert incoming.head is not None
        return content_refusal(self._front.accounts, account, incoming.head)

    async def _submit(
        self,
        server: GatewaySMTP,
        envelope: SmtpEnvelope,
        account: AccountSettings,
        incoming: IncomingMessage,
        now: datetime,
    ) -> str:
        """Hand the message to the spool (which logs it, off the loop); its reply."""
        submitted = Envelope(
            account=account.username,
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            smtputf8=envelope.smtp_utf8,
            received_at=now,
            client=server.peer_host(),
        )
        try:
            result = await self._front.spool.submit(submitted, incoming)
        except SpoolError as error:
            log.error("smtp.spool_failed", account=account.username, error=str(error))
            return replies.SPOOL_UNAVAILABLE
        return result.reply


def content_refusal(accounts: Accounts, account: AccountSettings, content: bytes) -> str | None:
    """The 5xx reply for a (normalized) message we must not pass on, or None when it may go."""
    for sender in header_senders(content):
        if sender.address is None:
            return replies.header_unreadable(sender.header)
        if not accounts.may_send_as(account, sender.address):
            allowed = accounts.allowed_senders(account)
            return replies.header_refused(sender.header, sender.address, allowed)
    return None


def _account(session: Session) -> AccountSettings:
    """The account that AUTH logged in (``GatewaySMTP`` returns it as the AuthResult's data)."""
    # aiosmtpd infers Session.auth_data as None from its __init__, though its docstring says it
    # holds whatever the authenticator returned.
    return session.auth_data  # type: ignore[return-value]
