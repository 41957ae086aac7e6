"""Mailboxes as Exchange keeps them: folders, messages with two kinds of id, and a change log.

Every message has an immutable id for life and a REST id that changes whenever it moves to
another folder (Graph's default ids). Every change takes the next number of a per-mailbox
counter, and a message leaving a folder leaves a :class:`Removal` behind; delta queries are
ranges over those numbers, so a client sees exactly what changed since its deltaLink.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property

from .._directory import User
from .._provider import SentMessage
from .mime import FileAttachment, Summary, summarize, with_attachments

# Outlook's well-known folder names and the display names the folders carry.
WELL_KNOWN = {
    "inbox": "Inbox",
    "drafts": "Drafts",
    "sentitems": "Sent Items",
    "deleteditems": "Deleted Items",
    "archive": "Archive",
}
_REST_PREFIX = "AAMkAGI2"
_IMMUTABLE_PREFIX = "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A"
_FOLDER_PREFIX = "AQMkADAwATM3"
_ATTACHMENT_PREFIX = "AAMkAGI2AAABEgAQ"


def new_id(prefix: str) -> str:
    """Case-sensitive base64 with ``-``, ``_`` and ``=`` in it, like Exchange ids."""
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(46)).decode("ascii")


def new_item_id() -> str:
    """An immutable id: what an item keeps for life, whatever folder it moves to."""
    return new_id(_IMMUTABLE_PREFIX)


def new_attachment_id() -> str:
    return new_id(_ATTACHMENT_PREFIX)


@dataclass(frozen=True)
class Folder:
    id: str
    name: str  # the well-known name
    display_name: str


@dataclass
class Message:
    immutable_id: str
    rest_id: str
    folder_id: str
    raw: bytes  # the MIME as received or created; attachments added through Graph are separate
    received: datetime
    created: datetime
    arrival: int  # tie-break for equal receivedDateTime, in arrival order
    is_read: bool = False
    is_draft: bool = False
    sent: datetime | None = None
    flag: str = "notFlagged"
    modified: datetime | None = None
    seq: int = 0  # the change number of the last change
    attachments: list[FileAttachment] = field(default_factory=list)
    conversation_id: str = field(default_factory=lambda: new_id("AAQkAGI2"))
    # Single-value extended properties set through Graph, by normalized id (see messages.py).
    extended: dict[str, str] = field(default_factory=dict)

    @cached_property
    def summary(self) -> Summary:
        return summarize(self.raw)

    def replace_content(self, raw: bytes) -> None:
        """The MIME as sent replaces a draft's; the attachments are part of it now."""
        self.raw = raw
        self.attachments.clear()
        self.__dict__.pop("summary", None)  # drop the cached_property's value

    def mime(self) -> bytes:
        return with_attachments(self.raw, tuple(self.attachments))

    def id(self, immutable: bool) -> str:
        return self.immutable_id if immutable else self.rest_id

    @property
    def change_key(self) -> str:
        return "CQAAABYAAAD" + base64.b64encode(self.seq.to_bytes(8, "big")).decode()

    @property
    def has_attachments(self) -> bool:
        return self.summary.has_attachments or any(not a.is_inline for a in self.attachments)


@dataclass(frozen=True)
class Removal:
    """A message that left a folder (moved or deleted), for delta's ``@removed``."""

    seq: int
    folder_id: str
    rest_id: str
    immutable_id: str

    def id(self, immutable: bool) -> str:
        return self.immutable_id if immutable else self.rest_id


class Mailbox:
    """One user's folders, messages and sent mail."""

    def __init__(self, user: User, clock: Callable[[], float]) -> None:
        self.user = user
        self._clock = clock
        self.folders = {
            name: Folder(new_id(_FOLDER_PREFIX), name, display)
            for name, display in WELL_KNOWN.items()
        }
        self.messages: dict[str, Message] = {}  # by immutable id
        self._by_rest: dict[str, str] = {}
        self.removals: list[Removal] = []
        self.sent: list[SentMessage] = []
        self.seq = 0
        self._arrivals = 0

    def now(self) -> datetime:
        """The sandbox clock, to the second like Graph's timestamps."""
        return datetime.fromtimestamp(int(self._clock()), UTC)

    def folder(self, name_or_id: str) -> Folder | None:
        """A folder by well-known name (any case) or by id (exact)."""
        found = self.folders.get(name_or_id.lower())
        if found is not None:
            return found
        return next((f for f in self.folders.values() if f.id == name_or_id), None)

    def find(self, message_id: str) -> Message | None:
        """By immutable id or current REST id; a REST id from before a move finds nothing."""
        found = self.messages.get(message_id)
        if found is not None:
            return found
        immutable = self._by_rest.get(message_id)
        return self.messages.get(immutable) if immutable else None

    def in_folder(self, folder: Folder) -> list[Message]:
        return [m for m in self.messages.values() if m.folder_id == folder.id]

    def add(
        self,
        raw: bytes,
        folder: Folder,
        received: datetime | None = None,
        is_read: bool = False,
        is_draft: bool = False,
    ) -> Message:
        now = self.now()
        self._arrivals += 1
        message = Message(
            immutable_id=new_item_id(),
            rest_id=new_id(_REST_PREFIX),
            folder_id=folder.id,
            raw=raw,
            received=(received or now).astimezone(UTC).replace(microsecond=0),
            created=now,
            arrival=self._arrivals,
            is_read=is_read,
            is_draft=is_draft,
        )
        self.messages[message.immutable_id] = message
        self._by_rest[message.rest_id] = message.immutable_id
        self.touch(message)
        return message

    def touch(self, message: Message) -> None:
        """Record a change to ``message`` (it shows up in the next delta of its folder)."""
        self.seq += 1
        message.seq = self.seq
        message.modified = self.now()

    def _leave(self, message: Message) -> None:
        self.seq += 1
        self.removals.append(
            Removal(self.seq, message.folder_id, message.rest_id, message.immutable_id)
        )
        del self._by_rest[message.rest_id]

    def move(self, message: Message, folder: Folder) -> Message:
        """Exchange copies to the destination and removes the original: a new REST id."""
        self._leave(message)
        message.folder_id = folder.id
        message.rest_id = new_id(_REST_PREFIX)
        self._by_rest[message.rest_id] = message.immutable_id
        self.touch(message)
        return message

    def delete(self, message: Message) -> None:
        self._leave(message)
        del self.messages[message.immutable_id]

    def changes(
        self, folder: Folder, after: int, until: int, removals: bool
    ) -> list[Message | Removal]:
        """What changed in ``folder`` with change numbers in (after, until], in order.

        A first sync passes ``removals=False``: there is nothing to remove, only what is there.
        """
        items: list[Message | Removal] = [
            m for m in self.in_folder(folder) if after < m.seq <= until
        ]
        if removals:
            items += [
                r for r in self.removals if r.folder_id == folder.id and after < r.seq <= until
            ]
        return sorted(items, key=lambda item: item.seq)


class MailStore:
    """Every Microsoft user's mailbox, created on first use."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._boxes: dict[str, Mailbox] = {}

    def mailbox(self, user: User) -> Mailbox:
        key = user.address.casefold()
        if key not in self._boxes:
            self._boxes[key] = Mailbox(user, self._clock)
        return self._boxes[key]
