"""INBOX sources for ``provider: upstream`` accounts: a real IMAP or POP3 server with a password.

Both run the standard library clients (imaplib, poplib) in worker threads, because they block.
Work is serialised twice: an asyncio lock keeps waiting operations (the IMAP frontend fetches
several bodies at once) from each holding a worker thread, and a ``threading.Lock`` held by the
worker keeps a cancelled task's still-running thread alone on its connection.

IMAP keeps one logged-in connection and reconnects once when a reused one turns out to be dead
(idle timeout, server restart, BYE). It reads with EXAMINE and ``BODY.PEEK[]`` only, so the
gateway never marks anything read upstream; only the opt-in mirroring writes (:meth:`set_flags`,
:meth:`remove`) SELECT the INBOX read-write. POP3 opens one short connection per operation,
since a POP3 session locks the maildrop against the owner's other clients, and never deletes.

Failures are classified like every provider call (``gateway.providers._errors``): the network,
timeouts and a server going away are :class:`Temporary`; refused credentials, an untrusted
certificate or a server refusing a command are :class:`Permanent`, with a sentence for the admin.
"""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import re
import ssl
import threading
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

from ..config import UpstreamServer
from ..logs import get_logger
from ..outbound import upstream_context
from ..providers._errors import DeliveryError, Permanent, Temporary
from ._sources import (
    SEEN,
    Changes,
    CursorExpired,
    NotSupported,
    RemoteMessage,
    Removal,
    Snapshot,
)

log = get_logger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0

# Response codes (RFC 5530, RFC 2449) that say "not now" rather than "never".
_IMAP_TEMPORARY = ("[UNAVAILABLE]", "[INUSE]", "[LIMIT]", "[SERVERBUG]", "[OVERQUOTA]")
_POP3_TEMPORARY = ("[IN-USE]", "[SYS/TEMP]", "[LOGIN-DELAY]")

_SPECIAL_USE = {"trash": "\\Trash", "archive": "\\Archive"}

# poplib refuses any line over 2048 bytes (a guard against a hostile server), but real mail
# often has longer ones (HTML on one line); upstream servers are configured and trusted, so the
# limit is raised to imaplib's for this process. Every line is still bounded.
poplib._MAXLINE = max(poplib._MAXLINE, imaplib._MAXLINE)  # type: ignore[attr-defined]


def _tls_context(server: UpstreamServer, system_ca_file: Path) -> ssl.SSLContext:
    """The same trust as the upstream SMTP sender: system CAs plus the server's ``ca_file``;
    hostnames are verified (``create_default_context``)."""
    return upstream_context(server, system_ca_file)


def _credentials(server: UpstreamServer, protocol: str) -> tuple[str, str]:
    if not server.username or server.password is None:
        raise Permanent(
            f"upstream.{protocol} of this account has no username/password configured; "
            "add them to the config"
        )
    return server.username, server.password.value


def _wrong_password(protocol: str, server: UpstreamServer, detail: str) -> Permanent:
    return Permanent(
        f"upstream {protocol.upper()} server {server.host} refused the login of "
        f"{server.username} ({detail}): the upstream.{protocol} password (or username) in the "
        "config is wrong; fix it and reload"
    )


def _untrusted(
    protocol: str, server: UpstreamServer, error: ssl.SSLCertVerificationError
) -> Permanent:
    return Permanent(
        f"upstream {protocol.upper()} server {server.host}: its TLS certificate is not trusted "
        f"({error.verify_message}); set upstream.{protocol}.ca_file to the PEM file of its CA, "
        "or use the host name its certificate names"
    )


# -- IMAP ------------------------------------------------------------------------------------------

