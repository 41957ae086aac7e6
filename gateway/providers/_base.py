"""The interface every outbound backend implements, and what it needs from the OAuth layer."""

from __future__ import annotations

from typing import Protocol

from ..config import AccountSettings
from ..delivery import DeliveryResult, Envelope
from ._mime import Message


class Sender(Protocol):
    def concurrency(self, account: AccountSettings) -> int:
        """How many of ``account``'s messages the spool may hand to ``send`` at once."""

    async def send(
        self, account: AccountSettings, envelope: Envelope, message: Message
    ) -> DeliveryResult:
        """Deliver ``message`` for ``envelope``; raise Temporary, Permanent or ReauthRequired.

        The spool passes its file mapped (``mmap``) only to a sender whose class sets
        ``reads_mapped_files``; the others get bytes.
        """

    async def already_sent(self, account: AccountSettings, message_id: str) -> bool | None:
        """Whether the mailbox's sent mail holds ``message_id``; None when it cannot tell.

        Asked before re-sending a message whose earlier attempt may have reached the provider.
        """


class TokenSource(Protocol):
    """The part of :class:`gateway.oauth.TokenBroker` the API senders use."""

    async def access_token(self, username: str) -> str: ...

    async def refreshed_token(self, username: str, rejected: str, claims: str | None = None) -> str:
        """A newly issued token to replace ``rejected``, which the provider answered with 401.

        ``claims`` is the decoded claims challenge of that 401, if any. Callers that saw the
        same token refused get the one replacement, not one refresh each.
        """
        ...
