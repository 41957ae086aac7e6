"""The POP3 server over a real INBOX view of the sandbox, with poplib (fetchmail and curl:
test_mail_clients.py).

What must hold: RETR serves exactly the provider's bytes; TOP, LIST, STAT agree with them; UIDLs
survive sessions, restarts and new mail; DELE hides a message for the session only and never
touches the provider; STLS and POP3S work; nothing a client sends drops the connection.
"""

from __future__ import annotations

import asyncio
import poplib
import socket
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from gateway import outbound, tls
from gateway.login_gate import WRONG, Refused
from gateway.mailbox import MailboxView
from gateway.pop3_out import server as pop3_server
from gateway.providers import GmailSource, GraphSource
from gateway.runtime import RunningListener
from gateway.store import SecretBox, Stores, open_sqlite
from mailgw_sandbox import Fault, Sandbox
from tests.helpers import SandboxTokens

HOST = "127.0.0.1"
KEY = bytes(range(32))
PASSWORD = "pop secret"
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


class Pop3World:
    """A sandbox mailbox, its view in a store that can be reopened, and both POP3 listeners."""

    def __init__(
        self, sandbox: Sandbox, client: httpx.AsyncClient, state: Path, provider: str
    ) -> None:
        self.sandbox = sandbox
        self.provider = provider
        address = "desk@contoso.example" if provider == "microsoft" else "desk@example.com"
        self.user = sandbox.add_user(provider, address)  # type: ignore[arg-type]
        self.ops = sandbox.ops(self.user)
        tokens = SandboxTokens(sandbox, self.user)
        if provider == "microsoft":
            self.source: GraphSource | GmailSource = GraphSource(
                client, tokens, f"{sandbox.url}/v1.0", "desk", address
            )
        else:
            self.source = GmailSource(client, tokens, sandbox.url, "desk")
        self.state = state
        self.store: Stores | None = None
        self.view: MailboxView | None = None
        self.unavailable: str | None = None
        self.seeded = 0
        pair = tls.ensure_certificate(state / "gw", "localhost")
        assert pair.ca is not None
        self.client_tls = ssl.create_default_context(cafile=pair.ca)
        self.server_tls = tls.server_tls(pair).twisted
        self.listeners: list[RunningListener] = []
        self.ports: dict[str, int] = {}

    async def restart(self) -> None:
        """Reopen the store and the view, as a restarted gateway would."""
        if self.store is not None:
            await self.store.close()
        self.store = await open_sqlite(self.state / "store", SecretBox(KEY))
        self.view = await MailboxView.open(self.store.mailboxes, "desk", self.source)

    async def login(self, username: str, password: str, client: str) -> str | Refused:
        return "desk" if (username, password) == ("desk", PASSWORD) else WRONG

    async def mailbox_for(self, account: str) -> MailboxView | str:
        assert self.view is not None and account == "desk"
        return self.unavailable or self.view

    async def start(self) -> None:
        await self.restart()
        for name, implicit in (("pop3", False), ("pop3s", True)):
            running = await pop3_server.serve(
                name, HOST, 0, self.server_tls, implicit, self.login, self.mailbox_for
            )
            self.listeners.append(running)
            self.ports[name] = running.port

    async def stop(self) -> None:
        for running in self.listeners:
            await running.close()
        if self.store is not None:
            await self.store.close()

    def seed(self, subject: str, body: str = "Hello.\r\n") -> bytes:
        raw = (
            f"From: Sender <s@example.org>\r\nTo: {self.user.address}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.org>\r\nX-Raw: caf\xe9 \u65e5\u672c\r\n\r\n{body}"
        ).encode()
        # Distinct arrival times: UIDs (so message numbers) follow arrival order.
        self.ops.seed_inbox(self.user, raw, received_at=T0 + timedelta(minutes=self.seeded))
        self.seeded += 1
        if self.view is not None:  # else a login inside the freshness window would not see it
            self.view.stale()
        return raw

    def plain(self) -> poplib.POP3:
        return poplib.POP3(HOST, self.ports["pop3"], timeout=10)

    def logged_in(self) -> poplib.POP3:
        client = self.plain()
        client.user("desk")
        client.pass_(PASSWORD)
        return client


@pytest.fixture(params=["microsoft", "google"])
async def world(
    sandbox: Sandbox, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Pop3World]:
    async with outbound.async_client(sandbox.ca_file) as client:
        made = Pop3World(sandbox, client, tmp_path, request.param)
        await made.start()
        try:
            yield made
        finally:
            await made.stop()


def joined(lines: list[bytes]) -> bytes:
    """What poplib returns, turned back into the message bytes (it strips CRLF and stuffing)."""
    return b"".join(line + b"\r\n" for line in lines)


