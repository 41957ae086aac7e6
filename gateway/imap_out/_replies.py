"""The texts of the IMAP server's replies, in one place (as :mod:`gateway.smtp_in.replies` is for
SMTP): the words a client sees, Dovecot's where a client may match them, never Python's.

Constants are the text after the tag and status (``OK``/``NO``/``BAD``); functions build the
few that carry a value.
"""

from __future__ import annotations

# -- reading commands ----------------------------------------------------------------------------
LINE_TOO_LONG = b"BYE Command line too long"
TOO_MANY_PIPELINED = b"BYE Too many pipelined commands"
INVALID_TAG = b"BAD Error in IMAP command: invalid tag"
UNKNOWN_COMMAND = b"Error in IMAP command: unknown command"
UNSUPPORTED_COMMAND = b"Unsupported command"
INVALID_ARGUMENTS = b"Error in IMAP command: invalid arguments"
INTERNAL_ERROR = b"[SERVERBUG] Internal error, the command was not run"
LITERAL_READY = b"Ready for literal data"


def literal_too_long(limit: int) -> bytes:
    return b"[TOOBIG] Literal too long: at most %d octets" % limit


def illegal_syntax(text: str) -> bytes:
    """Stock Twisted's sentence for its own syntax errors, kept: clients have seen it."""
    return b"Illegal syntax: " + ascii_text(text)


def illegal_operation(text: str) -> bytes:
    return b"Illegal operation: " + ascii_text(text)


def illegal_mailbox_name(text: str) -> bytes:
    return b"Illegal mailbox name: " + ascii_text(text)


# -- mailboxes -----------------------------------------------------------------------------------
NO_SUCH_MAILBOX = b"[NONEXISTENT] No such mailbox"
CANNOT_SELECT = b"Mailbox cannot be selected"
ONLY_INBOX = b"[TRYCREATE] No such mailbox"
NO_COPY = b"[CANNOT] COPY is not supported: only INBOX exists"
NO_APPEND = b"[CANNOT] APPEND is not supported: the INBOX is read-only"
NO_SEARCH = b"[CANNOT] SEARCH is not supported by this mailbox"
READ_ONLY = b"[READ-ONLY] Mailbox is read-only"


def unavailable(text: str) -> bytes:
    """The provider's sentence (``MailboxUnavailable``): temporary, not a server bug."""
    return b"[UNAVAILABLE] " + ascii_text(text)


def failed(command: bytes) -> bytes:
    """An unexpected failure: the details go to the log, the client gets no Python text."""
    return b"[SERVERBUG] " + command + b" failed"


# -- SEARCH, STORE, FETCH ------------------------------------------------------------------------
SEARCH_BAD_KEYS = b"Error in IMAP command SEARCH: missing or invalid keys"
STORE_BAD_ITEM = b"Error in IMAP command STORE: invalid data item"
MISSING_MESSAGE_SET = "Missing message set"
MISSING_FETCH_ITEMS = "Missing FETCH items"
INVALID_FETCH_ITEMS = "Invalid FETCH items"
SOME_NOT_FETCHED = b"[SERVERBUG] Some messages could not be fetched"


def ascii_text(text: str) -> bytes:
    """``text`` on one line of ASCII: an exception's or provider's words never break the
    protocol (a CR or LF would end the reply line, 8-bit would be refused by strict clients)."""
    return text.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
