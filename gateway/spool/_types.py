"""What the SMTP front hands to the spool, and what it gets back.

Kept apart from the spool's machinery so that smtp_in depends on these few types only; the
:class:`~gateway.delivery.Envelope` it hands over is the delivery vocabulary's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..delivery import Envelope

if TYPE_CHECKING:
    from ._incoming import IncomingMessage


@dataclass(frozen=True)
class SubmitResult:
    """The spool's answer. ``reply`` is the full SMTP reply for the client ("250 2.0.0 ...").

    Normally the message is queued and the reply is a 250 naming ``queue_id``. With inline
    delivery configured, a permanent provider refusal comes back as a 5xx reply and nothing is
    queued (``queue_id`` is None), so the legacy program learns at once.
    """

    reply: str
    queue_id: str | None


def held_hint(account: str) -> str:
    """What sends held mail: said wherever held mail is shown (log, ``gateway queue list``)."""
    return (
        "sent at once when the mailbox is reconnected, or when a config reload changes the "
        f"account (a fixed upstream password); `gateway queue release {account}` tries it now"
    )


class SpoolError(Exception):
    """The spool cannot take the message now (disk full, store unavailable): answer 451/452."""


class Spool(Protocol):
    def receive(self, prologue: bytes = b"") -> IncomingMessage:
        """A message to stream in (``write`` its content), then ``submit`` or ``discard``."""

    async def submit(self, envelope: Envelope, message: bytes | IncomingMessage) -> SubmitResult:
        """Store the message durably (fsynced) before returning; then deliver it."""
