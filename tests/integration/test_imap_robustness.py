"""Hostile and broken input to the gateway's IMAP and POP3 fronts, over real sockets.

What must hold after every abuse: the abusing connection gets answers (BAD/NO with a sentence,
or ``* BYE`` and a close for an over-long line), never a Python error text; a SECOND connection,
logged in and selected before the abuse, still answers NOOP and UID FETCH; and the gateway still
accepts new logins. Limits decided here: command lines up to 64 KiB (Dovecot's default), string
literals outside APPEND up to 4 KiB (Twisted's limit; Dovecot refuses big non-APPEND literals
too), and APPEND refused before its literal is read (the INBOX is read-only, so the gateway never
buffers an upload it would reject).
"""

from __future__ import annotations

import asyncio
import contextlib
import poplib
import random
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable

import pytest

from tests.gateway_accounts import (
    HOST,
    PYTHON_LEAKS,
    Gateway,
    RawIMAP,
    login_raw,
    two_account_gateway,
)
from tests.helpers import PASSWORD

ACCOUNT = "crm"  # the Graph account; the protocol layer is the same for Gmail
BIG = b"x" * 76 + b"\r\n"


def _message(n: int, lines: int = 3) -> bytes:
    return (
        f"From: s@example.org\r\nTo: crm@contoso.example\r\nSubject: robust {n}\r\n"
        f"Message-ID: <robust-{n}@example.org>\r\n\r\n"
    ).encode() + BIG * lines


