"""Upstream IMAP and POP3 INBOX sources against the private Dovecot: exact bytes and sizes,
no \\Seen set by reading, arrivals and removals, UIDVALIDITY changes, reconnects, TLS modes,
refused passwords, mirroring writes, and a MailboxView round trip over both.

Expected bytes are what Dovecot's own IMAP serves with BODY.PEEK[] (``doveadm save`` stores
the delivered bytes; IMAP serves bare LF as CRLF), so every comparison is against the server.
"""

from __future__ import annotations

import imaplib
import poplib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import outbound
from gateway.config import UpstreamServer
from gateway.config._schema import Secret
from gateway.delivery import Permanent, Temporary
from gateway.mailbox import MailboxView
from gateway.providers import (
    SEEN,
    CursorExpired,
    NotSupported,
    UpstreamImapSource,
    UpstreamPop3Source,
)
from gateway.providers.imap_inbox import _list_name, _parse_fetch
from gateway.store import SecretBox, open_sqlite
from mailgw_sandbox.upstream import Dovecot, MailUser, free_ports

KEY = bytes(range(32))
LONG = "x" * 5000  # over poplib's default 2048-byte line limit

MESSAGES = [
    b"From: a@example.org\r\nSubject: plain\r\n\r\nHello.\r\n",
    b"From: a@example.org\nSubject: bare LF and dots\n\n.\n..two\n.x\nend\n",
    (
        "From: a@example.org\r\nSubject: caf\u00e9 \u65e5\u672c\r\n\r\n"
        f"{LONG}\r\n\u65e5\u672c\u8a9e\r\n"
    ).encode(),
    b"From: a@example.org\r\nSubject: no final newline\r\n\r\nno newline",
]


class SpecialUseDovecot(Dovecot):
    """The harness's Dovecot plus Trash and Archive folders marked SPECIAL-USE (RFC 6154)."""

    def _config(self) -> str:
        return super()._config() + (
            "namespace inbox {\n  inbox = yes\n"
            "  mailbox Trash {\n    special_use = \\Trash\n    auto = create\n  }\n"
            "  mailbox Archive {\n    special_use = \\Archive\n    auto = create\n  }\n}\n"
        )


@pytest.fixture(scope="module")
def special_dovecot() -> Iterator[Dovecot]:
    with SpecialUseDovecot() as server:
        yield server


def settings(
    dovecot: Dovecot,
    user: MailUser,
    protocol: str = "imap",
    security: str = "none",
    password: str | None = None,
    host: str | None = None,
    ca_file: Path | None = None,
) -> UpstreamServer:
    implicit = security == "tls"
    ports = {
        "imap": dovecot.imaps_port if implicit else dovecot.imap_port,
        "pop3": dovecot.pop3s_port if implicit else dovecot.pop3_port,
    }
    return UpstreamServer(
        host=host or dovecot.host,
        port=ports[protocol],
        security=security,  # type: ignore[arg-type]
        username=user.name,
        password=Secret(password or user.password, "test"),
        ca_file=ca_file,
    )


def imap_source(dovecot: Dovecot, user: MailUser, **options: object) -> UpstreamImapSource:
    server = settings(dovecot, user, "imap", **options)  # type: ignore[arg-type]
    return UpstreamImapSource(server, outbound.system_ca_file(), timeout=10)


def pop3_source(dovecot: Dovecot, user: MailUser, **options: object) -> UpstreamPop3Source:
    server = settings(dovecot, user, "pop3", **options)  # type: ignore[arg-type]
    return UpstreamPop3Source(server, outbound.system_ca_file(), timeout=10)


@contextmanager
def direct(dovecot: Dovecot, user: MailUser, readonly: bool = True) -> Iterator[imaplib.IMAP4]:
    """Dovecot's own IMAP, as the reference for what the sources should see."""
    imap = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
    try:
        imap.login(user.name, user.password)
        assert imap.select("INBOX", readonly=readonly)[0] == "OK"
        yield imap
    finally:
        imap.logout()