_UID = re.compile(rb"\bUID (\d+)")
_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_DATE = re.compile(
    rb'\bINTERNALDATE "\s*(\d{1,2})-(\w{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([-+]\d{4})"'
)
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_LIST = re.compile(rb'^\(([^)]*)\) (?:NIL|"(?:[^"\\]|\\.)*") ?(.*)$')
_MONTHS = {
    m: n for n, m in enumerate(b"Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)
}
_META = "(UID FLAGS INTERNALDATE RFC822.SIZE)"


class _Refused(Exception):
    """A tagged NO/BAD; str() is the command and the server's own text."""


def _check(result: tuple[str, list], what: str) -> list:
    typ, data = result
    if typ != "OK":
        text = b" ".join(d for d in data if isinstance(d, bytes)).decode("utf-8", "replace")
        raise _Refused(f"{what} answered {typ} {text}".strip())
    return data


def _internal_date(match: re.Match[bytes]) -> datetime:
    """INTERNALDATE in UTC; parsed by hand because strptime's %b follows the locale."""
    day, month, year, hour, minute, second, zone = match.groups()
    offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5]))
    local = timezone(-offset if zone.startswith(b"-") else offset)
    moment = datetime(
        int(year), _MONTHS[month.title()], int(day), int(hour), int(minute), int(second)
    )
    return moment.replace(tzinfo=local).astimezone(UTC)


def _reason(error: BaseException) -> str:
    """The server's own text of an imaplib/poplib error (they carry it as bytes)."""
    arg = error.args[0] if error.args else error
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def _parse_fetch(data: list, lowest: int = 1) -> dict[int, dict[str, object]]:
    """FETCH responses by UID (``lowest`` and up: ``N:*`` also answers the last message below
    N). Unsolicited FETCHes may be mixed in; later data about a UID wins."""
    found: dict[int, dict[str, object]] = {}
    for item in data:
        text = item[0] if isinstance(item, tuple) else item
        uid = _UID.search(text) if isinstance(text, bytes) else None
        if uid is None or int(uid.group(1)) < lowest:
            continue
        fields = found.setdefault(int(uid.group(1)), {})
        if flags := _FLAGS.search(text):
            fields["seen"] = SEEN.encode().lower() in flags.group(1).lower().split()
        if date := _DATE.search(text):
            fields["date"] = _internal_date(date)
        if size := _SIZE.search(text):
            fields["size"] = int(size.group(1))
    return found


def _list_name(item: bytes | tuple[bytes, bytes]) -> tuple[set[str], str] | None:
    """(lower-cased attributes, raw mailbox name as sent) of one LIST reply."""
    text = item[0] if isinstance(item, tuple) else item
    match = _LIST.match(text)
    if match is None:
        return None
    attrs = {a.lower() for a in match.group(1).decode("ascii", "replace").split()}
    if isinstance(item, tuple):  # the name came as a literal
        return attrs, item[1].decode("utf-8", "replace")
    name = match.group(2).decode("utf-8", "replace")
    if name.startswith('"'):
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
    return attrs, name


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _split_id(provider_id: str) -> tuple[int, int]:
    """(UIDVALIDITY, UID) of an id; KeyError for one this source never made."""
    validity, _, uid = provider_id.partition(".")
    if not (validity.isdigit() and uid.isdigit()):
        raise KeyError(provider_id)
    return int(validity), int(uid)


def _split_cursor(cursor: str) -> tuple[int, int]:
    validity, _, uidnext = cursor.partition(":")
    if not (validity.isdigit() and uidnext.isdigit()):
        raise CursorExpired(f"not an upstream IMAP cursor: {cursor!r}")
    return int(validity), int(uidnext)


