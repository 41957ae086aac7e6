"""The SMTP submission front against real clients: smtplib, swaks, curl and raw sockets.

Only the two SMTP listeners run, in-process, with a spool that records what it is given (the real
spool is tested on its own); everything between the socket and ``spool.submit`` is real.
"""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest
import yaml

from gateway import tls
from gateway.accounts import Accounts
from gateway.config import load_settings
from gateway.delivery import Envelope
from gateway.login_gate import MAILBOX, LoginGate
from gateway.runtime import RunningListener
from gateway.smtp_in import server as smtp_server
from gateway.smtp_in.policy import normalize_line_endings
from gateway.spool import SpoolError, SubmitResult
from gateway.spool._files import SpoolFiles
from gateway.spool._incoming import IncomingMessage
from tests.helpers import PASSWORD, PASSWORD_HASH, base_config

HOST = "127.0.0.1"
CRM = "crm@contoso.example"
SIMPLE = (f"From: {CRM}\r\nTo: ann@example.org\r\nSubject: hello\r\n\r\nJust a test.\r\n").encode()


class RecordingSpool:
    """Takes messages like the real spool's interface; ``failure`` makes it raise instead."""

    def __init__(self) -> None:
        self.submitted: list[tuple[Envelope, bytes]] = []
        self.failure: Exception | None = None
        self.files = SpoolFiles(Path(tempfile.mkdtemp(prefix="recording-spool-")))
        self.files.prepare()

    def receive(self, prologue: bytes = b"") -> IncomingMessage:
        return IncomingMessage(self.files.tmp, "gw.test", prologue)

    async def submit(self, envelope: Envelope, message: IncomingMessage) -> SubmitResult:  # type: ignore[override]
        message.finish()
        stored = message.content()[len(message.added) :]  # as the handler gave it
        message.discard()
        if self.failure is not None:
            raise self.failure
        self.submitted.append((envelope, stored))
        queue_id = f"q{len(self.submitted)}"
        return SubmitResult(f"250 2.0.0 Queued as {queue_id}", queue_id)


class FakeClock:
    """The login gate's clock; its tarpit sleeps are recorded, not waited."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


@dataclass
class Front:
    smtp: int
    smtps: int
    ca: Path
    spool: RecordingSpool
    clock: FakeClock
    held: dict[str, str] = field(default_factory=dict)
    listeners: list[RunningListener] = field(default_factory=list)

    def client_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)


StartFront = Callable[..., Awaitable[Front]]


@pytest.fixture
async def start_front(tmp_path: Path) -> AsyncIterator[StartFront]:
    """Start both SMTP listeners with config overrides (``smtp={...}``, ``allowed_from=[...]``,
    ``more_accounts=[...]``)."""
    async with AsyncExitStack() as stack:

        async def start(
            smtp: dict | None = None, allowed_from: tuple = (), more_accounts: tuple = ()
        ) -> Front:
            config = base_config(tmp_path / "state", smtp=smtp or {})
            config["accounts"][0]["sending"] = {"allowed_from": list(allowed_from)}
            config["accounts"].extend(more_accounts)
            path = tmp_path / "config.yaml"
            path.write_text(yaml.safe_dump(config))
            settings = load_settings(path)
            pair = tls.ensure_certificate(tmp_path / "state", "localhost")
            context = tls.server_context(pair)
            assert pair.ca is not None
            front = Front(0, 0, pair.ca, RecordingSpool(), FakeClock())

            async def account_state(username: str) -> str | None:
                return front.held.get(username)

            shared = smtp_server.SmtpFront(
                settings,
                Accounts(settings.accounts),
                front.spool,
                account_state=account_state,
                gate=LoginGate(clock=front.clock, sleep=front.clock.sleep),
            )
            for implicit in (False, True):
                listener = await smtp_server.serve(
                    "smtps" if implicit else "smtp", HOST, 0, "localhost", context, implicit, shared
                )
                stack.push_async_callback(listener.close)
                front.listeners.append(listener)
                if implicit:
                    front.smtps = listener.port
                else:
                    front.smtp = listener.port
            return front

        yield start


class Raw:
    """A byte-exact SMTP client, for what smtplib would never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Raw:
        client = cls(*await asyncio.open_connection(HOST, port))
        assert (await client.reply()).startswith("220 ")
        return client

    async def reply(self) -> str:
        """One whole reply (all lines of a multi-line one), as text."""
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 5)).decode()
            lines.append(line.rstrip("\r\n"))
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def data(self, content: bytes) -> str:
        """Send a message's bytes as they are (they must end with CRLF) and the final dot."""
        await self.send(content + b".\r\n")
        return await self.reply()

    async def login(self) -> None:
        assert (await self.command("EHLO raw.test")).startswith("250-")
        token = base64.b64encode(f"\0crm\0{PASSWORD}".encode()).decode()
        assert (await self.command(f"AUTH PLAIN {token}")).startswith("235 2.7.0")

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def _message(**headers: str) -> EmailMessage:
    message = EmailMessage()
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content("Just a test.\n")
    return message


