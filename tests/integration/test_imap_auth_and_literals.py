"""Through the whole gateway over real sockets: LOGOUT closes TLS connections, literals in every
astring argument (synchronising and RFC 7888 non-synchronising), and AUTHENTICATE PLAIN (RFC
4959 SASL-IR) wherever a plaintext LOGIN is allowed.

The non-ASCII SEARCH is compared with a private Dovecot holding the same messages, through the
client that sends such terms as literals (imaplib).
"""

from __future__ import annotations

import asyncio
import imaplib
import re
import socket
import ssl
from base64 import b64encode
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mailgw_sandbox import Sandbox
from mailgw_sandbox.upstream import Dovecot
from tests.gateway_accounts import HOST, Gateway, RawIMAP, login_raw, two_account_gateway
from tests.helpers import PASSWORD
from tests.integration.test_imap_live import live_gateway

ACCOUNT = "crm"
SUBJECTS = ["Gr\u00fc\u00dfe aus K\u00f6ln", "plain ascii", "=?utf-8?q?gr=C3=BC=C3=9Fe_encoded?="]
TERM = "gr\u00fc\u00dfe".encode()


def _message(n: int, subject: str) -> bytes:
    return (
        f"From: s@example.org\r\nTo: crm@contoso.example\r\nCc: team-{n}@example.org\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <lit-{n}@example.org>\r\nDate: Mon, 2 Mar 2026 10:0{n}:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
    ).encode()


MESSAGES = [_message(n, subject) for n, subject in enumerate(SUBJECTS)]


