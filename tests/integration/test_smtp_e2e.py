"""The whole gateway, end to end: real SMTP clients (smtplib, swaks, curl) → SMTP front → durable
spool → Graph / Gmail senders → the sandbox clouds over HTTPS, with real tokens.

Nothing is stubbed between the client's socket and the sandbox's Sent list, so these tests show
what issue 5 promises a legacy program: a 250 means the message goes out exactly once, through
throttling, outages, a SIGKILL and a revoked consent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.app import Gateway
from gateway.spool._files import SpoolFiles
from mailgw_sandbox import Fault, Sandbox, SentMessage
from tests.helpers import (
    GOOGLE_ADDRESS,
    MS_ADDRESS,
    PASSWORD,
    AdminBrowser,
    Burst,
    GatewayProcess,
    connected_config,
    free_port,
    message_ids,
    parsed,
    running_gateway,
    sandbox_config,
    sent_of,
    until,
)

HOST = "127.0.0.1"
BIG = 10 * 1024 * 1024
ADDRESS = {"crm": MS_ADDRESS, "scanner": GOOGLE_ADDRESS}


# -- wiring ------------------------------------------------------------------------------------


@dataclass
class Live:
    """A running gateway with connected accounts, and the sandbox it delivers to."""

    gateway: Gateway
    sandbox: Sandbox

    @property
    def smtp(self) -> int:
        return self.gateway.ports["smtp"]

    @property
    def smtps(self) -> int:
        return self.gateway.ports["smtps"]

    @property
    def ca(self) -> Path:
        """The CA the gateway generated for its own certificate; clients must trust it."""
        return self.gateway.settings.state_dir / "tls" / "ca.crt"

    def client_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def sent(self, account: str) -> list[SentMessage]:
        return sent_of(self.sandbox, ADDRESS[account])


@pytest.fixture
async def live(sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[Live]:
    """Microsoft app-only, Google by its service account: delivering at once, nobody signs in
    (delegated consent is exercised by the revoked-token test)."""
    config = connected_config(sandbox, tmp_path)
    async with running_gateway(config, tmp_path / "c.yaml") as gateway:
        yield Live(gateway, sandbox)


async def delivered(live: Live, account: str, message_id: str, within: float = 15.0) -> SentMessage:
    """Wait until the message is in the account's Sent list, and return it (exactly once).

    A dead letter will never be sent: that fails at once, with the provider's reason."""
    spool = live.gateway.spool

    def done() -> bool:
        dead = [r.reason for r in spool.messages() if r.state == "dead"]
        if dead:
            pytest.fail(f"{message_id}: dead-lettered instead of sent: {dead}")
        return message_id in message_ids(live.sent(account))

    await until(
        done,
        within,
        lambda: f"{message_id} sent; spool: {[(r.state, r.reason) for r in spool.messages()]}",
    )
    matches = [s for s in live.sent(account) if message_ids([s]) == [message_id]]
    assert len(matches) == 1, f"{message_id} was sent {len(matches)} times"
    return matches[0]


def mail(account: str, subject: str, to: str = "alice@example.org", **headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = ADDRESS[account]
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="e2e.test")
    for name, value in headers.items():
        message[name] = value
    message.set_content(f"{subject}\n")
    return message


def smtplib_send(
    live: Live, mode: str, account: str, message: EmailMessage, **options: Any
) -> dict:
    """One smtplib session: ``plain`` (AUTH in clear text from loopback), ``starttls`` or
    ``smtps``; returns send_message's refused-recipients dict (empty when all were taken)."""
    if mode == "smtps":
        client: smtplib.SMTP = smtplib.SMTP_SSL(
            HOST, live.smtps, context=live.client_tls(), timeout=30
        )
    else:
        client = smtplib.SMTP(HOST, live.smtp, timeout=30)
    with client:
        if mode == "starttls":
            client.starttls(context=live.client_tls())
        client.login(account, PASSWORD)
        return client.send_message(message, **options)


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, timeout=60, check=False)


