"""FETCH rendering from a message's raw RFC 822 bytes: sections, BODYSTRUCTURE and ENVELOPE.

Twisted re-serialises headers from a dict and builds BODYSTRUCTURE from ``IMessagePart`` calls,
which loses duplicate headers, re-cases names, mislabels partials and crashes (dropping the
connection) on malformed Content-Type, quoted ``;`` and 8-bit headers
(docs/protocol-servers.md §2). Here everything is cut from the original bytes by offset, so
``BODY[HEADER]`` and friends are byte-exact, and the output follows Dovecot's, the reference the
differential tests compare with. Parsing never raises: malformed input degrades to RFC 3501
defaults. A parsed index is cached per message (keyed by the raw bytes) because clients fetch
BODYSTRUCTURE, ENVELOPE and sections of the same message in separate commands.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import groupby

_MAX_DEPTH = 32  # nesting bound: a hostile message cannot exhaust the stack


@dataclass
class _Mime:
    maintype: str
    subtype: str
    params: list[tuple[str, str]]
    children: list[Part] = field(default_factory=list)
    message: Part | None = None


@dataclass
class Part:
    """One MIME entity: byte offsets into the raw message plus its parsed Content-* headers."""

    raw: bytes
    start: int
    header_end: int  # end of the header block, including the blank separator line
    end: int
    fields: list[tuple[str, bytes]]  # (lower-cased name, raw field bytes incl. continuation/EOL)
    default: str = "text/plain"  # the Content-Type when the header has none (or a broken one)
    depth: int = 0
    rendered: dict[str, bytes] = field(default_factory=dict)  # BODYSTRUCTURE/ENVELOPE cache
    _by_name: dict[str, list[bytes]] | None = field(default=None, repr=False)
    _mime: _Mime | None = field(default=None, repr=False)

    # The MIME structure is parsed on first use: header-only FETCHes (the common client sync)
    # of a top-level message never pay for it.
    @property
    def maintype(self) -> str:
        return self._expand().maintype

    @property
    def subtype(self) -> str:
        return self._expand().subtype

    @property
    def params(self) -> list[tuple[str, str]]:
        return self._expand().params

    @property
    def children(self) -> list[Part]:
        return self._expand().children

    @property
    def message(self) -> Part | None:
        """The encapsulated message of a message/rfc822 part."""
        return self._expand().message

    def _expand(self) -> _Mime:
        if self._mime is None:
            self._mime = _expand(self)
        return self._mime

    @property
    def header(self) -> bytes:
        return self.raw[self.start : self.header_end]

    @property
    def body(self) -> bytes:
        return self.raw[self.header_end : self.end]

    def value(self, name: str, last: bool = False) -> bytes | None:
        """The raw value of the first (or ``last``) field ``name``, folding kept, or None."""
        if self._by_name is None:
            self._by_name = {}
            for fname, line in self.fields:
                value = line.split(b":", 1)[1].strip(b" \t\r\n")
                self._by_name.setdefault(fname, []).append(value)
        values = self._by_name.get(name)
        if not values:
            return None
        return values[-1] if last else values[0]

    @property
    def has_separator(self) -> bool:
        """Whether the header block ends with a blank line (a header-only message has none)."""
        return (
            self.header.endswith(b"\n\n")
            or self.header.endswith(b"\n\r\n")
            or (self.header in (b"\r\n", b"\n"))
        )


# -- parsing -----------------------------------------------------------------------------------


def _parse_fields(raw: bytes, start: int, end: int) -> tuple[list[tuple[str, bytes]], int]:
    """Split the header block at ``start``; return its fields and the offset of the body."""
    fields: list[tuple[str, bytes]] = []
    pos = start
    while pos < end:
        nl = raw.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        line = raw[pos:line_end]
        if line in (b"\r\n", b"\n"):
            return fields, line_end
        if line[:1] in (b" ", b"\t") and fields:
            name, prev = fields[-1]
            fields[-1] = (name, prev + line)
        elif b":" in line:
            name = line.split(b":", 1)[0].strip().decode("latin-1").lower()
            fields.append((name, line))
        pos = line_end
    return fields, end


_TOKEN = re.compile(r'[^\s()<>@,;:\\"/\[\]?=]+')


def parse_params(text: str) -> list[tuple[str, str]]:
    """Parse ``; name=value`` pairs leniently (quoted values may hold ``;``); never raises."""
    params: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n;":
            i += 1
        m = _TOKEN.match(text, i)
        if not m:
            break
        name, i = m.group(0), m.end()
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i >= n or text[i] != "=":
            i = text.find(";", i)
            if i < 0:
                break
            continue
        i += 1
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i < n and text[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(text[i])
                i += 1
            i += 1
            value = "".join(chars)
        else:
            m = re.compile(r"[^;\s]*").match(text, i)
            value = m.group(0) if m else ""
            i = m.end() if m else n
        params.append((name, value))
    return _rfc2231(params)


_RFC2231_KEY = re.compile(r"([^*]*)\*(?:(\d+)(\*?))?")


def _rfc2231(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Join RFC 2231 continuations as Dovecot 2.3 does (``rfc2231_parse``), so clients that do
    not decode RFC 2231 still see one ``name``: ``name*0``/``name*1`` become ``name``; if any
    segment is encoded (``name*0*``) they become one ``name*`` whose value stays encoded (plain
    segments joined as they are, ``''`` put first if the first is plain). Joined
    parameters follow the plain ones, sorted by name; a set with a missing index is listed
    as sent (``name*0``, ``name*2``). ``name*=`` alone counts as an encoded segment 0."""
    plain: list[tuple[str, str]] = []
    segments: list[tuple[str, int, bool, str]] = []  # (name, index, encoded, value)
    for key, value in params:
        m = _RFC2231_KEY.fullmatch(key)
        if m is None:
            plain.append((key, value))
        elif m.group(2) is None:  # name*
            segments.append((m.group(1), 0, True, value))
        else:
            segments.append((m.group(1), int(m.group(2)), m.group(3) == "*", value))
    segments.sort(key=lambda s: (s[0], s[1]))
    joined: list[tuple[str, str]] = []
    for name, grouped in groupby(segments, key=lambda s: s[0]):
        group = list(grouped)
        if [s[1] for s in group] != list(range(len(group))):  # a missing index: as sent
            joined += [(f"{n}*{x}{'*' if enc else ''}", v) for n, x, enc, v in group]
            continue
        encoded = any(s[2] for s in group)
        pieces = [] if group[0][2] or not encoded else ["''"]
        pieces += [value for _, _, _, value in group]
        joined.append((name + ("*" if encoded else ""), "".join(pieces)))
    return plain + joined


