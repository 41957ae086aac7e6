"""The gateway behind a real HAProxy speaking the PROXY protocol (issue 16) to SMTP and IMAPS.

HAProxy runs on 127.0.0.1 (``listeners.proxy_protocol_from``); the test's clients connect to
it from 127.0.0.2 and 127.0.0.3 (Linux routes all of 127/8 to lo), so the address HAProxy
reports differs from the one the gateway's socket sees. The haproxy.cfg is the README's
example ("Behind a TCP load balancer"), with test ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import logging
import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway import tls
from mailgw_sandbox import Sandbox
from mailgw_sandbox.upstream import INSTALL_HINT
from tests.helpers import (
    MS_ADDRESS,
    PASSWORD,
    free_port,
    running_gateway,
    sandbox_config,
    serve_without_consent,
)

HOST = "127.0.0.1"  # the gateway's and HAProxy's address
CLIENT = "127.0.0.2"
OTHER_CLIENT = "127.0.0.3"
PREAUTH = 3  # listeners.preauth_timeout_seconds
PER_ADDRESS = 2  # listeners.max_unauthenticated_per_address
MESSAGE = b"From: crm@contoso.example\r\nTo: a@example.org\r\nSubject: via haproxy\r\n\r\nx\r\n"
# HAProxy frontend name -> (gateway listener, the server line's PROXY option)
ROUTES = {
    "smtp_v1": ("smtp", "send-proxy"),
    "smtp_v2": ("smtp", "send-proxy-v2"),
    "imaps_v1": ("imaps", "send-proxy"),
    "imaps_v2": ("imaps", "send-proxy-v2"),
}


def haproxy_config(ports: dict[str, int], gateway_ports: dict[str, int]) -> str:
    """TCP mode, one frontend per route; health checks every 200 ms, which HAProxy sends with
    the server's PROXY option (v2: a LOCAL header; v1: the check's own addresses)."""
    text = """global
    maxconn 500
defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m
"""
    for name, (listener, option) in ROUTES.items():
        text += f"""frontend {name}
    bind {HOST}:{ports[name]}
    default_backend gw_{name}
backend gw_{name}
    server gw1 {HOST}:{gateway_ports[listener]} {option} check inter 200ms