# -- real clients: delivery through every way in -------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "starttls", "smtps"])
async def test_smtplib_delivers_once_through_graph_and_gmail(live: Live, mode: str) -> None:
    """Each way in (clear text AUTH from loopback, STARTTLS, implicit TLS) ends in the Sent list
    of both providers exactly once, addressed to the envelope's recipients."""
    sent = {}
    for account in ("crm", "scanner"):
        message = mail(account, f"{mode} via {account}", Cc="bob@example.org")
        assert await asyncio.to_thread(smtplib_send, live, mode, account, message) == {}
        sent[account] = message["Message-ID"]
    for account, message_id in sent.items():
        got = await delivered(live, account, message_id)
        assert set(got.recipients) == {"alice@example.org", "bob@example.org"}
        assert got.from_address == ADDRESS[account]
        assert parsed(got.raw)["Subject"] == f"{mode} via {account}"


@pytest.mark.parametrize("mode", ["--tls", "--tlsc"])
async def test_swaks_starttls_and_implicit_tls_deliver_once(live: Live, mode: str) -> None:
    """swaks, the MTA admins' test client, with STARTTLS and with SMTPS, verifying our cert."""
    port = live.smtp if mode == "--tls" else live.smtps
    message_id = make_msgid(domain="swaks.e2e.test")
    command = ["swaks", "--server", f"{HOST}:{port}", mode, "--tls-verify"]
    command += ["--tls-ca-path", str(live.ca), "--tls-sni", "localhost"]
    command += ["--from", MS_ADDRESS, "--to", "carol@example.org"]
    command += ["--auth", "LOGIN", "--auth-user", "crm", "--auth-password", PASSWORD]
    command += ["--header", f"Message-Id: {message_id}", "--header", "Subject: via swaks"]
    command += ["--header", f"From: {MS_ADDRESS}"]
    result = await asyncio.to_thread(run, command)
    assert result.returncode == 0, result.stdout.decode()
    assert b"<~  250 2.0.0 Ok: queued as " in result.stdout
    got = await delivered(live, "crm", message_id)
    assert got.recipients == ("carol@example.org",)


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
async def test_curl_with_tls_required_delivers_once(
    live: Live, scheme: str, tmp_path: Path
) -> None:
    """curl's SMTP client (STARTTLS forced with --ssl-reqd, or smtps://), uploading a CRLF file."""
    port = live.smtp if scheme == "smtp" else live.smtps
    message_id = make_msgid(domain="curl.e2e.test")
    upload = tmp_path / "message.eml"
    upload.write_bytes(
        (
            f"From: {GOOGLE_ADDRESS}\r\nTo: dave@example.org\r\nSubject: via curl {scheme}\r\n"
            f"Message-ID: {message_id}\r\n\r\nSent by curl.\r\n"
        ).encode()
    )
    command = ["curl", "--silent", "--show-error", "--url", f"{scheme}://localhost:{port}"]
    command += ["--ssl-reqd", "--cacert", str(live.ca), "--user", f"scanner:{PASSWORD}"]
    command += ["--mail-from", GOOGLE_ADDRESS, "--mail-rcpt", "dave@example.org"]
    command += ["--upload-file", str(upload)]
    result = await asyncio.to_thread(run, command)
    assert result.returncode == 0, result.stderr.decode()
    got = await delivered(live, "scanner", message_id)
    assert got.recipients == ("dave@example.org",)
    assert parsed(got.raw).get_content().strip() == "Sent by curl."


# -- content: UTF-8, 8-bit, Bcc, size ----------------------------------------------------------


@pytest.mark.parametrize("account", ["crm", "scanner"])
async def test_japanese_utf8_and_8bit_latin1_bodies_arrive_intact(live: Live, account: str) -> None:
    """8-bit content must cross SMTP (SMTPUTF8 / 8BITMIME), the spool and the provider's MIME
    handling without mojibake or lost bytes."""
    japanese = mail(account, "四半期の報告書（第３四半期）")
    japanese.set_content("こんにちは、世界。\n売上は前年比１２％増です。\n", cte="8bit")
    latin = mail(account, "Grüße aus Köln")
    latin.set_content("Grüße aus Köln, ½ Stück.\n", charset="iso-8859-1", cte="8bit")
    raw_japanese = japanese.as_bytes(policy=policy.SMTPUTF8)
    assert "Subject: 四半期の報告書".encode() in raw_japanese  # raw UTF-8, not RFC 2047
    raw_latin = latin.as_bytes(policy=policy.SMTP)
    assert b"Gr\xfc\xdfe aus K\xf6ln" in raw_latin  # a real 8-bit (not UTF-8) body on the wire

    def session() -> None:
        with smtplib.SMTP(HOST, live.smtp, timeout=30) as client:
            client.login(account, PASSWORD)
            client.sendmail(
                ADDRESS[account],
                ["alice@example.org"],
                raw_japanese,
                mail_options=["SMTPUTF8", "BODY=8BITMIME"],
            )
            client.sendmail(
                ADDRESS[account], ["alice@example.org"], raw_latin, mail_options=["BODY=8BITMIME"]
            )

    await asyncio.to_thread(session)
    got = parsed((await delivered(live, account, japanese["Message-ID"])).raw)
    assert got["Subject"] == "四半期の報告書（第３四半期）"
    body = got.get_content().replace("\r\n", "\n")  # 8bit parts keep the wire's CRLF
    assert body == "こんにちは、世界。\n売上は前年比１２％増です。\n"
    got = parsed((await delivered(live, account, latin["Message-ID"])).raw)
    assert got["Subject"] == "Grüße aus Köln"
    assert got.get_content().replace("\r\n", "\n") == "Grüße aus Köln, ½ Stück.\n"


