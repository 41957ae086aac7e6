"""Twisted's IAccount / IMailbox / IMessage over one account's :class:`MailboxView`.

Only INBOX exists. Each SELECT syncs the view and freezes a list of messages for the session:
sequence numbers are positions in that list, so they change only through EXPUNGE responses this
session sends (NOOP appends new mail and reports EXISTS; messages removed at the provider stay
until the next SELECT, a safe point).

Flags live in :class:`LocalFlags`, one per view (so per account, shared by IMAP and IMAPS
sessions), in memory only: they start from the provider's read state, are not persisted across
gateway restarts and are never written back to the provider (least privilege: Mail.Read /
gmail.readonly). EXPUNGE and CLOSE remove \\Deleted messages from this session's list only; the
provider is untouched and the next session sees them again (still flagged \\Deleted).

Bodies are fetched only when the FETCH needs them (``fetch_items`` receives the parsed query from
:class:`CompatIMAP4Server`); RFC822.SIZE alone uses the view's remembered size.
"""

from __future__ import annotations

import asyncio
import io
import re
import weakref
from collections.abc import Iterable
from email.utils import format_datetime
from typing import Any

from twisted.mail import imap4
from zope.interface import implementer

from ..mailbox import MailboxView, MessageInfo
from ..runtime import as_deferred
from . import _render
from ._search import Candidate, compile_query, needs_headers

INBOX = "INBOX"
FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
_NEEDS_BODY = {"body", "bodystructure", "envelope", "rfc822", "rfc822header", "rfc822text"}
_PARALLEL_FETCHES = 8


class LocalFlags:
    """Per-account flags kept by the gateway, by provider id (so a rebuilt UID map keeps them);
    a message without an entry has the provider's flags."""

    def __init__(self) -> None:
        self._flags: dict[str, frozenset[str]] = {}

    def of(self, info: MessageInfo) -> frozenset[str]:
        kept = self._flags.get(info.provider_id)
        return kept if kept is not None else frozenset(info.flags)

    def change(self, info: MessageInfo, names: Iterable[str], how: int) -> frozenset[str]:
        """``how``: 1 adds, -1 removes, 0 replaces (STORE +FLAGS / -FLAGS / FLAGS)."""
        wanted = {_canonical(n) for n in names if _canonical(n) in FLAGS}
        current = set(self.of(info))
        updated = current | wanted if how > 0 else current - wanted if how < 0 else wanted
        self._flags[info.provider_id] = frozenset(updated)
        return self._flags[info.provider_id]


_VIEW_FLAGS: weakref.WeakKeyDictionary[MailboxView, LocalFlags] = weakref.WeakKeyDictionary()


def flags_for(view: MailboxView) -> LocalFlags:
    """The one flag store of the view's account (both IMAP listeners share it)."""
    found = _VIEW_FLAGS.get(view)
    if found is None:
        found = _VIEW_FLAGS[view] = LocalFlags()
    return found


def _canonical(name: str) -> str:
    return next((f for f in FLAGS if f.lower() == name.lower()), name)


@implementer(imap4.IMailboxInfo)
class _InboxInfo:
    """LIST's view of INBOX (separate from the mailbox: LIST flags are not SELECT flags)."""

    def __init__(self, flags: list[str] | None = None) -> None:
        self.flags = flags or ["\\HasNoChildren"]

    def getFlags(self) -> list[str]:
        return self.flags

    def getHierarchicalDelimiter(self) -> str:
        return "/"


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class InboxAccount:
    """A logged-in account: one mailbox, INBOX; everything that would create folders says NO."""

    def __init__(self, name: str, view: MailboxView) -> None:
        self.name = name
        self.view = view

    def listMailboxes(self, ref: str, wildcard: str) -> list[tuple[str, Any]]:
        if not wildcard:  # RFC 3501: LIST "" "" asks for the hierarchy delimiter
            return [("", _InboxInfo(["\\Noselect"]))]
        pattern = _wildcard(f"{ref}{wildcard}")
        return [(INBOX, _InboxInfo())] if pattern.fullmatch(INBOX) else []

    def select(self, name: str, rw: bool = True) -> Any:
        """Async: the view is synced first, so SELECT shows the INBOX as it is now."""

        async def open_() -> InboxMailbox | None:
            if name.upper() != INBOX:
                return None
            await self.view.sync()
            return InboxMailbox(self.view, flags_for(self.view), bool(rw))

        return as_deferred(open_())

    def isSubscribed(self, name: str) -> bool:
        return name.upper() == INBOX

    def subscribe(self, name: str) -> None:
        if name.upper() != INBOX:
            raise imap4.MailboxException("Only INBOX exists on this gateway")

    def unsubscribe(self, name: str) -> None:
        raise imap4.MailboxException("INBOX stays subscribed")

    def addMailbox(self, name: str, mbox: Any = None) -> None:
        raise imap4.MailboxException("This gateway serves only INBOX")

    def create(self, pathspec: str) -> None:
        raise imap4.MailboxException("This gateway serves only INBOX")

    def delete(self, name: str) -> None:
        raise imap4.MailboxException("This gateway serves only INBOX")

    def rename(self, oldname: str, newname: str) -> None:
        raise imap4.MailboxException("This gateway serves only INBOX")

    def getPersonalNamespaces(self) -> list[list[str]]:
        return [["", "/"]]

    def getSharedNamespaces(self) -> None:
        return None

    def getOtherNamespaces(self) -> None:
        return None


