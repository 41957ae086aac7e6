"""The IMAP compatibility layer over real sockets, and differentially against a real Dovecot.

The same corpus is delivered to Dovecot and served by ``CompatIMAP4Server`` from a small
in-memory read-only mailbox (a test double built from the raw bytes); the same FETCH commands
go to both over raw sockets and the untagged responses must be byte-identical. The other tests
check the defects of stock Twisted listed in docs/protocol-servers.md, one by one.
"""

from __future__ import annotations

import asyncio
import io
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from twisted.internet.protocol import Factory
from twisted.mail import imap4
from zope.interface import implementer

from gateway.imap_out._compat import CompatIMAP4Server
from gateway.mailbox import crlf_form
from gateway.runtime import ConnectionRegistry, RunningListener, as_deferred, listen_twisted
from mailgw_sandbox.upstream import Dovecot, MailUser
from tests.unit.test_imap_render import CORPUS

# Responses compared byte for byte with Dovecot; the tagged completion lines differ in wording.
FETCHES = [
    "BODY.PEEK[]",
    "BODY.PEEK[]<0.30>",
    "BODY.PEEK[]<5000.10>",
    "BODY.PEEK[HEADER]",
    "BODY.PEEK[TEXT]",
    "BODY.PEEK[TEXT]<2.5>",
    "BODY.PEEK[HEADER.FIELDS (SUBJECT X-Custom-Header from)]",
    "BODY.PEEK[HEADER.FIELDS.NOT (Received SUBJECT)]",
    "BODY.PEEK[HEADER.FIELDS (X-Not-There)]",
    "RFC822.SIZE",
    "RFC822.HEADER",
    "RFC822.TEXT",
    "RFC822",
    "BODY.PEEK[HEADER]<0.20>",
    "BODY.PEEK[HEADER.FIELDS (DATE)]<3.100000>",
    "BODYSTRUCTURE",
    "BODY",
    "ENVELOPE",
    "BODY.PEEK[1]",
    "BODY.PEEK[1.MIME]",
    "BODY.PEEK[2]",
    "BODY.PEEK[2.MIME]",
    "BODY.PEEK[2.HEADER]",
    "BODY.PEEK[2.TEXT]",
    "BODY.PEEK[2.1]",
    "BODY.PEEK[2.1]<3.4>",
    "BODY.PEEK[2.1.MIME]",
    "BODY.PEEK[1.HEADER]",
    "BODY.PEEK[1.TEXT]",
    "BODY.PEEK[2.HEADER.FIELDS (subject)]",
    "BODY.PEEK[3]",
    "UID RFC822.SIZE BODYSTRUCTURE ENVELOPE",
]

# Known, justified differences: (message name, FETCH) -> reason. Keep this empty unless a
# difference is deliberate; every entry is reported by the differential test.
KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {}


# -- the in-memory read-only mailbox (test double) ---------------------------------------------


@implementer(imap4.IMessage, imap4.IMessageFile)
class RawMessage:
    """A message served from its raw bytes, as the mailbox view will."""

    def __init__(self, uid: int, raw: bytes, broken: bool = False) -> None:
        self.uid, self.raw, self.broken = uid, raw, broken

    def open(self) -> io.BytesIO:
        if self.broken:
            raise RuntimeError("backend lost the body")
        return io.BytesIO(self.raw)

    def getSize(self) -> int:
        return len(crlf_form(self.raw))

    def getUID(self) -> int:
        return self.uid

    def getFlags(self) -> list[str]:
        return []

    def getInternalDate(self) -> str:
        return "Mon, 2 Jan 2023 10:00:00 +0000"


