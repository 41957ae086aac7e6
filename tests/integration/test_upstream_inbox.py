"""The INBOX of upstream IMAP and POP3 accounts, through the whole gateway, with real clients.

A real private Dovecot is the upstream; the gateway reads it with the password from the config
(STARTTLS, the Dovecot CA as ``ca_file``) and serves it to imaplib and poplib through the same
view as the clouds: the bytes are Dovecot's, RFC822.SIZE is Dovecot's, UIDs and UIDVALIDITY
survive a restart, new mail arrives by IDLE, mail expunged upstream leaves, and what a client
deletes is hidden by the gateway while Dovecot keeps it and its \\Seen flag stays unset. The
flags another client sets upstream (\\Answered, \\Flagged, keywords such as $Forwarded) reach
the gateway's clients: in FETCH FLAGS, SELECT's FLAGS and PERMANENTFLAGS, SEARCH, and IDLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import poplib
import re
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mailgw_sandbox.upstream import Dovecot, MailUser
from tests.helpers import PASSWORD, PASSWORD_HASH, base_config, idling, running_gateway

HOST = "127.0.0.1"


def _message(subject: str) -> bytes:
    return (
        f"From: Sender <s@example.org>\r\nTo: legacy@upstream.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n\r\nBody of {subject}.\r\n"
    ).encode()


def _config(dovecot: Dovecot, user: MailUser, protocol: str, state: Path) -> dict:
    config = base_config(state, reading={"poll_seconds": 1})
    server = {
        "host": "localhost",  # the name in Dovecot's certificate: the hostname is verified
        "port": dovecot.imap_port if protocol == "imap" else dovecot.pop3_port,
        "security": "starttls",
        "username": user.name,
        "password": user.password,
        "ca_file": str(dovecot.ca_file),
    }
    config["accounts"] = [
        {
            "username": "legacy",
            "password_hash": PASSWORD_HASH,
            "provider": "upstream",
            "address": "legacy@upstream.test",
            "upstream": {protocol: server},
        }
    ]
    return config


@contextlib.asynccontextmanager
async def upstream_gateway(
    dovecot: Dovecot, user: MailUser, protocol: str, tmp_path: Path
) -> AsyncIterator[Any]:
    config = _config(dovecot, user, protocol, tmp_path / "state")
    async with running_gateway(config, tmp_path / "c.yaml") as gateway:
        yield gateway


def _imap(gateway: Any) -> imaplib.IMAP4:
    cafile = str(gateway.settings.state_dir / "tls" / "ca.crt")
    client = imaplib.IMAP4(HOST, gateway.ports["imap"], timeout=20)
    client.starttls(ssl_context=ssl.create_default_context(cafile=cafile))
    client.login("legacy", PASSWORD)
    return client


def _dovecot_view(dovecot: Dovecot, user: MailUser) -> list[bytes]:
    """What Dovecot itself serves: (UID FLAGS RFC822.SIZE BODY.PEEK[]) per message."""
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10) as imap:
        imap.login(user.name, user.password)
        imap.select("INBOX", readonly=True)
        data = imap.fetch("1:*", "(FLAGS RFC822.SIZE BODY.PEEK[])")[1]
    return [part[1] for part in data if isinstance(part, tuple)]


def _store_upstream(dovecot: Dovecot, user: MailUser, flags: dict[int, str]) -> None:
    """Set flags on the upstream server as another of its IMAP clients would: UID STORE."""
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10) as imap:
        imap.login(user.name, user.password)
        imap.select("INBOX")
        for uid, names in flags.items():
            assert imap.uid("STORE", str(uid), "+FLAGS", f"({names})")[0] == "OK"


def _flag_sets(data: list) -> dict[int, set[str]]:
    """Sequence number → flags, from imaplib's FETCH (FLAGS) answer (order is not compared
    here; the differential test compares the rendering with Dovecot's)."""
    out = {}
    for line in data:
        found = re.match(rb"(\d+) \(.*FLAGS \(([^)]*)\)", line)
        assert found, line
        out[int(found.group(1))] = set(found.group(2).decode().split())
    return out