def _content_type(value: bytes | None) -> tuple[str, str, list[tuple[str, str]]] | None:
    if value is None:
        return None
    text = _unfold(value).decode("latin-1")
    m = re.match(r"\s*([^\s/;]+)\s*/\s*([^\s;]+)", text)
    if not m:
        return None
    return m.group(1), m.group(2), parse_params(text[m.end() :])


def _split_multipart(
    raw: bytes, start: int, end: int, boundary: bytes
) -> tuple[list[tuple[int, int]], bool]:
    """Offsets of the body parts between ``--boundary`` delimiter lines (RFC 2046 §5.1.1).

    The flag says whether the close delimiter is the last line of the range, without its EOL.
    """
    delimiter = b"--" + boundary
    spans: list[tuple[int, int]] = []
    current: int | None = None
    pos = start
    while pos < end:
        nl = raw.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        if raw.startswith(delimiter, pos, line_end):
            rest = raw[pos + len(delimiter) : line_end].strip()
            if rest in (b"", b"--"):
                if current is not None:
                    cut = pos - 2 if raw[pos - 2 : pos] == b"\r\n" else pos - 1
                    spans.append((current, max(current, cut)))
                if rest == b"--":
                    return spans, line_end == end and raw[line_end - 1 : line_end] != b"\n"
                current = line_end
        pos = line_end
    if current is not None:
        spans.append((current, end))
    return spans, False


def parse_part(
    raw: bytes, start: int, end: int, default: str = "text/plain", depth: int = 0
) -> Part:
    """Index the entity in ``raw[start:end]``; its MIME structure is parsed when first used."""
    fields, body_start = _parse_fields(raw, start, end)
    return Part(raw, start, body_start, end, fields, default, depth)


