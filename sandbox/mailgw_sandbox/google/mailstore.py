"""Gmail's data model: messages carrying labels (no folders), and a history of every change.

History ids grow but skip numbers, and only a bounded window of records is kept, so a client
that asks for changes from too long ago gets 404 and must resync — as with the real service.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from functools import cached_property
from typing import Any, Literal

from .._directory import Directory, User
from .._provider import SentMessage
from . import mime

SYSTEM_LABELS = frozenset(
    {
        "INBOX",
        "SENT",
        "TRASH",
        "SPAM",
        "UNREAD",
        "STARRED",
        "IMPORTANT",
        "DRAFT",
        "CHAT",
        "CATEGORY_PERSONAL",
        "CATEGORY_SOCIAL",
        "CATEGORY_PROMOTIONS",
        "CATEGORY_UPDATES",
        "CATEGORY_FORUMS",
    }
)
NOT_APPLICABLE = frozenset({"SENT", "DRAFT", "CHAT"})  # system-managed: modify refuses them
HISTORY_WINDOW = 1000  # records kept per mailbox; older startHistoryIds get 404

ChangeType = Literal["messageAdded", "messageDeleted", "labelAdded", "labelRemoved"]
CHANGE_TYPES: tuple[ChangeType, ...] = (
    "messageAdded",
    "messageDeleted",
    "labelAdded",
    "labelRemoved",
)
_CHANGE_KEYS: dict[ChangeType, str] = {
    "messageAdded": "messagesAdded",
    "messageDeleted": "messagesDeleted",
    "labelAdded": "labelsAdded",
    "labelRemoved": "labelsRemoved",
}


class HistoryGone(Exception):
    """The start id is older than the history the mailbox still keeps."""


class NoRecipients(Exception):
    """Gmail takes recipients from To/Cc/Bcc only; none were there."""


@dataclass
class StoredMessage:
    id: str
    thread_id: str
    raw: bytes
    labels: set[str]
    internal_date: int  # epoch ms
    history_id: int
    snippet: str
    trashed_from_inbox: bool = False

    @cached_property
    def headers(self) -> Message:
        return mime.parse_headers(self.raw)

    @property
    def message_id(self) -> str | None:
        return mime.message_id(self.headers)

    def header_text(self, name: str) -> str:
        """All values of a header, decoded, for searching."""
        return " ".join(h["value"] for h in mime.header_json(self.headers, {name.lower()}))

    def ref(self) -> dict[str, Any]:
        return {"id": self.id, "threadId": self.thread_id}

    def summary(self) -> dict[str, Any]:
        """id, threadId and labelIds; Google omits empty lists from JSON."""
        body = self.ref()
        if self.labels:
            body["labelIds"] = sorted(self.labels)
        return body


@dataclass(frozen=True)
class Change:
    type: ChangeType
    message: dict[str, Any]  # the message summary right after the change
    label_ids: tuple[str, ...] = ()

    def touches(self, label: str) -> bool:
        return label in self.label_ids or label in self.message.get("labelIds", ())

    def json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message}
        if self.label_ids:
            body["labelIds"] = list(self.label_ids)
        return body


@dataclass(frozen=True)
class HistoryRecord:
    id: int
    changes: tuple[Change, ...]

    def filtered(self, types: set[str], label: str | None) -> HistoryRecord | None:
        kept = tuple(
            c for c in self.changes if c.type in types and (label is None or c.touches(label))
        )
        return HistoryRecord(self.id, kept) if kept else None

    def json(self) -> dict[str, Any]:
        refs = {
            c.message["id"]: {k: c.message[k] for k in ("id", "threadId")} for c in self.changes
        }
        body: dict[str, Any] = {"id": str(self.id), "messages": list(refs.values())}
        for change in self.changes:
            body.setdefault(_CHANGE_KEYS[change.type], []).append(change.json())
        return body


class Mailbox:
    """One user's messages and history."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.messages: dict[str, StoredMessage] = {}
        self.history: list[HistoryRecord] = []
        self.history_id = 100_000 + secrets.randbelow(900_000)
        self.history_floor = self.history_id

    def get(self, message_id: str) -> StoredMessage:
        message = self.messages.get(message_id)
        if message is None:
            raise KeyError(message_id)
        return message

    def threads(self) -> set[str]:
        return {m.thread_id for m in self.messages.values()}

    def add(
        self, raw: bytes, labels: Iterable[str], internal_date: int, thread_id: str | None = None
    ) -> StoredMessage:
        message_id = self._new_id()
        message = StoredMessage(
            id=message_id,
            thread_id=thread_id if thread_id in self.threads() else message_id,
            raw=raw,
            labels=set(labels),
            internal_date=internal_date,
            history_id=self.history_id,
            snippet=mime.snippet(raw),
        )
        self.messages[message_id] = message
        self._record(message, "messageAdded")
        return message

    def change_labels(
        self, message: StoredMessage, add: Iterable[str] = (), remove: Iterable[str] = ()
    ) -> None:
        """Apply label changes; one history record holds what actually changed (if anything)."""
        added = sorted(set(add) - message.labels)
        removed = sorted(set(remove) & message.labels - set(added))
        message.labels |= set(added)
        message.labels -= set(removed)
        labelled: list[tuple[ChangeType, list[str]]] = [
            ("labelAdded", added),
            ("labelRemoved", removed),
        ]
        changes = [Change(kind, message.summary(), tuple(ids)) for kind, ids in labelled if ids]
        if changes:
            self._append(message, tuple(changes))

    def trash(self, message: StoredMessage) -> None:
        message.trashed_from_inbox = "INBOX" in message.labels
        self.change_labels(message, add={"TRASH"}, remove={"INBOX", "SPAM"})

    def untrash(self, message: StoredMessage) -> None:
        back = {"INBOX"} if message.trashed_from_inbox else set()
        self.change_labels(message, add=back, remove={"TRASH"})

    def delete(self, message_id: str) -> None:
        message = self.messages.pop(message_id, None)
        if message is None:
            raise KeyError(message_id)
        self._record(message, "messageDeleted")

    def history_since(self, start: int) -> list[HistoryRecord]:
        if start < self.history_floor:
            raise HistoryGone(start)
        return [record for record in self.history if record.id > start]

    def forget_history(self) -> None:
        """Drop every record, as Gmail does after a while: older start ids now get 404."""
        self.history.clear()
        self.history_floor = self.history_id

    def _record(self, message: StoredMessage, kind: ChangeType) -> None:
        self._append(message, (Change(kind, message.summary()),))

    def _append(self, message: StoredMessage, changes: tuple[Change, ...]) -> None:
        self.history_id += 1 + secrets.randbelow(9)  # increasing, never contiguous by design
        message.history_id = self.history_id
        self.history.append(HistoryRecord(self.history_id, changes))
        if len(self.history) > HISTORY_WINDOW:
            self.history_floor = self.history.pop(0).id

    def _new_id(self) -> str:
        """16 hex digits that grow with time, like Gmail's."""
        while True:
            candidate = f"{int(self.clock() * 1000) << 20 | secrets.randbelow(1 << 20):016x}"
            if candidate not in self.messages:
                return candidate