def _code(error: smtplib.SMTPException) -> tuple[int, str]:
    code = getattr(error, "smtp_code", None)
    if code is None:  # SMTPRecipientsRefused keeps its replies per recipient
        code, text = next(iter(error.recipients.values()))  # type: ignore[attr-defined]
        return code, text.decode()
    return code, error.smtp_error.decode()  # type: ignore[attr-defined]


# -- real clients: smtplib -----------------------------------------------------------------


async def test_smtplib_plain_auth_from_loopback_keeps_bcc_private(start_front: StartFront) -> None:
    front = await start_front()

    def session() -> tuple:
        with smtplib.SMTP(HOST, front.smtp, timeout=10) as client:
            client.ehlo("app.test")
            features = dict(client.esmtp_features)
            client.login("CRM", PASSWORD)  # usernames are case-insensitive
            message = _message(From=CRM, To="ann@example.org", Bcc="hidden@example.net")
            message["Subject"] = "quarterly report"
            return features, client.send_message(message)

    features, refused = await asyncio.to_thread(session)
    assert refused == {}
    assert features["size"] == str(35 * 2**20)
    for keyword in ("8bitmime", "smtputf8", "enhancedstatuscodes", "pipelining", "starttls"):
        assert keyword in features
    assert features["auth"].split() == ["LOGIN", "PLAIN"]
    [(envelope, data)] = front.spool.submitted
    assert envelope.account == "crm" and envelope.mail_from == CRM
    assert envelope.rcpt_tos == ("ann@example.org", "hidden@example.net")
    assert envelope.client == HOST and not envelope.smtputf8
    assert data.startswith(b"Received: from app.test ([127.0.0.1])\r\n\tby localhost with ESMTPA;")
    assert b"hidden@example.net" not in data and b"Subject: quarterly report\r\n" in data


async def test_starttls_then_auth_login(start_front: StartFront) -> None:
    front = await start_front()

    def session() -> tuple:
        with smtplib.SMTP(HOST, front.smtp, timeout=10) as client:
            client.starttls(context=front.client_tls())
            client.ehlo()
            client.user, client.password = "crm", PASSWORD
            auth = client.auth("LOGIN", client.auth_login)
            client.sendmail(CRM, ["ann@example.org"], SIMPLE)
            return auth, client.sock.version()

    (code, text), version = await asyncio.to_thread(session)
    assert (code, text) == (235, b"2.7.0 Authentication successful")
    assert version in ("TLSv1.2", "TLSv1.3")
    [(envelope, data)] = front.spool.submitted
    assert envelope.rcpt_tos == ("ann@example.org",)
    assert b"with ESMTPSA;" in data and data.endswith(SIMPLE)