def _expand(part: Part) -> _Mime:
    """Parse Content-Type, multipart children and an encapsulated message of ``part``.

    Children are expanded at once, because a nested multipart can move its own end by the
    EOL of its close delimiter (see below), which its parent's offsets must already reflect.
    """
    parsed = _content_type(part.value("content-type"))
    if parsed is None:
        maintype, subtype = part.default.split("/")
        mime = _Mime(maintype, subtype, [])
    else:
        mime = _Mime(*parsed)
    if part.depth >= _MAX_DEPTH:
        return mime
    raw, end, kind = part.raw, part.end, mime.maintype.lower()
    if kind == "multipart":
        boundary = _param(mime.params, "boundary")
        if boundary:
            child_default = "message/rfc822" if mime.subtype.lower() == "digest" else "text/plain"
            spans, closed_at_end = _split_multipart(
                raw, part.header_end, end, boundary.encode("latin-1")
            )
            for s, e in spans:
                child = parse_part(raw, s, e, child_default, part.depth + 1)
                child._expand()
                mime.children.append(child)
            if closed_at_end:
                # The EOL of a close delimiter directly followed by the parent's delimiter: RFC
                # 2046 gives it to the parent's delimiter, Dovecot to this part. Follow Dovecot.
                part.end += 2 if raw.startswith(b"\r\n", end) else int(raw.startswith(b"\n", end))
    elif kind == "message" and mime.subtype.lower() == "rfc822":
        mime.message = parse_part(raw, part.header_end, end, "text/plain", part.depth + 1)
        mime.message._expand()
        part.end = max(part.end, mime.message.end)
    return mime


def _param(params: list[tuple[str, str]], name: str) -> str | None:
    for key, value in params:
        if key.lower() == name:
            return value
    return None


class _IndexCache:
    """LRU of parsed messages bounded by the bytes it keeps alive, not only by entry count.

    ``functools.lru_cache`` would pin up to maxsize raw messages whatever their size; a few
    large attachments must not grow the process by gigabytes.
    """

    def __init__(self, max_bytes: int = 64 << 20, max_entries: int = 20000) -> None:
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._parts: OrderedDict[bytes, Part] = OrderedDict()
        self._bytes = 0

    def get(self, raw: bytes) -> Part:
        part = self._parts.get(raw)
        if part is not None:
            self._parts.move_to_end(raw)
            return part
        part = parse_part(raw, 0, len(raw))
        self._parts[raw] = part
        self._bytes += len(raw)
        while self._parts and (self._bytes > self.max_bytes or len(self._parts) > self.max_entries):
            evicted, _ = self._parts.popitem(last=False)
            self._bytes -= len(evicted)
        return part


_CACHE = _IndexCache()


def index(raw: bytes) -> Part:
    """The cached MIME index of one message's raw bytes (expected in CRLF form)."""
    return _CACHE.get(raw)


# -- sections ----------------------------------------------------------------------------------


def _child(entity: Part, number: int) -> Part | None:
    """Part ``number`` (1-based) of ``entity`` in IMAP section numbering (RFC 3501 §6.4.5)."""
    if entity.message is not None:
        return _child(entity.message, number)
    if entity.children:
        return entity.children[number - 1] if 0 < number <= len(entity.children) else None
    return entity if number == 1 else None


def resolve(root: Part, path: list[int]) -> Part | None:
    """The part addressed by a 1-based section path; the message itself for an empty path."""
    entity: Part | None = root
    for number in path:
        if entity is None:
            return None
        entity = _child(entity, number)
    return entity


def header_fields(part: Part, names: list[str], negate: bool) -> bytes:
    """HEADER.FIELDS(.NOT): the matching original fields, in order, plus the blank line."""
    wanted = {name.lower() for name in names}
    kept = [line for name, line in part.fields if (name in wanted) != negate]
    # Dovecot always ends HEADER.FIELDS with a blank line, but .NOT copies the header's own
    # end, which a header-only message lacks.
    return b"".join(kept) + (b"\r\n" if part.has_separator or not negate else b"")


def section(root: Part, path: list[int], spec: str, names: list[str] | None = None) -> bytes:
    """The bytes of ``BODY[path.spec]``; spec is "", HEADER, HEADER.FIELDS(.NOT), TEXT or MIME.

    A section that does not exist is empty, as in Dovecot, rather than an error.
    """
    target = resolve(root, path)
    if target is None:
        return b""
    if spec == "":
        return target.raw[target.start : target.end] if not path else target.body
    if spec == "MIME":
        return target.header if path else b""
    message = target if not path else target.message
    if message is None:
        return b""
    if spec == "HEADER":
        return message.header
    if spec == "TEXT":
        return message.body
    return header_fields(message, names or [], spec.endswith(".NOT"))


# -- IMAP string syntax --------------------------------------------------------------------------


def _unfold(value: bytes) -> bytes:
    """Remove line breaks of folded headers; a TAB after a fold becomes a space (as Dovecot)."""
    return re.sub(rb"\r?\n[ \t]", b" ", value).replace(b"\r", b"").replace(b"\n", b"")


_NEEDS_LITERAL = re.compile(rb'[\r\n"\\]')