@implementer(imap4.IMailbox)
class ReadOnlyMailbox:
    """INBOX of a few raw messages; ``fetch`` answers asynchronously like a remote backend."""

    def __init__(self, raws: list[bytes]) -> None:
        self.messages = [RawMessage(i, raw) for i, raw in enumerate(raws, 1)]
        self.listeners: list[Any] = []
        self.listened = 0  # sessions ever added as listeners: shows one came before it left
        self.select_delay = 0.01  # a remote backend answers later: exposes pipelining bugs
        self.select_gate: asyncio.Event | None = None  # when set: SELECT answers once it is set
        self.selects: list[Any] = []  # the Deferred of every select, to wait for its callbacks

    def getFlags(self) -> list[str]:
        return ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"]

    def getHierarchicalDelimiter(self) -> str:
        return "/"

    def getUIDValidity(self) -> int:
        return 42

    def getUIDNext(self) -> int:
        return len(self.messages) + 1

    def getUID(self, seq: int) -> int:
        return self.messages[seq - 1].uid

    def getMessageCount(self) -> int:
        return len(self.messages)

    def getRecentCount(self) -> int:
        return 0

    def getUnseenCount(self) -> int:
        return len(self.messages)

    def getFirstUnseen(self) -> int | None:
        return 1 if self.messages else None

    def isWriteable(self) -> bool:
        return False

    def addListener(self, listener: Any) -> None:
        self.listeners.append(listener)
        self.listened += 1

    def removeListener(self, listener: Any) -> None:
        self.listeners.remove(listener)

    def fetch(self, messages: Any, uid: bool) -> Any:
        async def found() -> list[tuple[int, RawMessage]]:
            await asyncio.sleep(0)
            by_uid = {m.uid: (seq, m) for seq, m in enumerate(self.messages, 1)}
            messages.last = max(by_uid) if uid else len(self.messages)
            if uid:
                return [by_uid[n] for n in messages if n in by_uid]
            return [(n, self.messages[n - 1]) for n in messages if 0 < n <= len(self.messages)]

        return as_deferred(found())

    def store(self, messages: Any, flags: Any, mode: int, uid: bool) -> None:
        raise imap4.ReadOnlyMailbox()


@implementer(imap4.IAccount)
class Account:
    def __init__(self, mailbox: ReadOnlyMailbox) -> None:
        self.mailbox = mailbox

    def select(self, name: str, rw: bool = True) -> Any:
        async def pick() -> ReadOnlyMailbox | None:
            if self.mailbox.select_gate is not None:
                await self.mailbox.select_gate.wait()
            else:
                await asyncio.sleep(self.mailbox.select_delay)  # async like the real view
            return self.mailbox if name.upper() == "INBOX" else None

        deferred = as_deferred(pick())
        self.mailbox.selects.append(deferred)
        return deferred


class _TestServer(CompatIMAP4Server):
    def connectionMade(self) -> None:
        self.factory.connections.add(self, self.transport.loseConnection)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.factory.connections.discard(self)
        super().connectionLost(reason)

    def authenticateLogin(self, user: bytes, passwd: bytes) -> Any:
        return (imap4.IAccount, Account(self.factory.mailbox), lambda: None)


class _Factory(Factory):
    noisy = False

    def __init__(self, mailbox: ReadOnlyMailbox) -> None:
        self.connections = ConnectionRegistry()
        self.mailbox = mailbox

    def buildProtocol(self, addr: Any) -> _TestServer:
        protocol = _TestServer()
        protocol.factory = self
        return protocol


@pytest.fixture
async def served() -> AsyncIterator[tuple[RunningListener, ReadOnlyMailbox]]:
    mailbox = ReadOnlyMailbox(list(CORPUS.values()))
    listener = await listen_twisted("imap-compat", _Factory(mailbox), "127.0.0.1", 0)
    try:
        yield listener, mailbox
    finally:
        await listener.close()


# -- a raw blocking client (run through asyncio.to_thread) --------------------------------------


