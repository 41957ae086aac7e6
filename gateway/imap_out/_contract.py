"""What the IMAP server asks of a mailbox beyond Twisted's ``IMailbox``, written down once.

Stock ``IMailbox`` has no way to say which FETCH items are wanted, nor to hand over a message
already in wire form, nor to report changes between commands. The gateway's INBOX
(:class:`~gateway.imap_out._mailbox.InboxMailbox`) implements :class:`GatewayMailbox` and its
messages :class:`PreparedMessage`; a session listening to it is a :class:`MailboxListener`.
Any other ``IMailbox`` (the test servers' plain ones) is still served, the stock way.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from twisted.internet.defer import Deferred


@runtime_checkable
class GatewayMailbox(Protocol):
    """An ``IMailbox`` that knows the FETCH query and the provider's changes."""

    def fetch_items(
        self, messages: Any, query: list | None, uid: bool
    ) -> Deferred[list[tuple[int, PreparedMessage]]]:
        """FETCH told the parsed items (Twisted #9197), so bodies are downloaded only for the
        items that render them; the messages found, as (sequence number, message)."""
        ...

    def getPermanentFlags(self) -> list[str]:
        """SELECT's PERMANENTFLAGS (stock reports the mailbox's flags, or none)."""
        ...

    def getFirstUnseen(self) -> int | None:
        """SELECT's ``[UNSEEN n]``: the first message without \\Seen, if any."""
        ...

    async def refresh(self) -> None:
        """NOOP and CHECK: bring the session's view up to date."""
        ...

    def drain(self) -> list[bytes]:
        """The untagged responses (EXPUNGE, EXISTS, FETCH FLAGS) for changes not yet told."""
        ...


class PreparedMessage(Protocol):
    """A message of :meth:`GatewayMailbox.fetch_items`, ready for the wire."""

    @property
    def crlf_bytes(self) -> bytes:
        """The raw message in CRLF form, not copied (``getSize()`` is its length)."""
        ...

    @property
    def internal_datetime(self) -> datetime:
        """INTERNALDATE as an aware datetime: no string round trip per message."""
        ...

    def getUID(self) -> int: ...

    def getSize(self) -> int: ...

    def getFlags(self) -> list[str]: ...


class MailboxListener(Protocol):
    """A session selected on a :class:`GatewayMailbox`: told when the view changed."""

    def mailbox_changed(self) -> None:
        """Report pending changes now if the client is waiting for them (IDLE)."""
        ...