def literal(data: bytes) -> bytes:
    """A literal; a NUL byte, which RFC 3501 forbids in one (9: CHAR8), is sent as 0x80, as
    Dovecot does (the length is unchanged)."""
    return b"{%d}\r\n" % len(data) + data.replace(b"\x00", b"\x80")


def nstring(value: bytes | str | None) -> bytes:
    """NIL, a quoted string, or a literal when 8-bit bytes or line breaks make quoting invalid."""
    if value is None:
        return b"NIL"
    data = value.encode("latin-1") if isinstance(value, str) else value
    if not data.isascii() or _NEEDS_LITERAL.search(data):
        return literal(data)  # Dovecot writes strings needing escapes as literals too
    return b'"' + data + b'"'


def _field_value(line: bytes | None) -> bytes | None:
    """A field's value as Dovecot's header parser gives it: blanks after the colon skipped,
    the field's own line end dropped, any fold still inside, trailing blanks kept."""
    if line is None:
        return None
    value = line.split(b":", 1)[1].lstrip(b" \t")
    return value[:-2] if value.endswith(b"\r\n") else value.rstrip(b"\n")


def _unfolded_nstring(line: bytes | None) -> bytes:
    """Date, In-Reply-To, Message-ID in ENVELOPE: the value with every CR and LF removed, the
    blanks of a fold kept (Dovecot's ``imap_append_nstring_nolf``)."""
    value = _field_value(line)
    if value is None:
        return b"NIL"
    return nstring(value.replace(b"\r", b"").replace(b"\n", b""))


_BLANKS = b" \t\r\n"
_NEEDS_CLEANING = re.compile(rb'[\t\r\n\x00"\\]|  ')


def for_humans(text: bytes) -> bytes:
    """A string meant to be read (Subject, address names) as Dovecot writes it
    (``imap_append_string_for_humans``): runs of blanks and line breaks become one space,
    leading and trailing ones go, NUL becomes 0x80; quoted if nothing had to change (and it
    needs no escape and is ASCII), else a literal of the cleaned text."""
    if not _NEEDS_CLEANING.search(text) and text.strip(b" ") == text and text.isascii():
        return b'"' + text + b'"'
    cleaned = b" ".join(re.split(rb"[ \t\r\n]+", text.strip(_BLANKS)))
    return literal(cleaned) if cleaned else b'""'