async def test_smtps_implicit_tls_allows_auth_even_when_plaintext_auth_is_never(
    start_front: StartFront,
) -> None:
    front = await start_front(smtp={"plaintext_auth": "never"})

    def session() -> None:
        context = front.client_tls()
        with smtplib.SMTP_SSL(HOST, front.smtps, context=context, timeout=10) as client:
            client.login("crm", PASSWORD)
            client.sendmail(CRM, ["ann@example.org"], SIMPLE)

    await asyncio.to_thread(session)
    assert len(front.spool.submitted) == 1


async def test_plaintext_auth_never_hides_auth_until_starttls(start_front: StartFront) -> None:
    front = await start_front(smtp={"plaintext_auth": "never"})
    raw = await Raw.connect(front.smtp)
    try:
        assert "AUTH" not in await raw.command("EHLO raw.test")
        assert (await raw.command("AUTH PLAIN")).startswith("538 5.7.11 Encryption required")
        assert await raw.command("STARTTLS") == "220 2.0.0 Ready to start TLS"
        await raw.writer.start_tls(front.client_tls(), server_hostname="localhost")
        assert "250-AUTH LOGIN PLAIN" in await raw.command("EHLO raw.test")
    finally:
        await raw.close()


async def test_utf8_subject_body_and_smtputf8_address_arrive_byte_exact(
    start_front: StartFront,
) -> None:
    front = await start_front()
    message = (
        f"From: {CRM}\r\nTo: 用户@例子.广告\r\nSubject: 四半期の報告書\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nこんにちは、世界。\r\n"
    ).encode()

    def session() -> None:
        with smtplib.SMTP(HOST, front.smtp, timeout=10) as client:
            client.login("crm", PASSWORD)
            client.sendmail(
                CRM, ["用户@例子.广告"], message, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
            )

    await asyncio.to_thread(session)
    [(envelope, data)] = front.spool.submitted
    assert envelope.smtputf8 and envelope.rcpt_tos == ("用户@例子.广告",)
    assert data.endswith(message) and b"with UTF8SMTPA;" in data


async def test_8bit_body_is_kept_and_utf8_address_needs_smtputf8(start_front: StartFront) -> None:
    front = await start_front()
    latin1 = f"From: {CRM}\r\nTo: ann@example.org\r\n\r\nGr\xfc\xdfe aus K\xf6ln\r\n".encode(
        "latin-1"
    )
    raw = await Raw.connect(front.smtp)
    try:
        await raw.login()
        assert await raw.command(f"MAIL FROM:<{CRM}> BODY=8BITMIME") == "250 2.1.0 Sender OK"
        assert (await raw.command("RCPT TO:<jörg@exämple.org>")).startswith("553 5.6.7")
        assert await raw.command("RCPT TO:<ann@example.org>") == "250 2.1.5 Recipient OK"
        assert (await raw.command("DATA")).startswith("354")
        assert await raw.data(latin1) == "250 2.0.0 Queued as q1"
    finally:
        await raw.close()
    assert front.spool.submitted[0][1].endswith(latin1)


# -- real clients: swaks and curl ----------------------------------------------------------


def _run(command: list[str], data: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, input=data, capture_output=True, timeout=30, check=False)


@pytest.mark.parametrize("mode", ["--tls", "--tlsc"])
async def test_swaks_starttls_and_implicit_tls_with_auth(
    start_front: StartFront, mode: str
) -> None:
    front = await start_front()
    port = front.smtp if mode == "--tls" else front.smtps
    command = ["swaks", "--server", f"{HOST}:{port}", mode, "--tls-verify", "--from", CRM]
    command += ["--tls-ca-path", str(front.ca), "--tls-sni", "localhost"]
    command += ["--to", "ann@example.org", "--auth", "PLAIN", "--auth-user", "crm"]
    command += ["--auth-password", PASSWORD, "--header", "Subject: via swaks"]
    result = await asyncio.to_thread(_run, command)
    assert result.returncode == 0, result.stdout.decode()
    assert b"<~  250 2.0.0 Queued as q1" in result.stdout
    [(envelope, data)] = front.spool.submitted
    assert envelope.rcpt_tos == ("ann@example.org",) and b"Subject: via swaks" in data