@dataclass
class GmailStore:
    """Every Google user's mailbox, plus what each one sent (for tests and the control API)."""

    directory: Directory
    mailboxes: dict[str, Mailbox] = field(default_factory=dict)
    sent_log: dict[str, list[SentMessage]] = field(default_factory=dict)

    def mailbox(self, user: User) -> Mailbox:
        key = user.address.casefold()
        if key not in self.mailboxes:
            self.mailboxes[key] = Mailbox(self.directory.clock)
        return self.mailboxes[key]

    def now_ms(self) -> int:
        return int(self.directory.clock() * 1000)

    def deliver(self, user: User, raw: bytes, internal_date: int | None = None) -> StoredMessage:
        """Mail arriving from outside: INBOX and UNREAD."""
        when = internal_date or mime.date_ms(mime.parse_headers(raw)) or self.now_ms()
        return self.mailbox(user).add(raw, {"INBOX", "UNREAD"}, when)

    def send(self, user: User, raw: bytes, thread_id: str | None = None) -> StoredMessage:
        """messages.send: fix From/Date/Message-ID, keep the SENT copy (with Bcc), and deliver
        to sandbox Google users among the recipients (without Bcc)."""
        now = datetime.fromtimestamp(self.directory.clock(), UTC)
        prepared, sender = mime.prepare_outgoing(raw, user, now)
        recipients = mime.recipients(mime.parse_headers(prepared))
        if not recipients:
            raise NoRecipients
        to_self = any(user.may_send_as(address) for address in recipients)
        labels = {"SENT", "INBOX", "UNREAD"} if to_self else {"SENT"}
        stored = self.mailbox(user).add(prepared, labels, self.now_ms(), thread_id)
        self.sent_log.setdefault(user.address.casefold(), []).append(
            SentMessage(
                id=stored.id,
                mailbox=user.address,
                from_address=sender,
                recipients=recipients,
                raw=prepared,
                saved_to_sent=True,
            )
        )
        delivered = mime.set_header(prepared, "Bcc", None)
        for address in recipients:
            other = self.directory.user(address)
            if other is not None and other.provider == "google" and other is not user:
                self.deliver(other, delivered, self.now_ms())
        return stored


