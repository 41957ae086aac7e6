"""Spool → upstream SMTP: a real Postfix (STARTTLS or implicit TLS, AUTH) into a real Dovecot."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.config import AccountSettings, SendingSettings, UpstreamServer, UpstreamSettings
from gateway.config._schema import Secret
from gateway.outbound import system_ca_file
from gateway.providers import UpstreamSender
from gateway.sandbox.upstream import MailUser, Postfix
from gateway.spool import Envelope, FileSpool
from tests.helpers import PASSWORD_HASH


def _account(postfix: Postfix, user: MailUser, security: str, password: str) -> AccountSettings:
    port = postfix.submission_port if security == "starttls" else postfix.smtps_port
    server = UpstreamServer(
        host="localhost",
        port=port,
        security=security,  # type: ignore[arg-type]
        username=user.name,
        password=Secret(password, "test"),
        ca_file=postfix.ca_file,
    )
    return AccountSettings(
        username="legacy",
        password_hash=PASSWORD_HASH,
        provider="upstream",
        address=f"{user.name}@upstream.test",
        upstream=UpstreamSettings(smtp=server),
        sending=SendingSettings(),
    )


def _spool(directory: Path, account: AccountSettings) -> FileSpool:
    senders = {"upstream": UpstreamSender(system_ca_file())}
    return FileSpool(directory, [account], senders, first_backoff=0.05, rescan_interval=0.5)


async def _settled(spool: FileSpool, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while any(r.state == "queued" for r in spool.messages()):
        assert time.monotonic() < deadline, [(r.state, r.reason) for r in spool.messages()]
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_upstream_delivery_keeps_the_envelope(
    postfix: Postfix, upstream_user: MailUser, tmp_path: Path, security: str
) -> None:
    token = uuid.uuid4().hex
    account = _account(postfix, upstream_user, security, upstream_user.password)
    raw = (
        f"From: {account.address}\r\nTo: shown@example.org\r\nSubject: upstream {token}\r\n"
        "\r\nTschüss, 8-bit body.\r\n"
    ).encode()
    spool = _spool(tmp_path / "spool", account)
    await spool.start()
    try:
        # Only the envelope recipient gets it; the To header is not used for routing.
        envelope = Envelope(
            "legacy", account.address, ("envelope-only@elsewhere.example",), False,
            datetime.now(UTC), "127.0.0.1",
        )  # fmt: skip
        await spool.submit(envelope, raw)
        await _settled(spool)
    finally:
        await spool.stop()
    assert spool.messages() == []
    uids = await asyncio.to_thread(postfix.wait_for_delivery, "header", "Subject", token)
    assert len(uids) == 1
    stored = postfix.dovecot.doveadm(
        "fetch", "-u", postfix.catchall_user, "text", "mailbox", "INBOX", "uid", str(uids[0])
    )
    assert "Tschüss, 8-bit body." in stored
    assert "envelope-only@elsewhere.example" in stored  # Postfix's Delivered-To/Received
    assert "Message-ID: <" in stored  # added by the spool for later deduplication
    (logged,) = spool.recent_deliveries()
    assert logged["result"] == "sent" and "accepted 1 recipient" in logged["detail"]


async def test_wrong_upstream_password_holds_the_mail(
    postfix: Postfix, upstream_user: MailUser, tmp_path: Path
) -> None:
    account = _account(postfix, upstream_user, "starttls", "not-the-password")
    spool = _spool(tmp_path / "spool", account)
    await spool.start()
    try:
        envelope = Envelope(
            "legacy", account.address, ("x@elsewhere.example",), False, datetime.now(UTC), "::1"
        )
        await spool.submit(envelope, b"Subject: held\r\n\r\nbody\r\n")
        await _settled(spool)
    finally:
        await spool.stop()
    (held,) = spool.messages()
    assert held.state == "held"
    assert "refused the stored credentials (535" in held.reason


async def test_upstream_refusal_reaches_the_client_inline(
    postfix: Postfix, upstream_user: MailUser, tmp_path: Path
) -> None:
    account = _account(postfix, upstream_user, "tls", upstream_user.password)
    spool = FileSpool(
        tmp_path / "spool",
        [account],
        {"upstream": UpstreamSender(system_ca_file())},
        deliver_inline=True,
    )
    envelope = Envelope(
        "legacy", "bad sender@", ("x@elsewhere.example",), False, datetime.now(UTC), "127.0.0.1"
    )
    result = await spool.submit(envelope, b"Subject: refused\r\n\r\nbody\r\n")
    assert result.queue_id is None
    assert result.reply.startswith("501 5.1.7 upstream localhost answered 501 5.1.7 Bad sender")
    assert spool.messages() == []
    assert spool.recent_deliveries()[0]["result"] == "refused"