async def test_retr_top_list_stat_are_the_provider_bytes(world: Pop3World) -> None:
    tricky = "Line one\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
    raws = [world.seed("a"), world.seed("b", tricky), world.seed("c", "x\r\n" * 5)]

    def session() -> tuple:
        client = world.logged_in()
        try:
            stat = client.stat()
            listing = client.list()
            retrs = [client.retr(n) for n in (1, 2, 3)]
            top0 = client.top(3, 0)[1]
            top2 = client.top(3, 2)[1]
            one = client.list(2)
            return stat, listing, retrs, top0, top2, one
        finally:
            client.quit()

    stat, listing, retrs, top0, top2, one = await asyncio.to_thread(session)
    sizes = [len(raw) for raw in raws]
    assert stat == (3, sum(sizes))
    assert listing[1] == [b"%d %d" % (n, s) for n, s in enumerate(sizes, 1)]
    assert one == b"+OK 2 %d" % sizes[1]
    for (response, lines, _), raw in zip(retrs, raws, strict=True):
        assert joined(lines) == raw  # byte-exact, dot-stuffing undone, nothing added
        assert response == b"+OK %d octets" % len(raw)
    head = raws[2].split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert joined(top0) == head
    assert joined(top2) == head + b"x\r\nx\r\n"


async def test_dele_applies_at_quit_locally_and_rset_undoes_it(world: Pop3World) -> None:
    raws = [world.seed(f"d{n}") for n in range(3)]

    def first() -> tuple:
        client = world.logged_in()
        try:
            uidls = client.uidl()[1]
            assert client.dele(2) == b"+OK Message 2 deleted"
            after = (client.stat()[0], client.list()[1], client.uidl()[1])
            errors = []
            for call in (lambda: client.retr(2), lambda: client.uidl(2), lambda: client.dele(2)):
                with pytest.raises(poplib.error_proto) as refused:
                    call()
                errors.append(str(refused.value))
            client.rset()
            restored = (client.stat()[0], client.uidl()[1])
            client.dele(1)
            return uidls, after, errors, restored
        finally:
            client.quit()  # with message 1 marked deleted

    uidls, (count, listing, after_uidls), errors, restored = await asyncio.to_thread(first)
    assert count == 2 and [line.split()[0] for line in listing] == [b"1", b"3"]
    assert after_uidls == [uidls[0], uidls[2]]  # numbers do not shift (RFC 1939)
    assert all("already deleted" in error for error in errors)
    assert restored == (3, uidls)

    def second() -> tuple:
        client = world.logged_in()
        try:
            return client.stat()[0], client.uidl()[1], joined(client.retr(1)[1])
        finally:
            client.quit()

    count, again, body = await asyncio.to_thread(second)
    # QUIT applied the DELE for the account (kept locally), the provider was not touched.
    assert count == 2 and body == raws[1]
    assert [u.split()[1] for u in again] == [u.split()[1] for u in uidls[1:]]
    assert len(world.ops.inbox_ids(world.user)) == 3


async def test_uidl_stable_across_sessions_restart_and_new_mail(world: Pop3World) -> None:
    for n in range(3):
        world.seed(f"u{n}")

    def uidls() -> dict[bytes, bytes]:
        client = world.logged_in()
        try:
            return dict(line.split(b" ", 1) for line in client.uidl()[1])  # type: ignore[misc]
        finally:
            client.quit()

    first = await asyncio.to_thread(uidls)
    assert len(set(first.values())) == 3
    assert all(len(uid) == 32 and uid.isalnum() for uid in first.values())
    assert await asyncio.to_thread(uidls) == first
    await world.restart()
    assert await asyncio.to_thread(uidls) == first
    world.seed("u3")
    later = await asyncio.to_thread(uidls)
    assert {k: later[k] for k in first} == first and later[b"4"] not in first.values()

    def single() -> bytes:
        client = world.logged_in()
        try:
            return client._shortcmd("UIDL 2")  # poplib has no "UIDL n"
        finally:
            client.quit()

    assert await asyncio.to_thread(single) == b"+OK 2 " + first[b"2"]  # #9104: number included


async def test_snapshot_per_session(world: Pop3World) -> None:
    world.seed("s0")

    def session() -> tuple:
        client = world.logged_in()
        try:
            before = client.stat()[0]
            world.seed("s1")  # arrives during the session: seen by the next one
            return before, client.stat()[0]
        finally:
            client.quit()

    assert await asyncio.to_thread(session) == (1, 1)
    assert (await asyncio.to_thread(lambda: world.logged_in().stat()))[0] == 2