def _wildcard(pattern: str) -> re.Pattern[str]:
    """IMAP LIST wildcards (``*`` any, ``%`` no hierarchy), INBOX matched case-insensitively."""
    parts = ("[^/]*" if c == "%" else ".*" if c == "*" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.IGNORECASE)


@implementer(imap4.IMessage, imap4.IMessageFile)
class GatewayMessage:
    """One message of a FETCH; the body is present only if the FETCH needed it."""

    def __init__(self, info: MessageInfo, flags: LocalFlags, raw: bytes | None, size: int) -> None:
        self.info, self._flags, self.raw, self.size = info, flags, raw, size

    def open(self) -> io.BytesIO:
        if self.raw is None:
            raise RuntimeError("the body was not fetched for this FETCH")
        return io.BytesIO(self.raw)

    def getSize(self) -> int:
        return self.size

    def getUID(self) -> int:
        return self.info.uid

    def getFlags(self) -> list[str]:
        return sorted(self._flags.of(self.info))

    def getInternalDate(self) -> str:
        return format_datetime(self.info.internal_date)


def _fields(raw: bytes) -> Any:
    """name (lower case) -> the raw values of every such field of the top-level header."""
    root = _render.index(_render.to_crlf(raw))
    return lambda name: [
        line.split(b":", 1)[1].strip(b" \t\r\n") for field, line in root.fields if field == name
    ]


