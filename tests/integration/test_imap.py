"""The IMAP server over a real INBOX view, through the real gateway, with real clients.

Both clouds of the sandbox are used with the connection modes that need no consent (Microsoft
app-only, a Google service account), so the gateway serves the INBOX right after start. What
must hold: SELECT reports the INBOX with a stable UIDVALIDITY; UIDs survive sessions and new
mail; BODY.PEEK[] is byte-for-byte the provider's message; header fetches and SEARCH work;
flags set with STORE are visible to SEARCH; a wrong password is refused with a response code.
"""

from __future__ import annotations

import asyncio
import imaplib
import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailgw_sandbox import Sandbox, User
from tests.helpers import (
    CLOUD_ACCOUNTS,
    PASSWORD,
    running_gateway,
    sandbox_config,
    serve_without_consent,
)

HOST = "127.0.0.1"
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


@dataclass
class World:
    """A running gateway, the sandbox user behind the account, and how to reach it."""

    gateway: Any
    sandbox: Sandbox
    user: User
    account: str
    cafile: str
    seeded: int = 0

    def seed(self, subject: str) -> bytes:
        raw = (
            f"From: Sender <s@example.org>\r\nTo: {self.user.address}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.org>\r\nX-Raw: caf\xe9 \u65e5\u672c\r\n\r\n"
            f"Hello from {subject}.\r\n"
        ).encode()
        # Distinct arrival times: UIDs (and so sequence numbers) follow arrival order.
        received = T0 + timedelta(minutes=self.seeded)
        self.sandbox.ops(self.user).seed_inbox(self.user, raw, received_at=received)
        self.seeded += 1
        view = self.gateway.views.get(self.account)
        if view is not None:  # else a new session inside the freshness window would not see it
            view.stale()
        return raw

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cafile)

    def starttls(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4(HOST, self.gateway.ports["imap"], timeout=15)
        client.starttls(ssl_context=self.tls())
        return client

    def implicit(self) -> imaplib.IMAP4_SSL:
        port = self.gateway.ports["imaps"]
        return imaplib.IMAP4_SSL(HOST, port, ssl_context=self.tls(), timeout=15)

    def logged_in(self, implicit: bool = False) -> imaplib.IMAP4:
        client = self.implicit() if implicit else self.starttls()
        client.login(self.account, PASSWORD)
        return client


@pytest.fixture(params=["microsoft", "google"])
async def world(
    request: pytest.FixtureRequest, sandbox: Sandbox, tmp_path: Path
) -> AsyncIterator[World]:
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    serve_without_consent(sandbox, config, tmp_path)
    account, address = CLOUD_ACCOUNTS[request.param]
    user = sandbox.directory.user(address)
    assert user is not None
    async with running_gateway(config, tmp_path / "c.yaml") as gateway:
        cafile = str(gateway.settings.state_dir / "tls" / "ca.crt")
        yield World(gateway, sandbox, user, account, cafile)


def _uids(client: imaplib.IMAP4) -> list[int]:
    typ, data = client.uid("FETCH", "1:*", "(UID)")
    assert typ == "OK", data
    return [int(re.search(rb"UID (\d+)", line).group(1)) for line in data if line]


def _literal(data: list) -> bytes:
    """The literal of a one-message FETCH answer, as imaplib returns it."""
    return next(part[1] for part in data if isinstance(part, tuple))


def _flat(data: list) -> bytes:
    """Everything but the literals of a FETCH answer, to look for data items."""
    return b" ".join(part[0] if isinstance(part, tuple) else part for part in data)


async def test_select_fetch_and_stable_uids(world: World) -> None:
    raws = [world.seed(f"m{n}") for n in range(3)]

    def first_session() -> dict[str, Any]:
        client = world.logged_in()
        out: dict[str, Any] = {}
        try:
            out["listed"] = client.list()
            out["delimiter"] = client.list('""', '""')
            out["lsub"] = client.lsub()
            out["select"] = client.select("INBOX")
            out["validity"] = client.untagged_responses.get("UIDVALIDITY")
            out["uidnext"] = client.untagged_responses.get("UIDNEXT")
            out["uids"] = uids = _uids(client)
            out["listing"] = client.uid("FETCH", "1:*", "(UID FLAGS INTERNALDATE)")
            out["bodies_after_listing"] = world.gateway.views[world.account].cache.used
            out["peek"] = client.uid("FETCH", str(uids[1]), "(BODY.PEEK[] RFC822.SIZE FLAGS)")
            out["header"] = client.uid(
                "FETCH", str(uids[0]), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"
            )
            out["structure"] = client.fetch("3", "(BODYSTRUCTURE ENVELOPE)")
            out["status"] = client.status("INBOX", "(MESSAGES UIDNEXT UNSEEN)")
            out["sent"] = client.select("Sent")
            return out
        finally:
            client.logout()

    out = await asyncio.to_thread(first_session)
    uids, uidnext, validity = out["uids"], out["uidnext"], out["validity"]
    assert out["listed"] == ("OK", [b'(\\HasNoChildren) "/" "INBOX"'])
    assert out["delimiter"][1] == [b'(\\Noselect) "/" ""']
    assert out["lsub"] == out["listed"]
    assert out["select"] == ("OK", [b"3"])
    assert validity and uidnext and int(uidnext[0]) > max(uids)
    assert uids == sorted(uids) and len(set(uids)) == 3
    peek = out["peek"]
    assert peek[0] == "OK" and _literal(peek[1]) == raws[1]
    assert f"RFC822.SIZE {len(raws[1])}".encode() in _flat(peek[1])
    # The listing needs no body: nothing was downloaded for it.
    assert out["listing"][1][0] == (
        f'1 (UID {uids[0]} FLAGS () INTERNALDATE "01-Mar-2026 08:00:00 +0000")'.encode()
    )
    assert out["bodies_after_listing"] == 0
    assert _literal(out["header"][1]) == b"Subject: m0\r\n\r\n"
    structure = out["structure"]
    assert structure[0] == "OK"
    assert b'BODYSTRUCTURE ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit"' in structure[1][0]
    assert b'"m2"' in structure[1][0]  # ENVELOPE's subject
    status = f"INBOX (MESSAGES 3 UIDNEXT {uidnext[0].decode()} UNSEEN 3)".encode()
    assert out["status"][1] == [status]
    assert out["sent"][0] == "NO"

    world.seed("m3")

    def second_session() -> tuple:
        client = world.logged_in(implicit=True)
        try:
            client.select("INBOX")
            return client.untagged_responses.get("UIDVALIDITY"), _uids(client)
        finally:
            client.logout()

    validity2, uids2 = await asyncio.to_thread(second_session)
    assert validity2 == validity
    assert uids2[:3] == uids and len(uids2) == 4 and uids2[3] > uids[2]


async def test_store_seen_search_noop_and_expunge(world: World) -> None:
    for n in range(3):
        world.seed(f"s{n}")

    def session() -> dict:
        client = world.logged_in()
        out: dict = {}
        try:
            client.select("INBOX")
            uids = _uids(client)
            out["unseen_before"] = client.uid("SEARCH", "UNSEEN")[1]
            out["store"] = client.uid("STORE", str(uids[0]), "+FLAGS", "(\\Seen)")
            out["unseen_after"] = client.uid("SEARCH", "UNSEEN")[1]
            out["seen"] = client.search(None, "SEEN")[1]
            out["uid_range"] = client.uid("SEARCH", f"UID {uids[1]}:*")[1]
            out["since"] = client.search(None, "SINCE", "1-Mar-2026")[1]
            out["before"] = client.search(None, "BEFORE", "1-Mar-2026")[1]
            out["subject"] = client.search(None, "SUBJECT", "S1")[1]
            out["header"] = client.search(None, "NOT", "HEADER", "Message-ID", "s2@")[1]
            out["body"] = client.search(None, "BODY", '"hello from s1"')[1]
            client.literal = "\u65e5\u672c".encode()  # in X-Raw, as raw 8-bit UTF-8
            out["text"] = client.search("UTF-8", "TEXT")[1]
            out["larger"] = client.search(None, "LARGER", "1")[1]
            with pytest.raises(imaplib.IMAP4.error, match="not supported"):
                client.search(None, "XBOGUS", "100")  # BAD, and the session goes on
            out["uids"] = uids
        except BaseException:
            client.logout()
            raise
        out["client"] = client  # stays selected while the test seeds new mail
        return out

    out = await asyncio.to_thread(session)
    client = out.pop("client")
    world.seed("s3")  # new mail while the session is selected: NOOP reports what the
    await world.gateway.views[world.account].sync()  # poller found (its round, run now)

    def rest() -> None:
        try:
            out["noop"] = client.noop()
            out["exists"] = client.untagged_responses.get("EXISTS")
            out["delete"] = client.store("1", "+FLAGS.SILENT", "(\\Deleted)")
            out["expunge"] = client.expunge()
            out["count_after"] = client.search(None, "ALL")[1]
        finally:
            client.logout()

    await asyncio.to_thread(rest)
    uids = out["uids"]
    assert out["unseen_before"] == [" ".join(map(str, uids)).encode()]
    assert out["store"][0] == "OK" and b"\\Seen" in out["store"][1][0]
    assert out["unseen_after"] == [f"{uids[1]} {uids[2]}".encode()]
    assert out["seen"] == [b"1"]
    assert out["uid_range"] == [f"{uids[1]} {uids[2]}".encode()]
    assert out["since"] == [b"1 2 3"] and out["before"] == [b""]
    assert out["subject"] == [b"2"] and out["header"] == [b"1 2"]
    assert out["body"] == [b"2"] and out["text"] == [b"1 2 3"]
    assert out["larger"] == [b"1 2 3"]
    assert out["noop"][0] == "OK" and out["exists"] and out["exists"][-1] == b"4"
    assert out["expunge"] == ("OK", [b"1"])
    assert out["count_after"] == [b"1 2 3"]
    # The deletion is the gateway's (every later session of the account sees three messages);
    # the provider is untouched: its INBOX still holds all four.

    def again() -> int:
        client = world.logged_in(implicit=True)
        try:
            return int(client.select("INBOX")[1][0])
        finally:
            client.logout()

    assert await asyncio.to_thread(again) == 3
    assert len(world.sandbox.ops(world.user).inbox_ids(world.user)) == 4


async def test_wrong_password_and_authenticate_plain_after_starttls(world: World) -> None:
    def session() -> tuple:
        client = world.starttls()
        try:
            with pytest.raises(imaplib.IMAP4.error) as wrong:
                client.login(world.account, "not the password")
            caps = client.capabilities
            secret = f"\0{world.account}\0{PASSWORD}".encode()
            typ, _ = client.authenticate("PLAIN", lambda _: secret)
            selected = client.select("INBOX", readonly=True)[0]
            stored = client.store("1", "+FLAGS", "(\\Seen)")
            return str(wrong.value), caps, typ, selected, stored
        finally:
            client.logout()

    def cleartext() -> tuple:
        client = imaplib.IMAP4(HOST, world.gateway.ports["imap"], timeout=15)
        try:
            secret = f"\0{world.account}\0{PASSWORD}".encode()
            typ, _ = client.authenticate("PLAIN", lambda _: secret)
            return client.capabilities, typ
        finally:
            client.shutdown()

    world.seed("a0")
    wrong, caps, typ, selected, stored = await asyncio.to_thread(session)
    assert "[AUTHENTICATIONFAILED]" in wrong
    assert "AUTH=PLAIN" in caps
    assert typ == "OK" and selected == "OK"
    assert stored[0] == "NO" and b"READ-ONLY" in stored[1][0]  # EXAMINE: read-only session
    clear_caps, clear_typ = await asyncio.to_thread(cleartext)
    # In clear text from loopback, where reading.plaintext_auth (loopback by default) allows
    # LOGIN, AUTHENTICATE is allowed too (test_imap_auth_and_literals covers "never").
    assert "AUTH=PLAIN" in clear_caps and "LOGINDISABLED" not in clear_caps
    assert clear_typ == "OK"


async def test_curl_lists_and_fetches_by_uid(world: World) -> None:
    raw = world.seed("curl")

    def run(url: str) -> subprocess.CompletedProcess:
        argv = ["curl", "-sS", "--cacert", world.cafile, "-u", f"{world.account}:{PASSWORD}", url]
        return subprocess.run(argv, capture_output=True, timeout=30, check=False)

    base = f"imaps://localhost:{world.gateway.ports['imaps']}"
    listing = await asyncio.to_thread(run, f"{base}/")
    uid = await asyncio.to_thread(run, f"{base}/INBOX?UID%201:*")
    assert listing.returncode == 0, listing.stderr
    assert b"INBOX" in listing.stdout
    assert uid.returncode == 0, uid.stderr
    found = re.search(rb"SEARCH (\d+)", uid.stdout)
    assert found, uid.stdout
    fetched = await asyncio.to_thread(run, f"{base}/INBOX/;UID={found.group(1).decode()}")
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == raw
