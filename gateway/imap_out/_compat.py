"""A compatibility subclass of Twisted's IMAP4Server: the measured defects fixed.

docs/protocol-servers.md §2–§3 lists what stock ``IMAP4Server`` gets wrong; each override names
the defect it fixes. The work is split by job: reading commands (pipelining, literals, tags,
argument parsing) is :mod:`._reading`, FETCH is :mod:`._fetch`, the texts of the replies are
:mod:`._replies`, and what a mailbox may offer beyond ``IMailbox`` is :mod:`._contract`. This
module holds the connection and the command handlers with their error mapping: a failure is
answered ``NO`` with a sentence (the provider's for ``MailboxUnavailable``), never with Python's
text and never by dropping the connection.

Only public hooks of ``IMAP4Server`` are overridden (the ``do_*`` handlers and their
``<state>_<COMMAND>`` tables); the few private parts still used are pinned by
``tests/unit/test_library_hooks.py``.
"""

from __future__ import annotations

import contextlib
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import connectionDone
from twisted.mail import imap4
from twisted.python import log
from twisted.python.failure import Failure

from ..mailbox import MailboxUnavailable
from . import _replies
from ._contract import GatewayMailbox
from ._fetch import FetchStreaming
from ._reading import CommandReading
from ._search import UnsupportedSearch

_STORE_MODES = {p + b"FLAGS" + s for p in (b"", b"+", b"-") for s in (b"", b".SILENT")}


