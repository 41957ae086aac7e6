"""Connection caps an idle holder cannot turn against others (issue 11, point 3), on real sockets.

Every program on the machine connects from 127.0.0.1; Linux routes all of 127/8 to lo, so a
client that binds 127.0.0.2 before connecting is "another address" while the gateway still listens
on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import os
import poplib
import resource
import select
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from mailgw_sandbox import Sandbox
from tests.helpers import (
    PASSWORD,
    base_config,
    free_port,
    running_gateway,
    sandbox_config,
    serve_without_consent,
)

HOST = "127.0.0.1"
OTHER = "127.0.0.2"
PREAUTH = 2  # listeners.preauth_timeout_seconds in these tests
PLAIN = ("smtp", "imap", "pop3")
MESSAGE = b"From: crm@contoso.example\r\nTo: a@example.org\r\nSubject: hi\r\n\r\nx\r\n"


def _raise_own_file_limit() -> None:
    """This test process holds a thousand client sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 8192):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))


def _connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect((HOST, port))
    return sock


class _ImapFrom(imaplib.IMAP4):
    def _create_socket(self, timeout: float | None) -> socket.socket:  # type: ignore[override]
        return socket.create_connection((self.host, self.port), timeout, (OTHER, 0))


class _PopFrom(poplib.POP3):
    def _create_socket(self, timeout: float) -> socket.socket:  # type: ignore[override]
        return socket.create_connection((self.host, self.port), timeout, (OTHER, 0))


def _first_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        data += chunk
    return data


def _hold(ports: dict[str, int], count: int) -> tuple[list[socket.socket], dict[str, list[bytes]]]:
    """``count`` idle sockets per plain listener from 127.0.0.1; each one's first line."""
    held, first = [], {}
    for kind in PLAIN:
        socks = [_connect_from(HOST, ports[kind]) for _ in range(count)]
        first[kind] = [_first_line(sock) for sock in socks]
        held.extend(socks)
    return held, first


def _told(socks: list[socket.socket]) -> list[tuple[int, bytes]]:
    """(index, rest up to EOF) of each socket the server has closed; open ones are left out."""
    readable, _, _ = select.select(socks, [], [], 2.0)
    told = []
    for sock in readable:
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(512):
                data += chunk
        told.append((socks.index(sock), data))
    return told


def _programs(ports: dict[str, int], source: str) -> tuple:
    """A legacy program's round from ``source``: SMTP login and send, IMAP login and SELECT,
    POP3 login and STAT."""
    with smtplib.SMTP(HOST, ports["smtp"], timeout=10, source_address=(source, 0)) as smtp:
        smtp.login("crm", PASSWORD)
        sent = smtp.sendmail("crm@contoso.example", ["a@example.org"], MESSAGE)
    imap = (_ImapFrom if source == OTHER else imaplib.IMAP4)(HOST, ports["imap"], timeout=10)
    imap.login("crm", PASSWORD)
    selected = imap.select("INBOX", readonly=True)[0]
    imap.logout()
    pop = (_PopFrom if source == OTHER else poplib.POP3)(HOST, ports["pop3"], timeout=10)
    pop.user("scanner")
    pop.pass_(PASSWORD)
    stat = pop.stat()
    pop.quit()
    return sent, selected, stat


