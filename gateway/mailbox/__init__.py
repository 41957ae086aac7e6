"""The provider-neutral INBOX view shared by IMAP and POP3.

:class:`MailboxView` keeps one account's provider id → UID map in the store and syncs it from a
:class:`MailboxSource` (:class:`GraphSource`, :class:`GmailSource`, the upstream IMAP and POP3
sources); frontends never see HTTP or the upstream protocols.
"""

from ._sources import (
    SEEN,
    Changes,
    CursorExpired,
    GmailSource,
    GraphSource,
    MailboxSource,
    NotSupported,
    RemoteMessage,
    Snapshot,
)
from ._uidmap import Applied, UidMap
from ._upstream import UpstreamImapSource, UpstreamPop3Source
from ._view import (
    KNOWN_FLAGS,
    BodyCache,
    MailboxUnavailable,
    MailboxView,
    MessageInfo,
    OnDelete,
    ReadingPolicy,
    crlf_form,
)

__all__ = [
    "KNOWN_FLAGS",
    "SEEN",
    "Applied",
    "BodyCache",
    "Changes",
    "CursorExpired",
    "GmailSource",
    "GraphSource",
    "MailboxSource",
    "MailboxUnavailable",
    "MailboxView",
    "MessageInfo",
    "NotSupported",
    "OnDelete",
    "ReadingPolicy",
    "RemoteMessage",
    "Snapshot",
    "UidMap",
    "UpstreamImapSource",
    "UpstreamPop3Source",
    "crlf_form",
]