"""
    return text


@dataclass
class Setup:
    gateway: Any
    sandbox: Sandbox
    haproxy: dict[str, int]  # frontend name -> port
    cafile: str


@contextlib.asynccontextmanager
async def haproxy(directory: Path, gateway_ports: dict[str, int]) -> AsyncIterator[dict[str, int]]:
    """HAProxy in the foreground on free ports of 127.0.0.1; yields its frontends' ports."""
    if shutil.which("haproxy") is None:
        pytest.fail(f"haproxy is missing: {INSTALL_HINT}", pytrace=False)
    ports = {name: free_port() for name in ROUTES}
    config = directory / "haproxy.cfg"
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(config.write_text, haproxy_config(ports, gateway_ports))
    check = await asyncio.create_subprocess_exec(
        "haproxy", "-c", "-f", str(config), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await check.communicate()
    assert check.returncode == 0, out
    process = await asyncio.create_subprocess_exec(
        "haproxy", "-db", "-f", str(config), stderr=asyncio.subprocess.PIPE
    )
    try:
        for port in ports.values():
            await _until_listening(process, port)
        yield ports
    finally:
        process.terminate()
        await process.wait()
    assert process.stderr is not None
    said = (await process.stderr.read()).decode()
    assert " is DOWN" not in said, said  # the gateway passed every health check


async def _until_listening(process: asyncio.subprocess.Process, port: int) -> None:
    for _ in range(200):
        if process.returncode is not None:
            assert process.stderr is not None
            pytest.fail((await process.stderr.read()).decode())
        with socket.socket() as probe:  # relayed, the gateway sees a header naming 127.0.0.1
            if probe.connect_ex((HOST, port)) != 0:
                await asyncio.sleep(0.05)
                continue
        return
    pytest.fail(f"haproxy did not listen on {port}")


@pytest.fixture
async def setup(sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[Setup]:
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    serve_without_consent(sandbox, config, tmp_path)
    config["listeners"].update(
        proxy_protocol_from=[HOST],
        preauth_timeout_seconds=PREAUTH,
        max_unauthenticated_per_address=PER_ADDRESS,
    )
    async with (
        running_gateway(config, tmp_path / "config.yaml", sandbox) as gateway,
        haproxy(tmp_path / "haproxy", gateway.ports) as ports,
    ):
        cafile = str(gateway.settings.state_dir / "tls" / "ca.crt")
        yield Setup(gateway, sandbox, ports, cafile)


def _fields(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.getMessage() == event]  # type: ignore[attr-defined]


def _connect(port: int, source: str) -> socket.socket:
    return socket.create_connection((HOST, port), 10, (source, 0))


def _first_line(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while not data.endswith(b"\n") and (chunk := sock.recv(512)):
            data += chunk
    return data


def _rest(sock: socket.socket) -> bytes:
    """Everything until the gateway closes the connection (a reset counts as a close)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


# -- the README's example ---------------------------------------------------------------------


def test_the_readmes_haproxy_cfg_is_valid(tmp_path: Path) -> None:
    """``haproxy -c`` on the README's two-instance haproxy.cfg (its certificate made here)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Behind a TCP load balancer (PROXY protocol)", 1)[1]
    example = section.split("```haproxy\n", 1)[1].split("```", 1)[0]
    assert "send-proxy-v2 check" in example  # the server options the tests below run with
    pair = tls.create_ca_signed_pair(tmp_path, "proxy", "gateway.example.com")
    pem = tmp_path / "gateway.pem"
    pem.write_bytes(pair.cert.read_bytes() + pair.key.read_bytes())
    config = tmp_path / "haproxy.cfg"
    config.write_text(example.replace("/etc/haproxy/gateway.example.com.pem", str(pem)))
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


# -- the client's address reaches the gateway ------------------------------------------------


def _smtp_send(port: int, password: str = PASSWORD) -> int:
    """AUTH PLAIN (one attempt, unlike smtplib's login()) and, if accepted, one message."""
    with smtplib.SMTP(HOST, port, timeout=10, source_address=(CLIENT, 0)) as client:
        client.ehlo("app.test")
        client.user, client.password = "crm", password
        try:
            client.auth("PLAIN", client.auth_plain)
        except smtplib.SMTPAuthenticationError as refused:
            return refused.smtp_code
        client.sendmail("crm@contoso.example", ["a@example.org"], MESSAGE)
        return 250


@pytest.mark.parametrize("frontend", ["smtp_v1", "smtp_v2"])
async def test_smtp_through_haproxy_sees_the_client_address(
    setup: Setup, frontend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """send-proxy (v1) and send-proxy-v2: the login gate, the logs and the Received header
    name 127.0.0.2, the client HAProxy reports, not HAProxy's 127.0.0.1."""
    caplog.set_level(logging.INFO)
    port = setup.haproxy[frontend]
    assert await asyncio.to_thread(_smtp_send, port, "wrong password") == 535
    assert await asyncio.to_thread(_smtp_send, port) == 250
    assert [f["client"] for f in _fields(caplog, "login.failed")] == [CLIENT]
    assert [f["client"] for f in _fields(caplog, "smtp.auth_ok")] == [CLIENT]
    user = setup.sandbox.directory.user(MS_ADDRESS)
    assert user is not None
    for _ in range(400):
        sent = setup.sandbox.ops(user).sent(user)
        if sent:
            break
        await asyncio.sleep(0.05)
    (message,) = sent
    assert b"\r\nReceived: from app.test ([127.0.0.2])\r\n" in message.raw, message.raw[:300]


class _ImapsFrom(imaplib.IMAP4_SSL):
    """IMAPS from a chosen source address, trusting the gateway's own CA."""

    def __init__(self, port: int, source: str, cafile: str) -> None:
        self._source = source
        context = ssl.create_default_context(cafile=cafile)
        context.check_hostname = False  # the certificate names "localhost", we dial 127.0.0.1
        super().__init__(HOST, port, ssl_context=context, timeout=10)

    def _create_socket(self, timeout: float | None) -> socket.socket:  # type: ignore[override]
        sock = socket.create_connection((self.host, self.port), timeout, (self._source, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


@pytest.mark.parametrize("frontend", ["imaps_v1", "imaps_v2"])
async def test_imaps_through_haproxy_sees_the_client_address(
    setup: Setup, frontend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The PROXY header comes before the TLS handshake, which then goes through untouched."""
    caplog.set_level(logging.INFO)

    def session() -> str:
        client = _ImapsFrom(setup.haproxy[frontend], CLIENT, setup.cafile)
        client.login("crm", PASSWORD)
        typ, _ = client.select("INBOX", readonly=True)
        client.logout()
        return typ

    assert await asyncio.to_thread(session) == "OK"
    assert [f["client"] for f in _fields(caplog, "imap.login")] == [CLIENT]


# -- the per-address cap counts per real client ----------------------------------------------


async def test_the_per_address_cap_counts_each_client_behind_haproxy(setup: Setup) -> None:
    """Cap 2: a third idle connection of 127.0.0.2 closes its oldest, while 127.0.0.3's two,
    through the same HAProxy (all from 127.0.0.1 to the gateway's socket), are untouched.
    (HAProxy's health checks count under its own address, 127.0.0.1.)"""
    port = setup.haproxy["smtp_v2"]

    def hold() -> tuple[list[bytes], list[socket.socket]]:
        socks, greetings = [], []
        for source in (CLIENT, OTHER_CLIENT, CLIENT, OTHER_CLIENT, CLIENT):
            sock = _connect(port, source)
            greetings.append(_first_line(sock))
            socks.append(sock)
        return greetings, socks

    greetings, socks = await asyncio.to_thread(hold)
    try:
        assert all(g.startswith(b"220 ") for g in greetings), greetings
        oldest = await asyncio.to_thread(_rest, socks[0])
        assert b"Too many connections from your address" in oldest
        for sock in socks[1:]:  # still open: a NOOP is answered
            sock.sendall(b"NOOP\r\n")
            assert (await asyncio.to_thread(_first_line, sock)).startswith(b"250 ")
    finally:
        for sock in socks:
            sock.close()


# -- who may and who must send a header ------------------------------------------------------


async def test_a_direct_connection_from_haproxys_address_without_a_header_is_closed(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """127.0.0.1 is the load balancer: a program connecting from it directly is closed without
    a greeting, whether it speaks first (IMAPS: its TLS ClientHello) or waits (SMTP, until the
    pre-login deadline), and the log names the peer."""
    caplog.set_level(logging.INFO)
    ports = setup.gateway.ports

    def direct() -> bytes:
        talker = _connect(ports["imaps"], HOST)
        context = ssl.create_default_context(cafile=setup.cafile)
        context.check_hostname = False
        with pytest.raises(OSError):  # ssl.SSLError is one: the gateway closed mid-handshake
            context.wrap_socket(talker, server_hostname=HOST)
        talker.close()
        waiter = _connect(ports["smtp"], HOST)
        waiter.settimeout(PREAUTH + 10)
        said = _rest(waiter)
        waiter.close()
        return said

    assert await asyncio.to_thread(direct) == b""  # closed without a greeting
    refused = _fields(caplog, "connections.proxy_header_refused")
    assert [(f["listener"], f["peer"]) for f in refused] == [("imap", HOST), ("smtp", HOST)]
    assert refused[0]["reason"] == "not a PROXY protocol header"
    assert refused[1]["reason"] == f"no PROXY header within {PREAUTH} s"


async def test_a_header_from_an_address_not_listed_is_a_bad_command(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """127.0.0.2 is no load balancer: its PROXY line is an unknown SMTP command, and the
    address it claims is never used (a failed login is counted against 127.0.0.2)."""
    caplog.set_level(logging.INFO)

    def forge() -> tuple[bytes, bytes, bytes]:
        with _connect(setup.gateway.ports["smtp"], CLIENT) as sock, sock.makefile("rwb") as io:
            greeting = io.readline()
            io.write(b"PROXY TCP4 198.51.100.9 127.0.0.1 4000 25\r\n")
            io.flush()
            answer = io.readline()
            io.write(b"EHLO app.test\r\n")
            io.flush()
            while not (line := io.readline()).startswith(b"250 "):
                assert line.startswith(b"250-"), line
            io.write(b"AUTH PLAIN AGNybQB3cm9uZw==\r\n")  # crm / wrong
            io.flush()
            return greeting, answer, io.readline()

    greeting, answer, refused = await asyncio.to_thread(forge)
    assert greeting.startswith(b"220 ")
    assert answer.startswith(b"500 "), answer
    assert refused.startswith(b"535 "), refused
    assert [f["client"] for f in _fields(caplog, "login.failed")] == [CLIENT]
    assert _fields(caplog, "connections.proxy_header_refused") == []