def _sizes(data: list) -> list[int]:
    text = b" ".join(part[0] if isinstance(part, tuple) else part for part in data)
    return [int(n) for n in re.findall(rb"RFC822.SIZE (\d+)", text)]


async def test_imap_upstream_through_the_gateway(
    dovecot: Dovecot, upstream_user: MailUser, tmp_path: Path
) -> None:
    for n in range(3):
        dovecot.deliver(upstream_user.name, _message(f"u{n}"))
    upstream = await asyncio.to_thread(_dovecot_view, dovecot, upstream_user)

    async with upstream_gateway(dovecot, upstream_user, "imap", tmp_path) as gateway:

        def first() -> dict[str, Any]:
            client = _imap(gateway)
            try:
                client.select("INBOX")
                out: dict[str, Any] = {"validity": client.untagged_responses["UIDVALIDITY"]}
                fetched = client.fetch("1:*", "(RFC822.SIZE BODY.PEEK[])")[1]
                out["bodies"] = [p[1] for p in fetched if isinstance(p, tuple)]
                out["sizes"] = _sizes(fetched)
                out["uids"] = client.uid("SEARCH", "ALL")[1]
                with idling(client) as wait:
                    dovecot.deliver(upstream_user.name, _message("while idling"))
                    out["exists"] = wait(rb"^\* \d+ EXISTS")
                    dovecot.doveadm("expunge", "-u", upstream_user.name, "mailbox", "INBOX", "1")
                    out["expunge"] = wait(rb"^\* \d+ EXPUNGE")
                client.store("1", "+FLAGS", "(\\Deleted)")
                out["expunged"] = client.expunge()[1]
                out["after"] = client.uid("SEARCH", "ALL")[1]
                return out
            finally:
                client.logout()

        out = await asyncio.to_thread(first)
    assert out["bodies"] == upstream  # Dovecot's bytes, byte for byte
    assert out["sizes"] == [len(body) for body in upstream]
    assert out["uids"] == [b"1 2 3"]
    assert out["exists"].strip() == b"* 4 EXISTS"
    assert out["expunge"].strip() == b"* 1 EXPUNGE"
    assert out["expunged"] == [b"1"] and out["after"] == [b"3 4"]
    # Dovecot keeps what the client deleted, and reading set no \Seen there.
    assert dovecot.message_count(upstream_user.name) == 3
    assert dovecot.search(upstream_user.name, "SEEN") == []

    async with upstream_gateway(dovecot, upstream_user, "imap", tmp_path) as gateway:

        def again() -> tuple:
            client = _imap(gateway)
            try:
                client.select("INBOX")
                return client.untagged_responses["UIDVALIDITY"], client.uid("SEARCH", "ALL")[1]
            finally:
                client.logout()

        validity, uids = await asyncio.to_thread(again)
    assert validity == out["validity"] and uids == [b"3 4"]


