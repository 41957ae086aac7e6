"""The transaction policy: EHLO keywords, who may send as whom, recipients, and the hand-off.

aiosmtpd has parsed the command and checked its syntax when these hooks run; they decide and
return the reply. An accepted message goes to the spool, whose reply the client gets.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session

from ..accounts import Accounts
from ..config import AccountSettings
from ..logs import get_logger
from ..spool._types import Envelope, SpoolError
from . import replies
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
        account: AccountSettings = session.auth_data
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

    async def handle_DATA(
        self, server: GatewaySMTP, session: Session, envelope: SmtpEnvelope
    ) -> str:
        account: AccountSettings = session.auth_data
        raw = envelope.original_content or b""
        # Normalizing and scanning up to max_message_mb of bytes and parsing headers: off the loop.
        content = await asyncio.to_thread(normalize_line_endings, raw)
        refusal = await asyncio.to_thread(content_refusal, self._front.accounts, account, content)
        if refusal is not None:
            log.warning("smtp.message_refused", account=account.username, reply=refusal)
            return refusal
        return await self._submit(server, session, envelope, account, content)

    async def _submit(
        self,
        server: GatewaySMTP,
        session: Session,
        envelope: SmtpEnvelope,
        account: AccountSettings,
        content: bytes,
    ) -> str:
        now = datetime.now(UTC)
        client = server.peer_host()
        trace = received_header(
            session.host_name,
            client,
            self._hostname,
            tls=server.tls_active(),
            smtputf8=envelope.smtp_utf8,
            when=now,
        )
        submitted = Envelope(
            account=account.username,
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            smtputf8=envelope.smtp_utf8,
            received_at=now,
            client=client,
        )
        try:
            result = await self._front.spool.submit(submitted, trace + content)
        except SpoolError as error:
            log.error("smtp.spool_failed", account=account.username, error=str(error))
            return replies.SPOOL_UNAVAILABLE
        log.info(
            "smtp.submitted",
            account=account.username,
            recipients=len(submitted.rcpt_tos),
            size=len(content),
            queue_id=result.queue_id,
            reply=result.reply,
        )
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
