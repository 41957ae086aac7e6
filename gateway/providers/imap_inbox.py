"""The INBOX of an upstream IMAP server (``provider: upstream`` with ``upstream.imap``).

One logged-in imaplib connection, in a worker thread, replaced once when a reused one turns out
to be dead (idle timeout, server restart, BYE). It reads with EXAMINE and ``BODY.PEEK[]`` only,
so the gateway never marks anything read upstream; only the opt-in mirroring writes
(:meth:`UpstreamImapSource.set_flags`, :meth:`UpstreamImapSource.remove`) SELECT the INBOX
read-write.
"""

from __future__ import annotations

import asyncio
import imaplib
import re
import ssl
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

from ..config import UpstreamServer
from ..logs import get_logger
from ._inbox import (
    Changes,
    CursorExpired,
    NotSupported,
    RemoteMessage,
    Removal,
    Snapshot,
    flag_set,
)
from ._upstream import (
    DEFAULT_TIMEOUT,
    ThreadedClient,
    credentials,
    tls_context,
)

log = get_logger(__name__)

T = TypeVar("T")

# Response codes (RFC 5530) that say "not now" rather than "never".
_IMAP_TEMPORARY = ("[UNAVAILABLE]", "[INUSE]", "[LIMIT]", "[SERVERBUG]", "[OVERQUOTA]")
_SPECIAL_USE = {"trash": "\\Trash", "archive": "\\Archive"}

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
            fields["flags"] = _flag_names(flags.group(1))
        if date := _DATE.search(text):
            fields["date"] = _internal_date(date)
        if size := _SIZE.search(text):
            fields["size"] = int(size.group(1))
    return found


_SYSTEM_FLAGS = {
    f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
}


def _flag_names(listed: bytes) -> frozenset[str]:
    """Every flag of a FETCH FLAGS list (keywords such as $Forwarded too), system flags in
    their canonical case; \\Recent is this connection's, never the message's."""
    names = listed.decode("utf-8", "replace").split()
    return flag_set(_SYSTEM_FLAGS.get(n.lower(), n) for n in names)


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


def _split_cursor(cursor: str) -> tuple[int, int, int | None]:
    """``UIDVALIDITY:UIDNEXT[:HIGHESTMODSEQ]`` (the modseq only from a CONDSTORE server)."""
    validity, _, rest = cursor.partition(":")
    uidnext, _, modseq = rest.partition(":")
    if not (validity.isdigit() and uidnext.isdigit() and (not modseq or modseq.isdigit())):
        raise CursorExpired(f"not an upstream IMAP cursor: {cursor!r}")
    return int(validity), int(uidnext), int(modseq) if modseq else None


def _cursor(validity: int, uidnext: int, modseq: int | None) -> str:
    return f"{validity}:{uidnext}" + (f":{modseq}" if modseq is not None else "")