class RawClient:
    """Reads whole responses, literals included, so transcripts can be compared byte for byte."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()

    def read_until(self, tag: bytes) -> list[bytes]:
        """Responses (each with its literals) up to and including the tagged one."""
        responses: list[bytes] = []
        while True:
            response = self._response()
            responses.append(response)
            if response.startswith(tag + b" "):
                return responses

    def _response(self) -> bytes:
        out = b""
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("server closed the connection: " + repr(out))
            out += line
            if line.endswith(b"}\r\n") and b"{" in line:
                size = int(line[line.rindex(b"{") + 1 : -3])
                out += self.file.read(size)
                continue
            return out

    def command(self, line: str) -> list[bytes]:
        self.sock.sendall(b"a " + line.encode() + b"\r\n")
        return self.read_until(b"a")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _transcripts(host: str, port: int, user: str, password: str) -> dict[tuple[str, str], bytes]:
    client = RawClient(host, port)
    try:
        assert client.command(f"LOGIN {user} {password}")[-1].startswith(b"a OK")
        assert client.command("EXAMINE INBOX")[-1].startswith(b"a OK")
        out: dict[tuple[str, str], bytes] = {}
        for seq, name in enumerate(CORPUS, 1):
            for fetch in FETCHES:
                responses = client.command(f"FETCH {seq} ({fetch})")
                assert responses[-1].startswith(b"a OK"), responses
                out[name, fetch] = b"".join(responses[:-1])
        return out
    finally:
        client.close()


async def test_fetch_responses_equal_dovecot(
    served: tuple[RunningListener, ReadOnlyMailbox], dovecot: Dovecot, upstream_user: MailUser
) -> None:
    listener, _ = served
    for raw in CORPUS.values():
        await asyncio.to_thread(dovecot.deliver, upstream_user.name, raw)
    reference = await asyncio.to_thread(
        _transcripts, dovecot.host, dovecot.imap_port, upstream_user.name, upstream_user.password
    )
    ours = await asyncio.to_thread(_transcripts, listener.host, listener.port, "u", "p")
    differences = {
        key: (reference[key], ours[key]) for key in reference if reference[key] != ours[key]
    }
    unexpected = {k: v for k, v in differences.items() if k not in KNOWN_DIFFERENCES}
    assert not unexpected, "\n".join(
        f"{k}:\n dovecot {v[0]!r}\n ours    {v[1]!r}" for k, v in unexpected.items()
    )
    assert len(reference) == len(CORPUS) * len(FETCHES)


# Header names given as strings (RFC 3501: header-fld-name = astring). A ``{n}`` goes after
# the server's "+", a ``{n+}`` at once (Dovecot has LITERAL+, the gateway LITERAL-).
HEADER_NAME_FETCHES = [
    b"BODY.PEEK[HEADER.FIELDS ({7}\r\nSubject from)]",
    b"BODY.PEEK[HEADER.FIELDS ({7+}\r\nSubject {15}\r\nX-Custom-Header)]",
    b'BODY.PEEK[HEADER.FIELDS.NOT ({8}\r\nReceived "subject")]',
    b'BODY.PEEK[HEADER.FIELDS ("Subject" "a\\"b" nil "X Y" "")]',
    b"BODY.PEEK[2.HEADER.FIELDS ({12+}\r\ncontent-type)]",
    b"BODY.PEEK[HEADER.FIELDS ({4}\r\nDate)]<3.10>",
    b"BODY.PEEK[HEADER.FIELDS ({0+}\r\n)]",
    b"BODY.PEEK[HEADER.FIELDS ({3+}\r\n\xc3\xa4x {4+}\r\na\r\nb)]",
    b"UID BODY.PEEK[HEADER.FIELDS (subject: {2}\r\nTo)]",
]
# Refused by both (the tagged texts differ): no name, a quote inside an atom, no ")", 8-bit.
BAD_HEADER_LISTS = [
    b"BODY.PEEK[HEADER.FIELDS ()]",
    b"BODY.PEEK[HEADER.FIELDS (To \xc3\xa4x)]",
    b'BODY.PEEK[HEADER.FIELDS (a"b)]',
    b"BODY.PEEK[HEADER.FIELDS ({3+}\r\nabc]",
]
_SYNCHRONISING = re.compile(rb"\{\d+\}\r\n")


def _with_literals(client: RawClient, command: bytes) -> list[bytes]:
    """``a <command>``, each synchronising literal sent after the server's "+" (which is not
    in the transcript: its text differs between servers)."""
    data = b"a " + command + b"\r\n"
    while (marker := _SYNCHRONISING.search(data)) is not None:
        client.sock.sendall(data[: marker.end()])
        answer = client.read_until(b"+")
        assert len(answer) == 1, answer
        data = data[marker.end() :]
    client.sock.sendall(data)
    return client.read_until(b"a")


def _header_name_transcripts(host: str, port: int, user: str, password: str) -> dict:
    client = RawClient(host, port)
    try:
        assert client.command(f"LOGIN {user} {password}")[-1].startswith(b"a OK")
        assert client.command("EXAMINE INBOX")[-1].startswith(b"a OK")
        out: dict[tuple[str, bytes], Any] = {}
        for seq, name in enumerate(CORPUS, 1):
            for fetch in HEADER_NAME_FETCHES:
                responses = _with_literals(client, b"FETCH %d (%s)" % (seq, fetch))
                assert responses[-1].startswith(b"a OK"), (fetch, responses)
                out[name, fetch] = b"".join(responses[:-1])
        for fetch in BAD_HEADER_LISTS:
            out["bad", fetch] = [
                r.split(b" ")[1] for r in _with_literals(client, b"FETCH 1 " + fetch)
            ]
        return out
    finally:
        client.close()


async def test_fetch_header_names_as_literals_equal_dovecot(
    served: tuple[RunningListener, ReadOnlyMailbox], dovecot: Dovecot, upstream_user: MailUser
) -> None:
    """Stock took ``"Subject"`` and ``{7}`` themselves for header names (nothing matched) and
    ``()`` for the whole header; here quoted and literal names answer as Dovecot's, labels
    included (strings quoted, CR, LF and 8-bit left out)."""
    listener, _ = served
    for raw in CORPUS.values():
        await asyncio.to_thread(dovecot.deliver, upstream_user.name, raw)
    reference = await asyncio.to_thread(
        _header_name_transcripts,
        dovecot.host,
        dovecot.imap_port,
        upstream_user.name,
        upstream_user.password,
    )
    ours = await asyncio.to_thread(_header_name_transcripts, listener.host, listener.port, "u", "p")
    different = [key for key in reference if reference[key] != ours[key]]
    assert not different, "\n".join(
        f"{k}:\n dovecot {reference[k]!r}\n ours    {ours[k]!r}" for k in different
    )
    assert reference["bad", BAD_HEADER_LISTS[0]] == [b"BAD"]
    assert (
        b'BODY[HEADER.FIELDS ("SUBJECT" FROM)] {'
        in reference[next(iter(CORPUS)), HEADER_NAME_FETCHES[0]]
    )


# -- the stock defects, one by one --------------------------------------------------------------


def _session(port: int, script: list[str]) -> list[list[bytes]]:
    client = RawClient("127.0.0.1", port)
    try:
        client.command("LOGIN u p")
        return [client.command(line) for line in script]
    finally:
        client.close()


async def test_select_reports_required_responses(
    served: tuple[RunningListener, ReadOnlyMailbox],
) -> None:
    listener, _ = served
    (select,) = await asyncio.to_thread(_session, listener.port, ["SELECT INBOX"])
    text = b"".join(select)
    count = len(CORPUS)
    for expected in (
        b"* %d EXISTS" % count,
        b"[PERMANENTFLAGS ()]",
        b"[UNSEEN 1]",
        b"[UIDVALIDITY 42]",
        b"[UIDNEXT %d]" % (count + 1),
        b"a OK [READ-ONLY] SELECT completed",
    ):
        assert expected in text


async def test_store_on_read_only_answers_no_and_connection_survives(
    served: tuple[RunningListener, ReadOnlyMailbox],
) -> None:
    listener, _ = served
    _, store, noop = await asyncio.to_thread(
        _session, listener.port, ["EXAMINE INBOX", "STORE 1 +FLAGS (\\Seen)", "NOOP"]
    )
    assert store[-1].startswith(b"a NO [READ-ONLY]")
    assert noop[-1].startswith(b"a OK")


async def test_render_failure_answers_no_instead_of_dropping(
    served: tuple[RunningListener, ReadOnlyMailbox],
) -> None:
    listener, mailbox = served
    mailbox.messages[1].broken = True
    _, fetch, noop = await asyncio.to_thread(
        _session, listener.port, ["EXAMINE INBOX", "FETCH 1:3 (BODYSTRUCTURE)", "NOOP"]
    )
    assert [r[:11] for r in fetch[:-1]] == [b"* 1 FETCH (", b"* 3 FETCH ("]
    assert fetch[-1].startswith(b"a NO [SERVERBUG]")
    assert noop[-1].startswith(b"a OK")


def _pipelined(port: int) -> list[bytes]:
    client = RawClient("127.0.0.1", port)
    try:
        client.command("LOGIN u p")
        client.sock.sendall(
            b"a1 EXAMINE INBOX\r\na2 FETCH 1:2 (UID)\r\na3 NOOP\r\na4 IDLE\r\nDONE\r\na5 NOOP\r\n"
        )
        return client.read_until(b"a5")
    finally:
        client.close()


async def test_pipelined_commands_after_async_select_run_in_order(
    served: tuple[RunningListener, ReadOnlyMailbox],
) -> None:
    listener, _ = served
    responses = await asyncio.to_thread(_pipelined, listener.port)
    tagged = [r.split(b" ")[0] + b" " + r.split(b" ")[1] for r in responses if r[:1] == b"a"]
    assert tagged == [b"a1 OK", b"a2 OK", b"a3 OK", b"a4 OK", b"a5 OK"]
    fetches = [r for r in responses if b"FETCH (UID" in r]
    assert fetches == [b"* 1 FETCH (UID 1)\r\n", b"* 2 FETCH (UID 2)\r\n"]


async def test_disconnect_removes_listener(
    served: tuple[RunningListener, ReadOnlyMailbox],
) -> None:
    listener, mailbox = served
    await asyncio.to_thread(_session, listener.port, ["EXAMINE INBOX"])
    for _ in range(100):  # until the server has processed the disconnect
        if not mailbox.listeners:
            break
        await asyncio.sleep(0.02)
    assert mailbox.listened == 1, "EXAMINE never listened: nothing to remove"
    assert mailbox.listeners == []


async def test_id_unselect_and_long_uid_sets(
    served: tuple[RunningListener, ReadOnlyMailbox],
) -> None:
    listener, mailbox = served
    long_set = ",".join(str(n) for n in range(1, 12000, 2))  # ~30 KB, beyond Twisted's 16 KiB
    caps, ident, _, fetch, unselect, after = await asyncio.to_thread(
        _session,
        listener.port,
        [
            "CAPABILITY",
            'ID ("name" "test")',
            "EXAMINE INBOX",
            f"UID FETCH {long_set} (UID)",
            "UNSELECT",
            "FETCH 1 (UID)",
        ],
    )
    assert b" ID" in caps[0] and b"UNSELECT" in caps[0]
    assert ident[0].startswith(b"* ID (") and ident[-1].startswith(b"a OK")
    assert [r for r in fetch if r.startswith(b"*")] == [
        b"* %d FETCH (UID %d)\r\n" % (n, n) for n in range(1, len(CORPUS) + 1, 2)
    ]
    assert fetch[-1].startswith(b"a OK")
    assert unselect[-1].startswith(b"a OK") and mailbox.listeners == []
    assert after[-1].startswith(b"a BAD")  # no mailbox selected any more


def _idle_and_long_line(port: int, mailbox: ReadOnlyMailbox, loop: Any) -> list[bytes]:
    client = RawClient("127.0.0.1", port)
    try:
        client.command("LOGIN u p")
        client.command("EXAMINE INBOX")
        client.sock.sendall(b"i IDLE\r\n")
        assert client.file.readline().startswith(b"+")
        mailbox.messages.append(RawMessage(len(mailbox.messages) + 1, CORPUS["semicolon"]))
        count = len(mailbox.messages)
        for listener in list(mailbox.listeners):
            loop.call_soon_threadsafe(listener.newMessages, count, None)
        pushed = client.file.readline()
        client.sock.sendall(b"DONE\r\n")
        done = client.read_until(b"i")
        client.sock.sendall(b"b FETCH " + b"1," * 40000 + b"1 (UID)\r\n")  # 80 KB
        return [pushed, *done, client.file.readline()]
    finally:
        client.close()


async def test_idle_push_and_overlong_line(
    served: tuple[RunningListener, ReadOnlyMailbox],
) -> None:
    listener, mailbox = served
    responses = await asyncio.to_thread(
        _idle_and_long_line, listener.port, mailbox, asyncio.get_running_loop()
    )
    assert responses[0] == b"* %d EXISTS\r\n" % len(mailbox.messages)
    assert responses[-2].startswith(b"i OK")
    assert responses[-1] == b"* BYE Command line too long\r\n"


class _CountingMailbox(ReadOnlyMailbox):
    """Counts bodies opened, i.e. messages rendered, to observe backpressure from outside."""

    def __init__(self, raws: list[bytes]) -> None:
        super().__init__(raws)
        self.opened = 0
        for message in self.messages:
            message.open = self._counting(message.open)  # type: ignore[method-assign]

    def _counting(self, open_: Any) -> Any:
        def wrapped() -> io.BytesIO:
            self.opened += 1
            return open_()

        return wrapped


def _slow_reader(port: int, mailbox: _CountingMailbox, total: int) -> tuple[int, list[bytes]]:
    client = RawClient("127.0.0.1", port)
    try:
        client.command("LOGIN u p")
        client.command("EXAMINE INBOX")
        client.sock.sendall(b"a FETCH 1:* (BODY.PEEK[])\r\n")
        import time

        # Pacing on purpose: a reader that stalls for a while, during which the server must
        # stop rendering rather than buffer all 40 MB.
        time.sleep(0.5)
        rendered_while_stalled = mailbox.opened
        return rendered_while_stalled, client.read_until(b"a")
    finally:
        client.close()


async def test_fetch_pauses_for_a_slow_reader() -> None:
    big = CORPUS["no-content-type"] + b"x" * 200_000 + b"\r\n"
    mailbox = _CountingMailbox([big] * 200)
    listener = await listen_twisted("imap-slow", _Factory(mailbox), "127.0.0.1", 0)
    try:
        stalled, responses = await asyncio.to_thread(_slow_reader, listener.port, mailbox, 200)
    finally:
        await listener.close()
    assert stalled < 100, stalled
    assert len(responses) == 201 and responses[-1].startswith(b"a OK")
    assert all(r.endswith(b"x\r\n)\r\n") for r in responses[:-1])


def _starttls_injection(port: int) -> list[bytes]:
    import ssl

    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        greeting = sock.makefile("rb")
        greeting.readline()
        sock.sendall(b"a STARTTLS\r\nb CAPABILITY\r\n")
        answer = greeting.readline()
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with context.wrap_socket(sock, server_hostname="localhost") as secure:
            secure.settimeout(1.0)
            try:
                after = secure.recv(100)
            except TimeoutError:
                after = b""
        return [answer, after]
    finally:
        sock.close()


async def test_commands_pipelined_after_starttls_are_dropped(tmp_path: Any) -> None:
    from gateway import tls

    pair = tls.create_ca_signed_pair(tmp_path, "imap", "localhost")
    factory = _Factory(ReadOnlyMailbox([]))
    build = factory.buildProtocol

    def with_tls(addr: Any) -> _TestServer:
        protocol = build(addr)
        protocol.ctx = tls.server_tls(pair).twisted
        return protocol

    factory.buildProtocol = with_tls  # type: ignore[method-assign]
    listener = await listen_twisted("imap-tls", factory, "127.0.0.1", 0)
    try:
        answer, after = await asyncio.to_thread(_starttls_injection, listener.port)
    finally:
        await listener.close()
    assert answer.startswith(b"a OK")
    # The command injected in clear text must not run inside the TLS session.
    assert b"b OK" not in after, after


def _flood(port: int) -> bytes:
    client = RawClient("127.0.0.1", port)
    try:
        client.command("LOGIN u p")
        noop = b"n NOOP " + b"x" * 1000 + b"\r\n"
        client.sock.sendall(b"s EXAMINE INBOX\r\n" + noop * 1100)  # > 1 MiB behind EXAMINE
        return b"".join(client.file.readlines())
    finally:
        client.close()


async def test_unbounded_pipelining_is_cut_off(
    served: tuple[RunningListener, ReadOnlyMailbox],
) -> None:
    listener, mailbox = served
    mailbox.select_gate = asyncio.Event()  # the flood arrives while EXAMINE is still in flight
    transcript = await asyncio.to_thread(_flood, listener.port)  # read to EOF: cut off
    assert b"* BYE Too many pipelined commands" in transcript
    mailbox.select_gate.set()  # EXAMINE completes after the disconnect: no listener may remain
    (examine,) = mailbox.selects
    await _settled(examine)
    assert mailbox.listeners == []


async def _settled(deferred: Any) -> None:
    """Wait until *deferred* has fired and every callback the server chained to it has run
    (ours, added last, runs after them)."""
    done = asyncio.get_running_loop().create_future()

    def finish(result: Any) -> Any:
        if not done.done():
            done.set_result(None)
        return result  # the server's outcome, failure included, goes on unchanged

    deferred.addBoth(finish)
    await asyncio.wait_for(done, 10)