async def test_capabilities_stls_and_pop3s(world: Pop3World) -> None:
    raw = world.seed("tls")

    def stls() -> tuple:
        client = world.plain()
        try:
            before = client.capa()
            client.stls(context=world.client_tls)
            after = client.capa()
            version = client.sock.version()
            client.user("desk")
            client.pass_(PASSWORD)
            return before, after, version, joined(client.retr(1)[1])
        finally:
            client.quit()

    def implicit() -> tuple:
        client = poplib.POP3_SSL(HOST, world.ports["pop3s"], context=world.client_tls, timeout=10)
        try:
            caps = client.capa()
            client.user("desk")
            client.pass_(PASSWORD)
            return caps, joined(client.retr(1)[1])
        finally:
            client.quit()

    before, after, version, body = await asyncio.to_thread(stls)
    assert set(before) == {
        "TOP",
        "USER",
        "UIDL",
        "PIPELINING",
        "RESP-CODES",
        "AUTH-RESP-CODE",
        "STLS",
    }
    assert set(after) == set(before) - {"STLS"}
    assert version in ("TLSv1.2", "TLSv1.3") and body == raw
    caps, body = await asyncio.to_thread(implicit)
    assert "STLS" not in caps and "USER" in caps and body == raw


async def test_refusals_are_replies_not_disconnects(world: Pop3World) -> None:
    world.seed("r")

    def session() -> list[str]:
        client = world.plain()
        replies = [client.user("desk").decode()]
        try:
            for command in ("PASS wrong", "STAT", "FOO bar", "X" * 100_000, "AUTH"):
                with pytest.raises(poplib.error_proto) as refused:
                    client._shortcmd(command)  # raw commands, on purpose
                replies.append(str(refused.value))
            client.user("desk")
            client.pass_(PASSWORD)
            for command in ("RETR 9", "RETR x", "TOP 1", "LIST 0", "PASS again"):
                with pytest.raises(poplib.error_proto) as refused:
                    client._shortcmd(command)
                replies.append(str(refused.value))
            replies.append(client.noop().decode())
            return replies
        finally:
            client.quit()

    replies = await asyncio.to_thread(session)
    assert "-ERR [AUTH] Wrong username or password" in replies[1]
    assert replies[0].startswith("+OK") and "Line too long" in replies[4]
    assert all(reply.startswith("b'-ERR") for reply in replies[1:-1])
    assert replies[-1] == "+OK"


async def test_pipelined_commands_answer_in_order_and_stls_drops_injection(
    world: Pop3World,
) -> None:
    raw = world.seed("p")

    def exchange(payload: bytes, replies: int) -> bytes:
        with socket.create_connection((HOST, world.ports["pop3"]), timeout=10) as sock:
            stream = sock.makefile("rb")
            stream.readline()  # greeting
            sock.sendall(payload)
            return b"".join(stream.readline() for _ in range(replies))

    pipelined = f"USER desk\r\nPASS {PASSWORD}\r\nSTAT\r\nUIDL 1\r\nQUIT\r\n".encode()
    lines = (await asyncio.to_thread(exchange, pipelined, 5)).split(b"\r\n")
    assert lines[0] == b"+OK Send PASS" and lines[1] == b"+OK 1 messages"
    assert lines[2] == b"+OK 1 %d" % len(raw) and lines[3].startswith(b"+OK 1 ")
    assert lines[4] == b"+OK Bye"

    def injected() -> bytes:
        with socket.create_connection((HOST, world.ports["pop3"]), timeout=10) as sock:
            stream = sock.makefile("rb")
            stream.readline()
            sock.sendall(b"STLS\r\nUSER evil\r\n")
            answer = stream.readline()
            wrapped = world.client_tls.wrap_socket(sock, server_hostname=HOST)
            wrapped.sendall(b"PASS x\r\n")  # USER evil was discarded: PASS has no USER
            return answer + wrapped.makefile("rb").readline()

    assert await asyncio.to_thread(injected) == (
        b"+OK Begin TLS negotiation\r\n-ERR USER required before PASS\r\n"
    )


async def test_provider_trouble_is_a_temporary_error(world: Pop3World) -> None:
    world.seed("t")
    world.unavailable = "The mailbox desk must be connected again on the admin page"

    def attempt() -> str:
        client = world.plain()
        try:
            client.user("desk")
            with pytest.raises(poplib.error_proto) as refused:
                client.pass_(PASSWORD)
            return str(refused.value)
        finally:
            client.quit()

    assert "-ERR [SYS/TEMP] The mailbox desk must be connected" in await asyncio.to_thread(attempt)
    world.unavailable = None
    target = "graph" if world.provider == "microsoft" else "gmail"
    world.sandbox.faults.add(Fault(target, "503", remaining=50))
    try:
        assert "-ERR [SYS/TEMP]" in await asyncio.to_thread(attempt)
    finally:
        world.sandbox.faults.pending.clear()
    assert (await asyncio.to_thread(lambda: world.logged_in().stat()))[0] == 1
