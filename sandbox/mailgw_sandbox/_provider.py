"""What each half of the sandbox (Microsoft, Google) offers to the rest of it.

The control API, the demo and tests act "as the user in Outlook or Gmail would" through
:class:`MailboxOps`, without knowing how either provider stores mail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from aiohttp import web

from ._directory import Directory, Provider, User
from ._faults import FaultPlan

ConsentMode = Literal["auto", "screen", "deny"]


@dataclass
class Context:
    """Shared state handed to both providers."""

    directory: Directory
    faults: FaultPlan
    # auto: authorize redirects straight back (tests); screen: a page with Accept/Deny (demo);
    # deny: the user declines (tests of the error path).
    consent: ConsentMode = "auto"
    events: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SentMessage:
    """A message as the provider sent it: final recipients and the MIME it delivered."""

    id: str
    mailbox: str  # the address of the mailbox that sent it
    from_address: str  # the From as finally sent (Gmail may have rewritten it)
    recipients: tuple[str, ...]  # To + Cc + Bcc, lower-cased, in header order
    raw: bytes  # the MIME, Bcc header included as kept in Sent Items
    saved_to_sent: bool


class MailboxOps(Protocol):
    def seed_inbox(self, user: User, raw: bytes, received_at: datetime | None = None) -> str:
        """Deliver ``raw`` into the INBOX as if it arrived from outside; return its id."""

    def inbox_ids(self, user: User) -> list[str]:
        """Ids of the INBOX messages, oldest first."""

    def sent(self, user: User) -> list[SentMessage]:
        """Everything this mailbox sent, oldest first."""

    def move(self, user: User, message_id: str, destination: str) -> str:
        """Move as the user would ("archive", "trash", "inbox"); return the (maybe new) id."""

    def delete(self, user: User, message_id: str) -> None:
        """Delete permanently (Graph: hard delete; Gmail: messages.delete)."""

    def set_read(self, user: User, message_id: str, read: bool) -> None:
        """Mark read or unread as the user would in the web client."""

    def set_flagged(self, user: User, message_id: str, flagged: bool) -> None:
        """Flag or clear the flag as the user would in the web client (Outlook's follow-up
        flag, Gmail's star): the one flag besides read that both providers keep per message."""


class ProviderSandbox(Protocol):
    # Read-only: each provider keeps its own, more specific ops (a plain attribute would have
    # to be exactly MailboxOps).
    @property
    def provider(self) -> Provider: ...

    @property
    def ops(self) -> MailboxOps: ...

    def add_routes(self, app: web.Application) -> None:
        """Register this provider's HTTP routes on the sandbox's one application."""
