"""A compatibility subclass of Twisted's IMAP4Server: the measured defects fixed.

docs/protocol-servers.md §2–§3 lists what stock ``IMAP4Server`` gets wrong; each override below
names the defect it fixes. FETCH is answered entirely by our own loop over the raw message bytes
(:mod:`._render`): byte-exact sections and Dovecot-identical BODYSTRUCTURE/ENVELOPE, and an
exception while rendering one message is logged and answered with ``NO`` instead of dropping the
connection. The mailbox objects must provide ``IMessageFile.open()`` (the raw RFC 822 bytes)
and a ``getSize()`` equal to the length of their CRLF form (``gateway.mailbox.crlf_form``), so
RFC822.SIZE never needs the body; a ``crlf_bytes`` attribute (that form, ready) saves a copy.
A mailbox may also provide ``fetch_items(messages, query, uid)``: it is then called instead of
``fetch`` with the parsed FETCH items, so it can download bodies only when an item renders them
(Twisted #9197).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from twisted.internet.defer import maybeDeferred, succeed
from twisted.mail import imap4
from twisted.python import log

from ..mailbox import MailboxUnavailable, crlf_form
from ..runtime import reactor
from . import _render
from ._search import UnsupportedSearch
from ._seqset import parse_seqset

# RFC 3501: tag = 1*<ASTRING-CHAR except "+">; command names are ASCII letters.
_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+')
_COMMAND = re.compile(rb"[A-Za-z][A-Za-z0-9]*")
_STORE_MODES = {p + b"FLAGS" + s for p in (b"", b"+", b"-") for s in (b"", b".SILENT")}
_BATCH = 25  # messages rendered per reactor turn: other connections keep being served
_MAX_PIPELINED = 1 << 20  # bytes queued behind a slow command before the client is cut off
_LITERAL_LIMIT = 4096  # octets of one literal (no APPEND here): LITERAL-'s bound (RFC 7888)
_LITERAL = re.compile(rb"\{(\d{1,10})(\+?)\}\Z")  # a literal announced at the end of a line
_INLINE_LITERAL = re.compile(rb"\{(\d{1,10})\}\r\n")  # as parse_command hands it on
_ATOM = re.compile(rb"([" + re.escape(imap4._atomChars) + rb"]+)(?: |\Z)")
_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPED = re.compile(rb"\\(.)", re.DOTALL)


class CompatIMAP4Server(imap4.IMAP4Server):
    """IMAP4Server with pipelining, listener, SELECT, STORE, FETCH and sequence-set fixes."""

    MAX_LENGTH = 65536  # Dovecot's limit; Twisted's 16 KiB drops long UID FETCH lines

    _inflight: bytes | None = None  # tag of the command being run; reading waits meanwhile
    _lost = False
    _throttle: _Throttle | None = None
    _command: list[bytes] | None = None  # a command whose literals are being read
    _literal_left = 0  # octets of the current literal still to come
    _refused = False  # the command was answered already: its literals are read and dropped

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Disable Nagle: with delayed ACK it costs ~40 ms per BODY[] response."""
        with contextlib.suppress(Exception):  # TLS wrappers or test transports may lack it
            self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
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

    def lineLengthExceeded(self, line: bytes) -> None:
        """Say why before closing (stock closes silently), as Dovecot does."""
        self.sendLine(b"* BYE Command line too long")
        self.transport.loseConnection()

    def do_STARTTLS(self, tag: bytes) -> None:
        """Drop whatever was pipelined after STARTTLS in clear text (STARTTLS injection)."""
        self._buffer = b""
        super().do_STARTTLS(tag)

    unauth_STARTTLS = (do_STARTTLS,)

    def capabilities(self) -> dict[bytes, Any]:
        caps = super().capabilities()
        caps[b"ID"] = None
        caps[b"UNSELECT"] = None
        caps[b"LITERAL-"] = None  # RFC 7888: {n+} up to _LITERAL_LIMIT octets
        return caps

    # -- reading commands: pipelining (Twisted #9282) and literals (RFC 3501 §7.5, RFC 7888) --

    def dataReceived(self, data: bytes) -> None:
        """Bytes pipelined behind a command in flight wait in the buffer, up to a bound."""
        if self.paused and len(self._buffer) + len(data) > _MAX_PIPELINED:
            self._buffer = b""
            self.sendLine(b"* BYE Too many pipelined commands")
            self.transport.loseConnection()
            return
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        """One line at a time; reading stops while a command runs (stock ran the next command
        before an asynchronous one had answered) and resumes at its tagged answer. A command
        waiting for a continuation (IDLE's DONE, an AUTHENTICATE response) keeps reading."""
        super().lineReceived(line)
        if self._inflight is not None and self.parseState == "command" and self._command is None:
            self.paused = True

    def _resume_reading(self) -> None:
        if not self.paused or self._lost:
            return
        self.paused = False
        if not self._busyReceiving:  # else the loop reading the buffer goes on by itself
            self.dataReceived(b"")

    def sendContinuationRequest(self, msg: bytes = b"Ready for additional command text") -> None:
        super().sendContinuationRequest(msg)
        self._resume_reading()  # the command in flight wants the client's next line

    def parse_command(self, line: bytes) -> None:
        """Read a command whole, its literals included, then run it.

        Stock read a literal only where its parser for one argument expected it, so a literal
        anywhere else (a SEARCH key: imaplib sends every non-ASCII term as one) got no ``+``,
        the command ran at once and the literal was read as the next command; ``{n+}`` got
        BAD. Here every ``{n}`` and ``{n+}`` ending a line is read first (``+`` only for
        ``{n}``), and the argument parsers see the literal in place, as ``{n}\\r\\n<octets>``.
        A command refused on its first line (a bad tag, APPEND) never gets a ``+``; the octets
        of its non-synchronising literals are read and dropped, never run as commands.
        """
        if self._command is None:
            self._refused = not self._starts_command(line)
            self._command = [line]
        else:
            self._command.append(line)
        marker = _LITERAL.search(line)
        if marker is not None:
            self._expect_literal(int(marker[1]), not marker[2], marker.start())
            return
        parts, refused = self._command, self._refused
        self._command, self._refused = None, False
        if not refused:
            self._run(b"".join(parts))

    def _starts_command(self, line: bytes) -> bool:
        """Whether the command on ``line`` is to be read on; if not it was answered. Stock
        echoed any bytes back as a tag (NULs, 8-bit, even a ``+``), and a non-ASCII command
        name made it answer ``NO [SERVERBUG] 'ascii' codec can't decode…``."""
        words = line.split(None, 2)
        if words and not _TAG.fullmatch(words[0]):
            self.sendUntaggedResponse(b"BAD Error in IMAP command: invalid tag")
            return False
        if len(words) >= 2 and not _COMMAND.fullmatch(words[1]):
            self.sendBadResponse(words[0], b"Error in IMAP command: unknown command")
            return False
        if len(words) >= 2 and words[1].upper() == b"APPEND":
            self._run(line)  # refused before its literal is read: see do_APPEND
            return False
        return True

    def _expect_literal(self, size: int, synchronising: bool, start: int) -> None:
        parts = self._command
        assert parts is not None
        if not self._refused and (
            size > _LITERAL_LIMIT or sum(map(len, parts)) + size > self.MAX_LENGTH
        ):
            self._refused = True
            tag = parts[0].split(None, 1)[0]
            self.sendBadResponse(
                tag, b"[TOOBIG] Literal too long: at most %d octets" % _LITERAL_LIMIT
            )
        if self._refused:
            if synchronising:  # no "+" was sent, so the client sends no octets: command over
                self._command, self._refused = None, False
                return
            parts.clear()  # octets of a refused command are counted, not kept
        else:
            parts[-1] = parts[-1][:start] + b"{%d}\r\n" % size  # one form for the parsers
            if synchronising:
                self.sendContinuationRequest(b"Ready for literal data")
        self._literal_left = size
        if size:
            self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        if self._command is None:  # not a command's literal: stock's use of raw mode
            super().rawDataReceived(data)
            return
        self.resetTimeout()
        chunk, rest = data[: self._literal_left], data[self._literal_left :]
        self._literal_left -= len(chunk)
        if not self._refused:
            self._command.append(chunk)
        if not self._literal_left:
            self.setLineMode(rest)  # the rest of the command's line comes next

    def _run(self, command: bytes) -> None:
        words = command.split(None, 2)
        if len(words) >= 2:
            self._inflight = words[0]
        try:
            super().parse_command(command)
        except Exception:
            log.err(None, "imap: command failed")
            self._inflight = None
            tag = words[0] if words else None
            # The details go to the log only: Python's error text means nothing to a client.
            self.sendNegativeResponse(tag, b"[SERVERBUG] Internal error, the command was not run")

    def lookupCommand(self, cmd: bytes) -> Any:
        """The command's handler and argument parsers, the parsers taken from this class by
        name: stock's tables hold its own functions, so overrides (literals, quoted strings
        with escapes) would otherwise never be used."""
        spec = super().lookupCommand(cmd)
        if not spec:
            return spec
        return (spec[0], *(self._own_parser(p) for p in spec[1:]))

    def _own_parser(self, parser: Any) -> Any:
        name = getattr(parser, "__name__", "")
        if callable(parser) and name.startswith(("arg_", "opt_")):
            return getattr(type(self), name)
        return parser

    def arg_astring(self, line: bytes, final: bool = False) -> tuple[bytes, bytes]:
        """An astring: an atom, a quoted string (``\\"`` and ``\\\\`` escaped; stock ended it at
        the first ``"``) or a literal, in place as :meth:`parse_command` reads it."""
        del final  # stock needed it for empty literals; these are read already
        line = line.lstrip(b" ")
        if not line:
            raise imap4.IllegalClientResponse("Missing argument")
        if line[:1] == b'"':
            quoted = _QUOTED.match(line)
            if quoted is None:
                raise imap4.IllegalClientResponse("Unmatched quotes")
            value = _ESCAPED.sub(rb"\1", quoted[1])
            return value, line[quoted.end() :].removeprefix(b" ")
        literal = _INLINE_LITERAL.match(line)
        if literal is not None:
            end = literal.end() + int(literal[1])
            return line[literal.end() : end], line[end:].removeprefix(b" ")
        if line[:1] == b"{":
            raise imap4.IllegalClientResponse("Malformed literal")
        value, _, rest = line.partition(b" ")
        return value, rest

    def arg_atom(self, line: bytes | None) -> tuple[bytes, bytes | None]:
        """An atom; stock's pattern stopped at a line end, so ``UID SEARCH`` with a literal
        after it was "Malformed ATOM". The rest is None when nothing follows, as in stock."""
        if not line:
            raise imap4.IllegalClientResponse("Missing argument")
        atom = _ATOM.match(line)
        if atom is None:
            raise imap4.IllegalClientResponse("Malformed ATOM")
        return atom[1], line[atom.end() :] if atom.end() < len(line) else None

    def opt_charset(self, line: bytes) -> tuple[bytes | None, bytes]:
        """SEARCH's optional ``CHARSET <astring>``; the charset may be quoted or a literal."""
        if line[:8].upper() != b"CHARSET ":
            return None, line
        return self.arg_astring(line[8:])

    def _IMAP4Server__ebDispatch(self, failure: Any, tag: bytes) -> None:
        """Argument parsing failed: stock sends ``BAD Server error: <Python text>`` for anything
        but its own syntax errors (``FETCH`` without arguments: 'NoneType' object has no
        attribute…); the protocol errors keep stock's sentences."""
        if failure.check(
            imap4.IllegalClientResponse, imap4.IllegalOperation, imap4.IllegalMailboxEncoding
        ):
            imap4.IMAP4Server._IMAP4Server__ebDispatch(self, failure, tag)  # type: ignore[attr-defined]
            return
        log.err(failure, "imap: could not parse the arguments")
        self.sendBadResponse(tag, b"Error in IMAP command: invalid arguments")

    def _IMAP4Server__cbSearch(self, result: Any, tag: bytes, mbox: Any, uid: int) -> None:
        """``* SEARCH`` and the numbers; no trailing space when nothing matched (stock sent
        ``* SEARCH `` then, which strict parsers refuse; RFC 3501 7.2.5, as Dovecot)."""
        numbers = [mbox.getUID(seq) if uid else seq for seq in result]
        self.sendUntaggedResponse(b" ".join([b"SEARCH", *(b"%d" % n for n in numbers)]))
        self.sendPositiveResponse(tag, b"SEARCH completed")

    def _IMAP4Server__ebSearch(self, failure: Any, tag: bytes) -> None:
        """SEARCH failed: a refused key keeps its sentence, anything else no Python text."""
        if failure.check(UnsupportedSearch, imap4.IllegalQueryError, imap4.IllegalClientResponse):
            self.sendBadResponse(tag, _ascii(str(failure.value)))
            return
        if failure.check(IndexError, RecursionError):  # "SEARCH NOT", "OR SEEN", 3000 NOTs
            self.sendBadResponse(tag, b"Error in IMAP command SEARCH: missing or invalid keys")
            return
        log.err(failure, "imap: search failed")
        self.sendNegativeResponse(tag, b"[SERVERBUG] SEARCH failed")

    def do_COPY(self, tag: bytes, messages: Any, mailbox: bytes | str, uid: int = 0) -> None:
        """Refused without opening anything: only INBOX exists, and it is read-only. (Stock
        opens the target, downloads every message to copy and never closes the target.)"""
        name = mailbox.decode("utf-8", "replace") if isinstance(mailbox, bytes) else mailbox
        if name.upper() != "INBOX":
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
            return
        self.sendNegativeResponse(tag, b"[CANNOT] COPY is not supported: only INBOX exists")

    def arg_fetchatt(self, line: bytes) -> tuple[Any, bytes]:
        """Stock's FETCH parser raises bare Exceptions ("Header list must begin with (")."""
        if not line:
            raise imap4.IllegalClientResponse("Missing FETCH items")
        try:
            return imap4.IMAP4Server.arg_fetchatt(self, line)
        except imap4.IllegalClientResponse:
            raise
        except Exception as error:
            raise imap4.IllegalClientResponse("Invalid FETCH items") from error

    def _respond(self, state: bytes, tag: bytes | None, message: bytes | None) -> None:
        super()._respond(state, tag, message)
        if tag is not None and tag == self._inflight and state in (b"OK", b"NO", b"BAD"):
            self._inflight = None
            self._resume_reading()

    # -- APPEND ----------------------------------------------------------------------------------

    def do_APPEND(self, tag: bytes, _rest: bytes) -> None:
        """Refuse APPEND before its literal is read: the INBOX is read-only.

        Stock answers ``+`` to any announced size and buffers it (a temporary file beyond 10
        MiB, so ``{999999999}`` let one client fill the disk) only to have ``addMessage``
        refuse it; an APPEND to another mailbox even raised TypeError and left the client
        waiting forever. RFC 3501 lets the server answer NO instead of the continuation.
        """
        self.sendNegativeResponse(tag, b"[CANNOT] APPEND is not supported: the INBOX is read-only")

    auth_APPEND = (do_APPEND, imap4.IMAP4Server.arg_line)
    select_APPEND = auth_APPEND

    # -- sequence sets ---------------------------------------------------------------------------

    def arg_seqset(self, line: bytes) -> tuple[Any, bytes]:
        """Linear replacement for Twisted's quadratic ``parseIdList``."""
        if not line:
            raise imap4.IllegalClientResponse("Missing message set")
        token, _, rest = line.partition(b" ")
        try:
            return parse_seqset(token), rest
        except imap4.IllegalIdentifierError as error:
            raise imap4.IllegalClientResponse(f"Bad message number {error}") from error

    # -- SELECT / EXAMINE / UNSELECT -------------------------------------------------------------

    def _cbSelectWork(self, mbox: Any, cmdName: bytes, tag: bytes) -> None:
        """SELECT with the RFC 3501-required UIDNEXT, PERMANENTFLAGS and UNSEEN responses, in
        Dovecot's order and words."""
        if mbox is None:
            if not self._lost:
                self.sendNegativeResponse(tag, b"[NONEXISTENT] No such mailbox")
            return
        flags = [f.encode() if isinstance(f, str) else f for f in mbox.getFlags()]
        if self._lost or b"\\noselect" in [f.lower() for f in flags]:
            # The client left while the backend answered, or the mailbox cannot be selected:
            # never listen for it, and let the mailbox let go of what it holds.
            _close(mbox)
            if not self._lost:
                self.sendNegativeResponse(tag, b"Mailbox cannot be selected")
            return
        writeable = mbox.isWriteable()
        permanent = getattr(mbox, "getPermanentFlags", None)
        kept = permanent() if permanent else (flags if writeable else [])
        kept = [f.encode() if isinstance(f, str) else f for f in kept]
        self.sendUntaggedResponse(b"FLAGS (" + b" ".join(flags) + b")")
        what = b"Flags permitted." if kept else b"Read-only mailbox."
        self.sendPositiveResponse(None, b"[PERMANENTFLAGS (" + b" ".join(kept) + b")] " + what)
        self.sendUntaggedResponse(b"%d EXISTS" % mbox.getMessageCount())
        self.sendUntaggedResponse(b"%d RECENT" % mbox.getRecentCount())
        first_unseen = getattr(mbox, "getFirstUnseen", None)
        unseen = first_unseen() if first_unseen else None
        if unseen:
            self.sendPositiveResponse(None, b"[UNSEEN %d] First unseen." % unseen)
        self.sendPositiveResponse(None, b"[UIDVALIDITY %d] UIDs valid" % mbox.getUIDValidity())
        self.sendPositiveResponse(None, b"[UIDNEXT %d] Predicted next UID" % mbox.getUIDNext())
        mbox.addListener(self)
        self.mbox = mbox
        self.state = "select"
        mode = b"READ-WRITE" if writeable else b"READ-ONLY"
        self.sendPositiveResponse(tag, b"[" + mode + b"] " + cmdName + b" completed")

    def _ebSelectWork(self, failure: Any, cmdName: bytes, tag: bytes) -> None:
        if failure.check(MailboxUnavailable):  # the provider's sentence, not a server bug
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] " + _ascii(str(failure.value)))
            return
        log.err(failure, "imap: select failed")
        self.sendNegativeResponse(tag, cmdName + b" failed: server error")

    # -- STATUS ----------------------------------------------------------------------------------

    def _cbStatusGotMailbox(self, mbox: Any, tag: bytes, mailbox: str, names: list) -> None:
        """STATUS opens the mailbox only to count: stock never closes it (a mailbox that
        watches for changes would then live, and be told of every change, forever), and its
        failures answer BAD with Python text."""
        if not mbox:
            self.sendNegativeResponse(tag, b"[NONEXISTENT] No such mailbox")
            return
        deferred = maybeDeferred(mbox.requestStatus, names)
        deferred.addBoth(_closing, mbox)
        deferred.addCallbacks(
            self._IMAP4Server__cbStatus,  # type: ignore[attr-defined]
            self._status_failed,
            (tag, mailbox),
            None,
            (tag,),
            None,
        )

    def _ebStatusGotMailbox(self, failure: Any, tag: bytes) -> None:
        self._status_failed(failure, tag)

    def _status_failed(self, failure: Any, tag: bytes) -> None:
        if failure.check(MailboxUnavailable):
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] " + _ascii(str(failure.value)))
            return
        log.err(failure, "imap: status failed")
        self.sendNegativeResponse(tag, b"[SERVERBUG] STATUS failed")

    def do_UNSELECT(self, tag: bytes) -> None:
        """RFC 3691: leave the mailbox without the implicit EXPUNGE of CLOSE."""
        self._close_mailbox()
        self.state = "auth"
        self.sendPositiveResponse(tag, b"UNSELECT completed")

    select_UNSELECT = (do_UNSELECT,)

    def do_ID(self, tag: bytes, _args: bytes) -> None:
        """RFC 2971; clients such as Outlook and iOS send ID and some give up on BAD."""
        self.sendUntaggedResponse(b'ID ("name" "mail gateway")')
        self.sendPositiveResponse(tag, b"ID completed")

    unauth_ID = (do_ID, imap4.IMAP4Server.arg_line)
    auth_ID = unauth_ID
    select_ID = unauth_ID

    # -- STORE -----------------------------------------------------------------------------------

    def do_STORE(self, tag: bytes, messages: Any, mode: bytes, flags: list, uid: int = 0) -> None:
        """STORE whose failures answer NO (stock answers BAD to a read-only mailbox)."""
        mode = mode.upper()
        if mode not in _STORE_MODES:  # stock took any other word as FLAGS (replace)
            self.sendBadResponse(tag, b"Error in IMAP command STORE: invalid data item")
            return
        silent = mode.endswith(b"SILENT")
        how = 1 if mode.startswith(b"+") else -1 if mode.startswith(b"-") else 0
        names = [f.decode("utf-8", "replace") if isinstance(f, bytes) else f for f in flags]
        mbox = self.mbox
        deferred = maybeDeferred(mbox.store, messages, names, how, uid=uid)
        deferred.addCallbacks(
            self._stored, self._store_failed, (tag, mbox, uid, silent), None, (tag,), None
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
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
        elif failure.check(imap4.MailboxException):
            self.sendNegativeResponse(tag, _ascii(str(failure.value)))
        else:
            log.err(failure, "imap: store failed")
            self.sendNegativeResponse(tag, b"[SERVERBUG] STORE failed")

    select_STORE = (
        do_STORE,
        arg_seqset,
        imap4.IMAP4Server.arg_atom,
        imap4.IMAP4Server.arg_flaglist,
    )
    select_COPY = (do_COPY, arg_seqset, imap4.IMAP4Server.arg_finalastring)

    # -- FETCH -----------------------------------------------------------------------------------

    def do_FETCH(self, tag: bytes, messages: Any, query: list, uid: int = 0) -> None:
        """FETCH through :meth:`render_message`, in batches, never dropping the connection."""
        if not query:
            self.sendPositiveResponse(tag, b"FETCH completed")
            return
        old_timeout = self.setTimeout(None)
        self.blocked = []  # defer unsolicited responses (no EXPUNGE inside a FETCH)
        self._throttle = _Throttle()
        try:  # a slow reader pauses us instead of growing the write buffer without bound
            self.transport.registerProducer(self._throttle, True)
            self._throttle.registered = True
        except RuntimeError:  # another producer is registered; go on without backpressure
            pass
        # A mailbox with ``fetch_items`` is told the query (Twisted #9197), so it downloads
        # bodies only for the items that render them.
        fetch_items = getattr(self.mbox, "fetch_items", None)
        if fetch_items is not None:
            deferred = maybeDeferred(fetch_items, messages, query, uid=uid)
        else:
            deferred = maybeDeferred(self.mbox.fetch, messages, uid=uid)
        deferred.addCallback(
            lambda found: self._fetch_batch(iter(found), tag, query, uid, old_timeout, False)
        )
        deferred.addErrback(self._fetch_failed, tag, old_timeout)

    select_FETCH = (do_FETCH, arg_seqset, arg_fetchatt)

    def _fetch_batch(
        self, found: Iterator, tag: bytes, query: list, uid: int, old_timeout: Any, failed: bool
    ) -> None:
        if self._lost:
            return
        throttle = self._throttle
        assert throttle is not None
        if throttle.paused:
            throttle.on_resume = lambda: self._fetch_batch(
                found, tag, query, uid, old_timeout, failed
            )
            return
        for _ in range(_BATCH):
            try:
                seq, msg = next(found)
            except StopIteration:
                self._fetch_done(tag, old_timeout, failed)
                return
            except Exception:
                log.err(None, "imap: mailbox fetch iteration failed")
                self._fetch_done(tag, old_timeout, True)
                return
            try:
                self.transport.write(self.render_message(seq, msg, query, uid))
            except Exception:
                log.err(None, f"imap: could not render message {seq}")
                failed = True
        reactor().callLater(0, self._fetch_batch, found, tag, query, uid, old_timeout, failed)

    def _fetch_done(self, tag: bytes, old_timeout: Any, failed: bool) -> None:
        self._release_throttle()
        self.setTimeout(old_timeout)
        self._unblock()  # unsolicited responses held back meanwhile go out before the tag
        if failed:
            self.sendNegativeResponse(tag, b"[SERVERBUG] Some messages could not be fetched")
        else:
            self.sendPositiveResponse(tag, b"FETCH completed")

    def _fetch_failed(self, failure: Any, tag: bytes, old_timeout: Any) -> None:
        self._release_throttle()
        self.setTimeout(old_timeout)
        self._unblock()
        if failure.check(MailboxUnavailable):
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] " + _ascii(str(failure.value)))
            return
        log.err(failure, "imap: fetch failed")
        self.sendNegativeResponse(tag, b"[SERVERBUG] FETCH failed")

    def _release_throttle(self) -> None:
        """Unregister the producer this FETCH registered. Asking the transport which producer
        it holds does not work under TLS (the TLS protocol wraps ours), and a producer left
        registered made LOGOUT's loseConnection wait for it forever: no close_notify, no FIN."""
        throttle = self._throttle
        if throttle is not None and throttle.registered:
            throttle.registered = False
            self.transport.unregisterProducer()

    def spewMessage(self, id: int, msg: Any, query: list, uid: int) -> Any:
        """Stock entry point, kept safe for any caller: render whole or write nothing."""
        try:
            self.transport.write(self.render_message(id, msg, query, uid))
        except Exception:
            log.err(None, f"imap: could not render message {id}")
        return succeed(None)

    def render_message(self, seq: int, msg: Any, query: list, uid: int) -> bytes:
        """The complete ``* n FETCH (...)`` line of one message; raises instead of half-writing."""
        cache: dict[str, Any] = {}

        def root() -> _render.Part:
            if "root" not in cache:
                cache["root"] = _render.index(_raw(msg))
            return cache["root"]

        items = [self._render_item(item, msg, root) for item in query]
        if uid and not any(item.type == "uid" for item in query):
            items.insert(0, b"UID %d" % msg.getUID())  # first, where Dovecot puts it
        return b"* %d FETCH (%b)\r\n" % (seq, b" ".join(items))

    def _render_item(self, item: Any, msg: Any, root: Any) -> bytes:
        kind = item.type
        if kind == "body":
            return _render_body(item, root)
        if kind == "bodystructure":
            return b"BODYSTRUCTURE " + _render.bodystructure(root())
        if kind == "envelope":
            return b"ENVELOPE " + _render.envelope(root())
        if kind == "rfc822size":
            return b"RFC822.SIZE %d" % msg.getSize()
        if kind == "rfc822header":
            return b"RFC822.HEADER " + _render.literal(root().header)
        if kind == "rfc822text":
            return b"RFC822.TEXT " + _render.literal(root().body)
        if kind == "rfc822":
            return b"RFC822 " + _render.literal(root().raw)
        if kind == "uid":
            return b"UID %d" % msg.getUID()
        if kind == "flags":
            return b"FLAGS (" + " ".join(msg.getFlags()).encode("ascii", "replace") + b")"
        moment = getattr(msg, "internal_datetime", None)
        if kind == "internaldate" and moment is not None:
            return b'INTERNALDATE "' + _internal_date(moment) + b'"'
        out: list[bytes] = []
        getattr(self, "spew_" + kind)(0, msg, out.append, None)  # a message with a date string
        return b"".join(out)