@pytest.fixture(scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with two_account_gateway(tmp_path_factory.mktemp("robust")) as running:
        for n in range(3):
            running.seed(ACCOUNT, _message(n))
        running.seed(ACCOUNT, _message(3, lines=40_000))  # ~3 MB, for an abort mid-FETCH
        yield running


def _no_leak(data: bytes) -> None:
    for marker in PYTHON_LEAKS:
        assert marker not in data, f"Python error text {marker!r} sent to a client: {data!r}"


def _status(response: bytes) -> bytes:
    """OK / NO / BAD of a tagged response line."""
    return response.split(b" ", 2)[1]


def _sentence(response: bytes) -> bytes:
    """The human-readable text of a tagged response (after any [CODE])."""
    text = response.split(b" ", 2)[2].strip() if response.count(b" ") >= 2 else b""
    return re.sub(rb"^\[[^\]]*\]\s*", b"", text)


def _healthy(other: RawIMAP, gw: Gateway) -> None:
    """The bystander connection still works, and so do new logins."""
    noop = other.command("NOOP")
    assert _status(noop[-1]) == b"OK", noop
    fetched = other.command("UID FETCH 1:* (UID RFC822.SIZE)")
    assert _status(fetched[-1]) == b"OK", fetched
    assert len([r for r in fetched if b" FETCH (UID " in r]) >= 4
    fresh = login_raw(gw, ACCOUNT)
    try:
        assert _status(fresh.command("FETCH 1 (UID)")[-1]) == b"OK"
    finally:
        fresh.close()


async def _with_bystander(gw: Gateway, abuse: Callable[[], object]) -> object:
    """Run ``abuse`` (blocking) while another logged-in, selected connection is open."""

    def run() -> object:
        other = login_raw(gw, ACCOUNT)
        try:
            result = abuse()
            _healthy(other, gw)
            return result
        finally:
            other.close()

    return await asyncio.to_thread(run)


# -- IMAP ------------------------------------------------------------------------------------


def _garbage_lines() -> list[bytes]:
    rng = random.Random(1234)
    binary = [
        bytes(b for b in rng.randbytes(200) if b not in b"\r\n{}") for _ in range(5)
    ]  # no line ends, no literal markers: each is exactly one line
    return [
        *binary,
        b"\x00\x00\x00\x00",
        b"a\x00 NOOP",
        b"b NO\x00OP",
        b"\xff\xfe\xfd",
        b"c \xc3\x28\xa0\xa1",
        b"\xc3\x28 FETCH 1 (UID)",
        b"d FETCH 1 (BODY[HEADER.FIELDS (\xff\xfe)])",
        b"e SEARCH SUBJECT \xff\xfe",
        b"f SELECT \xe6\x97\xa5\xff",
        b"   ",
        b"g",
        b"h  ",
        b")(*%",
    ]


def _every_line_answered(client: RawIMAP, lines: list[bytes]) -> list[bytes]:
    """Send ``lines`` then a NOOP; the responses before the NOOP's."""
    client.send(b"".join(line + b"\r\n" for line in lines) + b"zz NOOP\r\n")
    responses = client.read_until(b"zz")
    assert _status(responses[-1]) == b"OK", responses
    return responses[:-1]


async def test_garbage_bytes_get_bad_and_the_connection_goes_on(gw: Gateway) -> None:
    lines = _garbage_lines()

    def abuse() -> list[bytes]:
        client = login_raw(gw, ACCOUNT)
        try:
            return _every_line_answered(client, lines)
        finally:
            client.close()

    responses = await _with_bystander(gw, abuse)
    _no_leak(b"".join(responses))
    # One answer per line: an invalid tag gets an untagged BAD, as in Dovecot (stock Twisted
    # echoed NULs and 8-bit bytes as tags, ran "a\0 NOOP" and answered 8-bit command names
    # with "NO [SERVERBUG] 'ascii' codec can't decode…").
    answers = [r for r in responses if r.startswith(b"* BAD") or not r.startswith(b"*")]
    assert len(answers) == len(lines), responses
    by_tag = {r.split(b" ", 1)[0]: r for r in answers if not r.startswith(b"*")}
    invalid_tag = b"* BAD Error in IMAP command: invalid tag\r\n"
    assert answers.count(invalid_tag) == 10, responses  # binary, NULs, a\0, \xff, \xc3(, )(
    assert by_tag[b"b"] == b"b BAD Error in IMAP command: unknown command\r\n"
    assert by_tag[b"c"] == b"c BAD Error in IMAP command: unknown command\r\n"
    assert by_tag[b"d"] == b"d BAD Illegal syntax: 8bit data in atom\r\n"  # as Dovecot
    assert by_tag[b"e"].startswith(b"e OK")  # SEARCH for 8-bit text: nothing matches
    assert by_tag[b"f"].startswith(b"f NO Illegal mailbox name")
    for tag in (b"g", b"h"):
        assert by_tag[tag].startswith(tag + b" BAD Missing command"), responses


async def test_garbage_before_login_and_on_the_starttls_port(gw: Gateway) -> None:
    def abuse() -> list[bytes]:
        sock = socket.create_connection((HOST, gw.ports["imap"]), timeout=15)
        client = RawIMAP(sock)
        try:
            assert client.greeting.startswith(b"* OK")
            return _every_line_answered(client, _garbage_lines())
        finally:
            client.close()

    responses = await _with_bystander(gw, abuse)
    _no_leak(b"".join(responses))
    assert all(b"BAD" in r or b"NO" in r for r in responses), responses


async def test_overlong_command_line_is_bye_and_close_for_that_connection_only(
    gw: Gateway,
) -> None:
    def abuse() -> bytes:
        client = login_raw(gw, ACCOUNT)
        try:
            client.send(b"a FETCH 1 (BODY.PEEK[HEADER.FIELDS (" + b"X-A " * 25_000 + b")])\r\n")
            return client.rest()
        finally:
            client.close()

    def long_but_allowed() -> list[bytes]:
        client = login_raw(gw, ACCOUNT)
        try:  # 60 KB: under the 64 KiB limit, so it is served (Twisted's 16 KiB would drop it)
            return client.command(b"UID FETCH " + b"1," * 30_000 + b"1 (UID)")
        finally:
            client.close()

    closed = await _with_bystander(gw, abuse)
    assert closed == b"* BYE Command line too long\r\n"
    allowed = await asyncio.to_thread(long_but_allowed)
    assert _status(allowed[-1]) == b"OK", allowed[-1]


async def test_huge_literals_are_refused_without_reading_them(gw: Gateway) -> None:
    def abuse() -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        pre = gw.raw_imaps()
        try:
            out["login"] = pre.command(b"LOGIN {999999999}")
            out["login-user"] = pre.command(b"LOGIN crm {10485760}")
        finally:
            pre.close()
        client = login_raw(gw, ACCOUNT)
        try:
            out["select"] = client.command(b"SELECT {999999999}")
            out["append"] = client.command(b"APPEND INBOX {999999999}")
            out["append-10m"] = client.command(b"APPEND INBOX (\\Seen) {10485760}")
            out["append-other"] = client.command(b"APPEND Sent {12}")
            out["fetch"] = client.command(b"FETCH 1 (BODY.PEEK[HEADER.FIELDS {999999999}])")
            out["status"] = client.command(b"STATUS {99999} (MESSAGES)")
            out["noop"] = client.command(b"NOOP")
        finally:
            client.close()
        return out

    out = await _with_bystander(gw, abuse)
    _no_leak(b"".join(b"".join(v) for v in out.values()))
    for name, responses in out.items():
        # No continuation request: the client must not start sending a gigabyte.
        assert not any(r.startswith(b"+") for r in responses), (name, responses)
        if name != "noop":
            assert _status(responses[-1]) in (b"NO", b"BAD"), (name, responses)
            assert _sentence(responses[-1]), (name, responses)
    assert out["noop"][-1].endswith(b"OK NOOP completed\r\n")
    for name in ("append", "append-10m", "append-other"):
        assert _status(out[name][-1]) == b"NO", out[name]


async def test_literal_within_limits_then_abrupt_disconnect(gw: Gateway) -> None:
    def abuse() -> bytes:
        client = gw.raw_imaps()
        try:
            client.send(b"a LOGIN {100}\r\n")
            cont = client.response()
            client.send(b"crm")  # 3 of the announced 100 bytes, then the client vanishes
            return cont
        finally:
            client.close()

    cont = await _with_bystander(gw, abuse)
    assert cont.startswith(b"+ ")


async def test_unknown_commands_get_bad_with_a_sentence(gw: Gateway) -> None:
    commands = ["FOOBAR", "XYZZY 1 2 3", "MOVE 1 Archive", "UID MOVE 1 Archive", "UID FOO 1"]

    def abuse() -> list[list[bytes]]:
        client = login_raw(gw, ACCOUNT)
        try:
            return [client.command(c) for c in commands]
        finally:
            client.close()

    answers = await _with_bystander(gw, abuse)
    for command, responses in zip(commands, answers, strict=True):
        _no_leak(b"".join(responses))
        assert _status(responses[-1]) == b"BAD", (command, responses)
        assert re.search(rb"[A-Za-z]{3,} [a-z]{3,}", _sentence(responses[-1])), responses


async def test_commands_in_the_wrong_state(gw: Gateway) -> None:
    def abuse() -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        client = gw.raw_imaps()
        try:
            for command in ("FETCH 1 (UID)", "SELECT INBOX", 'LIST "" *', "IDLE", "CLOSE"):
                out["unauth " + command] = client.command(command)
            assert _status(client.command(f'LOGIN {ACCOUNT} "{PASSWORD}"')[-1]) == b"OK"
            for command in (f'LOGIN {ACCOUNT} "{PASSWORD}"', "FETCH 1 (UID)", "EXPUNGE",
                            "STORE 1 +FLAGS (\\Seen)", "SEARCH ALL", "CLOSE", "STARTTLS",
                            "AUTHENTICATE PLAIN"):  # fmt: skip
                out["auth " + command] = client.command(command)
            out["select"] = client.command("SELECT INBOX")
            out["selected UID FETCH"] = client.command("UID FETCH 1:* (UID)")
        finally:
            client.close()
        return out

    out = await _with_bystander(gw, abuse)
    _no_leak(b"".join(b"".join(v) for v in out.values()))
    for name, responses in out.items():
        if name.startswith(("select", "selected")):
            assert _status(responses[-1]) == b"OK", responses
        else:
            assert _status(responses[-1]) in (b"BAD", b"NO"), (name, responses)
            assert _sentence(responses[-1]), (name, responses)


MALFORMED = [
    "FETCH",
    "FETCH 1",
    "FETCH x (UID)",
    "FETCH 0 (UID)",
    "FETCH -1 (UID)",
    "FETCH 1:x (UID)",
    "FETCH 1,,2 (UID)",
    "FETCH 99999999999999999999 (UID)",
    "FETCH 4294967296:* (UID)",
    "FETCH 1 (NOSUCHITEM)",
    "FETCH 1 (UID",
    "FETCH 1 UID)",
    "FETCH 1 (BODY[",
    "FETCH 1 (BODY[HEADER.FIELDS (FROM])",
    "FETCH 1 (BODY[HEADER.FIELDS ()])",
    "FETCH 1 (BODY.PEEK[]<5.x>)",
    "FETCH 1 (BODY.PEEK[]<-1.5>)",
    "FETCH 1 (BODY.PEEK[]<99999999999999999999.1>)",
    "FETCH 1 (BODY.PEEK[1.2.3.4.5.6.7.8.9.10.11.12])",
    "FETCH 1 (BODY.PEEK[0])",
    "FETCH 1 (BODY.PEEK[1.0])",
    "FETCH 1 (BODY.PEEK[99999999999999999999])",
    "FETCH 1 (BODY.PEEK[FOO])",
    "FETCH 1 (BODY.PEEK[1.FOO])",
    "FETCH 1 ((((((((((UID))))))))))",
    "FETCH 1 " + "(" * 5000,
    "SEARCH",
    "SEARCH (",
    "SEARCH )",
    "SEARCH NOSUCHKEY",
    "SEARCH UID x",
    "SEARCH BEFORE notadate",
    "SEARCH SINCE 99-Foo-99999",
    "SEARCH OR SEEN",
    "SEARCH NOT",
    "SEARCH LARGER x",
    "SEARCH HEADER",
    "SEARCH " + "NOT " * 3000 + "ALL",
    "SEARCH " + "(" * 3000 + "ALL" + ")" * 3000,
    "SEARCH CHARSET NOSUCH ALL",
    "STORE",
    "STORE 1",
    "STORE 1 +FLAGS",
    "STORE 1 BADMODE (\\Seen)",
    "STORE x +FLAGS (\\Seen)",
    "STORE 1 +FLAGS (\\Seen",
    "STORE 1 +FLAGS ((\\Seen))",
    "STORE 1 +FLAGS (\\Seen \x7f)",
    "UID",
    "UID FETCH",
    "UID FETCH 1",
    "UID SEARCH (",
    "UID STORE 1",
    "COPY 1",
    "COPY 1 Nowhere",
    "COPY 1 INBOX",
    "EXAMINE",
    'SELECT "unterminated',
    "STATUS INBOX",
    "STATUS INBOX (NOSUCH)",
    "STATUS INBOX (MESSAGES",
    "LIST",
    'LSUB ""',
    "ID (",
    'ID ("name"',
]


async def test_malformed_fetch_search_store_are_answered(gw: Gateway) -> None:
    def abuse() -> list[list[bytes]]:
        client = login_raw(gw, ACCOUNT)
        try:
            return [client.command(line) for line in MALFORMED]
        finally:
            client.close()

    answers = await _with_bystander(gw, abuse)
    for line, responses in zip(MALFORMED, answers, strict=True):
        _no_leak(b"".join(responses))
        tagged = responses[-1]
        assert _status(tagged) in (b"OK", b"NO", b"BAD"), (line, responses)
        if _status(tagged) != b"OK":
            assert _sentence(tagged), (line, responses)
    by_line = dict(zip(MALFORMED, answers, strict=True))
    for line in ("FETCH", "FETCH x (UID)", "FETCH 0 (UID)", "FETCH 1 (NOSUCHITEM)", "SEARCH (",
                 "STORE 1 BADMODE (\\Seen)", "UID FETCH", "STORE x +FLAGS (\\Seen)"):  # fmt: skip
        assert _status(by_line[line][-1]) == b"BAD", (line, by_line[line])
    # Stock answered a missing COPY target with a str (TypeError: "BAD Server error: …").
    assert by_line["COPY 1 Nowhere"][-1].endswith(b" NO [TRYCREATE] No such mailbox\r\n")
    assert _status(by_line["COPY 1 INBOX"][-1]) == b"NO"  # read-only: nothing is copied


def _rst_close(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): the rudest way a client can vanish."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


async def test_abrupt_disconnects_mid_command_and_mid_fetch(gw: Gateway) -> None:
    def abuse() -> int:
        sent = 0
        for payload in (
            b"a UID FETCH 1:* (BODY.PEEK[",  # half a command line
            b"a FETCH 1:* (BODY.PEEK[])\r\n",  # a 3 MB answer nobody reads
            b"a FETCH 1:* (BODY.PEEK[] BODYSTRUCTURE)\r\nb NOOP\r\nc FETCH 1 (UID)\r\n",
            b"a SEARCH SUBJECT robust\r\n",
        ):
            for rude in (False, True):
                client = login_raw(gw, ACCOUNT)
                client.send(payload)
                if payload.endswith(b"\r\n") and b"BODY.PEEK[]" in payload:
                    client.file.read(1000)  # the FETCH has started streaming
                if rude:
                    _rst_close(client.sock)
                else:
                    client.close()
                sent += 1
        return sent

    assert await _with_bystander(gw, abuse) == 8
    # The server closes its side of every aborted session: none is left open or half-closed.
    for _ in range(50):
        if not _server_connections(gw.ports["imaps"]):
            break
        await asyncio.sleep(0.1)
    assert _server_connections(gw.ports["imaps"]) == []


def _server_connections(port: int) -> list[str]:
    """Server-side TCP connections of a local port still ESTABLISHED or CLOSE_WAIT."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                local, state = fields[1], fields[3]
                if int(local.rsplit(":", 1)[1], 16) == port and state in ("01", "08"):
                    found.append(line.strip())
    return found


# -- POP3 ------------------------------------------------------------------------------------


def _pop3(gw: Gateway) -> poplib.POP3_SSL:
    client = poplib.POP3_SSL(HOST, gw.ports["pop3s"], context=gw.tls(), timeout=15)
    client.user(ACCOUNT)
    client.pass_(PASSWORD)
    return client


def _pop3_raw(gw: Gateway, lines: list[bytes], login: bool = True) -> list[bytes]:
    """One reply line per command line (none of these are multi-line), then NOOP's."""
    sock = gw.tls().wrap_socket(
        socket.create_connection((HOST, gw.ports["pop3s"]), timeout=15),
        server_hostname="localhost",
    )
    reader = sock.makefile("rb")
    try:
        assert reader.readline().startswith(b"+OK")
        if login:
            sock.sendall(f"USER {ACCOUNT}\r\nPASS {PASSWORD}\r\n".encode())
            assert reader.readline().startswith(b"+OK") and reader.readline().startswith(b"+OK")
        replies = []
        for line in lines:
            sock.sendall(line + b"\r\n")
            replies.append(reader.readline())
        sock.sendall(b"NOOP\r\n")
        replies.append(reader.readline())
        return replies
    finally:
        reader.close()
        sock.close()


async def _pop3_bystander(gw: Gateway, abuse: Callable[[], object]) -> object:
    def run() -> object:
        other = _pop3(gw)
        try:
            result = abuse()
            assert other.noop().startswith(b"+OK")
            assert other.stat()[0] >= 4
            assert other.top(1, 0)[1][2] == b"Subject: robust 0"
            fresh = _pop3(gw)
            assert fresh.stat()[0] >= 4
            fresh.quit()
            return result
        finally:
            other.close()

    return await asyncio.to_thread(run)


POP3_BAD = [
    b"FOO",
    b"XYZZY 1 2",
    b"\x00\x00\x00",
    b"\xff\xfe\xfd NOOP",
    b"RETR",
    b"RETR 0",
    b"RETR -1",
    b"RETR 99999999999999999999999999",
    b"RETR 1x",
    b"RETR \xd9\xa1",
    b"RETR 1 2",
    b"RETR  1",
    b"TOP 1",
    b"TOP 1 -1",
    b"TOP x 1",
    b"LIST 0",
    b"LIST abc",
    b"UIDL 99999",
    b"UIDL \xff",
    b"DELE 0",
    b"DELE 999",
    b"USER again",
    b"PASS again",
    b"STLS",
    b"APOP a b",
    b"AUTH PLAIN",
]


async def test_pop3_garbage_and_bad_numbers_are_err_replies(gw: Gateway) -> None:
    rng = random.Random(99)
    garbage = [bytes(b for b in rng.randbytes(300) if b not in b"\r\n") for _ in range(5)]

    replies = await _pop3_bystander(gw, lambda: _pop3_raw(gw, POP3_BAD + garbage))
    _no_leak(b"".join(replies))
    assert replies[-1] == b"+OK\r\n"
    for line, reply in zip(POP3_BAD + garbage, replies, strict=False):
        assert reply.startswith(b"-ERR ") and len(reply) > 10, (line, reply)
    before = await asyncio.to_thread(_pop3_raw, gw, [b"RETR 1", b"FOO", b"\x00"], False)
    _no_leak(b"".join(before))
    assert before == [
        b"-ERR RETR is not allowed before login\r\n",
        b"-ERR Unknown command\r\n",
        b"-ERR Unknown command\r\n",
        b"-ERR NOOP is not allowed before login\r\n",
    ]


async def test_pop3_long_lines_and_abrupt_disconnect_mid_retr(gw: Gateway) -> None:
    def abuse() -> list[bytes]:
        replies = _pop3_raw(gw, [b"NOOP " + b"A" * 100_000, b"USER " + b"u" * 9000])
        for rude in (False, True):
            sock = gw.tls().wrap_socket(
                socket.create_connection((HOST, gw.ports["pop3s"]), timeout=15),
                server_hostname="localhost",
            )
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(f"USER {ACCOUNT}\r\nPASS {PASSWORD}\r\nRETR 4\r\nRETR 4\r\n".encode())
            reader.readline(), reader.readline(), reader.read(5000)  # mid-RETR of ~3 MB
            if rude:
                _rst_close(sock)
            else:
                reader.close()
                sock.close()
        return replies

    replies = await _pop3_bystander(gw, abuse)
    _no_leak(b"".join(replies))
    assert replies[0] == b"-ERR Line too long\r\n" and replies[1] == b"-ERR Line too long\r\n"
    assert replies[-1] == b"+OK\r\n"


async def test_gateway_process_still_serves_both_protocols_and_accounts(gw: Gateway) -> None:
    """After all of the above (module order), each account still reads over IMAP and POP3."""

    def check() -> tuple:
        imap = gw.imap("scanner")
        try:
            selected = imap.select("INBOX")[0]
        finally:
            imap.logout()
        pop = _pop3(gw)
        try:
            count = pop.stat()[0]
        finally:
            pop.quit()
        return selected, count

    assert await asyncio.to_thread(check) == ("OK", 4)
