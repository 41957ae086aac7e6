"""One POP3 session's frozen view of the INBOX: message numbers, sizes, UIDLs, deletions.

POP3 (RFC 1939) numbers messages 1..n for the whole session and never renumbers them, so the
session takes a snapshot of :meth:`MailboxView.messages` right after the login sync and keeps
it; mail arriving later is seen by the next session. DELE marks a message; QUIT (the UPDATE
state) hands the marked ones to :meth:`MailboxView.delete`: they leave the account's view for
every later POP3 and IMAP session, and at the provider they are kept (the default), archived or
trashed as the account's reading policy says, never deleted. A dropped connection deletes
nothing (RFC 1939 6).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from ..mailbox import MailboxView, MessageInfo


def uidl_of(provider_id: str) -> bytes:
    """The UIDL of a message: 32 hex digits of SHA-256 over its provider id.

    Why the provider id and not UIDVALIDITY+UID: the provider id (Graph ImmutableId, Gmail
    message id) outlives our state — a rebuilt UID map, a lost state directory or a message
    moved out of INBOX and back all keep it — so a "leave on server" client never downloads the
    same mail twice because of us. It is hashed because raw ids are up to ~150 characters of
    base64 while RFC 1939 allows at most 70 characters in 0x21..0x7E; 128 bits make collisions
    within one maildrop practically impossible.
    """
    return hashlib.sha256(provider_id.encode("utf-8")).hexdigest()[:32].encode("ascii")


def top_of(wire: bytes, lines: int) -> bytes:
    """RFC 1939 TOP: the header, the blank line, then the first ``lines`` body lines."""
    end = wire.find(b"\r\n\r\n")
    if end < 0:
        return wire
    head, body = wire[: end + 4], wire[end + 4 :]
    if lines == 0 or not body:
        return head
    kept = body.split(b"\r\n")[:lines]
    taken = b"\r\n".join(kept)
    return head + taken + (b"\r\n" if len(taken) < len(body) else b"")


class NoSuchMessage(LookupError):
    """The message number is out of range or marks a deleted message; str() is the reply."""


class Pop3Session:
    """The messages of one session; every reply-worthy failure is :class:`NoSuchMessage`."""

    def __init__(self, account: str, view: MailboxView, messages: tuple[MessageInfo, ...]) -> None:
        self.account = account
        self.view = view
        self.messages = messages
        self.deleted: set[int] = set()

    @classmethod
    async def start(cls, account: str, view: MailboxView) -> Pop3Session:
        """Sync first (unless the view just did) so the session sees the INBOX as it is now,
        then freeze it."""
        await view.ensure_fresh()  # a sync of the last seconds will do
        return cls(account, view, view.messages())

    def info(self, number: int) -> MessageInfo:
        if not 1 <= number <= len(self.messages):
            raise NoSuchMessage(f"No message {number}")
        if number in self.deleted:
            raise NoSuchMessage(f"Message {number} is already deleted")
        return self.messages[number - 1]

    def live(self) -> list[int]:
        """Message numbers not marked deleted, in order."""
        return [n for n in range(1, len(self.messages) + 1) if n not in self.deleted]

    async def wire(self, number: int) -> bytes:
        """The message as RETR sends it before dot-stuffing: the provider's bytes with CRLF
        line ends (byte for byte when they already have them)."""
        return await self._view_call(self.view.fetch, number)

    async def size(self, number: int) -> int:
        """Octets RETR will send (RFC 1939), from the view's stored size when known."""
        return await self._view_call(self.view.size, number)

    async def _view_call(self, call: Any, number: int) -> Any:
        try:
            return await call(self.info(number).uid)
        except KeyError:  # deleted by another session since this one started
            raise NoSuchMessage(f"Message {number} was deleted by another session") from None

    async def sizes(self) -> dict[int, int]:
        """Sizes of all live messages; unknown ones are downloaded together (the view bounds
        how many at once), not one by one."""
        numbers = self.live()
        found = await asyncio.gather(*(self.size(n) for n in numbers))
        return dict(zip(numbers, found, strict=True))

    def uidl(self, number: int) -> bytes:
        return uidl_of(self.info(number).provider_id)

    def delete(self, number: int) -> None:
        self.info(number)
        self.deleted.add(number)

    async def commit(self) -> int:
        """QUIT: apply the DELEs (see the module docstring); how many left the view."""
        uids = [self.messages[n - 1].uid for n in sorted(self.deleted)]
        return len(await self.view.delete(uids))
