"""Spool → Graph / Gmail over real HTTPS against the sandbox: sizes, Bcc, send-as, faults,
crash recovery without duplicates, revoked consent.

Tokens come from a small stand-in for the broker that mints real sandbox grants (the broker
itself is tested in test_oauth.py); everything below it is the production code path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import json
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import outbound
from gateway.config import AccountSettings
from gateway.delivery import DeliveryResult, Envelope
from gateway.oauth import ReauthRequired
from gateway.providers import GmailSender, GraphSender, Sender
from gateway.spool import FileSpool
from mailgw_sandbox import Fault, Sandbox, User
from tests.helpers import PASSWORD_HASH, until

GMAIL_SCOPES = {
    "https://www.googleapis.com/auth/gmail.send",
    "https://www.googleapis.com/auth/gmail.readonly",
}
GRAPH_SCOPES = {"Mail.Send", "Mail.ReadWrite"}
BIG = 10 * 1024 * 1024


class SandboxTokens:
    """Broker stand-in: real sandbox access tokens; ``revoked`` accounts need re-consent."""

    def __init__(self, sandbox: Sandbox, accounts: dict[str, AccountSettings]) -> None:
        self.sandbox = sandbox
        self.accounts = accounts
        self.revoked: set[str] = set()
        self.apps = {
            "microsoft": sandbox.add_app("microsoft").client_id,
            "google": sandbox.add_app("google").client_id,
        }
        self._cache: dict[str, str] = {}

    async def access_token(self, username: str) -> str:
        if username in self.revoked:
            raise ReauthRequired(f"{username} must be connected again")
        if username not in self._cache:
            account = self.accounts[username]
            provider = "microsoft" if account.provider == "microsoft" else "google"
            scopes = GRAPH_SCOPES if provider == "microsoft" else GMAIL_SCOPES
            grant = self.sandbox.directory.issue(
                "access", provider, self.apps[provider], account.address, scopes
            )
            self._cache[username] = grant.token
        return self._cache[username]

    async def refreshed_token(self, username: str, rejected: str, claims: str | None = None) -> str:
        if self._cache.get(username) == rejected:
            del self._cache[username]
        return await self.access_token(username)


class World:
    def __init__(self, sandbox: Sandbox, client: httpx.AsyncClient, directory: Path) -> None:
        self.sandbox = sandbox
        self.directory = directory
        self.graph_user = sandbox.add_user("microsoft", "crm@contoso.example")
        self.gmail_user = sandbox.add_user(
            "google", "scanner@example.com", send_as=["scans@example.com"]
        )
        self.accounts = {
            "crm": _account("crm", "microsoft", "crm@contoso.example"),
            "scanner": _account("scanner", "google", "scanner@example.com"),
        }
        self.tokens = SandboxTokens(sandbox, self.accounts)
        self.senders: dict[str, Sender] = {
            "microsoft": GraphSender(client, self.tokens, f"{sandbox.url}/v1.0"),
            "google": GmailSender(client, self.tokens, sandbox.url),
        }

    def spool(self, senders: dict[str, Sender] | None = None, **options: Any) -> FileSpool:
        settings: dict[str, Any] = {
            "first_backoff": 0.05,
            "max_backoff": 0.5,
            "rescan_interval": 0.5,
            **options,
        }
        return FileSpool(
            self.directory, self.accounts.values(), senders or self.senders, **settings
        )

    def sent(self, user: User) -> list[Any]:
        return self.sandbox.ops(user).sent(user)


def _account(username: str, provider: str, address: str) -> AccountSettings:
    return AccountSettings(
        username=username, password_hash=PASSWORD_HASH, provider=provider, address=address
    )


@pytest.fixture
async def world(sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[World]:
    async with outbound.async_client(sandbox.ca_file) as client:
        yield World(sandbox, client, tmp_path / "spool")


def envelope(account: str, *rcpts: str, mail_from: str = "app@example.org") -> Envelope:
    return Envelope(account, mail_from, rcpts, False, datetime.now(UTC), "127.0.0.1")


def message(
    sender: str,
    to: str = "alice@example.org",
    subject: str = "hello",
    attachment: bytes | None = None,
    **headers: str,
) -> bytes:
    mail = EmailMessage(policy=policy.SMTP)
    mail["From"] = sender
    mail["To"] = to
    mail["Subject"] = subject
    for name, value in headers.items():
        mail[name.replace("_", "-")] = value
    mail.set_content("Body text.\n")
    if attachment is not None:
        mail.add_attachment(
            attachment, maintype="application", subtype="octet-stream", filename="scan.bin"
        )
    return mail.as_bytes()


def attachment_of(raw: bytes) -> bytes:
    parsed = email.message_from_bytes(raw, policy=policy.default)
    parts = [p for p in parsed.iter_attachments() if p.get_filename() == "scan.bin"]
    assert len(parts) == 1, [p.get_filename() for p in parsed.iter_attachments()]
    return parts[0].get_content()


async def drained(spool: FileSpool, within: float = 15.0) -> None:
    """Wait until nothing is queued or held (dead letters stay)."""
    deadline = time.monotonic() + within
    while any(r.state != "dead" for r in spool.messages()):
        assert time.monotonic() < deadline, [(r.id, r.state, r.reason) for r in spool.messages()]
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("account", ["crm", "scanner"])
async def test_small_and_10mb_messages_are_sent_once(world: World, account: str) -> None:
    user = world.graph_user if account == "crm" else world.gmail_user
    payload = os.urandom(BIG)
    spool = world.spool()
    await spool.start()
    try:
        small = await spool.submit(envelope(account, "alice@example.org"), message(user.address))
        large = await spool.submit(
            envelope(account, "alice@example.org"), message(user.address, attachment=payload)
        )
        assert small.reply.startswith("250 2.0.0 Ok: queued as ")
        await drained(spool)
    finally:
        await spool.stop()
    sent = world.sent(user)
    assert len(sent) == 2
    assert attachment_of(sent[1].raw) == payload  # through an upload session / the upload API
    assert [r["result"] for r in await spool.recent_deliveries()] == ["sent", "sent"]
    logged = {r["queue_id"]: r for r in await spool.recent_deliveries()}
    assert logged[large.queue_id]["recipients"] == 1
    assert logged[small.queue_id]["message_id"] in sent[0].raw.decode()


@pytest.mark.parametrize("account", ["crm", "scanner"])
async def test_a_30mb_message_streamed_from_the_spool_file_arrives_byte_exact(
    world: World, account: str
) -> None:
    """The spool hands the API senders its file mapped (no copy of the message in memory);
    the message still arrives exactly: Gmail stores the bytes we sent (the body unchanged),
    Graph the draft plus the attachment uploaded in pieces."""
    user = world.graph_user if account == "crm" else world.gmail_user
    payload = os.urandom(22 * 1024 * 1024)  # about 30 MB once base64-encoded in the message
    raw = message(user.address, attachment=payload, Message_ID="<big.30mb@example.org>")
    assert len(raw) > 30_000_000
    spool = world.spool()
    await spool.start()
    try:
        await spool.submit(envelope(account, "alice@example.org"), raw)
        await drained(spool, within=60.0)
    finally:
        await spool.stop()
    (sent,) = world.sent(user)
    assert attachment_of(sent.raw) == payload
    assert [r["result"] for r in await spool.recent_deliveries()] == ["sent"]
    if account == "scanner":  # Gmail keeps the message as uploaded: the body byte for byte
        body = raw[raw.index(b"\r\n\r\n") + 4 :]
        assert sent.raw.endswith(body)


@pytest.mark.parametrize("account", ["crm", "scanner"])
async def test_bcc_stays_private_and_header_only_recipients_get_nothing(
    world: World, account: str
) -> None:
    user = world.graph_user if account == "crm" else world.gmail_user
    raw = message(user.address, to="alice@example.org", Cc="outsider@example.org")
    spool = world.spool()
    await spool.start()
    try:
        await spool.submit(envelope(account, "alice@example.org", "hidden@example.net"), raw)
        await drained(spool)
    finally:
        await spool.stop()
    (sent,) = world.sent(user)
    assert set(sent.recipients) == {"alice@example.org", "hidden@example.net"}
    visible = email.message_from_bytes(sent.raw, policy=policy.default)
    shown = " ".join(str(visible.get(h, "")) for h in ("To", "Cc"))
    assert "hidden@example.net" not in shown
    assert "outsider@example.org" not in sent.raw.decode()


async def test_graph_send_as_denied_is_refused_inline_and_dead_lettered_queued(
    world: World,
) -> None:
    forbidden = message("ceo@contoso.example")
    inline = world.spool(deliver_inline=True)
    refused = await inline.submit(envelope("crm", "alice@example.org"), forbidden)
    assert refused.queue_id is None
    assert refused.reply.startswith("553 5.7.1 ") and "ErrorSendAsDenied" in refused.reply
    assert inline.messages() == []

    spool = world.spool()
    await spool.start()
    try:
        await spool.submit(envelope("crm", "alice@example.org"), forbidden)
        await until(lambda: [r.state for r in spool.messages()] == ["dead"], 10, "a dead letter")
    finally:
        await spool.stop()
    (dead,) = spool.messages()
    assert "ErrorSendAsDenied" in dead.reason
    assert world.sent(world.graph_user) == []


async def test_gmail_unverified_from_is_a_dead_letter_verified_alias_is_sent(
    world: World,
) -> None:
    spool = world.spool()
    await spool.start()
    try:
        await spool.submit(envelope("scanner", "bob@example.org"), message("boss@example.com"))
        await spool.submit(envelope("scanner", "bob@example.org"), message("scans@example.com"))
        await drained(spool)
    finally:
        await spool.stop()
    (dead,) = spool.messages()
    assert "boss@example.com is not a verified Gmail send-as address" in dead.reason
    (sent,) = world.sent(world.gmail_user)
    assert sent.from_address == "scans@example.com"  # not rewritten


@pytest.mark.parametrize(("target", "account"), [("graph", "crm"), ("gmail", "scanner")])
async def test_throttling_outage_and_resets_deliver_each_message_exactly_once(
    world: World, target: Any, account: str
) -> None:
    user = world.graph_user if account == "crm" else world.gmail_user
    world.sandbox.faults.add(Fault(target, "429", remaining=3, retry_after="0.3"))
    world.sandbox.faults.add(Fault(target, "503", remaining=3, retry_after="0.1"))
    world.sandbox.faults.add(Fault(target, "reset", remaining=3))
    spool = world.spool()
    await spool.start()
    started = time.monotonic()
    try:
        ids = []
        for n in range(6):
            raw = message(user.address, subject=f"burst {n}")
            ids.append((await spool.submit(envelope(account, "alice@example.org"), raw)).queue_id)
        await drained(spool, within=20)
    finally:
        await spool.stop()
    assert time.monotonic() - started >= 0.3  # the decimal Retry-After was waited for
    assert world.sandbox.faults.pending == []
    subjects = sorted(
        str(email.message_from_bytes(s.raw, policy=policy.default)["Subject"])
        for s in world.sent(user)
    )
    assert subjects == [f"burst {n}" for n in range(6)]


class CrashAfterAccept:
    """Lets the provider accept the message, then never returns: the process 'dies' here."""

    def __init__(self, inner: Sender) -> None:
        self.inner = inner
        self.accepted = asyncio.Event()

    def concurrency(self, account: AccountSettings) -> int:
        return self.inner.concurrency(account)

    async def send(self, account: AccountSettings, env: Envelope, raw: bytes) -> DeliveryResult:
        await self.inner.send(account, env, raw)
        self.accepted.set()
        await asyncio.Event().wait()
        raise AssertionError("never reached")

    async def already_sent(self, account: AccountSettings, message_id: str) -> bool | None:
        return await self.inner.already_sent(account, message_id)


@pytest.mark.parametrize(("provider", "account"), [("microsoft", "crm"), ("google", "scanner")])
async def test_restart_after_crash_between_accept_and_record_does_not_resend(
    world: World, provider: str, account: str
) -> None:
    user = world.graph_user if account == "crm" else world.gmail_user
    crashing = CrashAfterAccept(world.senders[provider])
    first = world.spool({**world.senders, provider: crashing})
    await first.start()
    queued = await first.submit(envelope(account, "alice@example.org"), message(user.address))
    await asyncio.wait_for(crashing.accepted.wait(), 10)
    await first.stop(grace=0.05)
    state = json.loads((world.directory / "queue" / f"{queued.queue_id}.json").read_text())
    assert state["attempt_started"] is True and state["state"] == "queued"

    second = world.spool()
    await second.start()
    try:
        await drained(second)
    finally:
        await second.stop()
    assert len(world.sent(user)) == 1
    (logged,) = await second.recent_deliveries()
    assert logged["result"] == "sent" and "found in sent mail" in logged["detail"]


async def test_revoked_consent_holds_mail_until_reconnected(world: World) -> None:
    world.tokens.revoked.add("crm")
    spool = world.spool()
    await spool.start()
    try:
        await spool.submit(envelope("crm", "alice@example.org"), message("crm@contoso.example"))
        await until(lambda: [r.state for r in spool.messages()] == ["held"], 10, "the message held")
        (held,) = spool.messages()
        assert "must be connected again" in held.reason
        assert world.sent(world.graph_user) == []
        world.tokens.revoked.clear()
        assert await spool.release("crm") == 1
        await drained(spool)
    finally:
        await spool.stop()
    assert len(world.sent(world.graph_user)) == 1


async def test_at_most_four_graph_requests_per_mailbox(world: World) -> None:
    gate = world.sandbox.microsoft.hold_graph_requests()
    graph = world.sandbox.microsoft.graph
    spool = world.spool()
    await spool.start()
    try:
        for n in range(10):
            raw = message("crm@contoso.example", subject=f"n{n}")
            await spool.submit(envelope("crm", "alice@example.org"), raw)
        # Every message is under way: held at Graph, or waiting for one of the spool's slots
        # (a fifth request would be at Graph by now, were the limit not kept).
        await until(
            lambda: (
                graph.in_flight.get("crm@contoso.example", 0) + spool.waiting_for_slot("crm") == 10
            ),
            10,
            "all ten held at Graph or waiting for a slot",
        )
        assert graph.in_flight["crm@contoso.example"] == 4 and spool.waiting_for_slot("crm") == 6
        gate.set()
        await drained(spool)
    finally:
        await spool.stop()
    assert len(world.sent(world.graph_user)) == 10
    assert world.sandbox.faults.requests["graph"] == 10  # no request was throttled and retried


async def test_graph_attachment_only_message_mixing_upload_and_json_attachments(
    world: World,
) -> None:
    files = {
        name: os.urandom(size) for name, size in (("a", 2 << 20), ("b", 2 << 20), ("c", 4 << 20))
    }
    mail = EmailMessage(policy=policy.SMTP)
    mail["From"] = "crm@contoso.example"
    mail["To"] = "alice@example.org"
    mail["Subject"] = "scans"
    mail.make_mixed()  # a scanner's mail: attachments and no text at all
    for name, data in files.items():
        mail.add_attachment(data, maintype="application", subtype="pdf", filename=f"{name}.pdf")
    spool = world.spool()
    await spool.start()
    try:
        await spool.submit(envelope("crm", "alice@example.org"), mail.as_bytes())
        await drained(spool)
    finally:
        await spool.stop()
    (sent,) = world.sent(world.graph_user)
    parsed = email.message_from_bytes(sent.raw, policy=policy.default)
    got = {p.get_filename(): p.get_content() for p in parsed.iter_attachments()}
    assert got == {f"{name}.pdf": data for name, data in files.items()}
    # draft, upload session for c (2 PUTs of ≤ 3 MiB), a as a JSON attachment, b in the draft, send
    assert world.sandbox.faults.requests["graph"] == 6


async def test_a_failed_large_graph_attempt_leaves_no_draft_behind(world: World) -> None:
    """The draft of an attempt whose attachments failed is deleted; the retry sends once."""
    mail = EmailMessage(policy=policy.SMTP)
    mail["From"] = "crm@contoso.example"
    mail["To"] = "alice@example.org"
    mail["Subject"] = "retry after a failed attachment"
    mail.set_content("See the files.\n")
    for name, size in (("a", 2 << 20), ("b", 2 << 20)):
        mail.add_attachment(os.urandom(size), maintype="application", subtype="pdf", filename=name)
    world.sandbox.faults.add(Fault("graph", "503", retry_after="0.1", path_suffix="/attachments"))
    spool = world.spool()
    await spool.start()
    try:
        await spool.submit(envelope("crm", "alice@example.org"), mail.as_bytes())
        await drained(spool)
    finally:
        await spool.stop()
    assert len(world.sent(world.graph_user)) == 1
    box = world.sandbox.ops(world.graph_user).store.mailbox(world.graph_user)
    drafts = [m for m in box.messages.values() if m.folder_id == box.folder("drafts").id]
    deleted = [m for m in box.messages.values() if m.folder_id == box.folder("deleteditems").id]
    assert drafts == [] and len(deleted) == 1  # the first attempt's draft, soft-deleted


def _keep_sent_copy(world: World, username: str, keep: bool) -> None:
    """Set the account's ``sending.save_to_sent`` (the spool and the tokens share the dict)."""
    account = world.accounts[username]
    world.accounts[username] = dataclasses.replace(
        account, sending=dataclasses.replace(account.sending, save_to_sent=keep)
    )