def peek_all(dovecot: Dovecot, user: MailUser) -> tuple[int, dict[int, bytes]]:
    """(UIDVALIDITY, UID → BODY.PEEK[]) straight from Dovecot."""
    with direct(dovecot, user) as imap:
        validity = int(imap.response("UIDVALIDITY")[1][0])
        _, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
    bodies = {
        int(re.search(rb"UID (\d+)", item[0]).group(1)): item[1]  # type: ignore[union-attr]
        for item in data
        if isinstance(item, tuple)
    }
    return validity, bodies


def upstream_flags(dovecot: Dovecot, user: MailUser, mailbox: str = "INBOX") -> dict[int, set]:
    """UID → stored flags, by doveadm (\\Recent is per session, not stored: left out)."""
    out = dovecot.doveadm("-f", "flow", "fetch", "-u", user.name, "uid flags", "mailbox", mailbox)
    found = (re.match(r"uid=(\d+) flags=(.*)", line) for line in out.splitlines())
    return {int(m.group(1)): set(m.group(2).split()) - {"\\Recent"} for m in found if m}


def deliver(dovecot: Dovecot, user: MailUser, *raws: bytes) -> None:
    for raw in raws:
        dovecot.deliver(user.name, raw)


def expunge(dovecot: Dovecot, user: MailUser, uid: int) -> None:
    with direct(dovecot, user, readonly=False) as imap:
        imap.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)")
        assert imap.uid("EXPUNGE", str(uid))[0] == "OK"


def mark(dovecot: Dovecot, user: MailUser, uid: int, flag: str) -> None:
    with direct(dovecot, user, readonly=False) as imap:
        assert imap.uid("STORE", str(uid), "+FLAGS.SILENT", f"({flag})")[0] == "OK"


