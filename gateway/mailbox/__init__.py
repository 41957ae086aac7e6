"""The provider-neutral INBOX view shared by IMAP and POP3.

:class:`MailboxView` keeps one account's provider id → UID map in the store and syncs it from a
:class:`MailboxSource` (:class:`GraphSource`, :class:`GmailSource`); frontends never see HTTP.
"""

from ._sources import (
    SEEN,
    Changes,
    CursorExpired,
    GmailSource,
    GraphSource,
    MailboxSource,
    RemoteMessage,
    Snapshot,
)
from ._uidmap import Applied, UidMap
from ._view import BodyCache, MailboxView, MessageInfo

__all__ = [
    "SEEN",
    "Applied",
    "BodyCache",
    "Changes",
    "CursorExpired",
    "GmailSource",
    "GraphSource",
    "MailboxSource",
    "MailboxView",
    "MessageInfo",
    "RemoteMessage",
    "Snapshot",
    "UidMap",
]