@pytest.fixture(scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with two_account_gateway(tmp_path_factory.mktemp("literals")) as running:
        for raw in MESSAGES:
            running.seed(ACCOUNT, raw)
        yield running


def _status(response: bytes) -> bytes:
    return response.split(b" ", 2)[1]


# -- LOGOUT over TLS ---------------------------------------------------------------------------


class _StrictEOF(ssl.SSLContext):
    """A client context whose sockets raise on a TCP close without TLS close_notify, instead of
    reading it as a clean end (Python's default)."""

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        kwargs["suppress_ragged_eofs"] = False
        return super().wrap_socket(*args, **kwargs)


def _logout_after_fetch(gw: Gateway, implicit: bool) -> list[bytes]:
    context = _StrictEOF(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(gw.cafile)
    if implicit:
        client: imaplib.IMAP4 = imaplib.IMAP4_SSL(
            "localhost", gw.ports["imaps"], ssl_context=context, timeout=10
        )
    else:
        client = imaplib.IMAP4("localhost", gw.ports["imap"], timeout=10)
        client.starttls(ssl_context=context)
    client.login(ACCOUNT, PASSWORD)
    client.select("INBOX", readonly=True)
    typ, _ = client.fetch("1:*", "(UID BODY.PEEK[])")
    assert typ == "OK"
    client.send(b"z LOGOUT\r\n")
    lines = []
    try:  # the socket timeout (10 s) bounds the wait for the close
        while line := client.readline():
            lines.append(line)
    finally:
        client.sock.close()
    return lines  # readline returned b"": close_notify, then the end of the stream


@pytest.mark.parametrize("implicit", [True, False], ids=["imaps", "starttls"])
async def test_logout_after_fetch_closes_the_tls_connection(gw: Gateway, implicit: bool) -> None:
    """The FETCH producer was never unregistered under TLS, so loseConnection waited for it:
    BYE and OK were sent, then neither close_notify nor FIN (a timeout here; without
    close_notify, an SSLEOFError)."""
    lines = await asyncio.to_thread(_logout_after_fetch, gw, implicit)
    assert lines[0].startswith(b"* BYE"), lines
    assert lines[-1].startswith(b"z OK"), lines


# -- literals ----------------------------------------------------------------------------------


def _uid_search(client: RawIMAP, tag: bytes, announce: bytes, synchronising: bool) -> list[bytes]:
    head = tag + b" UID SEARCH CHARSET UTF-8 SUBJECT " + announce + b"\r\n"
    if synchronising:
        client.send(head)
        cont = client.response()
        assert cont.startswith(b"+ "), cont
        client.send(TERM + b"\r\n")
    else:
        client.send(head + TERM + b"\r\n")
    return client.read_until(tag)


async def test_literals_in_search_login_select_and_status(gw: Gateway) -> None:
    def session() -> dict[str, Any]:
        out: dict[str, Any] = {}
        client = login_raw(gw, ACCOUNT)
        try:
            out["caps"] = client.command("CAPABILITY")[0]
            out["uids"] = client.command("UID SEARCH ALL")[0]
            out["sync"] = _uid_search(client, b"s1", b"{%d}" % len(TERM), True)
            out["nonsync"] = _uid_search(client, b"s2", b"{%d+}" % len(TERM), False)
            # Two literals in one command, the second non-synchronising, and a key after them.
            client.send(b"s3 SEARCH OR SUBJECT {5}\r\n")
            out["two-cont"] = client.response()
            client.send(b"plain SUBJECT {4+}\r\nK\xc3\xb6l ALL\r\n")
            out["two"] = client.read_until(b"s3")
            client.send(b"s4 STATUS {5+}\r\nINBOX (MESSAGES)\r\n")
            out["status"] = client.read_until(b"s4")
            client.send(b"s5 EXAMINE {5+}\r\nINBOX\r\n")
            out["examine"] = client.read_until(b"s5")
        finally:
            client.close()
        fresh = gw.raw_imaps()
        try:
            user, password = ACCOUNT.encode(), PASSWORD.encode()
            fresh.send(b"l1 LOGIN {%d}\r\n" % len(user))
            out["login-cont"] = fresh.response()
            fresh.send(user + b" {%d+}\r\n" % len(password) + password + b"\r\n")
            out["login"] = fresh.read_until(b"l1")
        finally:
            fresh.close()
        return out

    out = await asyncio.to_thread(session)
    assert b" LITERAL- " in out["caps"] + b" ", out["caps"]
    all_uids = out["uids"].split()[2:]
    assert len(all_uids) == 3
    hits = b"* SEARCH %s %s\r\n" % (all_uids[0], all_uids[2])  # raw UTF-8 and RFC 2047
    assert out["sync"] == [hits, out["sync"][-1]] and _status(out["sync"][-1]) == b"OK"
    assert out["nonsync"] == [hits, out["nonsync"][-1]]  # and no "+" was sent
    assert out["two-cont"].startswith(b"+ ")
    assert out["two"][0] == b"* SEARCH 1 2\r\n" and _status(out["two"][-1]) == b"OK"
    assert out["status"][0] == b"* STATUS INBOX (MESSAGES 3)\r\n"
    assert _status(out["examine"][-1]) == b"OK"
    assert out["login-cont"].startswith(b"+ ")
    assert _status(out["login"][-1]) == b"OK", out["login"]


async def test_refused_literals_are_dropped_not_run(gw: Gateway) -> None:
    """A literal over the limit gets BAD [TOOBIG] (no "+" for a synchronising one); the octets
    of a non-synchronising one, and of an APPEND's (refused before its literal), are read and
    dropped: the command lines inside them never run."""
    inside = b"x1 LOGOUT\r\nx2 NOOP\r\n"

    def session() -> dict[str, list[bytes]]:
        client = login_raw(gw, ACCOUNT)
        try:
            out = {"sync": client.command(b"SEARCH SUBJECT {5000}")}
            big = inside + b"y" * (5000 - len(inside))
            client.send(b"b1 SEARCH SUBJECT {5000+}\r\n" + big + b"\r\nb2 NOOP\r\n")
            out["nonsync"] = client.read_until(b"b2")
            client.send(b"b3 APPEND INBOX {%d+}\r\n" % len(inside) + inside + b"\r\nb4 NOOP\r\n")
            out["append"] = client.read_until(b"b4")
            return out
        finally:
            client.close()

    out = await asyncio.to_thread(session)
    assert len(out["sync"]) == 1 and b"BAD [TOOBIG]" in out["sync"][0], out["sync"]
    assert len(out["nonsync"]) == 2, out["nonsync"]
    assert out["nonsync"][0].startswith(b"b1 BAD [TOOBIG]")
    assert out["nonsync"][1].startswith(b"b2 OK")
    assert len(out["append"]) == 2, out["append"]
    assert out["append"][0].startswith(b"b3 NO")
    assert out["append"][1].startswith(b"b4 OK")


def _imaplib_search(client: imaplib.IMAP4) -> list[list[bytes]]:
    """A non-ASCII SUBJECT and a HEADER value, each the synchronising literal imaplib sends
    (after the command's other arguments)."""
    out = []
    for charset, key, literal in (("UTF-8", ["SUBJECT"], TERM), (None, ["HEADER", "Cc"], b"m-1")):
        client.literal = literal
        typ, data = client.search(charset, *key)
        assert typ == "OK", data
        out.append(data)
    return out


async def test_imaplib_non_ascii_search_gets_dovecots_hits(gw: Gateway, dovecot: Dovecot) -> None:
    user = dovecot.new_user("literal-search")
    for raw in MESSAGES:
        await asyncio.to_thread(dovecot.deliver, user.name, raw)

    def both() -> tuple[list[bytes], list[bytes]]:
        ours = gw.imap(ACCOUNT, implicit=True)
        try:
            ours.select("INBOX", readonly=True)
            mine = _imaplib_search(ours)
        finally:
            ours.logout()
        theirs = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=15)
        try:
            theirs.login(user.name, user.password)
            theirs.select("INBOX", readonly=True)
            reference = _imaplib_search(theirs)
        finally:
            theirs.logout()
        return mine, reference

    mine, reference = await asyncio.to_thread(both)
    assert reference == [[b"1 3"], [b"2"]]  # the raw UTF-8 subject and the RFC 2047 one
    assert mine == reference


# -- a string in every position where RFC 3501 allows an astring or string ---------------------

# How each string of a command is sent: quoted (the reference), or as a literal.
FORMS = ("quoted", "sync", "nonsync")
_STRING = re.compile(rb"\{(\d+)\}\r\n")


def _command(template: bytes, strings: list[bytes], form: str) -> bytes:
    """``template`` with each ``%s`` replaced by a string in ``form``."""
    if form == "quoted":
        quoted = [b'"' + v.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"' for v in strings]
        return template % tuple(quoted)
    announce = b"{%d}\r\n" if form == "sync" else b"{%d+}\r\n"
    return template % tuple(announce % len(v) + v for v in strings)


def _send(client: RawIMAP, tag: bytes, command: bytes) -> tuple[int, list[bytes]]:
    """Send ``tag command``, waiting for the ``+`` after each synchronising literal; the number
    of ``+`` continuations and the responses up to the tagged one."""
    data, continuations = tag + b" " + command + b"\r\n", 0
    while (marker := _STRING.search(data)) is not None:
        client.send(data[: marker.end()])
        answer = client.response()
        assert answer.startswith(b"+"), (command, answer)
        continuations += 1
        data = data[marker.end() :]
    client.send(data)
    return continuations, client.read_until(tag)


def _in_every_form(client: RawIMAP, template: bytes, strings: list[bytes]) -> dict[str, Any]:
    out = {}
    for n, form in enumerate(FORMS):
        out[form] = _send(client, b"f%d" % n, _command(template, strings, form))
    return out


# (command, its strings): SEARCH keys are compared with Dovecot, sequence numbers being equal.
SEARCHES = [
    (b"SEARCH SUBJECT %s", [b"ascii"]),
    (b"SEARCH SUBJECT %s", [b"ascii "]),  # a literal's last blank is part of it
    (b"SEARCH CHARSET %s SUBJECT %s", [b"UTF-8", "K\u00f6ln".encode()]),
    (b"SEARCH FROM %s", [b"s@example"]),
    (b"SEARCH TO %s CC %s", [b"crm", b"team-1"]),
    (b"SEARCH OR BCC %s (NOT CC %s)", [b"x", b"team-2"]),
    (b"SEARCH BODY %s", [b"hello"]),
    (b"SEARCH TEXT %s", [b"lit-1@"]),
    (b"SEARCH HEADER %s %s", [b"Message-ID", b"lit-2"]),
    (b"SEARCH HEADER %s %s", [b"cc", b""]),  # every message with the field
    (b"SEARCH NOT HEADER %s %s ALL", [b"X-Absent", b""]),
]


async def test_search_strings_as_literals_get_dovecots_hits(gw: Gateway, dovecot: Dovecot) -> None:
    """Every string of every SEARCH key (HEADER's field name too), as a synchronising and as a
    non-synchronising literal, finds what Dovecot finds for the same messages."""
    user = dovecot.new_user("literal-keys")
    for raw in MESSAGES:
        await asyncio.to_thread(dovecot.deliver, user.name, raw)

    def run(client: RawIMAP) -> list[dict[str, Any]]:
        try:
            return [_in_every_form(client, t, strings) for t, strings in SEARCHES]
        finally:
            client.close()

    def theirs() -> RawIMAP:
        client = RawIMAP(socket.create_connection((dovecot.host, dovecot.imap_port), 15))
        assert _status(client.command(f"LOGIN {user.name} {user.password}")[-1]) == b"OK"
        assert _status(client.command("EXAMINE INBOX")[-1]) == b"OK"
        return client

    mine = await asyncio.to_thread(lambda: run(login_raw(gw, ACCOUNT)))
    reference = await asyncio.to_thread(lambda: run(theirs()))
    for (template, strings), ours, dovecots in zip(SEARCHES, mine, reference, strict=True):
        for form in FORMS:
            assert ours[form][0] == (len(strings) if form == "sync" else 0), (template, form)
            assert ours[form][1][:-1] == dovecots[form][1][:-1], (template, strings, form)
            assert _status(ours[form][1][-1]) == b"OK", (template, form, ours[form])
    hits = [dovecots["quoted"][1][0] for dovecots in reference]
    assert hits[:2] == [b"* SEARCH 2\r\n", b"* SEARCH\r\n"]  # the blank counts
    assert hits[4:6] == [b"* SEARCH 2\r\n", b"* SEARCH 1 2\r\n"]


# (command, its strings, what the quoted form answers): over the whole gateway, each literal
# form answers exactly as the quoted one.
POSITIONS = [
    (b"LIST %s %s", [b"", b"*"], b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n'),
    (b"LIST %s %s", [b"", b"IN%"], b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n'),
    (b"LSUB %s %s", [b"", b"INBOX"], b'* LSUB (\\HasNoChildren) "/" "INBOX"\r\n'),
    (b"STATUS %s (MESSAGES)", [b"INBOX"], b"* STATUS INBOX (MESSAGES 3)\r\n"),
    (b"ID (%s %s)", [b"name", b"client (test)"], b'* ID ("name" "mail gateway")\r\n'),
    (b"UID SEARCH HEADER %s %s", [b"Subject", b"ascii"], None),
    (b"FETCH 2 (BODY.PEEK[HEADER.FIELDS (%s from)])", [b"Subject"], b"Subject: plain ascii"),
    (b"UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS.NOT (%s %s)])", [b"subject", b"x y"], b"Cc: "),
    (b"FETCH 3 (BODY.PEEK[HEADER.FIELDS (%s)]<0.6>)", [b"To"], b"{6}\r\nTo: cr"),
    (b"COPY 1 %s", [b"Archive"], None),
    (b"UID COPY 1 %s", [b"INBOX"], None),
    (b"SUBSCRIBE %s", [b"Archive"], None),
    (b"UNSUBSCRIBE %s", [b"INBOX"], None),
    (b"CREATE %s", [b"Archive"], None),
    (b"DELETE %s", [b"Archive"], None),
    (b"RENAME %s %s", [b"Archive", b"Old"], None),
    (b"SELECT %s", [b"INBOX"], b"* 3 EXISTS\r\n"),
]


async def test_every_astring_position_takes_literals(gw: Gateway) -> None:
    def run() -> list[dict[str, Any]]:
        client = login_raw(gw, ACCOUNT)
        try:
            return [_in_every_form(client, t, strings) for t, strings, _ in POSITIONS]
        finally:
            client.close()

    results = await asyncio.to_thread(run)
    for (template, strings, shows), out in zip(POSITIONS, results, strict=True):
        reference = out["quoted"][1]
        assert not any(r.startswith(b"* BYE") for r in reference), (template, reference)
        if shows is not None:
            assert any(shows in r for r in reference), (template, reference)
        for form in ("sync", "nonsync"):
            continuations, responses = out[form]
            assert continuations == (len(strings) if form == "sync" else 0), (template, form)
            # The same answers, the tagged line's tag aside.
            assert responses[:-1] == reference[:-1], (template, form, responses, reference)
            assert responses[-1].split(b" ", 1)[1] == reference[-1].split(b" ", 1)[1]
    refused = {b"COPY 1 %s", b"UID COPY 1 %s", b"SUBSCRIBE %s", b"UNSUBSCRIBE %s"}
    refused |= {b"CREATE %s", b"DELETE %s", b"RENAME %s %s"}  # only INBOX, read-only
    for (template, _, _), out in zip(POSITIONS, results, strict=True):
        wanted = b"NO" if template in refused else b"OK"
        assert _status(out["quoted"][1][-1]) == wanted, (template, out["quoted"])


async def test_literal_holding_a_command_is_never_run(gw: Gateway) -> None:
    """A mailbox name or header name whose literal holds command lines: the lines are the
    argument's octets (the command answers, the connection stays), never commands."""
    inside = b"x1 LOGOUT\r\nx2 CREATE other\r\n"

    def run() -> list[list[bytes]]:
        client = login_raw(gw, ACCOUNT)
        out = []
        try:
            for n, template in enumerate(
                (
                    b"CREATE %s",
                    b"SUBSCRIBE %s",
                    b'LIST "" %s',
                    b"RENAME %s x",
                    b"DELETE %s",
                    b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (%s)])",
                    b"SEARCH HEADER %s x",
                )
            ):
                form = "sync" if n % 2 else "nonsync"
                out.append(_send(client, b"r%d" % n, _command(template, [inside], form))[1])
            out.append(client.command("NOOP"))
            return out
        finally:
            client.close()

    out = await asyncio.to_thread(run)
    assert all(len(responses) <= 2 for responses in out[:-1]), out
    assert not [r for responses in out for r in responses if r.startswith((b"x1", b"x2", b"* BYE"))]
    assert _status(out[-1][-1]) == b"OK"
    fetched = out[5]
    assert (
        fetched[0]
        == b'* 1 FETCH (BODY[HEADER.FIELDS ("X1 LOGOUTX2 CREATE OTHER")] {2}\r\n\r\n)\r\n'
    )


# -- AUTHENTICATE ------------------------------------------------------------------------------


def _plain(authzid: str = "", user: str = ACCOUNT, password: str = PASSWORD) -> bytes:
    return b64encode(f"{authzid}\0{user}\0{password}".encode())


def _cleartext_sessions(port: int) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for name, command in (
        ("ir", b"AUTHENTICATE PLAIN " + _plain()),
        ("other-user", b"AUTHENTICATE PLAIN " + _plain(authzid="scanner")),
        ("wrong", b"AUTHENTICATE PLAIN " + _plain(password="nope")),
        ("malformed", b"AUTHENTICATE PLAIN " + b64encode(b"no separators")),
        ("unknown", b"AUTHENTICATE CRAM-MD5"),
    ):
        client = RawIMAP(socket.create_connection((HOST, port), timeout=15))
        try:
            if not out:
                out["caps"] = client.command("CAPABILITY")
            out[name] = client.command(command)
        finally:
            client.close()
    client = RawIMAP(socket.create_connection((HOST, port), timeout=15))
    try:  # without SASL-IR: an empty challenge, then the response
        client.send(b"c1 AUTHENTICATE PLAIN\r\n")
        out["challenge"] = [client.response()]
        client.send(_plain() + b"\r\n")
        out["two-step"] = client.read_until(b"c1")
    finally:
        client.close()
    return out


async def test_authenticate_plain_in_clear_text_where_login_is_allowed(gw: Gateway) -> None:
    """reading.plaintext_auth is loopback (the default): this client may log in without TLS,
    so AUTH=PLAIN and SASL-IR are offered and AUTHENTICATE goes through the login gate."""
    out = await asyncio.to_thread(_cleartext_sessions, gw.ports["imap"])
    caps = out["caps"][0].split()
    assert b"AUTH=PLAIN" in caps and b"SASL-IR" in caps and b"LOGINDISABLED" not in caps
    assert _status(out["ir"][-1]) == b"OK", out["ir"]
    assert out["other-user"][-1].split()[1:3] == [b"NO", b"[AUTHORIZATIONFAILED]"]
    assert out["wrong"][-1].split()[1:3] == [b"NO", b"[AUTHENTICATIONFAILED]"]
    assert _status(out["malformed"][-1]) == b"BAD"
    assert _status(out["unknown"][-1]) == b"NO"
    assert out["challenge"] == [b"+ \r\n"] or out["challenge"] == [b"+\r\n"]
    assert _status(out["two-step"][-1]) == b"OK", out["two-step"]


async def test_authenticate_refused_in_clear_text_where_login_is_not(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """reading.plaintext_auth: never: LOGINDISABLED, no AUTH= before STARTTLS, and AUTHENTICATE
    is refused before any credentials are read."""
    async with live_gateway("microsoft", sandbox, tmp_path, plaintext_auth="never") as world:

        def attempt() -> dict[str, list[bytes]]:
            client = RawIMAP(socket.create_connection((HOST, world.gateway.ports["imap"]), 15))
            try:
                return {
                    "caps": client.command("CAPABILITY"),
                    "ir": client.command(b"AUTHENTICATE PLAIN " + _plain(user=world.account)),
                    "no-ir": client.command(b"AUTHENTICATE PLAIN"),
                }
            finally:
                client.close()

        out = await asyncio.to_thread(attempt)
    caps = out["caps"][0].split()
    assert b"LOGINDISABLED" in caps and b"STARTTLS" in caps
    assert not [c for c in caps if c.startswith(b"AUTH=")] and b"SASL-IR" not in caps
    for name in ("ir", "no-ir"):  # no "+": the client is never asked for its password
        assert len(out[name]) == 1, out[name]
        assert out[name][0].split()[1:3] == [b"NO", b"[PRIVACYREQUIRED]"], out[name]