class CompatIMAP4Server(CommandReading, FetchStreaming, imap4.IMAP4Server):
    """IMAP4Server with pipelining, listener, SELECT, STATUS, SEARCH, STORE, FETCH and
    sequence-set fixes."""

    # Twisted's ``account = None`` types it None; from LOGIN on it is the logged-in IAccount.
    account: Any

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Disable Nagle: with delayed ACK it costs ~40 ms per BODY[] response."""
        with contextlib.suppress(Exception):  # TLS wrappers or test transports may lack it
            self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Leave the mailbox's listeners: stock Twisted keeps dead sessions there forever."""
        self._lost = True
        self._close_mailbox()
        self._command = None
        super().connectionLost(reason)

    def _close_mailbox(self) -> None:
        mbox, self.mbox = self.mbox, None
        if mbox is None:
            return
        try:
            mbox.removeListener(self)
        except Exception:
            log.err(None, "imap: removeListener failed")
        _close(mbox)

    def mailbox_changed(self) -> None:
        """:class:`~._contract.MailboxListener`: changes wait for NOOP here; the gateway's
        server reports them at once to an idling client."""

    def do_STARTTLS(self, tag: bytes) -> None:
        """Drop whatever was pipelined after STARTTLS in clear text (STARTTLS injection)."""
        self.clearLineBuffer()
        super().do_STARTTLS(tag)

    unauth_STARTTLS = (do_STARTTLS,)

    def capabilities(self) -> dict[bytes, Any]:
        caps = super().capabilities()
        caps[b"ID"] = None
        caps[b"UNSELECT"] = None
        caps[b"LITERAL-"] = None  # RFC 7888: {n+} up to LITERAL_LIMIT octets
        return caps

    def do_ID(self, tag: bytes, _args: bytes) -> None:
        """RFC 2971; clients such as Outlook and iOS send ID and some give up on BAD."""
        self.sendUntaggedResponse(b'ID ("name" "mail gateway")')
        self.sendPositiveResponse(tag, b"ID completed")

    unauth_ID = (do_ID, imap4.IMAP4Server.arg_line)
    auth_ID = unauth_ID
    select_ID = unauth_ID

    # -- SELECT / EXAMINE / UNSELECT -------------------------------------------------------------

    def do_SELECT(self, tag: bytes, name: bytes | str) -> None:
        self._select(tag, name, True, b"SELECT")

    def do_EXAMINE(self, tag: bytes, name: bytes | str) -> None:
        self._select(tag, name, False, b"EXAMINE")

    def _select(self, tag: bytes, name: bytes | str, writeable: bool, command: bytes) -> None:
        if self.mbox:  # leave the selected mailbox first (RFC 3501 6.3.1)
            self._close_mailbox()
            self.state = "auth"
        deferred = maybeDeferred(self.account.select, _mailbox_name(name), writeable)
        deferred.addCallback(self._selected, command, tag)
        deferred.addErrback(self._select_failed, command, tag)

    auth_SELECT = (do_SELECT, imap4.IMAP4Server.arg_astring)
    select_SELECT = auth_SELECT
    auth_EXAMINE = (do_EXAMINE, imap4.IMAP4Server.arg_astring)
    select_EXAMINE = auth_EXAMINE

    def _selected(self, mbox: Any, command: bytes, tag: bytes) -> None:
        """SELECT with the RFC 3501-required UIDNEXT, PERMANENTFLAGS and UNSEEN responses, in
        Dovecot's order and words."""
        if mbox is None:
            if not self._lost:
                self.sendNegativeResponse(tag, _replies.NO_SUCH_MAILBOX)
            return
        flags = [f.encode() if isinstance(f, str) else f for f in mbox.getFlags()]
        if self._lost or b"\\noselect" in [f.lower() for f in flags]:
            # The client left while the backend answered, or the mailbox cannot be selected:
            # never listen for it, and let the mailbox let go of what it holds.
            _close(mbox)
            if not self._lost:
                self.sendNegativeResponse(tag, _replies.CANNOT_SELECT)
            return
        writeable = mbox.isWriteable()
        ours = isinstance(mbox, GatewayMailbox)
        kept = mbox.getPermanentFlags() if ours else (flags if writeable else [])
        kept = [f.encode() if isinstance(f, str) else f for f in kept]
        self.sendUntaggedResponse(b"FLAGS (" + b" ".join(flags) + b")")
        what = b"Flags permitted." if kept else b"Read-only mailbox."
        self.sendPositiveResponse(None, b"[PERMANENTFLAGS (" + b" ".join(kept) + b")] " + what)
        self.sendUntaggedResponse(b"%d EXISTS" % mbox.getMessageCount())
        self.sendUntaggedResponse(b"%d RECENT" % mbox.getRecentCount())
        first_unseen = getattr(mbox, "getFirstUnseen", None)  # optional in stock IMailbox
        unseen = first_unseen() if first_unseen else None
        if unseen:
            self.sendPositiveResponse(None, b"[UNSEEN %d] First unseen." % unseen)
        self.sendPositiveResponse(None, b"[UIDVALIDITY %d] UIDs valid" % mbox.getUIDValidity())
        self.sendPositiveResponse(None, b"[UIDNEXT %d] Predicted next UID" % mbox.getUIDNext())
        mbox.addListener(self)
        self.mbox = mbox
        self.state = "select"
        mode = b"READ-WRITE" if writeable else b"READ-ONLY"
        self.sendPositiveResponse(tag, b"[" + mode + b"] " + command + b" completed")

    def _select_failed(self, failure: Any, command: bytes, tag: bytes) -> None:
        if failure.check(MailboxUnavailable):  # the provider's sentence, not a server bug
            self.sendNegativeResponse(tag, _replies.unavailable(str(failure.value)))
            return
        log.err(failure, "imap: select failed")
        self.sendNegativeResponse(tag, command + b" failed: server error")

    def do_UNSELECT(self, tag: bytes) -> None:
        """RFC 3691: leave the mailbox without the implicit EXPUNGE of CLOSE."""
        self._close_mailbox()
        self.state = "auth"
        self.sendPositiveResponse(tag, b"UNSELECT completed")

    select_UNSELECT = (do_UNSELECT,)

    # -- STATUS ----------------------------------------------------------------------------------

    def do_STATUS(self, tag: bytes, mailbox: bytes | str, names: list) -> None:
        """STATUS opens the mailbox only to count: stock never closes it (a mailbox that
        watches for changes would then live, and be told of every change, forever), and its
        failures answer BAD with Python text."""
        wanted = [n.decode("ascii") if isinstance(n, bytes) else n for n in names]
        name = _mailbox_name(mailbox)
        deferred = maybeDeferred(self.account.select, name, 0)
        deferred.addCallback(self._status_opened, tag, name, wanted)
        deferred.addErrback(self._status_failed, tag)

    auth_STATUS = (do_STATUS, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_plist)
    select_STATUS = auth_STATUS

    def _status_opened(self, mbox: Any, tag: bytes, name: str, names: list[str]) -> None:
        if not mbox:
            self.sendNegativeResponse(tag, _replies.NO_SUCH_MAILBOX)
            return
        deferred = maybeDeferred(mbox.requestStatus, names)
        deferred.addBoth(_closing, mbox)
        deferred.addCallbacks(
            self._status_counted, self._status_failed, callbackArgs=(tag, name), errbackArgs=(tag,)
        )

    def _status_counted(self, status: dict[str, Any], tag: bytes, name: str) -> None:
        counts = " ".join(f"{item} {value}" for item, value in status.items()).encode("ascii")
        self.sendUntaggedResponse(b"STATUS " + name.encode("imap4-utf-7") + b" (" + counts + b")")
        self.sendPositiveResponse(tag, b"STATUS complete")

    def _status_failed(self, failure: Any, tag: bytes) -> None:
        if failure.check(MailboxUnavailable):
            self.sendNegativeResponse(tag, _replies.unavailable(str(failure.value)))
            return
        log.err(failure, "imap: status failed")
        self.sendNegativeResponse(tag, _replies.failed(b"STATUS"))

    # -- SEARCH ----------------------------------------------------------------------------------

    def do_SEARCH(self, tag: bytes, charset: bytes | None, query: list, uid: int = 0) -> None:
        """SEARCH by the mailbox (``ISearchableMailbox``, as the gateway's INBOX is); stock's
        own loop over every message is not offered."""
        mbox = self.mbox
        searchable = imap4.ISearchableMailbox(mbox, None)
        if searchable is None:
            self.sendNegativeResponse(tag, _replies.NO_SEARCH)
            return
        deferred = maybeDeferred(searchable.search, query, uid=uid)
        deferred.addCallback(self._searched, tag, mbox, uid)
        deferred.addErrback(self._search_failed, tag)

    select_SEARCH = (do_SEARCH, CommandReading.opt_charset, CommandReading.arg_searchkeys)

    def _searched(self, result: Any, tag: bytes, mbox: Any, uid: int) -> None:
        """``* SEARCH`` and the numbers; no trailing space when nothing matched (stock sent
        ``* SEARCH `` then, which strict parsers refuse; RFC 3501 7.2.5, as Dovecot)."""
        numbers = [mbox.getUID(seq) if uid else seq for seq in result]
        self.sendUntaggedResponse(b" ".join([b"SEARCH", *(b"%d" % n for n in numbers)]))
        self.sendPositiveResponse(tag, b"SEARCH completed")

    def _search_failed(self, failure: Any, tag: bytes) -> None:
        """SEARCH failed: a refused key keeps its sentence, anything else no Python text."""
        if failure.check(UnsupportedSearch, imap4.IllegalQueryError, imap4.IllegalClientResponse):
            self.sendBadResponse(tag, _replies.ascii_text(str(failure.value)))
            return
        if failure.check(IndexError, RecursionError):  # "SEARCH NOT", "OR SEEN", 3000 NOTs
            self.sendBadResponse(tag, _replies.SEARCH_BAD_KEYS)
            return
        log.err(failure, "imap: search failed")
        self.sendNegativeResponse(tag, _replies.failed(b"SEARCH"))

    # -- STORE, COPY, APPEND ---------------------------------------------------------------------

    def do_STORE(self, tag: bytes, messages: Any, mode: bytes, flags: list, uid: int = 0) -> None:
        """STORE whose failures answer NO (stock answers BAD to a read-only mailbox)."""
        mode = mode.upper()
        if mode not in _STORE_MODES:  # stock took any other word as FLAGS (replace)
            self.sendBadResponse(tag, _replies.STORE_BAD_ITEM)
            return
        silent = mode.endswith(b"SILENT")
        how = 1 if mode.startswith(b"+") else -1 if mode.startswith(b"-") else 0
        names = [f.decode("utf-8", "replace") if isinstance(f, bytes) else f for f in flags]
        mbox = self.mbox
        deferred = maybeDeferred(mbox.store, messages, names, how, uid=uid)
        deferred.addCallbacks(
            self._stored,
            self._store_failed,
            callbackArgs=(tag, mbox, uid, silent),
            errbackArgs=(tag,),
        )

    def _stored(self, result: Any, tag: bytes, mbox: Any, uid: int, silent: bool) -> None:
        if result and not silent:
            for seq, flags in result.items():
                names = b" ".join(f.encode() if isinstance(f, str) else f for f in flags)
                suffix = b" UID %d" % mbox.getUID(seq) if uid else b""
                self.sendUntaggedResponse(b"%d FETCH (FLAGS (%b)%b)" % (seq, names, suffix))
        self.sendPositiveResponse(tag, b"STORE completed")

    def _store_failed(self, failure: Any, tag: bytes) -> None:
        if failure.check(imap4.ReadOnlyMailbox):
            self.sendNegativeResponse(tag, _replies.READ_ONLY)
        elif failure.check(imap4.MailboxException):
            self.sendNegativeResponse(tag, _replies.ascii_text(str(failure.value)))
        else:
            log.err(failure, "imap: store failed")
            self.sendNegativeResponse(tag, _replies.failed(b"STORE"))

    def do_COPY(self, tag: bytes, messages: Any, mailbox: bytes | str, uid: int = 0) -> None:
        """Refused without opening anything: only INBOX exists, and it is read-only. (Stock
        opens the target, downloads every message to copy and never closes the target.)"""
        name = mailbox.decode("utf-8", "replace") if isinstance(mailbox, bytes) else mailbox
        if name.upper() != "INBOX":
            self.sendNegativeResponse(tag, _replies.ONLY_INBOX)
            return
        self.sendNegativeResponse(tag, _replies.NO_COPY)

    def do_APPEND(self, tag: bytes, _rest: bytes) -> None:
        """Refuse APPEND before its literal is read: the INBOX is read-only.

        Stock answers ``+`` to any announced size and buffers it (a temporary file beyond 10
        MiB, so ``{999999999}`` let one client fill the disk) only to have ``addMessage``
        refuse it; an APPEND to another mailbox even raised TypeError and left the client
        waiting forever. RFC 3501 lets the server answer NO instead of the continuation.
        """
        self.sendNegativeResponse(tag, _replies.NO_APPEND)

    auth_APPEND = (do_APPEND, imap4.IMAP4Server.arg_line)
    select_APPEND = auth_APPEND

    select_STORE = (
        do_STORE,
        CommandReading.arg_seqset,
        imap4.IMAP4Server.arg_atom,
        imap4.IMAP4Server.arg_flaglist,
    )
    select_COPY = (do_COPY, CommandReading.arg_seqset, imap4.IMAP4Server.arg_finalastring)
    select_FETCH = (
        FetchStreaming.do_FETCH,
        CommandReading.arg_seqset,
        CommandReading.arg_fetchatt,
    )


def _mailbox_name(name: bytes | str) -> str:
    """A mailbox name as the account's ``select`` takes it (modified UTF-7 decoded, RFC 3501
    5.1.3), as stock's private ``_parseMbox`` does."""
    if isinstance(name, str):
        return name
    try:
        return name.decode("imap4-utf-7")
    except Exception as error:
        raise imap4.IllegalMailboxEncoding(name) from error


def _closing(result: Any, mbox: Any) -> Any:
    """Close ``mbox`` after a step, passing its result (or failure) on."""
    _close(mbox)
    return result


def _close(mbox: Any) -> None:
    """ICloseableMailbox.close, if the mailbox has it; a failure is logged, never raised."""
    closeable = imap4.ICloseableMailbox(mbox, None)
    if closeable is not None:
        maybeDeferred(closeable.close).addErrback(log.err)
