"""Spool → upstream SMTP: a real Postfix (STARTTLS or implicit TLS, AUTH) into a real Dovecot."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.config import AccountSettings, SendingSettings, UpstreamSettings, UpstreamSmtpServer
from gateway.config._schema import Secret
from gateway.delivery import Envelope
from gateway.outbound import system_ca_file
from gateway.providers import UpstreamSender
from gateway.spool import FileSpool
from mailgw_sandbox.upstream import POSTFIX_BIN, MailUser, Postfix
from tests.helpers import PASSWORD_HASH


def _account(postfix: Postfix, user: MailUser, security: str, password: str) -> AccountSettings:
    port = postfix.submission_port if security == "starttls" else postfix.smtps_port
    server = UpstreamSmtpServer(
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
    (logged,) = await spool.recent_deliveries()
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
    assert (await spool.recent_deliveries())[0]["result"] == "refused"


def _postfix_sessions(postfix: Postfix, since: int, sasl_user: str) -> list[int]:
    """Messages per smtpd session that logged in as ``sasl_user``, from Postfix's own log after
    byte offset ``since`` (each session: ``connect from`` … ``disconnect from``, one pid)."""
    text = postfix.log_file.read_bytes()[since:].decode(errors="replace")
    open_sessions: dict[str, int] = {}  # smtpd pid → messages of sasl_user so far
    per_session: list[int] = []
    for line in text.splitlines():
        found = re.search(r"/smtpd\[(\d+)\]: (.*)", line)
        if not found:
            continue
        pid, event = found.groups()
        if event.startswith("connect from "):
            open_sessions[pid] = 0
        elif f"sasl_username={sasl_user}" in event and pid in open_sessions:
            open_sessions[pid] += 1
        elif event.startswith("disconnect from ") and open_sessions.get(pid):
            per_session.append(open_sessions.pop(pid))
    return per_session


def _restart(postfix: Postfix) -> None:
    """``postfix stop`` (the master takes its smtpd processes down with it), then start again."""
    master = postfix.master_pid()
    stop = [POSTFIX_BIN, "-c", str(postfix.config_dir), "stop"]
    subprocess.run(stop, check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + 15
    while master is not None and Path(f"/proc/{master}").exists():
        assert time.monotonic() < deadline, "the Postfix master did not stop"
        time.sleep(0.05)
    postfix.start()


async def _submit_batch(spool: FileSpool, account: AccountSettings, token: str, indexes: range):
    for index in indexes:
        envelope = Envelope(
            "legacy", account.address, (f"rcpt{index}@elsewhere.example",), False,
            datetime.now(UTC), "127.0.0.1",
        )  # fmt: skip
        raw = f"From: {account.address}\r\nSubject: batch {token} #{index}\r\n\r\nbody\r\n"
        await spool.submit(envelope, raw.encode())


def _delivered_subjects(postfix: Postfix, token: str, expected: int) -> list[str]:
    """Subjects of the catch-all's messages carrying ``token``, once ``expected`` have arrived
    and Postfix's queue is empty (the gateway's spool already is): a duplicate would be in
    the mailbox by then, as nothing is left to deliver."""
    deadline = time.monotonic() + 60
    while True:
        uids = postfix.dovecot.search(postfix.catchall_user, "header", "Subject", token)
        if (len(uids) >= expected and _queue_empty(postfix)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    listing = postfix.dovecot.doveadm(
        "fetch", "-u", postfix.catchall_user, "hdr.subject", "mailbox", "INBOX",
        "header", "Subject", token,
    )  # fmt: skip
    return re.findall(r"batch \S+ #\d+", listing)


def _queue_empty(postfix: Postfix) -> bool:
    """No file in Postfix's queue: it removes one only once the message is delivered."""
    queues = ("maildrop", "incoming", "active", "deferred", "hold")
    return not any(p.is_file() for q in queues for p in (postfix.queue_dir / q).rglob("*"))


async def test_200_messages_arrive_once_over_reused_sessions(
    postfix: Postfix, upstream_user: MailUser, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    account = _account(postfix, upstream_user, "starttls", upstream_user.password)
    sender = UpstreamSender(system_ca_file())
    spool = FileSpool(tmp_path / "spool", [account], {"upstream": sender}, first_backoff=0.05)
    log_start = postfix.log_file.stat().st_size
    await spool.start()
    try:
        await _submit_batch(spool, account, token, range(200))
        await _settled(spool, within=120)
    finally:
        await spool.stop()
        await sender.close()  # QUIT: Postfix logs each session's disconnect
    assert spool.messages() == []
    subjects = await asyncio.to_thread(_delivered_subjects, postfix, token, 200)
    assert sorted(subjects) == sorted(f"batch {token} #{i}" for i in range(200))
    sessions: list[int] = []
    for _ in range(50):  # postlogd writes asynchronously
        sessions = _postfix_sessions(postfix, log_start, upstream_user.name)
        if sum(sessions) >= 200:
            break
        await asyncio.sleep(0.1)
    assert sum(sessions) == 200
    assert 1 <= len(sessions) <= 4, sessions  # max_sessions (default 4), each carrying many


async def test_postfix_restarted_mid_batch_loses_and_duplicates_nothing(
    postfix: Postfix, upstream_user: MailUser, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Postfix restarts while the pool holds sessions to it, between two halves of a batch: the
    next messages find their sessions gone before anything was sent, and go over new
    sessions, each once, without a spool retry."""
    caplog.set_level(logging.INFO, logger="gateway")
    token = uuid.uuid4().hex
    account = _account(postfix, upstream_user, "tls", upstream_user.password)
    sender = UpstreamSender(system_ca_file())
    spool = FileSpool(tmp_path / "spool", [account], {"upstream": sender}, first_backoff=0.05)
    await spool.start()
    try:
        await _submit_batch(spool, account, token, range(100))
        await _settled(spool, within=120)
        pool = await sender.pool(account.username, account.upstream.smtp)  # type: ignore[union-attr]
        opened_before = pool.opened
        assert pool.open_sessions >= 1
        # Postfix itself must be done with the first half (in Dovecot, its queue empty): a
        # `postfix stop` during its own LMTP delivery makes Postfix deliver that message again,
        # a duplicate that is Postfix's, not the gateway's.
        await asyncio.to_thread(_delivered_subjects, postfix, token, 100)
        await asyncio.to_thread(_restart, postfix)
        await _submit_batch(spool, account, token, range(100, 200))
        await _settled(spool, within=120)
    finally:
        await spool.stop()
        await sender.close()
    assert spool.messages() == []
    assert pool.opened > opened_before  # the dropped sessions were replaced
    deliveries = await spool.recent_deliveries(limit=400)
    assert [d["result"] for d in deliveries] == ["sent"] * 200
    events = [r.getMessage() for r in caplog.records]
    assert "upstream.session_dropped" in events and "spool.retry" not in events
    subjects = await asyncio.to_thread(_delivered_subjects, postfix, token, 200)
    assert sorted(subjects) == sorted(f"batch {token} #{i}" for i in range(200))