@pytest.mark.parametrize("account", ["crm", "scanner"])
async def test_bcc_only_recipient_arrives_and_stays_private(live: Live, account: str) -> None:
    """send_message strips the Bcc header but puts the address in RCPT TO: the provider must
    deliver to it, and the headers the other recipients see must not name it."""
    message = mail(account, "board minutes", Cc="bob@example.org", Bcc="secret@example.net")
    assert await asyncio.to_thread(smtplib_send, live, "plain", account, message) == {}
    got = await delivered(live, account, message["Message-ID"])
    assert set(got.recipients) == {"alice@example.org", "bob@example.org", "secret@example.net"}
    visible = parsed(got.raw)
    shown = " ".join(str(visible.get(h, "")) for h in ("To", "Cc"))
    assert "alice@example.org" in shown and "bob@example.org" in shown
    assert "secret@example.net" not in shown


@pytest.mark.parametrize(("account", "target"), [("crm", "graph"), ("scanner", "gmail")])
async def test_10mb_attachment_goes_through_the_upload_apis(
    live: Live, account: str, target: str
) -> None:
    """Above Graph's 4 MB request cap a MIME sendMail is impossible: draft + upload session +
    send (several Graph requests); Gmail's JSON endpoint refuses it: resumable /upload/."""
    payload = os.urandom(BIG)
    message = mail(account, "the big scan")
    message.add_attachment(
        payload, maintype="application", subtype="octet-stream", filename="scan.bin"
    )
    before = live.sandbox.faults.requests.get(target, 0)
    assert await asyncio.to_thread(smtplib_send, live, "starttls", account, message) == {}
    got = await delivered(live, account, message["Message-ID"], within=30)
    (part,) = [p for p in parsed(got.raw).iter_attachments() if p.get_filename() == "scan.bin"]
    assert part.get_content() == payload
    # One request would mean a single sendMail / media upload; the upload APIs take several.
    assert live.sandbox.faults.requests[target] - before >= 3


# -- refusals ----------------------------------------------------------------------------------


async def test_forbidden_from_is_refused_at_mail_from_and_at_end_of_data(live: Live) -> None:
    """A sender the account may not use is refused with 550 5.7.1 before anything is queued:
    in the envelope at MAIL FROM, in the header at the end of DATA."""
    header_forged = mail("crm", "forged header")
    header_forged.replace_header("From", "ceo@contoso.example")

    def session() -> tuple[smtplib.SMTPResponseException, smtplib.SMTPResponseException]:
        with smtplib.SMTP(HOST, live.smtp, timeout=30) as client:
            client.login("crm", PASSWORD)
            with pytest.raises(smtplib.SMTPSenderRefused) as envelope:
                client.sendmail("ceo@contoso.example", ["alice@example.org"], b"Subject: x\r\n\r\n")
            client.rset()
            with pytest.raises(smtplib.SMTPDataError) as header:
                client.sendmail(MS_ADDRESS, ["alice@example.org"], header_forged.as_bytes())
            return envelope.value, header.value

    envelope, header = await asyncio.to_thread(session)
    assert envelope.smtp_code == 550 and envelope.smtp_error.startswith(b"5.7.1 Account crm")
    assert header.smtp_code == 550 and b"5.7.1 The From header <ceo@contoso.example>" in (
        header.smtp_error
    )
    # A message is in the spool before its 250 and leaves it only once sent: an empty spool
    # and nothing sent now means nothing was accepted, and nothing can go out later.
    assert live.gateway.spool.messages() == [] and live.sent("crm") == []