class UpstreamImapSource:
    """The INBOX of an upstream IMAP server, read-only unless mirroring writes are asked for.

    An id is ``"{UIDVALIDITY}.{UID}"``: stable exactly as long as the server keeps its UIDs.
    ``ids_stable`` is True even though a UIDVALIDITY change renames every message: the view
    then resyncs by id, every old id is missing (its messages are expunged for clients) and the
    messages come back as new ones with fresh gateway UIDs. That is what RFC 3501 requires of
    UIDs (never reused, never pointing at other bytes), and it keeps the gateway's own
    UIDVALIDITY — which clients would otherwise see change — for the one case where the
    provider itself could not keep its promise. Clients download those messages again; nothing
    can tell which new UID is which old message.

    The cursor is ``"{UIDVALIDITY}:{UIDNEXT}"`` as seen by the EXAMINE before the listing:
    a message arriving later has a UID at or above it, so it is never missed (at worst seen
    twice, which the view ignores).
    """

    ids_stable = True

    def __init__(
        self, server: UpstreamServer, system_ca_file: Path, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.server = server
        self.system_ca_file = system_ca_file
        self.timeout = timeout
        self._queue = asyncio.Lock()
        self._lock = threading.Lock()
        self._imap: imaplib.IMAP4 | None = None
        self._capabilities: frozenset[str] = frozenset()
        self._examined = False  # INBOX selected read-only (else read-write or nothing)
        self._uidvalidity = 0

    # -- the MailboxSource interface --

    async def list_inbox(self) -> Snapshot:
        return await self._call(self._list)

    async def changes_since(self, cursor: str) -> Changes:
        return await self._call(self._changes, cursor)

    async def fetch_raw(self, provider_id: str) -> bytes:
        """The message exactly as the server stores it; KeyError once it is gone upstream."""
        return await self._call(self._body, provider_id)

    async def set_flags(self, provider_id: str, seen: bool | None, flagged: bool | None) -> None:
        """A message already gone upstream is done, as with the API sources."""
        wanted = {"\\Seen": seen, "\\Flagged": flagged}
        if any(v is not None for v in wanted.values()):
            await self._call(self._store, provider_id, wanted)

    async def remove(self, provider_id: str, how: Removal) -> None:
        """Move to the special-use \\Trash or \\Archive folder; never expunge another message."""
        await self._call(self._move, provider_id, how)

    async def close(self) -> None:
        """Log out (at shutdown); the next operation would connect again."""
        async with self._queue:
            await asyncio.to_thread(self._logout)

    # -- connection --

    async def _call(self, op: Callable[..., T], *args: object) -> T:
        async with self._queue:
            return await asyncio.to_thread(self._run, op, *args)

    def _run(self, op: Callable[..., T], *args: object) -> T:
        """Run ``op(imap, *args)``; a reused connection that died is replaced once."""
        with self._lock:
            reused = self._imap is not None
            try:
                return self._attempt(op, *args)
            except (imaplib.IMAP4.abort, OSError) as error:
                self._drop()
                if not reused or isinstance(error, ssl.SSLCertVerificationError):
                    raise self._failure(error) from error
                log.info("upstream.imap.reconnect", host=self.server.host, reason=str(error))
            try:
                return self._attempt(op, *args)
            except (imaplib.IMAP4.abort, OSError) as error:
                self._drop()
                raise self._failure(error) from error

    def _attempt(self, op: Callable[..., T], *args: object) -> T:
        try:
            if self._imap is None:
                self._imap = self._connect()
            imap = self._imap
            # imaplib keeps every untagged reply until asked; old EXISTS/EXPUNGE/FETCH are of
            # no use here and would only pile up on a long-lived connection.
            imap.untagged_responses.clear()
            return op(imap, *args)
        except imaplib.IMAP4.abort:
            raise
        except (imaplib.IMAP4.error, _Refused) as error:
            raise self._failure(error) from error

    def _connect(self) -> imaplib.IMAP4:
        server = self.server
        port = server.port_for("imap")
        if server.security == "tls":
            context = _tls_context(server, self.system_ca_file)
            imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                server.host, port, ssl_context=context, timeout=self.timeout
            )
        else:
            imap = imaplib.IMAP4(server.host, port, timeout=self.timeout)
        try:
            if server.security == "starttls":
                imap.starttls(_tls_context(server, self.system_ca_file))
            self._login(imap)
            caps = _check(imap.capability(), "CAPABILITY")[0].decode("ascii", "replace")
        except BaseException:
            with suppress(Exception):
                imap.shutdown()
            raise
        self._capabilities = frozenset(caps.upper().split())
        self._examined = False
        return imap

    def _login(self, imap: imaplib.IMAP4) -> None:
        if imap.state != "NONAUTH":  # PREAUTH greeting
            return
        username, password = _credentials(self.server, "imap")
        try:
            if username.isascii() and password.isascii():
                imap.login(username, password)
            else:  # imaplib's LOGIN sends ASCII only; PLAIN carries UTF-8
                imap.authenticate("PLAIN", lambda _: f"\0{username}\0{password}".encode())
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as error:
            text = _reason(error)
            if any(code in text for code in _IMAP_TEMPORARY):
                raise Temporary(f"upstream IMAP {self.server.host}: login: {text}") from error
            raise _wrong_password("imap", self.server, text) from error

    def _drop(self) -> None:
        imap, self._imap = self._imap, None
        if imap is not None:
            with suppress(Exception):
                imap.shutdown()

    def _logout(self) -> None:
        with self._lock:
            imap, self._imap = self._imap, None
            if imap is not None:
                with suppress(Exception):
                    imap.logout()

    def _failure(self, error: BaseException) -> DeliveryError:
        host = self.server.host
        if isinstance(error, ssl.SSLCertVerificationError):
            return _untrusted("imap", self.server, error)
        if isinstance(error, imaplib.IMAP4.abort | OSError):
            return Temporary(f"upstream IMAP {host}: {type(error).__name__}: {error}")
        text = _reason(error)
        if any(code in text for code in _IMAP_TEMPORARY):
            return Temporary(f"upstream IMAP {host}: {text}")
        return Permanent(f"upstream IMAP {host}: {text}")

    # -- operations (in the worker thread, holding the lock) --

    def _open(self, imap: imaplib.IMAP4, readonly: bool) -> tuple[int, int | None, int]:
        """(UIDVALIDITY, UIDNEXT or None, EXISTS) of a fresh EXAMINE (or SELECT)."""
        self._examined = False
        what = "EXAMINE INBOX" if readonly else "SELECT INBOX"
        exists = _check(imap.select("INBOX", readonly=readonly), what)[0]
        validity = imap.response("UIDVALIDITY")[1][0]
        if validity is None:
            raise _Refused(f"{what} answered without a UIDVALIDITY")
        uidnext = imap.response("UIDNEXT")[1][0]
        self._examined, self._uidvalidity = readonly, int(validity)
        return int(validity), int(uidnext) if uidnext is not None else None, int(exists or 0)

    def _remote(self, validity: int, uid: int, fields: dict[str, object]) -> RemoteMessage | None:
        date, size = fields.get("date"), fields.get("size")
        if not isinstance(date, datetime) or not isinstance(size, int):
            return None  # only an unsolicited FETCH named it: gone again, or next time
        return RemoteMessage(f"{validity}.{uid}", date, bool(fields.get("seen")), size)

    def _meta(self, imap: imaplib.IMAP4, validity: int, lowest: int) -> list[RemoteMessage]:
        data = _check(imap.uid("FETCH", f"{lowest}:*", _META), "UID FETCH")
        found = _parse_fetch(data, lowest)
        listed = (self._remote(validity, uid, f) for uid, f in sorted(found.items()))
        return [m for m in listed if m is not None]

    def _list(self, imap: imaplib.IMAP4) -> Snapshot:
        validity, uidnext, exists = self._open(imap, readonly=True)
        messages = self._meta(imap, validity, 1) if exists else []
        highest = max((_split_id(m.id)[1] for m in messages), default=0)
        return Snapshot(messages, f"{validity}:{uidnext or highest + 1}")

    def _changes(self, imap: imaplib.IMAP4, cursor: str) -> Changes:
        old_validity, old_next = _split_cursor(cursor)
        validity, uidnext, exists = self._open(imap, readonly=True)
        if validity != old_validity:
            raise CursorExpired(f"upstream UIDVALIDITY changed from {old_validity} to {validity}")
        flags: dict[int, dict[str, object]] = {}
        if exists:
            flags = _parse_fetch(_check(imap.uid("FETCH", "1:*", "(UID FLAGS)"), "UID FETCH"))
        added: list[RemoteMessage] = []
        if any(uid >= old_next for uid in flags):
            added = [m for m in self._meta(imap, validity, old_next) if _split_id(m.id)[1] in flags]
        seen = {f"{validity}.{uid}": bool(f.get("seen")) for uid, f in flags.items()}
        new_next = uidnext or max([old_next - 1, *flags]) + 1
        return Changes(added, [], seen, f"{validity}:{new_next}", frozenset(seen))

    def _body(self, imap: imaplib.IMAP4, provider_id: str) -> bytes:
        validity, uid = _split_id(provider_id)
        if not self._examined:
            self._open(imap, readonly=True)
        raw = self._peek(imap, uid) if validity == self._uidvalidity else None
        if raw is None:  # a fresh look: a new UIDVALIDITY, or mail this session has not seen
            self._open(imap, readonly=True)
            raw = self._peek(imap, uid) if validity == self._uidvalidity else None
        if raw is None:
            raise KeyError(provider_id)
        return raw

    def _peek(self, imap: imaplib.IMAP4, uid: int) -> bytes | None:
        """BODY.PEEK[] (BODY[] would set \\Seen); None when there is no such UID."""
        for item in _check(imap.uid("FETCH", str(uid), "(BODY.PEEK[])"), "UID FETCH BODY"):
            if isinstance(item, tuple) and b"BODY[]" in item[0]:
                named = _UID.search(item[0])
                if named is None or int(named.group(1)) == uid:
                    return item[1]
        return None

    def _writable(self, imap: imaplib.IMAP4, provider_id: str) -> str | None:
        """SELECT (read-write) and the UID to change, or None if the message is gone."""
        validity, uid = _split_id(provider_id)
        current, _, _ = self._open(imap, readonly=False)
        return str(uid) if current == validity else None

    def _store(self, imap: imaplib.IMAP4, provider_id: str, wanted: dict[str, bool | None]) -> None:
        uid = self._writable(imap, provider_id)
        if uid is None:
            return
        for sign, value in (("+", True), ("-", False)):
            names = [flag for flag, want in wanted.items() if want is value]
            if names:  # a UID that no longer exists matches nothing: OK, no change
                command = imap.uid("STORE", uid, f"{sign}FLAGS.SILENT", f"({' '.join(names)})")
                _check(command, "UID STORE")

    def _move(self, imap: imaplib.IMAP4, provider_id: str, how: Removal) -> None:
        folder = self._special_folder(imap, how)
        if "MOVE" not in self._capabilities and "UIDPLUS" not in self._capabilities:
            raise NotSupported(
                f"upstream IMAP server {self.server.host} has neither MOVE nor UIDPLUS, so a "
                "message cannot leave the INBOX without expunging others marked deleted"
            )
        uid = self._writable(imap, provider_id)
        if uid is None:
            return
        if "MOVE" in self._capabilities:
            _check(imap.uid("MOVE", uid, _quote(folder)), "UID MOVE")
            return
        # UID EXPUNGE (UIDPLUS) removes only this UID, never others someone marked \Deleted.
        _check(imap.uid("COPY", uid, _quote(folder)), "UID COPY")
        _check(imap.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)"), "UID STORE")
        _check(imap.uid("EXPUNGE", uid), "UID EXPUNGE")

    def _special_folder(self, imap: imaplib.IMAP4, how: Removal) -> str:
        """The folder the server marks \\Trash or \\Archive (RFC 6154); names vary by server
        and language, so a name is never guessed."""
        use = _SPECIAL_USE[how]
        pattern = '"*" RETURN (SPECIAL-USE)' if "SPECIAL-USE" in self._capabilities else '"*"'
        for item in _check(imap.list('""', pattern), "LIST"):
            parsed = _list_name(item) if item is not None else None
            if parsed is not None and use.lower() in parsed[0]:
                return parsed[1]
        raise NotSupported(
            f"upstream IMAP server {self.server.host} has no folder marked {use} (RFC 6154 "
            f"SPECIAL-USE), so a message cannot be moved to the {how} there; configure one on "
            "the server or turn this mirroring off"
        )