async def test_swaks_wrong_password_gets_535(start_front: StartFront) -> None:
    front = await start_front()
    command = ["swaks", "--server", f"{HOST}:{front.smtp}", "--tls", "--from", CRM]
    command += ["--to", "ann@example.org", "--auth", "LOGIN", "--auth-user", "crm"]
    command += ["--auth-password", "not the password"]
    result = await asyncio.to_thread(_run, command)
    assert result.returncode != 0
    assert b"535 5.7.8 Authentication credentials invalid" in result.stdout
    assert front.spool.submitted == []


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
async def test_curl_requires_tls_and_delivers(
    start_front: StartFront, scheme: str, tmp_path: Path
) -> None:
    front = await start_front()
    port = front.smtp if scheme == "smtp" else front.smtps
    message = tmp_path / "message.eml"
    message.write_bytes(SIMPLE)
    command = ["curl", "--silent", "--show-error", "--url", f"{scheme}://localhost:{port}"]
    command += ["--ssl-reqd", "--cacert", str(front.ca), "--user", f"crm:{PASSWORD}"]
    command += ["--mail-from", CRM, "--mail-rcpt", "ann@example.org"]
    command += ["--upload-file", str(message)]
    result = await asyncio.to_thread(_run, command)
    assert result.returncode == 0, result.stderr.decode()
    [(envelope, data)] = front.spool.submitted
    assert envelope.mail_from == CRM and data.endswith(SIMPLE) and b"ESMTPSA" in data


# -- authentication and sender policy ------------------------------------------------------


async def test_wrong_password_and_unknown_user_get_535_then_mail_gets_530(
    start_front: StartFront,
) -> None:
    front = await start_front()
    raw = await Raw.connect(front.smtp)
    try:
        assert (await raw.command("MAIL FROM:<crm@contoso.example>")).startswith("530 5.7.0")
        await raw.command("EHLO raw.test")
        for user, password in (("crm", "wrong"), ("nobody", PASSWORD)):
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            reply = await raw.command(f"AUTH PLAIN {token}")
            assert reply == "535 5.7.8 Authentication credentials invalid"
        assert await raw.command("AUTH LOGIN") == "334 VXNlcm5hbWU6"  # "Username:"
        assert await raw.command(base64.b64encode(b"crm").decode()) == "334 UGFzc3dvcmQ6"
        reply = await raw.command(base64.b64encode(b"wrong too").decode())
        assert reply == "535 5.7.8 Authentication credentials invalid"
        assert (await raw.command(f"MAIL FROM:<{CRM}>")).startswith("530 5.7.0")
    finally:
        await raw.close()


async def test_failed_logins_are_throttled_per_client_then_released(
    start_front: StartFront,
) -> None:
    front = await start_front()  # the fixture's gate: 10 failures per pair per 300 s

    async def login(password: str) -> str:
        raw = await Raw.connect(front.smtp)
        try:
            await raw.command("EHLO raw.test")
            token = base64.b64encode(f"\0crm\0{password}".encode()).decode()
            return await raw.command(f"AUTH PLAIN {token}")
        finally:
            await raw.close()

    for _ in range(MAILBOX.pair_limit):
        assert (await login("wrong")).startswith("535 5.7.8")
    reply = await login(PASSWORD)  # right, but too late from this address
    assert reply == (
        "454 4.7.0 Too many failed logins for this username from your address; "
        "try again in 5 minute(s)"
    )
    front.clock.now += 301
    assert (await login(PASSWORD)).startswith("235 2.7.0")


