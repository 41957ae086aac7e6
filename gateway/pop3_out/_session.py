"""One POP3 session's frozen view of the INBOX: message numbers, sizes, UIDLs, deletions.

POP3 (RFC 1939) numbers messages 1..n for the whole session and never renumbers them, so the
session takes a snapshot of :meth:`MailboxView.messages` right after the login sync and keeps
it; mail arriving later is seen by the next session. Deletions are a per-session mark only:
the provider is never touched (least privilege, the default policy of the gateway), and QUIT
merely logs what the client asked to delete. A client in "delete after download" mode
therefore sees the messages again in its next session, but with the same UIDLs, which is how
it knows not to download them twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import re

from ..mailbox import MailboxView, MessageInfo

_BARE_LINE_END = re.compile(rb"\r?\n|\r")
_SIZE_FETCHES = 8


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


def wire_form(raw: bytes) -> bytes:
    """The message as POP3 serves it: the provider's bytes with every line ending CRLF.

    Messages stored with CRLF (the norm for Graph and Gmail raw MIME) are served byte for byte;
    only bare LF or CR are turned into CRLF, since POP3 is a CRLF line protocol.
    """
    pairs = raw.count(b"\r\n")
    if raw.count(b"\n") == pairs and raw.count(b"\r") == pairs:
        return raw
    return _BARE_LINE_END.sub(b"\r\n", raw)


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

    def __init__(self, account: str, view: MailboxView, messages: list[MessageInfo]) -> None:
        self.account = account
        self.view = view
        self.messages = messages
        self.deleted: set[int] = set()
        self._sizes: dict[int, int] = {}

    @classmethod
    async def start(cls, account: str, view: MailboxView) -> Pop3Session:
        """Sync first so the session sees the INBOX as it is now, then freeze it."""
        await view.sync()
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
        raw = await self.view.fetch(self.info(number).uid)
        wire = wire_form(raw)
        self._sizes[number] = len(wire)
        return wire

    async def size(self, number: int) -> int:
        """Octets RETR will send before dot-stuffing (RFC 1939), fetching the body if unknown."""
        self.info(number)
        if number not in self._sizes:
            await self.wire(number)
        return self._sizes[number]

    async def sizes(self) -> dict[int, int]:
        """Sizes of all live messages; unknown ones fetched a few at a time, not one by one."""
        numbers = self.live()
        gate = asyncio.Semaphore(_SIZE_FETCHES)

        async def one(number: int) -> int:
            async with gate:
                return await self.size(number)

        found = await asyncio.gather(*(one(n) for n in numbers))
        return dict(zip(numbers, found, strict=True))

    def uidl(self, number: int) -> bytes:
        return uidl_of(self.info(number).provider_id)

    def delete(self, number: int) -> None:
        self.info(number)
        self.deleted.add(number)