class UpstreamImapSource(ThreadedClient):
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
    protocol = "imap"
    temporary_codes = _IMAP_TEMPORARY
    broken = (imaplib.IMAP4.abort, OSError)

    def __init__(
        self, server: UpstreamServer, system_ca_file: Path, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        super().__init__(server, system_ca_file, timeout)
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
            context = tls_context(server, self.system_ca_file)
            imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                server.host, port, ssl_context=context, timeout=self.timeout
            )
        else:
            imap = imaplib.IMAP4(server.host, port, timeout=self.timeout)
        try:
            if server.security == "starttls":
                imap.starttls(tls_context(server, self.system_ca_file))
            self._login(imap)
            caps = _check(imap.capability(), "CAPABILITY")[0].decode("ascii", "replace")
        except BaseException:
            with suppress(Exception):
                imap.shutdown()
            raise
        self._capabilities = frozenset(caps.upper().split())
        if "CONDSTORE" in self._capabilities:  # RFC 7162: every SELECT reports HIGHESTMODSEQ
            with suppress(imaplib.IMAP4.error):
                imap.enable("CONDSTORE")
        self._examined = False
        return imap

    def _login(self, imap: imaplib.IMAP4) -> None:
        if imap.state != "NONAUTH":  # PREAUTH greeting
            return
        username, password = credentials(self.server, "imap")
        try:
            if username.isascii() and password.isascii():
                imap.login(username, password)
            else:  # imaplib's LOGIN sends ASCII only; PLAIN carries UTF-8
                imap.authenticate("PLAIN", lambda _: f"\0{username}\0{password}".encode())
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as error:
            raise self._login_refused(error) from error

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

    # -- operations (in the worker thread, holding the lock) --

    def _open(self, imap: imaplib.IMAP4, readonly: bool) -> tuple[int, int | None, int]:
        """(UIDVALIDITY, UIDNEXT or None, EXISTS) of a fresh EXAMINE (or SELECT)."""
        self._examined = False
        what = "EXAMINE INBOX" if readonly else "SELECT INBOX"
        imap.untagged_responses.pop("HIGHESTMODSEQ", None)
        exists = _check(imap.select("INBOX", readonly=readonly), what)[0]
        validity = imap.response("UIDVALIDITY")[1][0]
        if validity is None:
            raise _Refused(f"{what} answered without a UIDVALIDITY")
        uidnext = imap.response("UIDNEXT")[1][0]
        self._examined, self._uidvalidity = readonly, int(validity)
        return int(validity), int(uidnext) if uidnext is not None else None, int(exists or 0)

    @staticmethod
    def _highest_modseq(imap: imaplib.IMAP4) -> int | None:
        """HIGHESTMODSEQ of the last SELECT/EXAMINE; None without CONDSTORE (or NOMODSEQ)."""
        value = imap.response("HIGHESTMODSEQ")[1][0]
        return int(value) if value is not None and value.isdigit() else None

    def _remote(self, validity: int, uid: int, fields: dict[str, object]) -> RemoteMessage | None:
        date, size = fields.get("date"), fields.get("size")
        if not isinstance(date, datetime) or not isinstance(size, int):
            return None  # only an unsolicited FETCH named it: gone again, or next time
        flags = fields.get("flags")
        flags = flags if isinstance(flags, frozenset) else frozenset()
        return RemoteMessage(f"{validity}.{uid}", date, flags, size, order=uid)

    def _meta(self, imap: imaplib.IMAP4, validity: int, lowest: int) -> list[RemoteMessage]:
        data = _check(imap.uid("FETCH", f"{lowest}:*", _META), "UID FETCH")
        found = _parse_fetch(data, lowest)
        listed = (self._remote(validity, uid, f) for uid, f in sorted(found.items()))
        return [m for m in listed if m is not None]

    def _list(self, imap: imaplib.IMAP4) -> Snapshot:
        validity, uidnext, exists = self._open(imap, readonly=True)
        modseq = self._highest_modseq(imap)
        messages = self._meta(imap, validity, 1) if exists else []
        highest = max((_split_id(m.id)[1] for m in messages), default=0)
        return Snapshot(messages, _cursor(validity, uidnext or highest + 1, modseq))

    def _changes(self, imap: imaplib.IMAP4, cursor: str) -> Changes:
        """New mail above the cursor's UIDNEXT, the flags of what changed, and the UIDs
        still present. With CONDSTORE only flags changed since the cursor's modseq are
        fetched (and the present UIDs by UID SEARCH); else the flags of every message."""
        old_validity, old_next, old_modseq = _split_cursor(cursor)
        validity, uidnext, exists = self._open(imap, readonly=True)
        if validity != old_validity:
            raise CursorExpired(f"upstream UIDVALIDITY changed from {old_validity} to {validity}")
        modseq = self._highest_modseq(imap)
        present, flags = self._present_and_flags(imap, exists, old_modseq, modseq)
        added: list[RemoteMessage] = []
        if any(uid >= old_next for uid in present):
            added = [
                m for m in self._meta(imap, validity, old_next) if _split_id(m.id)[1] in present
            ]
        now = {
            f"{validity}.{uid}": names
            for uid, f in flags.items()
            if isinstance(names := f.get("flags"), frozenset)
        }
        new_next = uidnext or max([old_next - 1, *present]) + 1
        ids = frozenset(f"{validity}.{uid}" for uid in present)
        return Changes(added, [], now, _cursor(validity, new_next, modseq), ids)

    def _present_and_flags(
        self, imap: imaplib.IMAP4, exists: int, old_modseq: int | None, modseq: int | None
    ) -> tuple[set[int], dict[int, dict[str, object]]]:
        """The UIDs in the INBOX, and the flags of those that (may have) changed."""
        if not exists:
            return set(), {}
        if modseq is None or old_modseq is None:
            flags = _parse_fetch(_check(imap.uid("FETCH", "1:*", "(UID FLAGS)"), "UID FETCH"))
            return set(flags), flags
        found = _check(imap.uid("SEARCH", "ALL"), "UID SEARCH")
        present = {int(uid) for line in found if line for uid in line.split()}
        if modseq == old_modseq:
            return present, {}
        since = f"(CHANGEDSINCE {old_modseq})"
        return present, _parse_fetch(
            _check(imap.uid("FETCH", "1:*", "(UID FLAGS)", since), "UID FETCH")
        )

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