class _Throttle:
    """Push producer registered during FETCH: the transport pauses it when its buffer fills."""

    def __init__(self) -> None:
        self.paused = False
        self.registered = False  # with the transport, by this FETCH
        self.on_resume: Any = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        callback, self.on_resume = self.on_resume, None
        if callback is not None:
            callback()

    def stopProducing(self) -> None:
        self.paused, self.on_resume = True, None


def _render_body(item: Any, root: Any) -> bytes:
    """BODY[section]<partial> with Dovecot's labels, or BODY (the non-extensible structure)."""
    path = [n + 1 for n in item.part]
    spec, label, names = _section_spec(item)
    if spec is None:
        return b"BODY " + _render.bodystructure(root(), extended=False)
    data = _render.section(root(), path, spec, names)
    prefix = ".".join(str(n) for n in path)
    name = f"BODY[{prefix}{'.' if prefix and label else ''}{label}]".encode("latin-1")
    if item.partialBegin is not None:
        begin = item.partialBegin
        data = data[begin : begin + item.partialLength]
        name += b"<%d>" % begin
    return name + b" " + _render.literal(data)


_MONTHS = b"Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def _internal_date(moment: datetime) -> bytes:
    """RFC 3501 date-time, as Dovecot writes it (``01-Mar-2026 08:00:00 +0000``), straight from
    an aware datetime: Twisted's spew_internaldate formats a string and parses it back, which
    was two thirds of the time of a listing."""
    offset = moment.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = b"-" if minutes < 0 else b"+"
    zone = b"%s%02d%02d" % (sign, abs(minutes) // 60, abs(minutes) % 60)
    return b"%02d-%s-%d %02d:%02d:%02d %s" % (
        moment.day,
        _MONTHS[moment.month - 1],
        moment.year,
        moment.hour,
        moment.minute,
        moment.second,
        zone,
    )


def _section_spec(item: Any) -> tuple[str | None, str, list[str]]:
    """(section spec, its label in the response, header field names) of a BODY item; spec
    None for BODY, the structure. Kept on the item: a FETCH of 5,000 messages asks once."""
    cached = getattr(item, "_gateway_spec", None)
    if cached is not None:
        return cached
    names: list[str] = []
    spec: str | None
    if item.header is not None:
        fields = item.header.fields
        if fields:
            names = [f.decode("latin-1") if isinstance(f, bytes) else f for f in fields]
            spec = "HEADER.FIELDS.NOT" if item.header.negate else "HEADER.FIELDS"
            # bytes.upper() leaves 8-bit octets alone: str.upper() turned \xff into U+0178,
            # which is not latin-1, and the message failed to render.
            upper = b" ".join(n.encode("latin-1").upper() for n in names).decode("latin-1")
            label = f"{spec} ({upper})"
        else:
            spec = label = "HEADER"
    elif item.text:
        spec = label = "TEXT"
    elif item.mime:
        spec = label = "MIME"
    elif item.empty:
        spec = label = ""
    else:
        spec, label = None, ""
    item._gateway_spec = (spec, label, names)
    return item._gateway_spec


def _raw(msg: Any) -> bytes:
    ready = getattr(msg, "crlf_bytes", None)  # the gateway's messages: no copy, no scan
    if ready is not None:
        return ready
    opened = imap4.IMessageFile(msg).open()
    data = opened.read()
    return crlf_form(data if isinstance(data, bytes) else bytes(data))


def _closing(result: Any, mbox: Any) -> Any:
    """Close ``mbox`` after a step, passing its result (or failure) on."""
    _close(mbox)
    return result


def _close(mbox: Any) -> None:
    """ICloseableMailbox.close, if the mailbox has it; a failure is logged, never raised."""
    closeable = imap4.ICloseableMailbox(mbox, None)
    if closeable is not None:
        maybeDeferred(closeable.close).addErrback(log.err)


def _ascii(text: str) -> bytes:
    return text.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
