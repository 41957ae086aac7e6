"""The upstream SMTP session pool against a scripted SMTP server on a real socket.

The server is scripted (not Postfix) so that a session can be dropped at an exact point of the
dialogue: between messages, before the final dot, after it. Postfix itself is exercised in
tests/integration/test_delivery_upstream.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.config import AccountSettings, UpstreamSettings, UpstreamSmtpServer
from gateway.delivery import Envelope, Permanent, Temporary
from gateway.outbound import system_ca_file
from gateway.providers import UpstreamSender
from tests.helpers import PASSWORD_HASH

# (connection from 1, message on that connection from 1, where: "mail", "body", "after_dot",
# "after_reply")
Drop = tuple[int, int, str]


@dataclass
class ScriptedSmtp:
    """A minimal SMTP server: records messages, drops connections where told to."""

    pipelining: bool = True
    batch_replies: bool = False  # hold replies until DATA, as RFC 2920 allows
    refuse_mail: bool = False
    drops: set[Drop] = field(default_factory=set)
    messages: list[bytes] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)  # per connection
    connections: int = 0
    open_now: int = 0
    peak_open: int = 0
    port: int = 0

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.open_now += 1
        self.peak_open = max(self.peak_open, self.open_now)
        seen: list[str] = []
        self.commands.append(seen)
        held: list[bytes] = []
        sent = 0  # messages begun on this connection

        def reply(line: bytes, now: bool = False) -> None:
            if self.batch_replies and not now:
                held.append(line)
                return
            writer.write(b"".join(held) + line)
            held.clear()

        try:
            writer.write(b"220 scripted ESMTP\r\n")
            while line := await reader.readline():
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper().decode()
                seen.append(verb)
                if verb == "EHLO":
                    extra = b"250-PIPELINING\r\n" if self.pipelining else b""
                    writer.write(
                        b"250-scripted\r\n" + extra + b"250-SIZE 1000000\r\n250 8BITMIME\r\n"
                    )
                elif verb == "MAIL":
                    sent += 1
                    if (number, sent, "mail") in self.drops:
                        return
                    reply(b"550 5.7.1 sender refused\r\n" if self.refuse_mail else b"250 ok\r\n")
                elif verb in ("RCPT", "RSET"):
                    reply(
                        b"503 5.5.1 no MAIL\r\n"
                        if self.refuse_mail and verb == "RCPT"
                        else b"250 ok\r\n"
                    )
                elif verb == "DATA":
                    if self.refuse_mail:
                        reply(b"554 5.5.1 no valid recipients\r\n", now=True)
                        continue
                    reply(b"354 go on\r\n", now=True)
                    body = b""
                    while (chunk := await reader.readline()) != b".\r\n":
                        if not chunk or (number, sent, "body") in self.drops:
                            return
                        body += chunk
                    if (number, sent, "after_dot") in self.drops:
                        self.messages.append(body)
                        return
                    self.messages.append(body)
                    writer.write(b"250 2.0.0 queued\r\n")
                    if (number, sent, "after_reply") in self.drops:
                        await writer.drain()
                        return
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"502 5.5.2 unknown\r\n")
                await writer.drain()
        finally:
            self.open_now -= 1
            writer.close()


@pytest.fixture
async def smtp() -> AsyncIterator[ScriptedSmtp]:
    scripted = ScriptedSmtp()
    server = await scripted.start()
    yield scripted
    server.close()


def test_the_spool_sends_as_many_messages_at_once_as_the_pool_has_sessions() -> None:
    sender = UpstreamSender(system_ca_file())
    assert sender.concurrency(_account(25, max_sessions=12)) == 12


def _account(port: int, max_sessions: int = 4) -> AccountSettings:
    server = UpstreamSmtpServer(
        host="127.0.0.1", port=port, security="none", max_sessions=max_sessions
    )
    return AccountSettings(
        username="legacy",
        password_hash=PASSWORD_HASH,
        provider="upstream",
        address="legacy@example.org",
        upstream=UpstreamSettings(smtp=server),
    )


def _envelope() -> Envelope:
    return Envelope(
        "legacy", "legacy@example.org", ("ann@example.org",), False, datetime.now(UTC), "::1"
    )


def _message(index: int) -> bytes:
    return f"Subject: {index}\r\n\r\n.leading dot\r\nbody {index}\r\n".encode()


@pytest.fixture
async def sender() -> AsyncIterator[UpstreamSender]:
    sender = UpstreamSender(system_ca_file(), timeout=5.0)
    yield sender
    await sender.close()


async def _until(condition, within: float = 5.0) -> None:
    for _ in range(int(within / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met")


async def test_messages_share_one_pipelined_session(smtp, sender) -> None:
    smtp.batch_replies = True  # a client that waited for each reply would time out
    account = _account(smtp.port)
    for index in range(5):
        result = await sender.send(account, _envelope(), _message(index))
        assert result.detail == "upstream 127.0.0.1 accepted 1 recipient(s)"
    assert smtp.connections == 1
    assert (
        smtp.commands[0]
        == ["EHLO"] + ["MAIL", "RCPT", "DATA"] + ["RSET", "MAIL", "RCPT", "DATA"] * 4
    )
    # Dot-stuffed on the wire, so the server's view of the body is the stuffed form.
    assert smtp.messages == [
        b"Subject: %d\r\n\r\n..leading dot\r\nbody %d\r\n" % (i, i) for i in range(5)
    ]


async def test_without_pipelining_a_refused_sender_stops_the_transaction(smtp, sender) -> None:
    smtp.pipelining, smtp.refuse_mail = False, True
    with pytest.raises(Permanent) as refused:
        await sender.send(_account(smtp.port), _envelope(), _message(0))
    assert refused.value.smtp_code == 550 and refused.value.status == "5.7.1"
    assert str(refused.value) == "upstream 127.0.0.1 answered 550 5.7.1 sender refused"
    assert smtp.commands[0] == ["EHLO", "MAIL"]  # no RCPT or DATA after the refusal
    # The session survives a refusal: the next message uses it, after RSET.
    smtp.refuse_mail = False
    await sender.send(_account(smtp.port), _envelope(), _message(1))
    assert smtp.connections == 1 and smtp.commands[0][2:] == ["RSET", "MAIL", "RCPT", "DATA"]


@pytest.mark.parametrize("drop", [(1, 1, "after_reply"), (1, 2, "mail")])
async def test_a_used_session_dropped_is_replaced_and_nothing_is_lost(smtp, sender, drop) -> None:
    """Dropped between messages, or at the next message's MAIL: that message was known not to
    be taken, so it goes once more on a new session, exactly once."""
    smtp.drops = {drop}
    account = _account(smtp.port)
    await sender.send(account, _envelope(), _message(0))
    await sender.send(account, _envelope(), _message(1))
    assert [m.rsplit(b" ", 1)[-1] for m in smtp.messages] == [b"0\r\n", b"1\r\n"]
    assert smtp.connections == 2


@pytest.mark.parametrize("where", ["body", "after_dot"])
async def test_a_drop_once_the_body_went_out_leaves_the_outcome_unknown(smtp, sender, where):
    """Once the whole body (dot included) is written, the client cannot tell a drop during
    the body from one after the dot: the spool must treat it as possibly sent."""
    smtp.drops = {(1, 2, where)}
    account = _account(smtp.port)
    await sender.send(account, _envelope(), _message(0))
    with pytest.raises(Temporary) as error:
        await sender.send(account, _envelope(), _message(1))
    assert error.value.outcome_unknown
    assert "no reply after the message was sent" in str(error.value)
    assert smtp.connections == 1  # not re-sent by the pool


async def test_a_new_session_dropped_before_the_message_is_a_known_failure(smtp, sender) -> None:
    smtp.drops = {(1, 1, "mail")}
    with pytest.raises(Temporary) as error:
        await sender.send(_account(smtp.port), _envelope(), _message(0))
    assert not error.value.outcome_unknown
    assert smtp.messages == [] and smtp.connections == 1


async def test_sessions_are_bounded_and_reused_under_concurrency(smtp, sender) -> None:
    account = _account(smtp.port, max_sessions=2)
    await asyncio.gather(*(sender.send(account, _envelope(), _message(i)) for i in range(20)))
    assert len(smtp.messages) == 20
    assert smtp.peak_open <= 2 and smtp.connections <= 2


async def test_idle_sessions_are_closed_with_quit(smtp, tmp_path: Path) -> None:
    now = [1000.0]
    sender = UpstreamSender(system_ca_file(), timeout=5.0)
    account = _account(smtp.port)
    pool = await sender.pool(account.username, account.upstream.smtp)
    pool.clock = lambda: now[0]
    await sender.send(account, _envelope(), _message(0))
    assert pool.close_idle() == 0 and pool.open_sessions == 1
    now[0] += account.upstream.smtp.idle_seconds
    assert pool.close_idle() == 1 and pool.open_sessions == 0
    await _until(lambda: smtp.open_now == 0)
    assert smtp.commands[0][-1] == "QUIT"
    await sender.send(account, _envelope(), _message(1))  # a new session when needed again
    assert smtp.connections == 2
    await sender.close()
    await _until(lambda: smtp.open_now == 0)
    assert smtp.commands[1][-1] == "QUIT"


def test_pool_settings_belong_to_upstream_smtp_only(tmp_path: Path) -> None:
    import yaml

    from gateway.config import ConfigError, load_settings

    def load(smtp: dict, imap: dict) -> object:
        account = {
            "username": "legacy",
            "password_hash": PASSWORD_HASH,
            "provider": "upstream",
            "address": "legacy@example.org",
            "upstream": {"smtp": {"host": "smtp.example.org", **smtp}, "imap": imap},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"state_dir": str(tmp_path), "accounts": [account]}))
        return load_settings(path)

    smtp = load({"max_sessions": 2, "idle_seconds": 30}, {"host": "imap.example.org"})
    assert smtp.accounts[0].upstream.smtp.max_sessions == 2  # type: ignore[attr-defined]
    assert load({}, {"host": "i.example.org"}).accounts[0].upstream.smtp.idle_seconds == 60  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as wrong:
        load({"max_sessions": 17}, {"host": "imap.example.org", "max_sessions": 2})
    text = str(wrong.value)
    assert "upstream.smtp.max_sessions: 17 is outside 1-16" in text
    assert "upstream.imap.max_sessions: unknown key" in text