def crlf(raw: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", raw)


# -- IMAP ------------------------------------------------------------------------------------------


def test_imap_reply_parsing_of_other_servers_forms() -> None:
    """Forms Dovecot does not send here: a zone offset, a space-padded day, a literal and a
    quoted folder name, an unsolicited FLAGS-only FETCH, and ``N:*`` answering below N."""
    data = [
        b'7 (UID 9 RFC822.SIZE 120 FLAGS (\\Seen $Junk) INTERNALDATE " 1-jan-2026 01:30:00 +0530")',
        b"3 (FLAGS (\\flagged \\Recent \\Answered $Forwarded) UID 4)",
        b'2 (UID 3 FLAGS () INTERNALDATE "31-Dec-2025 23:00:00 -0100" RFC822.SIZE 5)',
    ]
    found = _parse_fetch(data, lowest=4)
    assert found == {
        9: {
            "flags": {"\\Seen", "$Junk"},
            "size": 120,
            "date": datetime(2025, 12, 31, 20, 0, tzinfo=UTC),
        },
        4: {"flags": {"\\Flagged", "\\Answered", "$Forwarded"}},  # \\Recent is the session's
    }
    assert _list_name((b'(\\HasNoChildren \\Trash) "/" {9}', b"Papierkorb")) == (
        {"\\hasnochildren", "\\trash"},
        "Papierkorb",
    )
    assert _list_name(b'(\\Archive) "/" "Old \\"mail\\""') == ({"\\archive"}, 'Old "mail"')
    assert _list_name(b"(\\Trash) NIL Trash") == ({"\\trash"}, "Trash")


async def test_imap_lists_and_fetches_exact_bytes_without_marking_read(
    dovecot: Dovecot, upstream_user: MailUser
) -> None:
    deliver(dovecot, upstream_user, *MESSAGES)
    validity, bodies = peek_all(dovecot, upstream_user)
    source = imap_source(dovecot, upstream_user)
    snapshot = await source.list_inbox()

    assert [m.id for m in snapshot.messages] == [f"{validity}.{uid}" for uid in (1, 2, 3, 4)]
    assert snapshot.cursor.startswith(f"{validity}:5:")  # Dovecot has CONDSTORE: a modseq too
    now = datetime.now(UTC)
    for uid, message in enumerate(snapshot.messages, 1):
        raw = await source.fetch_raw(message.id)
        assert raw == bodies[uid]
        assert message.size == len(raw)
        assert not message.seen
        assert message.internal_date.tzinfo == UTC
        assert abs(message.internal_date - now) < timedelta(minutes=2)
    assert bodies[1] == MESSAGES[0] and bodies[4] == MESSAGES[3]  # stored as delivered
    assert bodies[2] == crlf(MESSAGES[1])  # served in CRLF form
    assert upstream_flags(dovecot, upstream_user) == {1: set(), 2: set(), 3: set(), 4: set()}

    mark(dovecot, upstream_user, 2, "\\Seen")
    again = await source.list_inbox()
    assert [m.seen for m in again.messages] == [False, True, False, False]
    with pytest.raises(KeyError):
        await source.fetch_raw(f"{validity}.99")
    await source.close()


async def test_imap_changes_since_sees_arrivals_removals_and_reads(
    dovecot: Dovecot, upstream_user: MailUser
) -> None:
    deliver(dovecot, upstream_user, *MESSAGES[:3])
    source = imap_source(dovecot, upstream_user)
    snapshot = await source.list_inbox()
    validity = snapshot.cursor.split(":")[0]

    deliver(dovecot, upstream_user, MESSAGES[3])
    expunge(dovecot, upstream_user, 1)
    mark(dovecot, upstream_user, 2, "\\Seen")
    changes = await source.changes_since(snapshot.cursor)

    ids = {uid: f"{validity}.{uid}" for uid in (2, 3, 4)}
    assert [m.id for m in changes.added] == [ids[4]]
    assert changes.added[0].size == len(await source.fetch_raw(ids[4])) == len(MESSAGES[3])
    assert changes.present == frozenset(ids.values())
    # CONDSTORE: only what changed since the cursor's modseq (the read one and the new one).
    assert changes.flags == {ids[2]: {SEEN}, ids[4]: set()}
    assert changes.removed == []
    assert changes.cursor.startswith(f"{validity}:5:")

    quiet = await source.changes_since(changes.cursor)
    assert quiet.added == [] and quiet.present == changes.present and quiet.flags == {}
    # A cursor without a modseq (or a server without CONDSTORE): every message's flags.
    legacy = await source.changes_since(f"{validity}:5")
    assert legacy.flags == {ids[2]: {SEEN}, ids[3]: set(), ids[4]: set()}
    assert legacy.cursor == changes.cursor
    await source.close()


async def test_imap_uidvalidity_change_expires_cursor_and_ids(
    dovecot: Dovecot, upstream_user: MailUser
) -> None:
    deliver(dovecot, upstream_user, MESSAGES[0])
    source = imap_source(dovecot, upstream_user)
    snapshot = await source.list_inbox()
    old_id = snapshot.messages[0].id
    validity = int(old_id.split(".")[0])

    # The open session is told "state inconsistent" (BYE): the source reconnects by itself.
    user = upstream_user.name
    dovecot.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(validity + 7), "INBOX")
    with pytest.raises(CursorExpired, match="UIDVALIDITY changed"):
        await source.changes_since(snapshot.cursor)
    with pytest.raises(KeyError):
        await source.fetch_raw(old_id)
    fresh = await source.list_inbox()
    assert [m.id for m in fresh.messages] == [f"{validity + 7}.1"]
    assert await source.fetch_raw(fresh.messages[0].id) == MESSAGES[0]
    await source.close()


async def test_imap_reconnects_after_the_server_drops_it(
    dovecot: Dovecot, upstream_user: MailUser
) -> None:
    deliver(dovecot, upstream_user, MESSAGES[0])
    source = imap_source(dovecot, upstream_user)
    first = await source.list_inbox()
    dovecot.doveadm("kick", upstream_user.name)
    assert await source.list_inbox() == first
    assert await source.fetch_raw(first.messages[0].id) == MESSAGES[0]
    await source.close()