@implementer(imap4.IMailbox, imap4.ISearchableMailbox)
class InboxMailbox:
    """The INBOX of one SELECT: a frozen, ordered message list over the shared view."""

    def __init__(self, view: MailboxView, flags: LocalFlags, writeable: bool) -> None:
        self.view = view
        self.flags = flags
        self.writeable = writeable
        self.messages = view.messages()
        self.listeners: list[Any] = []

    # -- what SELECT and STATUS report -------------------------------------------------------

    def getFlags(self) -> list[str]:
        return list(FLAGS)

    def getPermanentFlags(self) -> list[str]:
        """Kept for the gateway's lifetime (in memory), hence reported as permanent."""
        return list(FLAGS) if self.writeable else []

    def getHierarchicalDelimiter(self) -> str:
        return "/"

    def getUIDValidity(self) -> int:
        return self.view.uidvalidity

    def getUIDNext(self) -> int:
        return self.view.uidnext

    def getUID(self, seq: int) -> int:
        return self.messages[seq - 1].uid

    def getMessageCount(self) -> int:
        return len(self.messages)

    def getRecentCount(self) -> int:
        return 0

    def getUnseenCount(self) -> int:
        return sum(1 for info in self.messages if "\\Seen" not in self.flags.of(info))

    def getFirstUnseen(self) -> int | None:
        for seq, info in enumerate(self.messages, 1):
            if "\\Seen" not in self.flags.of(info):
                return seq
        return None

    def isWriteable(self) -> bool:
        return self.writeable

    def requestStatus(self, names: Iterable[str]) -> dict[str, int]:
        values = {
            "MESSAGES": self.getMessageCount,
            "RECENT": self.getRecentCount,
            "UIDNEXT": self.getUIDNext,
            "UIDVALIDITY": self.getUIDValidity,
            "UNSEEN": self.getUnseenCount,
        }
        return {n.upper(): values[n.upper()]() for n in names if n.upper() in values}

    def addListener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def removeListener(self, listener: Any) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    # -- NOOP --------------------------------------------------------------------------------

    async def refresh(self) -> int | None:
        """Sync and append new mail; the new EXISTS count if it grew, else None."""
        await self.view.sync()
        known = self.messages[-1].uid if self.messages else 0
        added = [info for info in self.view.messages() if info.uid > known]
        if not added:
            return None
        self.messages.extend(added)
        return len(self.messages)

    # -- FETCH / STORE / SEARCH / EXPUNGE ----------------------------------------------------

    def _selected(self, messages: Any, uid: bool) -> list[tuple[int, MessageInfo]]:
        """Resolve a sequence set or UID set against this session's list, in order."""
        last = self.messages[-1].uid if uid and self.messages else len(self.messages)
        bounds = []
        for low, high in messages.ranges:
            low = last if low is None else low
            high = last if high is None else high
            bounds.append((min(low, high), max(low, high)))
        return [
            (seq, info)
            for seq, info in enumerate(self.messages, 1)
            if any(lo <= (info.uid if uid else seq) <= hi for lo, hi in bounds)
        ]

    def fetch(self, messages: Any, uid: bool) -> Any:
        """Stock entry point: assume the whole message is needed."""
        return self.fetch_items(messages, None, uid)

    def fetch_items(self, messages: Any, query: list | None, uid: bool) -> Any:
        """FETCH with the parsed query: download bodies only for items that render them."""
        kinds = None if query is None else {item.type for item in query}
        body = kinds is None or bool(kinds & _NEEDS_BODY)
        size = kinds is None or "rfc822size" in kinds
        return as_deferred(self._load(self._selected(messages, uid), body, size))

    async def _load(
        self, chosen: list[tuple[int, MessageInfo]], body: bool, size: bool
    ) -> list[tuple[int, GatewayMessage]]:
        gate = asyncio.Semaphore(_PARALLEL_FETCHES)

        async def one(seq: int, info: MessageInfo) -> tuple[int, GatewayMessage] | None:
            async with gate:
                try:
                    raw = await self.view.fetch(info.uid) if body else None
                    if raw is not None:
                        length = len(_render.to_crlf(raw))
                    else:
                        length = await self.view.size(info.uid) if size else 0
                except KeyError:  # gone from the view since SELECT: nothing to show
                    return None
            return seq, GatewayMessage(info, self.flags, raw, length)

        found = await asyncio.gather(*(one(seq, info) for seq, info in chosen))
        return [item for item in found if item is not None]

    def store(self, messages: Any, flags: list[str], mode: int, uid: bool) -> dict[int, list]:
        if not self.writeable:
            raise imap4.ReadOnlyMailbox()
        return {
            seq: sorted(self.flags.change(info, flags, mode))
            for seq, info in self._selected(messages, uid)
        }

    def search(self, query: list, uid: bool) -> Any:
        """Sequence numbers (the server turns them into UIDs for UID SEARCH); bodies are
        fetched only when a key needs the header."""
        last_uid = self.messages[-1].uid if self.messages else 0
        test = compile_query(query, len(self.messages), last_uid)
        return as_deferred(self._search(test, needs_headers(query)))

    async def _search(self, test: Any, headers: bool) -> list[int]:
        candidates = list(enumerate(self.messages, 1))
        loaded: dict[int, Any] = {}
        if headers:
            found = await self._load(candidates, body=True, size=False)
            loaded = {seq: _fields(message.raw or b"") for seq, message in found}
        return [
            seq
            for seq, info in candidates
            if test(
                Candidate(
                    seq,
                    info.uid,
                    self.flags.of(info),
                    info.internal_date.date(),
                    loaded.get(seq),
                )
            )
        ]

    def expunge(self) -> list[int]:
        """Hide \\Deleted messages from this session only; highest number first, so every
        EXPUNGE response is valid after the previous ones. The provider is untouched."""
        gone = [
            seq for seq, info in enumerate(self.messages, 1) if "\\Deleted" in self.flags.of(info)
        ]
        for seq in reversed(gone):
            del self.messages[seq - 1]
        return list(reversed(gone))

    def addMessage(self, message: Any, flags: Any = (), date: Any = None) -> Any:
        from twisted.internet.defer import fail

        return fail(imap4.MailboxException("APPEND is not supported: the INBOX is read-only"))

    def copy(self, message: Any) -> Any:
        raise imap4.MailboxException("COPY is not supported: only INBOX exists")