async def test_upstream_flags_reach_the_gateways_imap_clients(
    dovecot: Dovecot, upstream_user: MailUser, tmp_path: Path
) -> None:
    for n in range(3):
        dovecot.deliver(upstream_user.name, _message(f"f{n}"))
    flags = {1: "\\Answered", 2: "\\Flagged $Forwarded"}  # as another upstream client sets them
    await asyncio.to_thread(_store_upstream, dovecot, upstream_user, flags)

    async with upstream_gateway(dovecot, upstream_user, "imap", tmp_path) as gateway:

        def session() -> dict[str, Any]:
            client = _imap(gateway)
            try:
                assert client.select("INBOX")[0] == "OK"
                out: dict[str, Any] = {
                    "flags": client.response("FLAGS")[1][0],
                    "permanent": client.response("PERMANENTFLAGS")[1][0],
                    "fetched": _flag_sets(client.fetch("1:*", "(UID FLAGS)")[1]),
                }
                for key in ("ANSWERED", "UNANSWERED", "FLAGGED", "KEYWORD $Forwarded"):
                    out[key] = client.search(None, key)[1]
                out["UNKEYWORD"] = client.uid("SEARCH", "UNKEYWORD", "$Forwarded")[1]
                with idling(client) as wait:  # another upstream client replies and forwards
                    _store_upstream(dovecot, upstream_user, {3: "\\Answered $Forwarded"})
                    out["pushed"] = wait(rb"^\* 3 FETCH")
                out["after"] = client.search(None, "ANSWERED KEYWORD $Forwarded")[1]
                return out
            finally:
                client.logout()

        out = await asyncio.to_thread(session)
    # SELECT lists the upstream's keyword, and a client may store flags and new keywords.
    assert out["flags"] == b"(\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded)"
    assert out["permanent"] == b"(\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded \\*)"
    assert out["fetched"] == {1: {"\\Answered"}, 2: {"\\Flagged", "$Forwarded"}, 3: set()}
    assert out["ANSWERED"] == [b"1"] and out["UNANSWERED"] == [b"2 3"]
    assert out["FLAGGED"] == [b"2"] and out["KEYWORD $Forwarded"] == [b"2"]
    assert out["UNKEYWORD"] == [b"1 3"]
    pushed = re.search(rb"FLAGS \(([^)]*)\)", out["pushed"])
    assert pushed and set(pushed.group(1).decode().split()) == {"\\Answered", "$Forwarded"}
    assert out["after"] == [b"3"]
    # Reading through the gateway changed nothing upstream.
    assert dovecot.search(upstream_user.name, "SEEN") == []


async def test_pop3_upstream_through_the_gateway(
    dovecot: Dovecot, upstream_user: MailUser, tmp_path: Path
) -> None:
    for n in range(2):
        dovecot.deliver(upstream_user.name, _message(f"p{n}"))
    upstream = await asyncio.to_thread(_dovecot_view, dovecot, upstream_user)

    async with upstream_gateway(dovecot, upstream_user, "pop3", tmp_path) as gateway:

        def session() -> tuple:
            cafile = str(gateway.settings.state_dir / "tls" / "ca.crt")
            client = poplib.POP3(HOST, gateway.ports["pop3"], timeout=20)
            client.stls(context=ssl.create_default_context(cafile=cafile))
            client.user("legacy")
            client.pass_(PASSWORD)
            try:
                listing = [int(line.split()[1]) for line in client.list()[1]]
                bodies = [b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n in (1, 2)]
                uidls = client.uidl()[1]
                client.dele(1)
            finally:
                client.quit()
            return listing, bodies, uidls

        listing, bodies, uidls = await asyncio.to_thread(session)
    assert bodies == upstream and listing == [len(b) for b in upstream]
    assert len(uidls) == 2
    assert dovecot.message_count(upstream_user.name) == 2  # DELE is the gateway's, not Dovecot's
    assert dovecot.search(upstream_user.name, "SEEN") == []


async def test_wrong_upstream_password_is_a_clear_refusal(
    dovecot: Dovecot, upstream_user: MailUser, tmp_path: Path
) -> None:
    config = _config(dovecot, upstream_user, "imap", tmp_path / "state")
    config["accounts"][0]["upstream"]["imap"]["password"] = "not-the-password"
    async with running_gateway(config, tmp_path / "c.yaml") as gateway:

        def attempt() -> tuple[str, bytes]:
            client = _imap(gateway)
            try:
                typ, data = client.select("INBOX")
                return typ, data[0]
            finally:
                client.logout()

        typ, refusal = await asyncio.to_thread(attempt)
    assert typ == "NO" and refusal.startswith(b"[UNAVAILABLE] upstream IMAP server"), refusal
    assert b"password" in refusal and upstream_user.password.encode() not in refusal