async def test_imap_set_flags_mirrors_to_the_server(
    dovecot: Dovecot, upstream_user: MailUser
) -> None:
    deliver(dovecot, upstream_user, *MESSAGES[:2])
    source = imap_source(dovecot, upstream_user)
    first, second = (await source.list_inbox()).messages

    await source.set_flags(first.id, seen=True, flagged=True)
    assert upstream_flags(dovecot, upstream_user) == {1: {"\\Seen", "\\Flagged"}, 2: set()}
    await source.set_flags(first.id, seen=False, flagged=None)
    assert upstream_flags(dovecot, upstream_user) == {1: {"\\Flagged"}, 2: set()}
    assert [m.seen for m in (await source.list_inbox()).messages] == [False, False]

    expunge(dovecot, upstream_user, 2)
    await source.set_flags(second.id, seen=True, flagged=None)  # gone: nothing to do
    assert upstream_flags(dovecot, upstream_user) == {1: {"\\Flagged"}}
    await source.close()


async def test_imap_remove_without_special_use_folders_is_not_supported(
    dovecot: Dovecot, upstream_user: MailUser
) -> None:
    deliver(dovecot, upstream_user, MESSAGES[0])
    source = imap_source(dovecot, upstream_user)
    message = (await source.list_inbox()).messages[0]
    with pytest.raises(NotSupported, match=r"no folder marked \\Trash .*SPECIAL-USE"):
        await source.remove(message.id, "trash")
    with pytest.raises(NotSupported, match=r"no folder marked \\Archive"):
        await source.remove(message.id, "archive")
    assert dovecot.message_count(upstream_user.name) == 1
    await source.close()


async def test_imap_remove_moves_to_special_use_folders(special_dovecot: Dovecot) -> None:
    user = special_dovecot.new_user("special")
    deliver(special_dovecot, user, *MESSAGES)
    source = imap_source(special_dovecot, user)
    one, two, three, _ = (await source.list_inbox()).messages

    await source.remove(one.id, "trash")
    await source.remove(two.id, "archive")
    assert special_dovecot.message_count(user.name, "Trash") == 1
    assert special_dovecot.message_count(user.name, "Archive") == 1
    assert peek_all(special_dovecot, user)[1].keys() == {3, 4}

    # Without MOVE: COPY + \Deleted + UID EXPUNGE of that UID only, never another \Deleted one.
    mark(special_dovecot, user, 4, "\\Deleted")
    source._capabilities -= {"MOVE"}
    await source.remove(three.id, "trash")
    assert special_dovecot.message_count(user.name, "Trash") == 2
    assert upstream_flags(special_dovecot, user) == {4: {"\\Deleted"}}
    trash = upstream_flags(special_dovecot, user, "Trash")
    assert all("\\Deleted" not in flags for flags in trash.values())
    await source.remove(one.id, "trash")  # already gone: done
    await source.close()


# -- POP3 ------------------------------------------------------------------------------------------


async def test_pop3_lists_and_fetches_what_imap_serves_without_marking_read(
    dovecot: Dovecot, upstream_user: MailUser
) -> None:
    deliver(dovecot, upstream_user, *MESSAGES)
    _, bodies = peek_all(dovecot, upstream_user)
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    pop.user(upstream_user.name)
    pop.pass_(upstream_user.password)
    uidls = [line.split()[1].decode() for line in pop.uidl()[1]]
    pop.quit()

    source = pop3_source(dovecot, upstream_user)
    before = datetime.now(UTC)
    snapshot = await source.list_inbox()
    assert [m.id for m in snapshot.messages] == uidls
    dates = [m.internal_date for m in snapshot.messages]
    assert dates == sorted(set(dates)) and dates[0] >= before  # first seen, in maildrop order
    for uid, message in enumerate(snapshot.messages, 1):
        raw = await source.fetch_raw(message.id)
        assert raw == bodies[uid]  # incl. the long line and the missing final newline
        assert message.size == len(raw)
        assert not message.seen
    assert upstream_flags(dovecot, upstream_user) == {1: set(), 2: set(), 3: set(), 4: set()}
    assert dovecot.message_count(upstream_user.name) == 4  # nothing deleted
    with pytest.raises(KeyError):
        await source.fetch_raw("no-such-uidl")


async def test_pop3_changes_since_lists_everything_present(
    dovecot: Dovecot, upstream_user: MailUser
) -> None:
    deliver(dovecot, upstream_user, *MESSAGES[:2])
    source = pop3_source(dovecot, upstream_user)
    first, second = (await source.list_inbox()).messages
    deliver(dovecot, upstream_user, MESSAGES[2])
    expunge(dovecot, upstream_user, 1)

    changes = await source.changes_since("pop3")
    kept, new = changes.added  # the view ignores ids it knows
    assert kept.id == second.id
    assert changes.present == frozenset({second.id, new.id})
    assert first.id not in changes.present
    assert new.size == len(await source.fetch_raw(new.id))