class GmailOps:
    """What a person does in the Gmail web client, for the control API, the demo and tests."""

    def __init__(self, store: GmailStore) -> None:
        self.store = store

    def seed_inbox(self, user: User, raw: bytes, received_at: datetime | None = None) -> str:
        when = int(received_at.timestamp() * 1000) if received_at else None
        return self.store.deliver(user, raw, when).id

    def inbox_ids(self, user: User) -> list[str]:
        inbox = [m for m in self.store.mailbox(user).messages.values() if "INBOX" in m.labels]
        return [m.id for m in sorted(inbox, key=lambda m: (m.internal_date, m.id))]

    def sent(self, user: User) -> list[SentMessage]:
        return list(self.store.sent_log.get(user.address.casefold(), ()))

    def move(self, user: User, message_id: str, destination: str) -> str:
        """Gmail ids never change on a "move": it only changes labels."""
        mailbox = self.store.mailbox(user)
        message = mailbox.get(message_id)
        if destination == "archive":
            mailbox.change_labels(message, remove={"INBOX"})
        elif destination == "trash":
            mailbox.trash(message)
        elif destination == "inbox":
            mailbox.change_labels(message, add={"INBOX"}, remove={"TRASH", "SPAM"})
        else:
            raise ValueError(f"unknown destination {destination!r}: use archive, trash or inbox")
        return message_id

    def delete(self, user: User, message_id: str) -> None:
        self.store.mailbox(user).delete(message_id)

    def set_read(self, user: User, message_id: str, read: bool) -> None:
        mailbox = self.store.mailbox(user)
        message = mailbox.get(message_id)
        if read:
            mailbox.change_labels(message, remove={"UNREAD"})
        else:
            mailbox.change_labels(message, add={"UNREAD"})

    def set_flagged(self, user: User, message_id: str, flagged: bool) -> None:
        """Star or unstar: the STARRED system label, which a user may apply by hand ("Manage
        labels", https://developers.google.com/gmail/api/guides/labels). Like every label
        change it leaves a history record (labelAdded / labelRemoved)."""
        mailbox = self.store.mailbox(user)
        message = mailbox.get(message_id)
        if flagged:
            mailbox.change_labels(message, add={"STARRED"})
        else:
            mailbox.change_labels(message, remove={"STARRED"})