async def test_wrong_password_gets_535_and_mail_without_auth_gets_530(live: Live) -> None:
    """No relay for strangers: a bad password is 535, skipping AUTH is 530, nothing is sent."""

    def session() -> tuple[smtplib.SMTPResponseException, tuple[int, bytes]]:
        with smtplib.SMTP(HOST, live.smtp, timeout=30) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
                client.login("crm", "not the password")
            return wrong.value, client.mail(MS_ADDRESS)

    wrong, (code, text) = await asyncio.to_thread(session)
    assert wrong.smtp_code == 535 and wrong.smtp_error.startswith(b"5.7.8")
    assert code == 530 and text.startswith(b"5.7.0 Authentication required")
    assert live.gateway.spool.messages() == [] and live.sent("crm") == []


# -- faults: throttling, outage, resets ------------------------------------------------------


async def test_throttling_outage_and_resets_during_a_burst_deliver_each_exactly_once(
    live: Live,
) -> None:
    """30 messages while Graph and Gmail answer 429 (decimal Retry-After), 503 and drop
    connections: each accepted message is in the Sent list once, by Message-ID."""
    # Resets carry no Retry-After, so the spool's own first backoff applies (config
    # spool.first_backoff_seconds, at least 1 s); shortened below that here so the test stays
    # fast. Retry-After values are the providers'.
    live.gateway.spool.first_backoff = 0.2
    for target in ("graph", "gmail"):
        live.sandbox.faults.add(Fault(target, "429", remaining=4, retry_after="0.35"))
        live.sandbox.faults.add(Fault(target, "503", remaining=3, retry_after="0.2"))
        live.sandbox.faults.add(Fault(target, "reset", remaining=3))
    messages = [mail(("crm", "scanner")[n % 2], f"burst {n}") for n in range(30)]

    def burst() -> None:
        for account in ("crm", "scanner"):
            with smtplib.SMTP(HOST, live.smtp, timeout=30) as client:
                client.login(account, PASSWORD)
                for message in messages:
                    if message["From"] == ADDRESS[account]:
                        assert client.send_message(message) == {}

    started = time.monotonic()
    await asyncio.to_thread(burst)
    expected = {account: sorted(m["Message-ID"] for m in messages if m["From"] == ADDRESS[account])
                for account in ("crm", "scanner")}  # fmt: skip

    def all_sent() -> bool:
        return all(set(message_ids(live.sent(a))) >= set(ids) for a, ids in expected.items())

    await until(all_sent, 30, "every message of the burst sent")
    await until(lambda: live.gateway.spool.messages() == [], 5, "the spool is empty")
    assert time.monotonic() - started >= 0.35  # the decimal Retry-After was honoured
    assert live.sandbox.faults.pending == []  # every fault really happened
    for account, ids in expected.items():
        assert sorted(message_ids(live.sent(account))) == ids  # none twice, none foreign
    spool = live.gateway.spool  # the log line follows the removal of the files: wait for it
    await until(lambda: len(spool.files.recent_deliveries(100)) >= 30, 5, "30 log entries")
    results = Counter(r["result"] for r in await spool.recent_deliveries(limit=100))
    assert results == {"sent": 30}


# -- SIGKILL in the middle of a burst of 500 -------------------------------------------------


