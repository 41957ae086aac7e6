"""Gmail send-as learning: the SMTP front accepts a mailbox's verified send-as aliases as From.

Gmail lists them (``users.settings.sendAs``), so they are learnt when the gateway starts and
whenever a mailbox is (re)connected. Microsoft has no API that lists Send As rights; there,
``sending.allowed_from`` names them and Graph refuses the rest (ErrorSendAsDenied).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .accounts import Accounts
from .delivery import DeliveryError
from .logs import get_logger
from .oauth import OAuthError
from .providers import GmailSender, Sender

log = get_logger(__name__)


class SendAsLearner:
    """Asks the Gmail sender for an account's aliases and records them in :class:`Accounts`.

    ``senders`` is the spool's own mapping, so a sender replaced by a config reload is the one
    asked next time.
    """

    def __init__(self, accounts: Accounts, senders: Mapping[str, Sender]) -> None:
        self.accounts = accounts
        self.senders = senders

    async def learn_all(self, usernames: Iterable[str]) -> None:
        for username in usernames:
            await self.learn(username)

    async def learn(self, username: str) -> None:
        """Learn one Gmail account's aliases; any other account is left alone. A failure
        (not connected, no gmail.readonly, Gmail down) is logged and changes nothing."""
        sender = self.senders.get("google")
        account = self.accounts.get(username)
        if not isinstance(sender, GmailSender) or account is None:
            return
        if account.provider != "google":
            return
        try:
            aliases = await sender.send_as_addresses(account)
        except (OAuthError, DeliveryError) as error:
            log.info("smtp.send_as_unknown", account=username, reason=str(error))
            return
        self.accounts.set_send_as_aliases(username, aliases)
        log.info("smtp.send_as_learned", account=username, aliases=len(aliases))
