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


class CompatIMAP4Server(imap4.IMAP4Server):
    """IMAP4Server with pipelining, listener, SELECT, STORE, FETCH and sequence-set fixes."""

    MAX_LENGTH = 65536  # Dovecot's limit; Twisted's 16 KiB drops long UID FETCH lines

    _inflight: bytes | None = None
    _pending_lines: list[bytes]
    _draining = False
    _lost = False
    _throttle: _Throttle

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Disable Nagle: with delayed ACK it costs ~40 ms per BODY[] response."""
        self._pending_lines = []
        with contextlib.suppress(Exception):  # TLS wrappers or test transports may lack it
            self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        """Leave the mailbox's listeners: stock Twisted keeps dead sessions there forever."""
        self._lost = True
        self._close_mailbox()
        self._pending_lines = []
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
        self._pending_lines = []
        self._buffer = b""
        super().do_STARTTLS(tag)

    unauth_STARTTLS = (do_STARTTLS,)

    def capabilities(self) -> dict[bytes, Any]:
        caps = super().capabilities()
        caps[b"ID"] = None
        caps[b"UNSELECT"] = None
        return caps

    # -- pipelining (Twisted #9282) --------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        """Queue command lines while a command is in flight; continuation lines pass through."""
        if self._inflight is not None and self.parseState == "command":
            if sum(map(len, self._pending_lines)) + len(line) > _MAX_PIPELINED:
                self.sendLine(b"* BYE Too many pipelined commands")
                self.transport.loseConnection()
                return
            self._pending_lines.append(line)
            return
        super().lineReceived(line)

    def parse_command(self, line: bytes) -> Any:
        """Stock parsing behind a check of the tag and command name, like Dovecot's.

        Stock echoes any bytes back as a tag (NULs, 8-bit, even a ``+``), and a non-ASCII
        command name made it answer ``NO [SERVERBUG] 'ascii' codec can't decode…``.
        """
        words = line.split(None, 2)
        if words and not _TAG.fullmatch(words[0]):
            self.sendUntaggedResponse(b"BAD Error in IMAP command: invalid tag")
            return None
        if len(words) >= 2 and not _COMMAND.fullmatch(words[1]):
            self.sendBadResponse(words[0], b"Error in IMAP command: unknown command")
            return None
        if len(words) >= 2:
            self._inflight = words[0]
        try:
            return super().parse_command(line)
        except Exception:
            log.err(None, "imap: command failed")
            self._inflight = None
            tag = words[0] if words else None
            # The details go to the log only: Python's error text means nothing to a client.
            self.sendNegativeResponse(tag, b"[SERVERBUG] Internal error, the command was not run")
            return None

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
            self._release_lines()

    def _release_lines(self) -> None:
        if self._draining:
            return  # the loop below continues once the current command returns
        self._draining = True
        try:
            # A queued line is due when no command is in flight, or when the one in flight waits
            # for a continuation (IDLE's DONE, a literal, an AUTHENTICATE response).
            while (
                self._pending_lines
                and not self._lost
                and (self._inflight is None or self.parseState != "command")
            ):
                imap4.IMAP4Server.lineReceived(self, self._pending_lines.pop(0))
        finally:
            self._draining = False

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
        except RuntimeError:  # another producer is registered; go on without backpressure
            self._throttle = _Throttle()
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
        if self._throttle.paused:
            self._throttle.on_resume = lambda: self._fetch_batch(
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
        if self._throttle.registered_with(self.transport):
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

    def registered_with(self, transport: Any) -> bool:
        return transport is not None and getattr(transport, "producer", None) is self


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