async def test_sigkill_in_a_burst_of_500_loses_and_duplicates_nothing(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Every message that got a 250 before the SIGKILL is delivered after the restart, and no
    message — accepted, or in flight when the process died — is delivered twice."""
    smtp_port = free_port()
    config = connected_config(sandbox, tmp_path)  # no consent to give
    config["listeners"] = {f"{name}_port": None for name in ("smtps", "imap", "imaps")}
    config["listeners"].update(pop3_port=None, pop3s_port=None, admin_port=None)
    config["listeners"]["smtp_port"] = smtp_port
    config["logging"] = {"level": "warning"}
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(config))
    gateway = GatewayProcess(config_file, tmp_path / "gateway.log", smtp_port)
    burst = Burst(500)
    workers = 4
    queue = tmp_path / "state" / "spool" / "queue"
    # Slow clouds (4 requests per mailbox at a time): a backlog builds up, so the kill leaves
    # queued messages and sends in flight — the cases a restart must get right.
    for target in ("graph", "gmail"):
        sandbox.faults.add(Fault(target, "slow", remaining=120, delay=0.15))
    try:
        await gateway.start()
        clients = asyncio.gather(
            *(asyncio.to_thread(burst.client, w, workers, smtp_port) for w in range(workers))
        )
        await until(lambda: len(burst.accepted) >= 200, 60, "200 messages accepted")
        gateway.kill()
        await asyncio.wait_for(clients, 30)
        assert await gateway.wait() == -signal.SIGKILL
        accepted, in_doubt = set(burst.accepted), set(burst.in_doubt)
        assert 200 <= len(accepted) < 500, "the kill must land in the middle of the burst"
        left = len(SpoolFiles(queue.parent).records())  # read as ``gateway queue`` reads it
        assert left >= 20, f"only {left} queued at the kill: the restart would prove little"

        await gateway.start()
        await until(lambda: not SpoolFiles(queue.parent).records(), 45, "the queue drains")
        listing = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "queue", "list", "-c", str(config_file),
            stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(listing.communicate(), 30)
        assert "the queue is empty" in out.decode(), out.decode()
    finally:
        gateway.kill()
        if gateway.process is not None:
            await gateway.wait()
    sent = Counter(
        message_ids(sent_of(sandbox, MS_ADDRESS)) + message_ids(sent_of(sandbox, GOOGLE_ADDRESS))
    )
    twice = sorted(m for m, count in sent.items() if count > 1)
    assert twice == [], f"delivered more than once: {twice}"
    missing = sorted(accepted - set(sent))
    assert missing == [], f"got 250 but never delivered: {missing}\n{gateway.output()}"
    assert set(sent) <= accepted | in_doubt  # nothing delivered that was never submitted
    found = [
        r
        for r in SpoolFiles(queue.parent).recent_deliveries(1000)
        if "found in sent" in r["detail"]
    ]
    print(
        f"crash: {len(accepted)} accepted, {len(in_doubt)} in doubt, {left} queued at the kill, "
        f"{len(sent)} sent, {len(found)} found in sent mail after the restart"
    )


# -- revoked consent: held, then delivered on reconnect ---------------------------------------


async def test_revoked_token_holds_mail_until_reconnected_on_the_admin_page(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Delegated consent, revoked in the cloud: the program still gets its 250, the mail waits
    ("held", not bounced), the admin is told, and reconnecting sends it."""
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    async with running_gateway(config, tmp_path / "c.yaml", sandbox) as gateway:
        live = Live(gateway, sandbox)
        browser = AdminBrowser(gateway, sandbox)
        try:
            await browser.sign_in()
            # Below MSAL's 5-minute margin, every silent call really refreshes at the cloud.
            sandbox.directory.access_lifetime["microsoft"] = 240
            start = await browser.post("/accounts/crm/connect")
            assert "is connected" in (await browser.consent(start.headers["location"])).text

            before = mail("crm", "before the revocation")
            assert await asyncio.to_thread(smtplib_send, live, "plain", "crm", before) == {}
            await delivered(live, "crm", before["Message-ID"])  # delegated delivery works

            sandbox.directory.revoke_user(MS_ADDRESS)
            gateway.broker.invalidate("crm")
            after = mail("crm", "after the revocation")
            assert await asyncio.to_thread(smtplib_send, live, "plain", "crm", after) == {}
            await until(lambda: [r.state for r in gateway.spool.messages()] == ["held"], 15, "held")
            (held,) = gateway.spool.messages()
            assert held.message_id == after["Message-ID"]
            assert "must be connected again" in held.reason
            assert "needs re-consent since" in (await browser.admin.get("/")).text

            def mail_from() -> tuple[int, bytes]:
                with smtplib.SMTP(HOST, live.smtp, timeout=30) as client:
                    client.login("crm", PASSWORD)
                    return client.mail(MS_ADDRESS)

            code, text = await asyncio.to_thread(mail_from)  # now that the gateway knows
            assert code == 250 and b"held until the mailbox is reconnected" in text
            assert "held (mailbox must be reconnected)" in (await browser.admin.get("/queue")).text
            assert message_ids(live.sent("crm")) == [before["Message-ID"]]

            again = await browser.post("/accounts/crm/connect")
            assert "is connected" in (await browser.consent(again.headers["location"])).text
            await delivered(live, "crm", after["Message-ID"])  # released by on_connected
            await until(lambda: gateway.spool.messages() == [], 5, "the spool is empty")
        finally:
            await browser.close()
    assert message_ids(live.sent("crm")) == [before["Message-ID"], after["Message-ID"]]
