"""The INBOX of an upstream POP3 server (``provider: upstream`` with ``upstream.pop3``).

One short poplib connection per operation, in a worker thread, since a POP3 session locks the
maildrop against the owner's other clients; it never sends DELE.
"""

from __future__ import annotations

import imaplib
import poplib
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from ._inbox import Changes, NotSupported, RemoteMessage, Removal, Snapshot
from ._upstream import ThreadedClient, credentials, tls_context

T = TypeVar("T")

# Response codes (RFC 2449, RFC 3206) that say "not now" rather than "never".
_POP3_TEMPORARY = ("[IN-USE]", "[SYS/TEMP]", "[LOGIN-DELAY]")

# poplib refuses any line over 2048 bytes (a guard against a hostile server), but real mail
# often has longer ones (HTML on one line); upstream servers are configured and trusted, so the
# limit is raised to imaplib's for this process. Every line is still bounded.
poplib._MAXLINE = max(poplib._MAXLINE, imaplib._MAXLINE)  # type: ignore[attr-defined]

_TOP_ALL = 2**31 - 1  # "every body line", within any server's int32


class UpstreamPop3Source(ThreadedClient):
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
    protocol = "pop3"
    temporary_codes = _POP3_TEMPORARY
    CURSOR = "pop3"  # every listing is complete; the cursor only says "listed before"

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

    def _run(self, op: Callable[..., T], *args: object) -> T:
        """One session: connect, log in, ``op``, QUIT (which, without DELE, changes nothing)."""
        with self._lock:
            try:
                pop = self._connect()
            except (poplib.error_proto, OSError) as error:
                raise self._failure(error) from error
            try:
                result = op(pop, *args)
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
            context = tls_context(server, self.system_ca_file)
            pop: poplib.POP3 = poplib.POP3_SSL(
                server.host, port, timeout=self.timeout, context=context
            )
        else:
            pop = poplib.POP3(server.host, port, timeout=self.timeout)
        try:
            if server.security == "starttls":
                pop.stls(tls_context(server, self.system_ca_file))
            self._login(pop)
        except BaseException:
            with suppress(Exception):
                pop.close()
            raise
        return pop

    def _login(self, pop: poplib.POP3) -> None:
        username, password = credentials(self.server, "pop3")
        try:
            pop.user(username)
            pop.pass_(password)
        except poplib.error_proto as error:
            raise self._login_refused(error) from error

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

    def _listing(self, pop: poplib.POP3) -> list[RemoteMessage]:
        numbers, sizes = self._numbers(pop), self._sizes(pop)
        now = datetime.now(UTC)
        return [
            RemoteMessage(uid, now + timedelta(microseconds=n), size=sizes.get(n))
            for uid, n in sorted(numbers.items(), key=lambda item: item[1])
        ]

    def _retrieve(self, pop: poplib.POP3, provider_id: str) -> bytes:
        number = self._numbers(pop).get(provider_id)
        if number is None:
            raise KeyError(provider_id)
        # typeshed types list() as the multi-line answer only; with a message number poplib
        # returns the one-line answer (bytes), as its uidl() overload already says.
        octets = int(pop.list(number).split()[2])  # type: ignore[attr-defined]
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