def _plist(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(nstring(k) + b" " + nstring(v) for k, v in params) + b")"


# -- ENVELOPE ------------------------------------------------------------------------------------

_ADDR_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\((?:\\.|[^()\\])*\)|[<>,:;@]|[^\s<>,:;@"(]+')

Address = tuple[str | None, str | None, str | None, str | None]


def parse_addresses(text: str) -> list[Address]:
    """Parse an address list into (name, adl, mailbox, host) tuples, with RFC 3501 group markers.

    As Dovecot: quoted names are unquoted, encoded words stay encoded, and a comment names the
    address when there is no display name (``a@b (Name)``).
    """
    out: list[Address] = []
    words: list[str] = []
    comments: list[str] = []
    angle: list[str] | None = None
    in_angle = in_group = False

    def flush() -> None:
        nonlocal words, comments, angle
        if angle is not None:
            name = " ".join(words) or None
            addr = "".join(angle)
        elif words:
            name, addr = None, "".join(words)
        else:
            words, comments, angle = [], [], None
            return
        if name is None and comments:
            name = comments[-1] or None
        mailbox, at, host = addr.rpartition("@")
        if not at:
            mailbox, host = addr, ""
        out.append((name, None, mailbox or None, host or None))
        words, comments, angle = [], [], None

    for tok in _ADDR_TOKEN.findall(text):
        if tok.startswith("("):
            comments.append(re.sub(r"\\(.)", r"\1", tok[1:-1]).strip())
            continue
        if tok.startswith('"'):
            tok = re.sub(r"\\(.)", r"\1", tok[1:-1])
        if in_angle:
            if tok == ">":
                in_angle = False
            else:
                angle.append(tok)  # type: ignore[union-attr]
        elif tok == "<":
            angle, in_angle = [], True
        elif tok == ",":
            flush()
        elif tok == ":" and not in_group:
            out.append((None, None, " ".join(words), None))
            words, comments, in_group = [], [], True
        elif tok == ";" and in_group:
            flush()
            out.append((None, None, None, None))
            in_group = False
        elif angle is None:
            words.append(tok)
    flush()
    return out


@lru_cache(maxsize=4096)  # small keys; the same senders and recipients recur across a mailbox
def _addresses(value: bytes | None) -> bytes:
    if value is None:
        return b"NIL"
    parsed = parse_addresses(_unfold(value).decode("latin-1"))
    if not parsed:
        return b"NIL"
    return b"(" + b"".join(_address(a) for a in parsed) + b")"


def _address(address: Address) -> bytes:
    name, adl, mailbox, host = address
    shown = b"NIL" if name is None else for_humans(name.encode("latin-1"))
    return b"(" + b" ".join([shown, nstring(adl), nstring(mailbox), nstring(host)]) + b")"


def envelope(part: Part) -> bytes:
    """ENVELOPE of a message, rendered once per cached index (clients ask again and again)."""
    cached = part.rendered.get("envelope")
    if cached is None:
        cached = part.rendered["envelope"] = _envelope(part)
    return cached


def _envelope(part: Part) -> bytes:
    """The ENVELOPE list of a message (RFC 3501 §7.4.2); Sender and Reply-To default to From.

    A duplicated field contributes its last occurrence, as in Dovecot.
    """

    def last(name: str) -> bytes | None:
        return part.value(name, last=True)

    def line(name: str) -> bytes | None:
        lines = [raw for field, raw in part.fields if field == name]
        return lines[-1] if lines else None

    subject = _field_value(line("subject"))
    sender_from = last("from")
    fields = [
        _unfolded_nstring(line("date")),
        # Dovecot's header parser turns a NUL in a header into U+FFFD before ENVELOPE sees it.
        b"NIL" if subject is None else for_humans(subject.replace(b"\x00", "\ufffd".encode())),
        _addresses(sender_from),
        _addresses(last("sender") or sender_from),
        _addresses(last("reply-to") or sender_from),
        _addresses(last("to")),
        _addresses(last("cc")),
        _addresses(last("bcc")),
        _unfolded_nstring(line("in-reply-to")),
        _unfolded_nstring(line("message-id")),
    ]
    return b"(" + b" ".join(fields) + b")"


# -- BODYSTRUCTURE -------------------------------------------------------------------------------


def _disposition(part: Part) -> bytes:
    value = part.value("content-disposition")
    if value is None:
        return b"NIL"
    text = _unfold(value).decode("latin-1")
    m = re.match(r"\s*([^\s;]+)", text)
    if not m:
        return b"NIL"
    return b"(" + nstring(m.group(1)) + b" " + _plist(parse_params(text[m.end() :])) + b")"


def _language(part: Part) -> bytes:
    value = part.value("content-language")
    if value is None:
        return b"NIL"
    tags = [t for t in re.split(r"[\s,]+", _unfold(value).decode("latin-1")) if t]
    if not tags:
        return b"NIL"
    return b"(" + b" ".join(nstring(t) for t in tags) + b")"


def _raw_nstring(part: Part, name: str) -> bytes:
    value = part.value(name)
    return b"NIL" if value is None else nstring(_unfold(value))


def bodystructure(part: Part, extended: bool = True) -> bytes:
    """BODYSTRUCTURE (``extended``) or BODY of an entity, rendered once per cached index."""
    key = "bodystructure" if extended else "body"
    cached = part.rendered.get(key)
    if cached is None:
        cached = part.rendered[key] = _bodystructure(part, extended)
    return cached


def _bodystructure(part: Part, extended: bool) -> bytes:
    """BODYSTRUCTURE or BODY in Dovecot's field order and defaults."""
    if part.children:
        inner = b"".join(bodystructure(c, extended) for c in part.children)
        out = inner + b" " + nstring(part.subtype)
        if extended:
            out += b" " + b" ".join(
                [
                    _plist(part.params),
                    _disposition(part),
                    _language(part),
                    _raw_nstring(part, "content-location"),
                ]
            )
        return b"(" + out + b")"
    params = list(part.params)
    is_text = part.maintype.lower() == "text"
    if is_text and _param(params, "charset") is None:
        params.append(("charset", "us-ascii"))
    encoding = part.value("content-transfer-encoding")
    items = [
        nstring(part.maintype),
        nstring(part.subtype),
        _plist(params),
        _raw_nstring(part, "content-id"),
        _raw_nstring(part, "content-description"),
        nstring(_unfold(encoding) if encoding else b"7bit"),
        b"%d" % (part.end - part.header_end),
    ]
    if part.message is not None:
        items += [envelope(part.message), bodystructure(part.message, extended)]
    if part.message is not None or is_text:
        items.append(b"%d" % part.body.count(b"\n"))
    if extended:
        items += [
            _raw_nstring(part, "content-md5"),
            _disposition(part),
            _language(part),
            _raw_nstring(part, "content-location"),
        ]
    return b"(" + b" ".join(items) + b")"
