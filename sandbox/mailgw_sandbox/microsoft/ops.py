"""What a person does in Outlook, for the control API, the demo and tests.

Ids handed out and accepted here are immutable ids, the ones a gateway sees when it sends
``Prefer: IdType="ImmutableId"`` (as it should); current REST ids are accepted too.
"""

from __future__ import annotations

from datetime import datetime

from .._directory import User
from .._provider import SentMessage
from .mailstore import Mailbox, MailStore, Message

# The control API's destination names and the Outlook folders they mean.
_DESTINATIONS = {"inbox": "inbox", "archive": "archive", "trash": "deleteditems"}


class OutlookOps:
    def __init__(self, store: MailStore) -> None:
        self.store = store

    def seed_inbox(self, user: User, raw: bytes, received_at: datetime | None = None) -> str:
        box = self.store.mailbox(user)
        return box.add(raw, box.folders["inbox"], received=received_at).immutable_id

    def inbox_ids(self, user: User) -> list[str]:
        box = self.store.mailbox(user)
        messages = sorted(
            box.in_folder(box.folders["inbox"]), key=lambda m: (m.received, m.arrival)
        )
        return [m.immutable_id for m in messages]

    def sent(self, user: User) -> list[SentMessage]:
        return list(self.store.mailbox(user).sent)

    def move(self, user: User, message_id: str, destination: str) -> str:
        folder_name = _DESTINATIONS.get(destination)
        if folder_name is None:
            raise ValueError(f"destination must be one of {', '.join(_DESTINATIONS)}")
        box, message = self._message(user, message_id)
        return box.move(message, box.folders[folder_name]).immutable_id

    def delete(self, user: User, message_id: str) -> None:
        box, message = self._message(user, message_id)
        box.delete(message)

    def set_read(self, user: User, message_id: str, read: bool) -> None:
        box, message = self._message(user, message_id)
        if message.is_read != read:
            message.is_read = read
            box.touch(message)

    def set_flagged(self, user: User, message_id: str, flagged: bool) -> None:
        """Outlook's "Flag" / "Clear flag": the message's followupFlag.flagStatus becomes
        ``flagged`` or ``notFlagged`` (the values of the followupFlag resource type,
        https://learn.microsoft.com/en-us/graph/api/resources/followupflag); a change shows up
        in the folder's next delta like any other."""
        box, message = self._message(user, message_id)
        status = "flagged" if flagged else "notFlagged"
        if message.flag != status:
            message.flag = status
            box.touch(message)

    def _message(self, user: User, message_id: str) -> tuple[Mailbox, Message]:
        box = self.store.mailbox(user)
        message = box.find(message_id)
        if message is None:
            raise KeyError(message_id)
        return box, message
