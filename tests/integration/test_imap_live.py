"""Changes reach connected clients, and the account's state survives restarts.

Through the real gateway and the sandbox clouds, with imaplib (IDLE spoken on its socket):
new mail at the provider arrives as EXISTS while a client IDLEs; a message moved out of the
INBOX at the provider is EXPUNGEd; a read-state change at the provider arrives as FETCH FLAGS;
an EXPUNGE in one session reaches another session and leaves the provider untouched; however
many sessions idle, one poller asks the provider. After a restart the UIDs, UIDVALIDITY, the
gateway's own flags and the learnt sizes are unchanged (no body is downloaded again for
RFC822.SIZE). With the opt-in policy, \\Seen and EXPUNGE reach the provider (trash, never a
permanent delete). ``reading.plaintext_auth`` rules LOGIN and USER before STARTTLS/STLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import poplib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailgw_sandbox import Fault, Sandbox, User
from tests.helpers import (
    CLOUD_ACCOUNTS,
    PASSWORD,
    InboxSeeder,
    idling,
    imap_starttls_login,
    running_gateway,
    sandbox_config,
    serve_without_consent,
)

HOST = "127.0.0.1"
T0 = datetime(2026, 4, 1, 8, 0, tzinfo=UTC)
POLL_SECONDS = 1


def _cloud_config(
    provider: str, sandbox: Sandbox, tmp_path: Path, reading: dict | None = None, **top: Any
) -> tuple[dict, str, str]:
    """A config with one app-only (Microsoft) or service-account (Google) account: no consent
    needed, so the INBOX is served right after start. Write scopes, so mirroring can work."""
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    config["reading"] = {"poll_seconds": POLL_SECONDS, **top}
    serve_without_consent(
        sandbox, config, tmp_path, ("gmail.send", "gmail.readonly", "gmail.modify")
    )
    account, address = CLOUD_ACCOUNTS[provider]
    for entry in config["accounts"]:
        if entry["username"] == account and reading:
            entry["reading"] = reading
    return config, address, account


@dataclass
class Live:
    gateway: Any
    sandbox: Sandbox
    user: User
    account: str
    cafile: str

    def __post_init__(self) -> None:
        self.seed = InboxSeeder(self.sandbox, self.user, T0)

    def inbox(self) -> list[str]:
        return self.sandbox.ops(self.user).inbox_ids(self.user)

    def login(self) -> imaplib.IMAP4:
        return imap_starttls_login(self.gateway.ports["imap"], self.cafile, self.account)


@contextlib.asynccontextmanager
async def live_gateway(
    provider: str, sandbox: Sandbox, tmp_path: Path, reading: dict | None = None, **top: Any
) -> AsyncIterator[Live]:
    config, address, account = _cloud_config(provider, sandbox, tmp_path, reading, **top)
    user = sandbox.directory.user(address)
    assert user is not None
    async with running_gateway(config, tmp_path / "c.yaml") as gateway:
        yield Live(gateway, sandbox, user, account, str(gateway.settings.state_dir / "tls/ca.crt"))


@pytest.fixture(params=["microsoft", "google"])
async def live(
    request: pytest.FixtureRequest, sandbox: Sandbox, tmp_path: Path
) -> AsyncIterator[Live]:
    async with live_gateway(request.param, sandbox, tmp_path) as world:
        yield world


async def test_idle_reports_new_moved_and_read_mail(live: Live) -> None:
    first = live.seed("a0")
    live.seed("a1")

    def session() -> dict[str, bytes]:
        client = live.login()
        try:
            client.select("INBOX")
            out = {}
            with idling(client) as wait:
                live.seed("a2")  # arrives at the provider while the client idles
                out["exists"] = wait(rb"^\* \d+ EXISTS")
                live.sandbox.ops(live.user).set_read(live.user, first, True)
                out["flags"] = wait(rb"^\* \d+ FETCH \(FLAGS")
                live.sandbox.ops(live.user).move(live.user, first, "archive")
                out["expunge"] = wait(rb"^\* \d+ EXPUNGE")
            out["after"] = client.search(None, "ALL")[1][0]
            return out
        finally:
            client.logout()

    out = await asyncio.to_thread(session)
    assert out["exists"].strip() == b"* 3 EXISTS"
    assert out["flags"].startswith(b"* 1 FETCH (FLAGS (\\Seen)")
    assert out["expunge"].strip() == b"* 1 EXPUNGE"
    assert out["after"] == b"1 2"


async def test_expunge_reaches_other_sessions_and_leaves_the_provider_alone(
    live: Live,
) -> None:
    for n in range(3):
        live.seed(f"e{n}")

    def sessions() -> tuple[bytes, list, int]:
        watcher, deleter = live.login(), live.login()
        try:
            watcher.select("INBOX")
            deleter.select("INBOX")
            with idling(watcher) as wait:
                deleter.store("2", "+FLAGS", "(\\Deleted)")
                expunged = deleter.expunge()[1]
                pushed = wait(rb"^\* \d+ EXPUNGE")
            return pushed, expunged, int(watcher.select("INBOX")[1][0])
        finally:
            watcher.logout()
            deleter.logout()

    pushed, expunged, remaining = await asyncio.to_thread(sessions)
    assert expunged == [b"2"] and pushed.strip() == b"* 2 EXPUNGE" and remaining == 2
    assert len(live.inbox()) == 3  # the default policy keeps the message at the provider


async def test_one_poller_per_mailbox(live: Live) -> None:
    live.seed("p0")
    clients = await asyncio.gather(*(asyncio.to_thread(live.login) for _ in range(5)))
    for client in clients:
        await asyncio.to_thread(client.select, "INBOX")
    target = "graph" if live.account == "crm" else "gmail"
    requests = live.sandbox.faults.requests
    before = requests.get(target, 0)
    await asyncio.sleep(POLL_SECONDS * 4.5)  # a measured window (pacing, not a wait for work)
    polls = requests.get(target, 0) - before
    for client in clients:
        await asyncio.to_thread(client.logout)
    # Five selected sessions, about four intervals: one poller makes about four rounds (a
    # Gmail round is one history call; a Graph round one delta call), five would make 20.
    assert 2 <= polls <= 6, polls
    for _ in range(100):  # the last session left: polling stops once its close is processed
        pollers = [t for t in asyncio.all_tasks() if t.get_name() == f"poll {live.account}"]
        if not pollers:
            break
        await asyncio.sleep(0.05)
    assert pollers == []


HEADERS = "(UID ENVELOPE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT MESSAGE-ID)] BODY.PEEK[HEADER])"


@pytest.mark.parametrize("provider", ["microsoft", "google"])
async def test_restart_keeps_uids_flags_sizes_and_headers(
    provider: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    async with live_gateway(provider, sandbox, tmp_path) as world:
        for n in range(4):
            world.seed(f"r{n}")

        def first() -> tuple:
            client = world.login()
            try:
                client.select("INBOX")
                validity = client.untagged_responses["UIDVALIDITY"][-1]
                listing = client.uid("FETCH", "1:*", "(UID RFC822.SIZE)")[1]
                client.store("1", "+FLAGS", "(\\Flagged \\Answered)")
                client.store("3", "+FLAGS", "(\\Deleted)")
                client.expunge()
                flags = client.uid("FETCH", "1:*", "(UID FLAGS)")[1]
                return validity, listing, flags, client.uid("FETCH", "1:*", HEADERS)[1]
            finally:
                client.logout()

        validity, listing, flags, headers = await asyncio.to_thread(first)
    target = "graph" if provider == "microsoft" else "gmail"
    async with live_gateway(provider, sandbox, tmp_path) as world:
        before = sandbox.faults.requests.get(target, 0)

        def second() -> tuple:
            client = world.login()
            try:
                client.select("INBOX")
                again = client.untagged_responses["UIDVALIDITY"][-1]
                return (
                    again,
                    client.uid("FETCH", "1:*", "(UID FLAGS)")[1],
                    client.uid("FETCH", "1:*", "(UID RFC822.SIZE)")[1],
                    client.uid("FETCH", "1:*", HEADERS)[1],
                )
            finally:
                client.logout()

        again, flags_after, sizes_after, headers_after = await asyncio.to_thread(second)
        calls = sandbox.faults.requests.get(target, 0) - before
    assert again == validity
    assert flags_after == flags and len(flags_after) == 3  # the expunged one stays hidden
    assert b"\\Flagged" in flags_after[0] and b"\\Answered" in flags_after[0]
    sizes = dict(re.findall(rb"UID (\d+) RFC822.SIZE (\d+)", b" ".join(listing)))
    del sizes[b"3"]
    assert dict(re.findall(rb"UID (\d+) RFC822.SIZE (\d+)", b" ".join(sizes_after))) == sizes
    assert headers_after == headers and len(headers) == 3 * 3  # (line, literal, literal) each
    # ... all without downloading a body: one sync (plus Gmail's profile call).
    assert calls <= 2, calls


@pytest.mark.parametrize("provider", ["microsoft", "google"])
async def test_opt_in_policy_mirrors_seen_and_trashes(
    provider: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    reading = {"mirror_flags": True, "on_delete": "trash"}
    async with live_gateway(provider, sandbox, tmp_path, reading) as world:
        ids = [world.seed(f"m{n}") for n in range(2)]

        def session() -> None:
            client = world.login()
            try:
                client.select("INBOX")
                client.fetch("1", "(BODY[])")  # no PEEK: sets \Seen (RFC 3501 6.4.5)
                client.store("2", "+FLAGS", "(\\Deleted)")
                client.expunge()
            finally:
                client.logout()

        await asyncio.to_thread(session)
        await world.gateway.views[world.account].close()  # the background calls finished
        store = sandbox.ops(world.user).store
        assert world.inbox() == [ids[0]]
        if provider == "microsoft":
            box = store.mailbox(world.user)
            read, trashed = box.find(ids[0]), box.find(ids[1])
            assert read is not None and read.is_read
            assert trashed is not None and trashed.folder_id == box.folder("deleteditems").id
        else:
            box = store.mailbox(world.user)
            assert "UNREAD" not in box.messages[ids[0]].labels
            assert "TRASH" in box.messages[ids[1]].labels


@pytest.mark.parametrize("policy", ["never", "loopback"])
async def test_plaintext_login_policy(policy: str, sandbox: Sandbox, tmp_path: Path) -> None:
    async with live_gateway("microsoft", sandbox, tmp_path, plaintext_auth=policy) as world:

        def attempt() -> tuple[str, str]:
            imap = imaplib.IMAP4(HOST, world.gateway.ports["imap"], timeout=10)
            try:
                imap_result = imap.login(world.account, PASSWORD)[0]
            except imaplib.IMAP4.error as refused:
                imap_result = str(refused)
            finally:
                imap.shutdown()
            pop = poplib.POP3(HOST, world.gateway.ports["pop3"], timeout=10)
            try:
                pop_result = pop.user(world.account).decode()
            except poplib.error_proto as refused:
                pop_result = str(refused)
            finally:
                pop.close()
            return imap_result, pop_result

        imap_result, pop_result = await asyncio.to_thread(attempt)
    if policy == "never":
        assert "STARTTLS" in imap_result and "PRIVACYREQUIRED" in imap_result
        assert "STLS" in pop_result and pop_result.startswith("b'-ERR")
    else:
        assert imap_result == "OK" and pop_result.startswith("+OK")


async def test_uid_expunge_removes_only_the_named_deleted_messages(live: Live) -> None:
    for n in range(3):
        live.seed(f"x{n}")

    def session() -> tuple:
        client = live.login()
        try:
            caps = client.capabilities
            client.select("INBOX")
            client.store("1:3", "+FLAGS", "(\\Deleted)")
            expunged = client.uid("EXPUNGE", "2")
            remaining = client.uid("SEARCH", "ALL")[1]
            with pytest.raises(imaplib.IMAP4.error, match="needs a UID set"):
                client._simple_command("UID", "EXPUNGE")
            client.select("INBOX", readonly=True)
            read_only = client._simple_command("EXPUNGE")
            return caps, expunged, remaining, read_only
        finally:
            client.logout()

    caps, expunged, remaining, read_only = await asyncio.to_thread(session)
    assert "UIDPLUS" in caps
    assert expunged[0] == "OK" and remaining == [b"1 3"]  # 1 and 3 stay, still \Deleted
    assert read_only[0] == "NO"


async def test_a_client_gone_during_select_leaves_no_watcher(live: Live) -> None:
    """SELECT syncs first; a client that disconnects meanwhile must not stay a watcher of the
    view (it would keep the poller running and the session alive forever)."""
    live.seed("g0")
    target = "graph" if live.account == "crm" else "gmail"
    live.sandbox.faults.add(Fault(target, "slow", remaining=1, delay=1.0))

    def select_and_vanish() -> None:
        client = live.login()
        client.send(client._new_tag() + b" SELECT INBOX\r\n")
        client.shutdown()  # gone before the answer

    opened = live.gateway.views.get(live.account)
    watched_before = opened.watched if opened is not None else 0
    await asyncio.to_thread(select_and_vanish)
    view = live.gateway.views[live.account]

    def pollers() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if t.get_name() == f"poll {live.account}"]

    # The slow sync ends, SELECT opens the INBOX (one more session watched the view), then
    # finds its client gone and lets go: wait for that, not for a guessed number of seconds.
    for _ in range(200):
        if view.watched == watched_before + 1 and view.watchers == 0 and not pollers():
            break
        await asyncio.sleep(0.05)
    assert view.watched == watched_before + 1, "the SELECT never opened the INBOX"
    assert view.watchers == 0, "the vanished client still watches the view"
    assert not pollers(), "the poller runs on for nobody"


async def test_status_and_copy_let_go_of_the_mailbox(live: Live) -> None:
    """Clients poll STATUS often; each one opens the INBOX only to count it. COPY is refused
    without opening (or downloading) anything."""
    for n in range(3):
        live.seed(f"s{n}")

    def session() -> tuple:
        client = live.login()
        try:
            answers = [client.status("INBOX", "(MESSAGES UNSEEN UIDNEXT)") for _ in range(5)]
            missing = client.status("Archive", "(MESSAGES)")
            client.select("INBOX")
            copied = client.copy("1:*", "INBOX")
            client.unselect()
            return answers, missing, copied
        finally:
            client.logout()

    view = live.gateway.views.get(live.account)
    downloads_before = view.cache.used if view is not None else 0
    answers, missing, copied = await asyncio.to_thread(session)
    assert answers[-1] == ("OK", [b"INBOX (MESSAGES 3 UNSEEN 3 UIDNEXT 4)"])
    assert missing[0] == "NO" and b"NONEXISTENT" in missing[1][0]
    assert copied[0] == "NO" and b"[CANNOT]" in copied[1][0]
    view = live.gateway.views[live.account]
    assert view.watchers == 0  # nothing left watching after five STATUS, a COPY, UNSELECT
    assert view.cache.used == downloads_before == 0  # COPY downloaded nothing