async def test_pop3_has_no_flags_or_folders(dovecot: Dovecot, upstream_user: MailUser) -> None:
    deliver(dovecot, upstream_user, MESSAGES[0])
    source = pop3_source(dovecot, upstream_user)
    message = (await source.list_inbox()).messages[0]
    with pytest.raises(NotSupported, match="POP3 has no flags"):
        await source.set_flags(message.id, seen=True, flagged=None)
    with pytest.raises(NotSupported, match="POP3 has no folders"):
        await source.remove(message.id, "trash")
    assert dovecot.message_count(upstream_user.name) == 1


# -- both ------------------------------------------------------------------------------------------

PROTOCOLS = {"imap": imap_source, "pop3": pop3_source}


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_wrong_password_is_permanent_and_says_so(
    dovecot: Dovecot, upstream_user: MailUser, protocol: str
) -> None:
    source = PROTOCOLS[protocol](dovecot, upstream_user, password="not-the-password-123")
    with pytest.raises(Permanent) as raised:
        await source.list_inbox()
    text = str(raised.value)
    assert f"upstream.{protocol} password (or username) in the config is wrong" in text
    assert upstream_user.name in text and "not-the-password-123" not in text


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_unreachable_server_is_temporary(
    dovecot: Dovecot, upstream_user: MailUser, protocol: str
) -> None:
    (closed,) = free_ports(1)
    server = settings(dovecot, upstream_user, protocol)
    server = UpstreamServer(**{**server.__dict__, "port": closed})
    kind = UpstreamImapSource if protocol == "imap" else UpstreamPop3Source
    with pytest.raises(Temporary, match="ConnectionRefusedError"):
        await kind(server, outbound.system_ca_file(), timeout=5).list_inbox()


@pytest.mark.parametrize("security", ["starttls", "tls"])
@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_tls_modes_verify_the_server(
    dovecot: Dovecot, upstream_user: MailUser, protocol: str, security: str
) -> None:
    deliver(dovecot, upstream_user, MESSAGES[0])
    make = PROTOCOLS[protocol]
    trusted = make(
        dovecot, upstream_user, security=security, host="localhost", ca_file=dovecot.ca_file
    )
    (message,) = (await trusted.list_inbox()).messages
    assert await trusted.fetch_raw(message.id) == MESSAGES[0]
    await trusted.close()

    untrusted = make(dovecot, upstream_user, security=security, host="localhost")
    with pytest.raises(Permanent, match=f"not trusted .*upstream.{protocol}.ca_file"):
        await untrusted.list_inbox()


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_view_round_trip(
    dovecot: Dovecot, upstream_user: MailUser, tmp_path: Path, protocol: str
) -> None:
    deliver(dovecot, upstream_user, *MESSAGES[:2])
    source = PROTOCOLS[protocol](dovecot, upstream_user)
    store = await open_sqlite(tmp_path / "state", SecretBox(KEY))
    try:
        view = await MailboxView.open(store.mailboxes, "desk", source)
        applied = await view.sync()
        assert applied.added == [1, 2]
        assert await view.fetch(1) == MESSAGES[0]
        assert await view.size(2) == len(crlf(MESSAGES[1]))

        deliver(dovecot, upstream_user, *MESSAGES[2:])
        expunge(dovecot, upstream_user, 1)
        applied = await view.sync()
        assert (applied.added, applied.removed) == ([3, 4], [1])
        sizes = {m.uid: m.size for m in view.messages()}  # known from the listing
        assert sizes == {2: len(crlf(MESSAGES[1])), 3: len(MESSAGES[2]), 4: len(MESSAGES[3])}
        assert await view.fetch(3) == MESSAGES[2]
        assert await view.fetch(4) == MESSAGES[3]
        again = await view.sync()
        assert again.added == again.removed == []
    finally:
        await store.close()
        await source.close()