# -- POP3 ------------------------------------------------------------------------------------------

_TOP_ALL = 2**31 - 1  # "every body line", within any server's int32


class UpstreamPop3Source:
    """The maildrop of an upstream POP3 server, never changed: no DELE, ever.

    An id is the server's UIDL, which RFC 1939 requires to be stable across sessions. POP3 has
    no arrival date, so a message's ``internal_date`` is when it was first listed (the view
    keeps the date it stored for a known id); within one listing they are a microsecond apart
    in maildrop order, which is arrival order, because the view orders a batch by date.

    Bodies are read with ``TOP n <all lines>`` where the server has TOP, because RETR makes
    servers such as Dovecot mark the message \\Seen for the owner's other (IMAP) clients; a TOP
    whose length does not match LIST is not trusted and RETR is used instead.
    """

    ids_stable = True
    CURSOR = "pop3"  # every listing is complete; the cursor only says "listed before"

    def __init__(
        self, server: UpstreamServer, system_ca_file: Path, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.server = server
        self.system_ca_file = system_ca_file
        self.timeout = timeout
        self._queue = asyncio.Lock()
        self._lock = threading.Lock()

    async def list_inbox(self) -> Snapshot:
        return Snapshot(await self._call(self._listing), self.CURSOR)

    async def changes_since(self, cursor: str) -> Changes:
        """The whole listing: the view ignores ids it knows and removes those not present."""
        messages = await self._call(self._listing)
        return Changes(messages, [], {}, self.CURSOR, frozenset(m.id for m in messages))

    async def fetch_raw(self, provider_id: str) -> bytes:
        """The message in CRLF form; KeyError once it is gone upstream."""
        return await self._call(self._retrieve, provider_id)

    async def set_flags(self, provider_id: str, seen: bool | None, flagged: bool | None) -> None:
        raise NotSupported("POP3 has no flags: read and flagged state cannot be kept upstream")

    async def remove(self, provider_id: str, how: Removal) -> None:
        raise NotSupported(
            f"POP3 has no folders: a message cannot be moved to the {how}, and the gateway "
            "never deletes mail upstream"
        )

    async def close(self) -> None:
        """Nothing to close: POP3 connections last one operation."""

    # -- connection --

    async def _call(self, op: Callable[[poplib.POP3, str], T], provider_id: str = "") -> T:
        async with self._queue:
            return await asyncio.to_thread(self._run, op, provider_id)

    def _run(self, op: Callable[[poplib.POP3, str], T], provider_id: str) -> T:
        """One session: connect, log in, ``op``, QUIT (which, without DELE, changes nothing)."""
        with self._lock:
            try:
                pop = self._connect()
            except (poplib.error_proto, OSError) as error:
                raise self._failure(error) from error
            try:
                result = op(pop, provider_id)
                pop.quit()
                return result
            except (poplib.error_proto, OSError) as error:
                raise self._failure(error) from error
            finally:
                with suppress(Exception):
                    pop.close()

    def _connect(self) -> poplib.POP3:
        server = self.server
        port = server.port_for("pop3")
        if server.security == "tls":
            context = _tls_context(server, self.system_ca_file)
            pop: poplib.POP3 = poplib.POP3_SSL(
                server.host, port, timeout=self.timeout, context=context
            )
        else:
            pop = poplib.POP3(server.host, port, timeout=self.timeout)
        try:
            if server.security == "starttls":
                pop.stls(_tls_context(server, self.system_ca_file))
            self._login(pop)
        except BaseException:
            with suppress(Exception):
                pop.close()
            raise
        return pop

    def _login(self, pop: poplib.POP3) -> None:
        username, password = _credentials(self.server, "pop3")
        try:
            pop.user(username)
            pop.pass_(password)
        except poplib.error_proto as error:
            text = _reason(error)
            if any(code in text for code in _POP3_TEMPORARY):
                raise Temporary(f"upstream POP3 {self.server.host}: login: {text}") from error
            raise _wrong_password("pop3", self.server, text) from error

    def _failure(self, error: BaseException) -> DeliveryError:
        host = self.server.host
        if isinstance(error, ssl.SSLCertVerificationError):
            return _untrusted("pop3", self.server, error)
        if isinstance(error, OSError):
            return Temporary(f"upstream POP3 {host}: {type(error).__name__}: {error}")
        text = _reason(error)
        if any(code in text for code in _POP3_TEMPORARY):
            return Temporary(f"upstream POP3 {host}: {text}")
        return Permanent(f"upstream POP3 {host}: {text}")

    # -- operations --

    def _numbers(self, pop: poplib.POP3) -> dict[str, int]:
        """UIDL → message number (a repeated UIDL, a server bug, keeps its first message)."""
        numbers: dict[str, int] = {}
        for line in pop.uidl()[1]:
            number, _, uid = line.decode("utf-8", "replace").partition(" ")
            numbers.setdefault(uid.strip(), int(number))
        return numbers

    def _sizes(self, pop: poplib.POP3) -> dict[int, int]:
        sizes: dict[int, int] = {}
        for line in pop.list()[1]:
            number, _, octets = line.decode("ascii", "replace").partition(" ")
            sizes[int(number)] = int(octets.split()[0])
        return sizes

    def _listing(self, pop: poplib.POP3, _: str = "") -> list[RemoteMessage]:
        numbers, sizes = self._numbers(pop), self._sizes(pop)
        now = datetime.now(UTC)
        return [
            RemoteMessage(uid, now + timedelta(microseconds=n), False, sizes.get(n))
            for uid, n in sorted(numbers.items(), key=lambda item: item[1])
        ]

    def _retrieve(self, pop: poplib.POP3, provider_id: str) -> bytes:
        number = self._numbers(pop).get(provider_id)
        if number is None:
            raise KeyError(provider_id)
        octets = int(pop.list(number).split()[2])
        if _has_top(pop):
            raw = _whole(pop.top(number, _TOP_ALL)[1], octets)
            if raw is not None:
                return raw
        lines = pop.retr(number)[1]
        raw = _whole(lines, octets)
        # A LIST size the server got wrong: serve what it sent (the view measures it).
        return raw if raw is not None else b"\r\n".join(lines) + b"\r\n"


def _has_top(pop: poplib.POP3) -> bool:
    try:
        return "TOP" in pop.capa()
    except poplib.error_proto:  # no CAPA (RFC 1939 only): TOP is optional there
        return False


def _whole(lines: list[bytes], octets: int) -> bytes | None:
    """The message from its (un-dot-stuffed) lines, or None if it is not ``octets`` long.

    The server ends the last line with CRLF even when the stored message does not; LIST counts
    the stored bytes, so exactly two extra octets are that CRLF, and dropping them serves the
    same bytes as the server's IMAP does.
    """
    raw = b"\r\n".join(lines) + b"\r\n"
    if len(raw) == octets:
        return raw
    if len(raw) == octets + 2 and raw.endswith(b"\r\n"):
        return raw[:-2]
    return None