async def test_forbidden_and_null_mail_from_are_refused_allowed_alias_accepted(
    start_front: StartFront,
) -> None:
    front = await start_front(allowed_from=("Sales@Contoso.example",))
    raw = await Raw.connect(front.smtp)
    try:
        await raw.login()
        assert await raw.command("MAIL FROM:<ceo@contoso.example>") == (
            "550 5.7.1 Account crm may not send as <ceo@contoso.example>; "
            "allowed: crm@contoso.example, Sales@Contoso.example"
        )
        assert (await raw.command("MAIL FROM:<>")).startswith("550 5.7.1 The null sender <>")
        assert await raw.command("MAIL FROM:<sales@contoso.example>") == "250 2.1.0 Sender OK"
    finally:
        await raw.close()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("From: ceo@contoso.example\r\n", "550 5.7.1 The From header <ceo@contoso.example>"),
        (f"From: {CRM}\r\nSender: ceo@contoso.example\r\n", "550 5.7.1 The Sender header"),
        (f"From: {CRM}\r\nFrom: ceo@contoso.example\r\n", "550 5.7.1 The From header <ceo@"),
        ("From: undisclosed\r\n", "550 5.7.1 The From header cannot be read"),
        (f"From: {CRM}\r\nResent-From: ceo@contoso.example\r\n", "550 5.7.1 The Resent-From"),
        (
            f"From: {CRM}\r\nResent-Sender: =?utf-8?q?crm?= <ceo@contoso.example>\r\n",
            "550 5.7.1 The Resent-Sender header <ceo@contoso.example>",
        ),
    ],
)
async def test_forbidden_header_sender_is_refused_at_end_of_data(
    start_front: StartFront, headers: str, expected: str
) -> None:
    front = await start_front()

    def session() -> tuple[int, str]:
        with smtplib.SMTP(HOST, front.smtp, timeout=10) as client:
            client.login("crm", PASSWORD)
            try:
                client.sendmail(CRM, ["ann@example.org"], f"{headers}\r\nbody\r\n".encode())
            except smtplib.SMTPDataError as error:
                return _code(error)
            return 250, ""

    code, text = await asyncio.to_thread(session)
    assert f"{code} {text}".startswith(expected)
    assert front.spool.submitted == []


READ_ONLY = {
    "username": "legacy",
    "password_hash": PASSWORD_HASH,
    "provider": "upstream",
    "address": "legacy@upstream.example",
    "upstream": {"imap": {"host": "imap.upstream.example", "username": "l", "password": "pw"}},
}


async def test_an_account_that_can_only_read_logs_in_but_is_refused_at_mail_from(
    start_front: StartFront,
) -> None:
    """No upstream.smtp: a 5xx naming the missing setting before any data, never a 250 and a
    dead letter later; the login itself works (its IMAP/POP3 programs need it)."""
    front = await start_front(more_accounts=(READ_ONLY,))

    def session() -> tuple[tuple[int, bytes], tuple[int, str]]:
        with smtplib.SMTP(HOST, front.smtp, timeout=10) as client:
            login = client.login("legacy", PASSWORD)
            try:
                client.sendmail("legacy@upstream.example", ["ann@example.org"], SIMPLE)
            except smtplib.SMTPSenderRefused as error:
                return login, _code(error)
            return login, (250, "")

    (login_code, _), refusal = await asyncio.to_thread(session)
    assert login_code == 235
    assert refusal == (
        550,
        "5.7.1 Account legacy can only read mail: it has no upstream.smtp server in the "
        "gateway's configuration, so there is nowhere to send its mail",
    )
    assert front.spool.submitted == []


async def test_account_needing_reconsent_still_gets_250_and_mail_is_held(
    start_front: StartFront,
) -> None:
    front = await start_front()
    front.held["crm"] = "the owner must sign in again on the admin page"
    raw = await Raw.connect(front.smtp)
    try:
        await raw.login()
        assert await raw.command(f"MAIL FROM:<{CRM}>") == (
            "250 2.1.0 Sender OK; mail is held until the mailbox is reconnected: "
            "the owner must sign in again on the admin page"
        )
        await raw.command("RCPT TO:<ann@example.org>")
        await raw.command("DATA")
        assert (await raw.data(SIMPLE)).startswith("250 2.0.0")
    finally:
        await raw.close()
    assert len(front.spool.submitted) == 1