async def test_idle_sockets_from_one_address_do_not_stop_another(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """200 idle sockets per protocol from 127.0.0.1: past the per-address cap (20) each new one
    closes the oldest idle one, with the protocol's goodbye, so a program from 127.0.0.2 and
    one from 127.0.0.1 itself still send and read at once."""
    _raise_own_file_limit()
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    serve_without_consent(sandbox, config, tmp_path)
    config["listeners"]["preauth_timeout_seconds"] = 60  # the holders stay for the whole test
    async with running_gateway(config, tmp_path / "config.yaml", sandbox) as gateway:
        held, first = await asyncio.to_thread(_hold, gateway.ports, 200)
        try:
            for n, kind in enumerate(PLAIN):
                # Past the cap each newcomer closed the oldest idle one (or, arriving before any
                # could be closed, was refused): 20 stay open, and every other one was told why.
                socks = held[n * 200 : (n + 1) * 200]
                closed = await asyncio.to_thread(_told, socks)
                told = [first[kind][i] + rest for i, rest in closed]
                assert len(told) == 200 - 20, kind
                assert all(b"Too many connections from your address" in t for t in told), kind
            for source in (OTHER, HOST):
                sent, selected, stat = await asyncio.to_thread(_programs, gateway.ports, source)
                assert sent == {} and selected == "OK" and stat[0] >= 0, source
        finally:
            for sock in held:
                sock.close()


def _dribble(port: int, start_byte: bytes) -> tuple[bytes, float]:
    """Send one byte every half second, never a full line; return all received and when EOF."""
    sock = _connect_from("127.0.0.3", port)
    started = time.monotonic()
    received = b""
    sock.settimeout(0.5)
    try:
        while time.monotonic() - started < 15:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                sock.send(start_byte)
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    return received, time.monotonic() - started


async def test_a_byte_dribbling_client_is_closed_at_the_preauth_deadline(
    write_config, tmp_path: Path
) -> None:
    from gateway.app import Gateway
    from gateway.config import load_settings

    config = base_config(tmp_path / "state")
    config["listeners"]["preauth_timeout_seconds"] = PREAUTH
    gateway = Gateway(load_settings(write_config(config)))
    await gateway.start()
    try:
        outcomes = await asyncio.gather(
            *(asyncio.to_thread(_dribble, gateway.ports[kind], b"N") for kind in PLAIN)
        )
    finally:
        await gateway.stop()
    goodbyes = dict(zip(PLAIN, outcomes, strict=True))
    for kind, (received, seconds) in goodbyes.items():
        assert seconds < 10, (kind, received)  # the idle timers alone would wait 60-300 s
    assert b"421 4.4.2 Timeout: no login within 2 seconds" in goodbyes["smtp"][0]
    assert b"* BYE Timeout: no login within 2 seconds" in goodbyes["imap"][0]
    assert b"-ERR Timeout: no login within 2 seconds" in goodbyes["pop3"][0]


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def _flood(ports: dict[str, int], total: int) -> list[socket.socket]:
    """``total`` idle sockets over every plain listener and the admin page, 10 per source
    address (127.0.1.x), so the total cap is what they meet, not the per-address one."""
    kinds = ("smtp", "imap", "pop3", "admin")
    held = []
    for n in range(total):
        source = f"127.0.1.{1 + n // 10}" if n // 10 < 250 else f"127.0.2.{n // 10 - 249}"
        # A full backlog refuses the connection: that is what a flood should meet.
        with contextlib.suppress(OSError):
            held.append(_connect_from(source, ports[kinds[n % 4]]))
    return held


def test_1100_idle_sockets_under_ulimit_1024(tmp_path: Path) -> None:
    _raise_own_file_limit()
    ports = {name: free_port() for name in ("smtp", "imap", "pop3", "admin")}
    config = base_config(tmp_path / "state")
    config["listeners"] = {
        **{f"{name}_port": None for name in ("smtps", "imaps", "pop3s")},
        **{f"{name}_port": port for name, port in ports.items()},
        "preauth_timeout_seconds": PREAUTH,
    }
    config["logging"] = {"level": "info"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            preexec_fn=_limit_files,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        _wait_for_health(ports["admin"], proc, log_path)
        # A program that logged in before the flood keeps its session throughout.
        early = smtplib.SMTP(HOST, ports["smtp"], timeout=10, source_address=(OTHER, 0))
        early.login("crm", PASSWORD)
        held = _flood(ports, 1100)
        try:
            assert early.noop()[0] == 250
            time.sleep(PREAUTH + 1)  # the held unauthenticated sockets reach their deadline
            with smtplib.SMTP(HOST, ports["smtp"], timeout=10, source_address=(OTHER, 0)) as smtp:
                assert smtp.login("crm", PASSWORD)[0] == 235
            imap = _ImapFrom(HOST, ports["imap"], timeout=10)
            assert imap.capability()[0] == "OK"
            imap.logout()
            pop = _PopFrom(HOST, ports["pop3"], timeout=10)
            assert pop.getwelcome().startswith(b"+OK")
            pop.quit()
            assert httpx.get(f"http://{HOST}:{ports['admin']}/healthz", timeout=10).is_success
            assert early.noop()[0] == 250
        finally:
            for sock in held:
                sock.close()
            early.close()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    log = log_path.read_text()
    lines = log.splitlines()
    assert len(lines) < 100, log[-3000:]
    assert "Traceback" not in log
    assert "connections.limits" in log and "open_files=1024" in log
    assert "connections.refused" in log


def _wait_for_health(port: int, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(f"http://{HOST}:{port}/healthz", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"gateway did not come up:\n{log_path.read_text()}")


_EMFILE_PROBE = """
import asyncio, os, resource, socket, sys
from gateway.logs import configure_logging
from gateway.acceptor import Acceptor, listening_socket
from gateway.admission import ConnectionLimits, size_caps

configure_logging("info")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
served = []

async def main():
    limits = ConnectionLimits(size_caps(100000, 1000, 60))
    sock = listening_socket("127.0.0.1", 0)
    def hand_over(conn, admission):
        conn.send(b"hello\\r\\n")
        served.append(conn)
    acceptor = Acceptor("probe", sock, limits, {}, hand_over)
    acceptor.start()
    filler = []
    while True:  # use up every descriptor
        try:
            filler.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            break
    print(acceptor.address[1], flush=True)
    await asyncio.sleep(3)  # clients knock meanwhile: accept fails with EMFILE
    for fd in filler[:20]:
        os.close(fd)
    await asyncio.sleep(2)
    print("served", len(served), flush=True)

asyncio.run(main())
"""


def test_out_of_files_pauses_accepting_with_one_log_line(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _EMFILE_PROBE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    clients = [socket.create_connection((HOST, port), timeout=10) for _ in range(10)]
    try:
        greetings = [client.recv(100) for client in clients]
    finally:
        for client in clients:
            client.close()
    out, err = proc.communicate(timeout=30)
    assert greetings == [b"hello\r\n"] * 10
    assert "served 10" in out
    assert err.count("listener.accept_paused") == 1, err
    assert "Traceback" not in err and "out of system resource" not in err
