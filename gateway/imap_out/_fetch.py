"""FETCH, answered entirely by our own loop over the raw message bytes (:mod:`._render`).

A mixin of :class:`~gateway.imap_out._compat.CompatIMAP4Server`. Byte-exact sections and
Dovecot-identical BODYSTRUCTURE/ENVELOPE; messages are rendered in batches (other connections
keep being served), a slow reader pauses the loop instead of growing the write buffer, and an
exception while rendering one message is logged and answered with ``NO`` instead of dropping
the connection. A :class:`~._contract.GatewayMailbox` is told the parsed items (Twisted #9197)
and hands over :class:`~._contract.PreparedMessage` objects; any other ``IMailbox`` is read the
stock way (``IMessageFile.open()``, ``getInternalDate()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from twisted.internet.defer import maybeDeferred, succeed
from twisted.mail import imap4
from twisted.python import log

from ..mailbox import MailboxUnavailable, crlf_form
from ..runtime import reactor
from . import _render, _replies
from ._contract import GatewayMailbox

_BATCH = 25  # messages rendered per reactor turn: other connections keep being served


class FetchStreaming:
    """The FETCH half of the IMAP server; see the module docstring."""

    _lost = False
    _throttle: _Throttle | None = None

    # Provided by Twisted's IMAP4Server, after this class in the MRO.
    transport: Any
    mbox: Any
    # Held unsolicited responses, or None; Any because Twisted's ``blocked = None`` types it None.
    blocked: Any
    sendPositiveResponse: Callable[..., None]
    sendNegativeResponse: Callable[..., None]
    setTimeout: Callable[[float | None], float | None]
    lineReceived: Callable[[bytes], None]

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
        prepared = isinstance(self.mbox, GatewayMailbox)
        if prepared:
            deferred = maybeDeferred(self.mbox.fetch_items, messages, query, uid=uid)
        else:
            deferred = maybeDeferred(self.mbox.fetch, messages, uid=uid)
        job = _FetchJob(tag, query, uid, old_timeout, prepared)
        deferred.addCallback(lambda found: self._fetch_batch(iter(found), job))
        deferred.addErrback(self._fetch_failed, job)

    def _fetch_batch(self, found: Iterator, job: _FetchJob) -> None:
        if self._lost:
            return
        throttle = self._throttle
        assert throttle is not None
        if throttle.paused:
            throttle.on_resume = lambda: self._fetch_batch(found, job)
            return
        for _ in range(_BATCH):
            try:
                seq, msg = next(found)
            except StopIteration:
                self._fetch_done(job)
                return
            except Exception:
                log.err(None, "imap: mailbox fetch iteration failed")
                job.failed = True
                self._fetch_done(job)
                return
            try:
                rendered = self.render_message(seq, msg, job.query, job.uid, job.prepared)
                self.transport.write(rendered)
            except Exception:
                log.err(None, f"imap: could not render message {seq}")
                job.failed = True
        reactor().callLater(0, self._fetch_batch, found, job)

    def _fetch_done(self, job: _FetchJob) -> None:
        self._end_fetch(job)
        if job.failed:
            self.sendNegativeResponse(job.tag, _replies.SOME_NOT_FETCHED)
        else:
            self.sendPositiveResponse(job.tag, b"FETCH completed")

    def _fetch_failed(self, failure: Any, job: _FetchJob) -> None:
        self._end_fetch(job)
        if failure.check(MailboxUnavailable):
            self.sendNegativeResponse(job.tag, _replies.unavailable(str(failure.value)))
            return
        log.err(failure, "imap: fetch failed")
        self.sendNegativeResponse(job.tag, _replies.failed(b"FETCH"))

    def _end_fetch(self, job: _FetchJob) -> None:
        self._release_throttle()
        self.setTimeout(job.old_timeout)
        self._release_blocked()  # unsolicited responses held back meanwhile go out before the tag

    def _release_blocked(self) -> None:
        """Stop holding unsolicited responses and run any line received meanwhile (stock's
        private ``_unblock``, through the public ``blocked`` and ``lineReceived``)."""
        lines, self.blocked = self.blocked or [], None
        while lines and self.blocked is None:
            self.lineReceived(lines.pop(0))
        if self.blocked is not None:
            self.blocked.extend(lines)

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

    def render_message(
        self, seq: int, msg: Any, query: list, uid: int, prepared: bool = False
    ) -> bytes:
        """The complete ``* n FETCH (...)`` line of one message; raises instead of half-writing.
        ``prepared``: ``msg`` is a :class:`~._contract.PreparedMessage`."""
        cache: dict[str, Any] = {}

        def root() -> _render.Part:
            if "root" not in cache:
                cache["root"] = _render.index(msg.crlf_bytes if prepared else _raw(msg))
            return cache["root"]

        items = [self._render_item(item, msg, root, prepared) for item in query]
        if uid and not any(item.type == "uid" for item in query):
            items.insert(0, b"UID %d" % msg.getUID())  # first, where Dovecot puts it
        return b"* %d FETCH (%b)\r\n" % (seq, b" ".join(items))

    def _render_item(
        self, item: Any, msg: Any, root: Callable[[], _render.Part], prepared: bool
    ) -> bytes:
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
        if kind == "internaldate" and prepared:
            return b'INTERNALDATE "' + _internal_date(msg.internal_datetime) + b'"'
        out: list[bytes] = []
        getattr(self, "spew_" + kind)(0, msg, out.append, None)  # a message with a date string
        return b"".join(out)


class _FetchJob:
    """One FETCH in progress: what it asked and how it went."""

    def __init__(self, tag: bytes, query: list, uid: int, old_timeout: Any, prepared: bool):
        self.tag, self.query, self.uid = tag, query, uid
        self.old_timeout = old_timeout  # the idle timeout, suspended while rendering
        self.prepared = prepared  # the messages are PreparedMessage
        self.failed = False  # some message could not be rendered


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


def _render_body(item: Any, root: Callable[[], _render.Part]) -> bytes:
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
            # The list as Dovecot names it (atoms as sent, strings quoted): see _syntax.
            label = f"{spec} {item.header.labels.decode('latin-1')}"
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
    """A stock ``IMessageFile``'s bytes in CRLF form (the gateway's messages are prepared)."""
    opened = imap4.IMessageFile(msg).open()
    data = opened.read()
    return crlf_form(data if isinstance(data, bytes) else bytes(data))