# -- hostile input -------------------------------------------------------------------------


@pytest.mark.parametrize("sequence", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"])
async def test_smuggled_end_of_data_never_ends_data(
    start_front: StartFront, sequence: bytes
) -> None:
    front = await start_front()
    smuggled = b"MAIL FROM:<crm@contoso.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    raw = await Raw.connect(front.smtp)
    try:
        await raw.login()
        await raw.command(f"MAIL FROM:<{CRM}>")
        await raw.command("RCPT TO:<ann@example.org>")
        assert (await raw.command("DATA")).startswith("354")
        await raw.send(SIMPLE + b"text" + sequence + smuggled + b"forged\r\n.\r\n")
        assert (await raw.reply()).startswith("250 2.0.0")  # one message, ended by CRLF.CRLF
        assert await raw.command("NOOP") == "250 2.0.0 OK"  # no reply to a smuggled command
    finally:
        await raw.close()
    ((envelope, message),) = front.spool.submitted
    assert envelope.rcpt_tos == ("ann@example.org",)  # the smuggled RCPT is just text
    body = message.split(b"\r\n\r\n", 1)[1]
    # The payload stayed inside the one message, normalized to CRLF (an upstream sender
    # dot-stuffs it, so no MTA further on can read it as two messages either).
    assert b"MAIL FROM:<crm@contoso.example>\r\nRCPT TO:<victim@example.org>\r\n" in body
    assert b"forged" in body and normalize_line_endings(body) == body


async def test_commands_pipelined_behind_starttls_are_discarded(start_front: StartFront) -> None:
    front = await start_front()
    raw = await Raw.connect(front.smtp)
    try:
        await raw.command("EHLO raw.test")
        await raw.send(b"STARTTLS\r\nNOOP\r\n")
        assert await raw.reply() == "220 2.0.0 Ready to start TLS"
        await raw.writer.start_tls(front.client_tls(), server_hostname="localhost")
        assert (await raw.command("EHLO after.tls")).startswith("250-localhost")
        assert await raw.command("QUIT") == "221 2.0.0 Bye"
    finally:
        await raw.close()


async def test_pipelined_transaction_is_answered_in_order(start_front: StartFront) -> None:
    front = await start_front()
    raw = await Raw.connect(front.smtp)
    try:
        await raw.login()
        await raw.send(
            f"MAIL FROM:<{CRM}>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
            "DATA\r\n".encode()
        )
        answers = [await raw.reply() for _ in range(4)]
        assert answers[:3] == ["250 2.1.0 Sender OK", *["250 2.1.5 Recipient OK"] * 2]
        assert answers[3].startswith("354")
        assert await raw.data(SIMPLE) == "250 2.0.0 Queued as q1"
    finally:
        await raw.close()
    assert front.spool.submitted[0][0].rcpt_tos == ("a@example.org", "b@example.org")


async def test_vrfy_and_expn_reveal_nothing(start_front: StartFront) -> None:
    front = await start_front()
    raw = await Raw.connect(front.smtp)
    try:
        await raw.command("EHLO raw.test")
        known, unknown = await raw.command(f"VRFY {CRM}"), await raw.command("VRFY no@where")
        assert known == unknown and known.startswith("252 2.5.0")
        assert await raw.command("EXPN staff") == "502 5.5.1 EXPN is not available"
    finally:
        await raw.close()


async def test_every_reply_carries_an_enhanced_status_code(start_front: StartFront) -> None:
    front = await start_front()
    raw = await Raw.connect(front.smtp)
    try:
        await raw.login()
        assert (await raw.command("RCPT TO:<a@example.org>")).startswith("503 5.5.1")
        assert (await raw.command("DATA")).startswith("503 5.5.1")
        assert await raw.command("FROB") == "500 5.5.1 Command not recognized"
        assert (await raw.command("MAIL FROM:<a@b@c>")).startswith("553 5.1.3")
        assert await raw.command("RSET") == "250 2.0.0 OK"
    finally:
        await raw.close()


# -- limits and failures -------------------------------------------------------------------


async def test_recipient_size_and_line_limits(start_front: StartFront) -> None:
    front = await start_front(smtp={"max_recipients": 2, "max_message_mb": 1})
    raw = await Raw.connect(front.smtp)
    try:
        await raw.login()
        reply = await raw.command(f"MAIL FROM:<{CRM}> SIZE={2 * 2**20}")
        assert reply == "552 5.3.4 Message too big: the limit is 1 MB"
        await raw.command(f"MAIL FROM:<{CRM}>")
        for name in ("a", "b"):
            await raw.command(f"RCPT TO:<{name}@example.org>")
        reply = await raw.command("RCPT TO:<c@example.org>")
        assert reply.startswith("452 4.5.3 Too many recipients: at most 2 per message")
        await raw.command("DATA")
        big_line = SIMPLE + b"x" * 1200 + b"\r\n"
        assert (await raw.data(big_line)).startswith("500 5.5.2 Line too long")
        await raw.command(f"MAIL FROM:<{CRM}>")
        await raw.command("RCPT TO:<a@example.org>")
        await raw.command("DATA")
        too_big = SIMPLE + (b"y" * 998 + b"\r\n") * 1100
        assert await raw.data(too_big) == ("552 5.3.4 Message too big: the limit is 1 MB")
        assert await raw.command("NOOP " + "z" * 600) == "500 5.5.2 Command line too long"
    finally:
        await raw.close()
    assert front.spool.submitted == []


async def test_session_limit_answers_421_and_frees_the_slot(start_front: StartFront) -> None:
    """max_connections counts logged-in sessions: idle unauthenticated sockets do not."""
    front = await start_front(smtp={"max_connections": 2})
    idle = [await Raw.connect(front.smtp) for _ in range(3)]
    first, second = await Raw.connect(front.smtp), await Raw.connect(front.smtp)
    await first.login()
    await second.login()
    for raw in idle:
        await raw.close()
    reader, writer = await asyncio.open_connection(HOST, front.smtp)
    assert await reader.read() == b"421 4.7.0 Too many connections, try later\r\n"  # then EOF
    writer.close()
    await first.close()
    await second.command("NOOP")  # the server has seen the first close by now
    third = await Raw.connect(front.smtp)
    await second.close()
    await third.close()


async def test_closing_the_listener_closes_open_connections(start_front: StartFront) -> None:
    front = await start_front()
    raw = await Raw.connect(front.smtp)
    await raw.login()
    await front.listeners[0].close()
    assert await asyncio.wait_for(raw.reader.read(), 5) == b""
    await raw.close()


async def test_spool_errors_and_crashes_become_451_without_details(
    start_front: StartFront,
) -> None:
    front = await start_front()
    raw = await Raw.connect(front.smtp)

    async def transaction() -> str:
        await raw.command(f"MAIL FROM:<{CRM}>")
        await raw.command("RCPT TO:<ann@example.org>")
        await raw.command("DATA")
        return await raw.data(SIMPLE)

    try:
        await raw.login()
        front.spool.failure = SpoolError("/var/spool: No space left on device")
        assert await transaction() == (
            "451 4.3.0 The gateway cannot queue the message right now, please retry later"
        )
        front.spool.failure = RuntimeError("secret internals")
        assert await transaction() == "451 4.3.0 Internal error, please retry"
        front.spool.failure = None
        assert await transaction() == "250 2.0.0 Queued as q1"
    finally:
        await raw.close()