@pytest.mark.parametrize("keep", [True, False])
async def test_graph_save_to_sent_is_honoured_for_small_and_large_messages(
    world: World, keep: bool
) -> None:
    """false: sendMail (always filed) is not used; the drafts are marked PidTagDeleteAfterSubmit,
    so both messages reach the recipient and nothing is left in Sent Items or Drafts."""
    _keep_sent_copy(world, "crm", keep)
    user = world.graph_user
    payload = os.urandom(BIG)
    spool = world.spool()
    await spool.start()
    try:
        await spool.submit(envelope("crm", "alice@example.org"), message(user.address, subject="s"))
        await spool.submit(
            envelope("crm", "bob@example.org"), message(user.address, attachment=payload)
        )
        await drained(spool)
    finally:
        await spool.stop()
    by_recipient = {m.recipients: m for m in world.sent(user)}
    small, large = by_recipient[("alice@example.org",)], by_recipient[("bob@example.org",)]
    assert attachment_of(large.raw) == payload
    assert (small.saved_to_sent, large.saved_to_sent) == (keep, keep)
    box = world.sandbox.microsoft.store.mailbox(user)
    sent_items, drafts = (
        box.in_folder(box.folders["sentitems"]),
        box.in_folder(box.folders["drafts"]),
    )
    assert (len(sent_items), drafts) == (2 if keep else 0, [])
    details = [r["detail"] for r in await spool.recent_deliveries()]
    assert len(details) == 2
    assert all(("no Sent Items copy" in detail) is not keep for detail in details)


async def test_without_a_sent_copy_a_crash_mid_send_is_sent_again(world: World) -> None:
    """The guarantee without a Sent copy is at-least-once: Sent Items cannot be asked, so the
    message whose attempt was interrupted after Graph took it goes out a second time."""
    _keep_sent_copy(world, "crm", False)
    user = world.graph_user
    assert await world.senders["microsoft"].already_sent(world.accounts["crm"], "<x@y>") is None
    crashing = CrashAfterAccept(world.senders["microsoft"])
    first = world.spool({**world.senders, "microsoft": crashing})
    await first.start()
    await first.submit(envelope("crm", "alice@example.org"), message(user.address))
    await asyncio.wait_for(crashing.accepted.wait(), 10)
    await first.stop(grace=0.05)

    second = world.spool()
    await second.start()
    try:
        await drained(second)
    finally:
        await second.stop()
    assert [m.recipients for m in world.sent(user)] == [("alice@example.org",)] * 2
    (logged,) = await second.recent_deliveries()
    assert logged["result"] == "sent" and "found in sent mail" not in logged["detail"]
