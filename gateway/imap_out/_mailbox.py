"""Twisted's IAccount / IMailbox / IMessage over one account's :class:`MailboxView`.

Only INBOX exists. Each SELECT syncs the view and takes its message list: sequence numbers are
positions in this session's list, so they change only through EXPUNGE responses the session
sends. Changes (new mail, mail that left the provider's INBOX, flags set by another session or
at the provider, deletions by another session) reach the session from the view as they happen
and are queued; :meth:`InboxMailbox.drain` turns them into EXISTS / EXPUNGE / FETCH FLAGS at a
safe point (NOOP, CHECK, IDLE), never in the middle of a FETCH, STORE or SEARCH.

Flags and deletions live in the view (per account, in the store, shared by every session);
whether they also reach the provider is the account's :class:`ReadingPolicy`.

Bodies are fetched only when the FETCH needs them (``fetch_items`` receives the parsed query from
:class:`CompatIMAP4Server`); RFC822.SIZE alone uses the view's stored size. A FETCH of a body
section without .PEEK sets \\Seen, as RFC 3501 6.4.5 says, and then also returns FLAGS.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from email.utils import format_datetime
from typing import Any

from twisted.mail import imap4
from zope.interface import implementer

from ..mailbox import MailboxView, MessageInfo
from ..runtime import as_deferred
from . import _render
from ._contract import GatewayMailbox, MailboxListener, PreparedMessage
from ._search import (
    Candidate,
    compile_query,
    message_text,
    needs_headers,
    needs_size,
    needs_text,
)

INBOX = "INBOX"
FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")  # Dovecot's order
_SYSTEM_RANK = {flag.casefold(): rank for rank, flag in enumerate(FLAGS)}


def in_imap_order(flags: Iterable[str]) -> list[str]:
    """System flags in Dovecot's order, then keywords by name: FETCH FLAGS byte for byte as
    Dovecot writes it (a plain sort would put ``$Forwarded`` before ``\\Answered``)."""
    return sorted(flags, key=lambda f: (_SYSTEM_RANK.get(f.casefold(), len(FLAGS)), f))


_NEEDS_BODY = {"body", "bodystructure", "envelope", "rfc822", "rfc822header", "rfc822text"}
_FROM_HEADER = {"uid", "flags", "internaldate", "rfc822size", "envelope", "rfc822header"}


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
            await self.view.ensure_fresh()  # a sync of the last seconds will do
            return InboxMailbox(self.view, bool(rw))

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

    def getUserNamespaces(self) -> None:  # INamespacePresenter's name for "other users'"
        return None


def _wildcard(pattern: str) -> re.Pattern[str]:
    """IMAP LIST wildcards (``*`` any, ``%`` no hierarchy), INBOX matched case-insensitively."""
    parts = ("[^/]*" if c == "%" else ".*" if c == "*" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.IGNORECASE)


# IMessage's part methods (getHeaders, getBodyFile, ...) serve stock FETCH and SEARCH, which
# _compat replaces with its own: they are not implemented, and mypy-zope's check says so.
@implementer(imap4.IMessage, imap4.IMessageFile)
class GatewayMessage(PreparedMessage):  # type: ignore[misc]
    """One message of a FETCH; the body is present only if the FETCH needed it."""

    def __init__(
        self, info: MessageInfo, flags: frozenset[str], raw: bytes | None, size: int
    ) -> None:
        self.info, self.flags, self.raw, self.size = info, flags, raw, size

    def open(self) -> io.BytesIO:
        if self.raw is None:
            raise RuntimeError("the body was not fetched for this FETCH")
        return io.BytesIO(self.raw)

    @property
    def crlf_bytes(self) -> bytes:
        """For :class:`CompatIMAP4Server`: the message already in CRLF form, not copied."""
        if self.raw is None:
            raise RuntimeError("the body was not fetched for this FETCH")
        return self.raw

    def getSize(self) -> int:
        return self.size

    def getUID(self) -> int:
        return self.info.uid

    def getFlags(self) -> list[str]:
        return in_imap_order(self.flags)

    def getInternalDate(self) -> str:
        return format_datetime(self.info.internal_date)

    @property
    def internal_datetime(self) -> datetime:
        """For :class:`CompatIMAP4Server`'s INTERNALDATE without a string round trip."""
        return self.info.internal_date


