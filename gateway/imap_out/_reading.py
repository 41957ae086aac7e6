"""Reading IMAP commands: pipelining, literals, tags and argument parsing.

A mixin of :class:`~gateway.imap_out._compat.CompatIMAP4Server`, ahead of Twisted's
``IMAP4Server`` in its bases. Stock ran the next pipelined command before an asynchronous one
had answered (Twisted #9282), read a literal only where one argument parser expected it, echoed
any bytes back as a tag and answered parse failures with Python's text. Here a command is read
whole, literals included, then dispatched through :meth:`dispatchCommand` (public), which runs
the argument parsers of this class; reading pauses while the command runs and resumes at its
tagged answer (the three public ``send*Response`` methods).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.mail import imap4
from twisted.python import log

from . import _replies
from ._seqset import parse_seqset
from ._syntax import FetchItems, search_keys, string_at

# RFC 3501: tag = 1*<ASTRING-CHAR except "+">; command names are ASCII letters.
_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+')
_COMMAND = re.compile(rb"[A-Za-z][A-Za-z0-9]*")
# ATOM-CHAR (RFC 3501): printable ASCII but the atom-specials; the same set as stock Twisted's
# private ``_atomChars`` (which lets DEL through and refuses every 8-bit octet).
_ATOM_CHARS = bytes(c for c in range(0x21, 0x80) if c not in b']\\(){%*"')
_ATOM = re.compile(rb"([" + re.escape(_ATOM_CHARS) + rb"]+)(?: |\Z)")
_MAX_PIPELINED = 1 << 20  # bytes queued behind a slow command before the client is cut off
_LITERAL_LIMIT = 4096  # octets of one literal (no APPEND here): LITERAL-'s bound (RFC 7888)
_LITERAL = re.compile(rb"\{(\d{1,10})(\+?)\}\Z")  # a literal announced at the end of a line


class CommandReading:
    """The reading half of the IMAP server; see the module docstring."""

    MAX_LENGTH = 65536  # Dovecot's limit; Twisted's 16 KiB drops long UID FETCH lines
    LITERAL_LIMIT = _LITERAL_LIMIT

    _inflight: bytes | None = None  # tag of the command being run; reading waits meanwhile
    _lost = False
    _command: list[bytes] | None = None  # a command whose literals are being read
    _literal_left = 0  # octets of the current literal still to come
    _refused = False  # the command was answered already: its literals are read and dropped

    # Provided by Twisted's IMAP4Server (and its LineReceiver), after this class in the MRO.
    transport: Any
    paused: bool
    parseState: str
    _buffer: bytes  # LineReceiver's; pinned by tests/unit/test_library_hooks.py
    _busyReceiving: bool  # LineReceiver's; pinned likewise
    sendLine: Callable[[bytes], None]
    sendUntaggedResponse: Callable[..., None]
    clearLineBuffer: Callable[[], bytes]
    setRawMode: Callable[[], None]
    setLineMode: Callable[..., None]
    resetTimeout: Callable[[], None]

    def lineLengthExceeded(self, line: bytes) -> None:
        """Say why before closing (stock closes silently), as Dovecot does."""
        self.sendLine(b"* " + _replies.LINE_TOO_LONG)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """Bytes pipelined behind a command in flight wait in the buffer, up to a bound."""
        if self.paused and len(self._buffer) + len(data) > _MAX_PIPELINED:
            self.clearLineBuffer()
            self.sendLine(b"* " + _replies.TOO_MANY_PIPELINED)
            self.transport.loseConnection()
            return
        super().dataReceived(data)  # type: ignore[misc]

    def lineReceived(self, line: bytes) -> None:
        """One line at a time; reading stops while a command runs (stock ran the next command
        before an asynchronous one had answered) and resumes at its tagged answer. A command
        waiting for a continuation (IDLE's DONE, an AUTHENTICATE response) keeps reading."""
        super().lineReceived(line)  # type: ignore[misc]
        if self._inflight is not None and self.parseState == "command" and self._command is None:
            self.paused = True

    def _resume_reading(self) -> None:
        if not self.paused or self._lost:
            return
        self.paused = False
        if not self._busyReceiving:  # else the loop reading the buffer goes on by itself
            self.dataReceived(b"")

    def sendContinuationRequest(self, msg: bytes = b"Ready for additional command text") -> None:
        super().sendContinuationRequest(msg)  # type: ignore[misc]
        self._resume_reading()  # the command in flight wants the client's next line

    # -- the tagged answer ends the command in flight ---------------------------------------------

    def sendPositiveResponse(self, tag: bytes | None = None, message: bytes = b"") -> None:
        super().sendPositiveResponse(tag, message)  # type: ignore[misc]
        self._answered(tag)

    def sendNegativeResponse(self, tag: bytes | None = None, message: bytes = b"") -> None:
        super().sendNegativeResponse(tag, message)  # type: ignore[misc]
        self._answered(tag)

    def sendBadResponse(self, tag: bytes | None = None, message: bytes = b"") -> None:
        super().sendBadResponse(tag, message)  # type: ignore[misc]
        self._answered(tag)

    def _answered(self, tag: bytes | None) -> None:
        if tag is not None and tag == self._inflight:
            self._inflight = None
            self._resume_reading()

    # -- a command read whole, literals included (RFC 3501 §7.5, RFC 7888) -------------------------

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
            self.sendUntaggedResponse(_replies.INVALID_TAG)
            return False
        if len(words) >= 2 and not _COMMAND.fullmatch(words[1]):
            self.sendBadResponse(words[0], _replies.UNKNOWN_COMMAND)
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
            self.sendBadResponse(tag, _replies.literal_too_long(_LITERAL_LIMIT))
        if self._refused:
            if synchronising:  # no "+" was sent, so the client sends no octets: command over
                self._command, self._refused = None, False
                return
            parts.clear()  # octets of a refused command are counted, not kept
        else:
            parts[-1] = parts[-1][:start] + b"{%d}\r\n" % size  # one form for the parsers
            if synchronising:
                self.sendContinuationRequest(_replies.LITERAL_READY)
        self._literal_left = size
        if size:
            self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        if self._command is None:  # not a command's literal: stock's use of raw mode
            super().rawDataReceived(data)  # type: ignore[misc]
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
            super().parse_command(command)  # type: ignore[misc]
        except Exception:
            log.err(None, "imap: command failed")
            self._inflight = None
            tag = words[0] if words else None
            # The details go to the log only: Python's error text means nothing to a client.
            self.sendNegativeResponse(tag, _replies.INTERNAL_ERROR)

    # -- dispatch: the command's handler and its argument parsers ---------------------------------

    def dispatchCommand(self, tag: bytes, cmd: bytes, rest: bytes | None, uid: Any = None) -> None:
        """Run the handler once its arguments are parsed, one parser after the other (any may
        answer later). Stock does the same through private methods, and answers a parser's
        unexpected failure ``BAD Server error: <Python text>``; see :meth:`_arguments_failed`."""
        spec = self.lookupCommand(cmd)
        if not spec:
            self.sendBadResponse(tag, _replies.UNSUPPORTED_COMMAND)
            return
        handler, *parsers = spec
        self._parse_arguments(tag, handler, [self, tag], parsers, rest, uid)

    def _parse_arguments(
        self, tag: bytes, handler: Any, args: list, parsers: list, line: Any, uid: Any
    ) -> None:
        for i, parser in enumerate(parsers):
            if not callable(parser):  # a constant argument of the table entry
                args.append(parser)
                continue
            deferred = maybeDeferred(parser, self, line)
            deferred.addCallback(self._parsed_one, tag, handler, args, parsers[i + 1 :], uid)
            deferred.addErrback(self._arguments_failed, tag)
            return
        if line:
            raise imap4.IllegalClientResponse("Too many arguments for command: " + repr(line))
        if uid is not None:
            handler(*args, uid=uid)
        else:
            handler(*args)

    def _parsed_one(
        self, result: tuple[Any, Any], tag: bytes, handler: Any, args: list, parsers: list, uid: Any
    ) -> None:
        value, rest = result
        args.append(value)
        self._parse_arguments(tag, handler, args, parsers, rest, uid)

    def _arguments_failed(self, failure: Any, tag: bytes) -> None:
        """Parsing (or the handler run after it) failed: the protocol errors keep stock's
        sentences; anything else (``FETCH`` without arguments: 'NoneType' object has no
        attribute…) is logged and answered without Python text."""
        if failure.check(imap4.IllegalClientResponse):
            self.sendBadResponse(tag, _replies.illegal_syntax(str(failure.value)))
        elif failure.check(imap4.IllegalOperation):
            self.sendNegativeResponse(tag, _replies.illegal_operation(str(failure.value)))
        elif failure.check(imap4.IllegalMailboxEncoding):
            self.sendNegativeResponse(tag, _replies.illegal_mailbox_name(str(failure.value)))
        else:
            log.err(failure, "imap: could not parse the arguments")
            self.sendBadResponse(tag, _replies.INVALID_ARGUMENTS)

    def lookupCommand(self, cmd: bytes) -> Any:
        """The command's handler and argument parsers, the parsers taken from this class by
        name: stock's tables hold its own functions, so overrides (literals, quoted strings
        with escapes) would otherwise never be used."""
        spec = super().lookupCommand(cmd)  # type: ignore[misc]
        if not spec:
            return spec
        return (spec[0], *(self._own_parser(p) for p in spec[1:]))

    def _own_parser(self, parser: Any) -> Any:
        name = getattr(parser, "__name__", "")
        if callable(parser) and name.startswith(("arg_", "opt_")):
            return getattr(type(self), name)
        return parser

    # -- argument parsers --------------------------------------------------------------------------

    def arg_astring(self, line: bytes, final: bool = False) -> tuple[bytes, bytes]:
        """An astring: an atom, a quoted string (``\\"`` and ``\\\\`` escaped; stock ended it at
        the first ``"``) or a literal, in place as :meth:`parse_command` reads it."""
        del final  # stock needed it for empty literals; these are read already
        line = line.lstrip(b" ")
        if not line:
            raise imap4.IllegalClientResponse("Missing argument")
        string = string_at(line)
        if string is not None:
            value, end = string
            return value, line[end:].removeprefix(b" ")
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

    def arg_seqset(self, line: bytes) -> tuple[Any, bytes]:
        """Linear replacement for Twisted's quadratic ``parseIdList``."""
        if not line:
            raise imap4.IllegalClientResponse(_replies.MISSING_MESSAGE_SET)
        token, _, rest = line.partition(b" ")
        try:
            return parse_seqset(token), rest
        except imap4.IllegalIdentifierError as error:
            raise imap4.IllegalClientResponse(f"Bad message number {error}") from error

    def arg_searchkeys(self, line: bytes) -> tuple[list, bytes]:
        """SEARCH's keys, every string argument (HEADER's field name too) quoted or a literal,
        read by :func:`~._syntax.search_keys`."""
        return search_keys(line), b""

    def arg_fetchatt(self, line: bytes) -> tuple[Any, bytes]:
        """FETCH items by Twisted's parser with header names read as astrings (literals,
        quoted); its bare Exceptions ("Missing )") answered as the syntax errors they are."""
        if not line:
            raise imap4.IllegalClientResponse(_replies.MISSING_FETCH_ITEMS)
        parser = FetchItems()
        try:
            parser.parseString(line)
            return parser.result, b""
        except imap4.IllegalClientResponse:
            raise
        except Exception as error:
            raise imap4.IllegalClientResponse(_replies.INVALID_FETCH_ITEMS) from error
