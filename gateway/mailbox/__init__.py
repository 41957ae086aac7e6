"""The provider-neutral INBOX view shared by IMAP and POP3.

:class:`MailboxView` keeps one account's provider id → UID map in the store and syncs it from a
``MailboxSource`` (``gateway.providers``: Graph, Gmail, upstream IMAP and POP3); frontends
never see HTTP or the upstream protocols. :class:`MailboxViews` holds the open views, one per
account, for the IMAP and POP3 listeners.
"""

from ._registry import MailboxViews
from ._uidmap import Applied, UidMap
from ._view import (
    KNOWN_FLAGS,
    BodyCache,
    MailboxUnavailable,
    MailboxView,
    MessageInfo,
    OnDelete,
    ReadingPolicy,
    crlf_form,
    header_of,
)

__all__ = [
    "KNOWN_FLAGS",
    "Applied",
    "BodyCache",
    "MailboxUnavailable",
    "MailboxView",
    "MailboxViews",
    "MessageInfo",
    "OnDelete",
    "ReadingPolicy",
    "UidMap",
    "crlf_form",
    "header_of",
]