def _fields(raw: bytes) -> Any:
    """name (lower case) -> the raw values of every such field of the top-level header."""
    root = _render.index(raw)
    return lambda name: [
        line.split(b":", 1)[1].strip(b" \t\r\n") for field, line in root.fields if field == name
    ]


class _Pending:
    """Changes told by the view and not yet reported to this session's client."""

    def __init__(self) -> None:
        self.added = False
        self.removed: set[int] = set()
        self.flags: set[int] = set()

    def __bool__(self) -> bool:
        return self.added or bool(self.removed or self.flags)


# IMailboxIMAP.destroy is called only by Twisted's in-memory account when it deletes a mailbox;
# INBOX is never deleted here (InboxAccount.delete refuses): not implemented.
@implementer(imap4.IMailbox, imap4.ISearchableMailbox, imap4.ICloseableMailbox)
class InboxMailbox(GatewayMailbox):  # type: ignore[misc]
    """The INBOX of one SELECT: this session's ordered message list over the shared view."""

    def __init__(self, view: MailboxView, writeable: bool) -> None:
        self.view = view
        self.writeable = writeable
        # The view's own tuple, not a copy: 1,000 idle sessions on a 5,000-message INBOX would
        # otherwise hold 40 MB of lists. Replaced (never changed in place) as changes are
        # reported; see _shared.
        self.messages: tuple[MessageInfo, ...] = view.messages()
        self.listeners: list[MailboxListener] = []  # sessions, told of changes
        self._pending = _Pending()
        view.watch(self._told)

    def close(self) -> None:
        """ICloseableMailbox: the session left INBOX (CLOSE, UNSELECT, logout, lost)."""
        self.view.unwatch(self._told)
        self.listeners.clear()

    def flags_of(self, info: MessageInfo) -> frozenset[str]:
        """Flags now; a message already gone from the view keeps its last known flags."""
        try:
            return self.view.flags(info.uid)
        except KeyError:
            return frozenset(info.flags)

    # -- what SELECT and STATUS report -------------------------------------------------------

    def getFlags(self) -> list[str]:
        """The system flags and every keyword in the mailbox (from the provider, such as an
        upstream server's $Forwarded, or set by a client), as Dovecot lists them."""
        return [*FLAGS, *self.view.keywords()]

    def getPermanentFlags(self) -> list[str]:
        """Kept in the gateway's store per account, hence permanent; ``\\*``: a client may
        create keywords (kept by the gateway, not at the provider). None in EXAMINE."""
        return [*FLAGS, *self.view.keywords(), "\\*"] if self.writeable else []

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
        return sum(1 for info in self.messages if "\\Seen" not in self.flags_of(info))

    def getFirstUnseen(self) -> int | None:
        for seq, info in enumerate(self.messages, 1):
            if "\\Seen" not in self.flags_of(info):
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

    def addListener(self, listener: MailboxListener) -> None:
        self.listeners.append(listener)

    def removeListener(self, listener: MailboxListener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    # -- changes from the view, reported at safe points --------------------------------------

    def _told(self, applied: Any, origin: object) -> None:
        pending = self._pending
        pending.added |= bool(applied.added)
        pending.removed.update(applied.removed)
        if origin is not self:  # this session already answered its own STORE
            pending.flags.update(applied.flags_changed)
        if pending:
            for listener in list(self.listeners):
                listener.mailbox_changed()

    async def refresh(self) -> None:
        """NOOP/CHECK: nothing to ask the provider; the view's poller asks it every
        ``poll_seconds`` and its changes arrive through :meth:`_told`, so what a client
        sends never sets the pace of provider requests."""

    def drain(self) -> list[bytes]:
        """The untagged responses for every pending change, applied to this session's list:
        EXPUNGE (each number valid after the previous ones), then EXISTS, then FETCH FLAGS."""
        pending, self._pending = self._pending, _Pending()
        if not pending:
            return []
        lines = [b"%d EXPUNGE" % seq for seq in self._drop(pending.removed)]
        if pending.added:
            known = self.messages[-1].uid if self.messages else 0
            fresh = [info for info in self.view.messages() if info.uid > known]
            if fresh:
                self.messages = self._shared([*self.messages, *fresh])
                lines.append(b"%d EXISTS" % len(self.messages))
        for seq, info in enumerate(self.messages, 1):
            if info.uid in pending.flags:
                names = " ".join(in_imap_order(self.flags_of(info))).encode()
                lines.append(b"%d FETCH (FLAGS (%b) UID %d)" % (seq, names, info.uid))
        self.messages = self._shared(self.messages)  # a newer listing of the same messages
        return lines

    def _drop(self, uids: set[int]) -> list[int]:
        """Remove these UIDs from the session's list; their sequence numbers as EXPUNGE must
        report them: each counted after the previous removals (so highest first is simplest)."""
        if not uids:
            return []
        gone = [seq for seq, info in enumerate(self.messages, 1) if info.uid in uids]
        if gone:
            self.messages = self._shared([i for i in self.messages if i.uid not in uids])
        return list(reversed(gone))

    def _shared(self, mine: Iterable[MessageInfo]) -> tuple[MessageInfo, ...]:
        """This session's list as a tuple: the view's own when it holds the same UIDs in the
        same order (the usual case once every change is reported), so sessions share one
        listing instead of each keeping a copy."""
        mine = tuple(mine)
        current = self.view.messages()
        if len(current) == len(mine) and all(
            a.uid == b.uid for a, b in zip(current, mine, strict=True)
        ):
            return current
        return mine

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
        chosen = self._selected(messages, uid)
        return as_deferred(self._fetch(chosen, query, body, size))

    async def _fetch(
        self, chosen: list[tuple[int, MessageInfo]], query: list | None, body: bool, size: bool
    ) -> list[tuple[int, GatewayMessage]]:
        """Mark \\Seen where the FETCH implies it, then load what its items render: nothing
        but metadata, the header section alone (kept by the view, so no download after a
        restart), or whole messages."""
        if self.writeable and query is not None and _marks_seen(query):
            unseen = [info.uid for _, info in chosen if "\\Seen" not in self.flags_of(info)]
            if unseen:
                await self.view.store_flags(unseen, ["\\Seen"], 1, origin=self)
                if not any(item.type == "flags" for item in query):
                    query.append(imap4._FetchParser.Flags())
        if body and query is not None and _headers_suffice(query):
            return await self._with_headers(await self._load(chosen, False, size))
        return await self._load(chosen, body, size)

    async def _with_headers(
        self, found: list[tuple[int, GatewayMessage]]
    ) -> list[tuple[int, GatewayMessage]]:
        heads = await self.view.headers(m.info.uid for _, m in found)
        return [
            (seq, GatewayMessage(m.info, m.flags, heads[m.info.uid], m.size))
            for seq, m in found
            if m.info.uid in heads
        ]

    async def _load(
        self, chosen: list[tuple[int, MessageInfo]], body: bool, size: bool
    ) -> list[tuple[int, GatewayMessage]]:
        """The messages of a FETCH; only bodies and unknown sizes are awaited, so a listing of
        known sizes costs no task per message."""
        ready: dict[int, GatewayMessage] = {}
        waiting: list[tuple[int, MessageInfo]] = []
        for seq, info in chosen:
            try:
                length = 0 if not size else self.view.known_size(info.uid)
            except KeyError:  # gone from the view since SELECT: nothing to show
                continue
            if body or length is None:
                waiting.append((seq, info))
            else:
                ready[seq] = GatewayMessage(info, self.flags_of(info), None, length)

        async def one(seq: int, info: MessageInfo) -> None:
            try:  # the view bounds how many downloads run at once
                raw = await self.view.fetch(info.uid) if body else None
                length = len(raw) if raw is not None else await self.view.size(info.uid)
            except KeyError:
                return
            ready[seq] = GatewayMessage(info, self.flags_of(info), raw, length)

        await asyncio.gather(*(one(seq, info) for seq, info in waiting))
        return [(seq, ready[seq]) for seq, _ in chosen if seq in ready]

    def store(self, messages: Any, flags: list[str], mode: int, uid: bool) -> Any:
        if not self.writeable:
            raise imap4.ReadOnlyMailbox()
        chosen = self._selected(messages, uid)
        return as_deferred(self._store(chosen, flags, mode))

    async def _store(
        self, chosen: list[tuple[int, MessageInfo]], flags: list[str], mode: int
    ) -> dict[int, list[str]]:
        now = await self.view.store_flags([i.uid for _, i in chosen], flags, mode, origin=self)
        return {seq: in_imap_order(now.get(info.uid, self.flags_of(info))) for seq, info in chosen}

    def search(self, query: list, uid: bool) -> Any:
        """Sequence numbers (the server turns them into UIDs for UID SEARCH); headers, sizes
        and bodies are loaded only when a key needs them."""
        last_uid = self.messages[-1].uid if self.messages else 0
        test = compile_query(query, len(self.messages), last_uid)
        needs = (needs_headers(query), needs_size(query), needs_text(query))
        return as_deferred(self._search(test, *needs))

    async def _search(self, test: Any, headers: bool, size: bool, text: bool) -> list[int]:
        candidates = list(enumerate(self.messages, 1))
        fields: dict[int, Any] = {}
        texts: dict[int, Any] = {}
        sizes: dict[int, int] = {}
        if headers:
            heads = await self.view.headers(info.uid for _, info in candidates)
            fields = {seq: _fields(heads[i.uid]) for seq, i in candidates if i.uid in heads}
        if text or size:
            found = await self._load(candidates, body=text, size=size)
            texts = {seq: _text_of(m.raw) for seq, m in found if m.raw is not None}
            sizes = {seq: m.size for seq, m in found}
        return [
            seq
            for seq, info in candidates
            if test(
                Candidate(
                    seq,
                    info.uid,
                    self.flags_of(info),
                    info.internal_date.date(),
                    fields.get(seq),
                    texts.get(seq),
                    sizes.get(seq),
                )
            )
        ]

    def expunge(self, uids: Any = None) -> Any:
        """Remove \\Deleted messages (only those in the UID set ``uids`` for UID EXPUNGE):
        from the view for every session of the account (kept, archived or trashed at the
        provider per the account's policy), and from this session's list, highest number
        first so every EXPUNGE response stays valid."""
        if not self.writeable:
            raise imap4.ReadOnlyMailbox()
        chosen = self.messages if uids is None else [i for _, i in self._selected(uids, True)]
        return as_deferred(self._expunge(chosen))

    async def _expunge(self, chosen: Sequence[MessageInfo]) -> list[int]:
        doomed = [info.uid for info in chosen if "\\Deleted" in self.flags_of(info)]
        await self.view.delete(doomed, origin=self)
        self._pending.removed.difference_update(doomed)
        return self._drop(set(doomed))

    def addMessage(self, message: Any, flags: Any = (), date: Any = None) -> Any:
        from twisted.internet.defer import fail

        return fail(imap4.MailboxException("APPEND is not supported: the INBOX is read-only"))

    def copy(self, message: Any) -> Any:
        raise imap4.MailboxException("COPY is not supported: only INBOX exists")


def _marks_seen(query: list) -> bool:
    """RFC 3501 6.4.5: BODY[...] without .PEEK, RFC822 and RFC822.TEXT set \\Seen."""
    for item in query:
        if item.type in ("rfc822", "rfc822text"):
            return True
        if item.type == "body" and not item.peek and _is_section(item):
            return True
    return False


def _text_of(raw: bytes) -> Any:
    """``text(with_header)`` for SEARCH BODY/TEXT, decoding the message once per kind."""
    done: dict[bool, str] = {}

    def text(with_header: bool) -> str:
        if with_header not in done:
            done[with_header] = message_text(raw, with_header)
        return done[with_header]

    return text


def _headers_suffice(query: list) -> bool:
    """Whether every item renders from the top-level header section alone (ENVELOPE,
    RFC822.HEADER, BODY[HEADER], BODY[HEADER.FIELDS (...)], and metadata)."""
    return all(
        item.type in _FROM_HEADER
        or (item.type == "body" and not item.part and item.header is not None)
        for item in query
    )


def _is_section(item: Any) -> bool:
    """BODY[...] (a section, maybe empty) as opposed to BODY, the structure."""
    return bool(item.header is not None or item.text or item.mime or item.empty or item.part)
