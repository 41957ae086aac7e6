"""The PROXY protocol: v1/v2 parsing, the reader that takes no byte past the header, and the
accept loop placing a load balancer's connection under the client address its header names."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from gateway.acceptor import Acceptor
from gateway.admission import Admission, ConnectionLimits, IncidentLog, LoadBalancers, size_caps
from gateway.config import ConfigError, load_settings
from gateway.proxy_protocol import (
    V2_SIGNATURE,
    HeaderReader,
    ProxyHeader,
    ProxyHeaderError,
    header_length,
    parse,
)
from tests.helpers import base_config

V1_TCP4 = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 2525\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 2993\r\n"
V1_WORST = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"


def v2(command: int, family: int, block: bytes, length: int | None = None) -> bytes:
    """A v2 header: version 2 with ``command``, ``family`` (family << 4 | transport)."""
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", size) + block


def v2_tcp4(source: str, tlvs: bytes = b"") -> bytes:
    block = ipaddress.IPv4Address(source).packed + bytes([198, 51, 100, 1])
    return v2(1, 0x11, block + struct.pack("!HH", 56324, 2525) + tlvs)


def v2_tcp6(source: str) -> bytes:
    block = ipaddress.IPv6Address(source).packed + ipaddress.IPv6Address("2001:db8::1").packed
    return v2(1, 0x21, block + struct.pack("!HH", 56324, 2993))


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (V1_TCP4, "192.0.2.7"),
        (V1_TCP6, "2001:db8::7"),
        (b"PROXY TCP6 ::ffff:192.0.2.9 ::1 1 2\r\n", "192.0.2.9"),  # IPv4 relayed over IPv6
        (b"PROXY UNKNOWN\r\n", None),
        (V1_WORST, None),  # the spec's longest line, 107 bytes
        (v2_tcp4("192.0.2.7"), "192.0.2.7"),
        (v2_tcp4("192.0.2.7", tlvs=b"\x04\x00\x03abc"), "192.0.2.7"),  # a NOOP TLV is skipped
        (v2_tcp6("2001:db8::7"), "2001:db8::7"),
        (v2(0, 0x00, b""), None),  # LOCAL: a health check
        (v2(0, 0x11, bytes(12)), None),  # LOCAL ignores whatever address block comes with it
        (v2(1, 0x00, b""), None),  # PROXY of an unspecified family: the real endpoints stand
        (v2(1, 0x31, bytes(216)), None),  # a UNIX socket client: no address to count
    ],
)
def test_valid_headers_are_measured_then_parsed(header: bytes, client: str | None) -> None:
    assert len(V1_WORST) == 107
    assert header_length(header + b"\x16\x03\x01 the client's own bytes") == len(header)
    assert parse(header) == ProxyHeader(1 if header.startswith(b"PROXY") else 2, client)


@pytest.mark.parametrize(
    "header",
    [V1_TCP4, V1_TCP6, v2_tcp4("192.0.2.7"), v2_tcp6("2001:db8::7"), v2(0, 0x00, b"")],
)
def test_a_truncated_header_cannot_be_measured_yet(header: bytes) -> None:
    """Until the length is known every byte seen belongs to the header (the reader takes
    them); a v2 header's length is known from its 16th byte on."""
    for end in range(len(header)):
        length = header_length(header[:end])
        assert length is None or (end >= 16 and length == len(header))
        with pytest.raises(ProxyHeaderError):
            parse(header[:end])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"EHLO client.example\r\n", "not a PROXY protocol header"),
        (b"a1 LOGIN user pass\r\n", "not a PROXY protocol header"),
        (b"\x16\x03\x01\x02\x00", "not a PROXY protocol header"),  # a TLS ClientHello
        (b"PROXY\r\n", "not a PROXY protocol header"),
        (b"\r\n\r\n\x00\r\nQUIX\n", "bad v2 signature"),
        (b"\r\n\r\nHELO", "bad v2 signature"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c", "version 1"),
        (b"PROXY UNKNOWN " + b"x" * 100, "without CRLF in its first 107 bytes"),
        (V1_WORST[:-2] + b"f\r\n", "without CRLF in its first 107 bytes"),  # 108 bytes
        (v2(1, 0x11, b"", length=521), "of 537 bytes; at most 536"),
    ],
)
def test_bad_signature_and_oversized_headers_are_refused_early(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=reason):
        header_length(data)


def test_the_largest_v2_header_allowed_is_536_bytes() -> None:
    header = v2_tcp4("192.0.2.7", tlvs=b"\x04" + struct.pack("!H", 505) + bytes(505))
    assert len(header) == 536
    assert header_length(header) == 536 and parse(header).client == "192.0.2.7"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n", "not 'PROXY TCP4|TCP6"),
        (b"PROXY TCP5 192.0.2.7 198.51.100.1 1 2\r\n", "not 'PROXY TCP4|TCP6"),
        (b"PROXY  TCP4 192.0.2.7 198.51.100.1 1 2\r\n", "not 'PROXY TCP4|TCP6"),  # two spaces
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2 \r\n", "not 'PROXY TCP4|TCP6"),
        (b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP6 192.0.2.7 2001:db8::1 1 2\r\n", "not an IPv6 address"),
        (b"PROXY TCP4 192.0.2.07 198.51.100.1 1 2\r\n", "not an IPv4 address"),  # octal?
        (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 2\r\n", "not an IPv6 address"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 065 2\r\n", "port '065'"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n", "port '65536'"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 +2\r\n", "port '\\+2'"),
        (b"PROXY TCP4 192.0.2.7\r198.51.100.1 1 2\r\n", "one line ending in CRLF"),
        (b"PROXY TCP4 192.0.2.\xe9 198.51.100.1 1 2\r\n", "not US-ASCII"),
        (v2(2, 0x11, bytes(12)), "unknown command 2"),
        (v2(1, 0x41, bytes(12)), "unknown family/transport 0x41"),
        (v2(1, 0x13, bytes(12)), "unknown family/transport 0x13"),
        (v2(1, 0x11, bytes(8)), "address block of 8 bytes; needs 12"),
        (v2(1, 0x21, bytes(12)), "address block of 12 bytes; needs 36"),
        (v2(1, 0x11, bytes(12), length=13), "announces 13 bytes, carries 12"),
    ],
)
def test_malformed_headers_are_refused(header: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=reason):
        parse(header)


# -- which peers must send one ---------------------------------------------------------------


def test_load_balancers_match_addresses_networks_and_mapped_ipv4() -> None:
    balancers = LoadBalancers(("127.0.0.1", "10.0.0.0/8", "2001:db8::/32"))
    assert balancers.include("127.0.0.1") and balancers.include("10.200.0.3")
    assert balancers.include("::ffff:10.1.2.3")  # a dual-stack listener's view of IPv4
    assert balancers.include("2001:db8::5")
    assert not balancers.include("127.0.0.2") and not balancers.include("192.0.2.1")
    assert not LoadBalancers().include("127.0.0.1") and not LoadBalancers()


def test_config_names_the_key_and_the_fix_for_a_bad_network(write_config, tmp_path: Path) -> None:
    config = base_config(tmp_path / "state")
    config["listeners"]["proxy_protocol_from"] = ["127.0.0.1", "10.0.0.1/8"]
    with pytest.raises(ConfigError) as raised:
        load_settings(write_config(config), environ={})
    (problem,) = raised.value.problems
    assert problem.key == "listeners.proxy_protocol_from"
    assert "'10.0.0.1/8' is not an IP address or network" in problem.message
    assert "host bits set" in problem.message and "10.0.0.0/8" in problem.fix
    config["listeners"]["proxy_protocol_from"] = ["127.0.0.1", "10.0.0.0/8", "::1"]
    loaded = load_settings(write_config(config), environ={})
    assert loaded.listeners.proxy_protocol_from == ("127.0.0.1", "10.0.0.0/8", "::1")
    assert load_settings(write_config(), environ={}).listeners.proxy_protocol_from == ()


# -- the reader over a real socket -----------------------------------------------------------


async def _until(condition: Any) -> None:
    """Wait (up to 10 s) for a condition the event loop brings about, however fast it runs."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in 10 s")


def _nothing_pending(sock: socket.socket) -> bool:
    try:
        return not sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True


async def _read_header(feed: list[bytes]) -> tuple[ProxyHeader | str, bytes]:
    """Send ``feed`` piece by piece, each once the reader took the previous one; what the
    reader reported, and what it left in the socket."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    outcome: asyncio.Future[ProxyHeader | str] = asyncio.get_running_loop().create_future()
    reader = HeaderReader(ours, outcome.set_result, outcome.set_result)
    reader.start()
    try:
        for piece in feed[:-1]:
            theirs.sendall(piece)
            await _until(lambda: outcome.done() or _nothing_pending(ours))
        theirs.sendall(feed[-1])
        theirs.shutdown(socket.SHUT_WR)
        result = await asyncio.wait_for(outcome, 10)
        ours.setblocking(True)
        rest = b"".join(iter(lambda: ours.recv(4096), b""))
        return result, rest
    finally:
        reader.stop()
        ours.close()
        theirs.close()


async def test_the_reader_leaves_the_clients_own_bytes_in_the_socket() -> None:
    hello = b"\x16\x03\x01\x00\xc8 a TLS ClientHello"
    assert await _read_header([V1_TCP4 + hello]) == (ProxyHeader(1, "192.0.2.7"), hello)
    assert await _read_header([v2_tcp6("2001:db8::7") + hello]) == (
        ProxyHeader(2, "2001:db8::7"),
        hello,
    )


async def test_the_reader_accepts_a_header_split_over_segments() -> None:
    header = v2_tcp4("192.0.2.7")
    pieces = [header[:3], header[3:15], header[15:20], header[20:] + b"EHLO"]
    assert await _read_header(pieces) == (ProxyHeader(2, "192.0.2.7"), b"EHLO")
    pieces = [b"PRO", V1_TCP6[3:30], V1_TCP6[30:-1], b"\n" + b"a1 CAPABILITY\r\n"]
    assert await _read_header(pieces) == (ProxyHeader(1, "2001:db8::7"), b"a1 CAPABILITY\r\n")


async def test_the_reader_refuses_garbage_and_an_early_close() -> None:
    failure, _ = await _read_header([b"EHLO client.example\r\n"])
    assert failure == "not a PROXY protocol header"
    failure, _ = await _read_header([V1_TCP4[:20]])
    assert failure == "connection closed before a complete PROXY header"
    failure, _ = await _read_header([b"PROXY UNKNOWN ", b"x" * 100])
    assert failure == "v1 header without CRLF in its first 107 bytes"


# -- the accept loop -------------------------------------------------------------------------


class _Timers:
    """Deadlines that fire only when told: no wall clock."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def __call__(self, seconds: float, callback: Any) -> Any:
        self.callbacks.append(callback)
        return asyncio.get_running_loop().call_later(3600, lambda: None)

    def fire_all(self) -> None:
        for callback in self.callbacks:
            callback()


class _Incidents(IncidentLog):
    def __init__(self) -> None:
        super().__init__()
        self.noted: list[tuple[str, dict[str, Any]]] = []

    def note(self, event: str, key: str, **fields: Any) -> None:
        self.noted.append((event, fields))


class _Listener:
    """An acceptor on 127.0.0.1 that trusts 127.0.0.1 as its load balancer; what it hands over."""

    def __init__(self, per_address: int = 20, proxy_protocol: bool = True) -> None:
        self.timers = _Timers()
        self.incidents = _Incidents()
        self.limits = ConnectionLimits(
            size_caps(1024, per_address, 30),
            schedule=self.timers,
            incidents=self.incidents,
            load_balancers=LoadBalancers(("127.0.0.1",)),
        )
        self.handed: asyncio.Queue[tuple[socket.socket, Admission]] = asyncio.Queue()
        listening = socket.create_server(("127.0.0.1", 0))
        refusals = {"address": b"421 too many from your address\r\n"}
        self.acceptor = Acceptor(
            "smtp",
            listening,
            self.limits,
            refusals,
            lambda conn, admission: self.handed.put_nowait((conn, admission)),
            proxy_protocol,
        )
        self.acceptor.start()

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        return socket.create_connection(self.acceptor.address, 10, (source, 0))

    async def next(self) -> tuple[socket.socket, Admission]:
        return await asyncio.wait_for(self.handed.get(), 10)


async def _closed(sock: socket.socket) -> bytes:
    """What the gateway said before closing the connection (waits for the close)."""

    def read() -> bytes:
        said = b""
        try:
            while chunk := sock.recv(4096):
                said += chunk
        except ConnectionResetError:  # closed with the client's bytes unread: a reset
            pass
        return said

    return await asyncio.to_thread(read)


async def test_a_load_balancers_connection_is_counted_under_the_client_it_names() -> None:
    listener = _Listener(per_address=1)
    try:
        client = listener.connect()
        client.sendall(V1_TCP4 + b"EHLO")
        conn, admission = await listener.next()
        assert admission.address == "192.0.2.7" and admission.placed
        assert conn.recv(16) == b"EHLO"  # the header is gone, the client's bytes are not
        # Another client through the same balancer has a share of its own...
        other = listener.connect()
        other.sendall(v2_tcp4("192.0.2.8"))
        _, second = await listener.next()
        assert second.address == "192.0.2.8"
        # ...while the same client again is over its cap of 1: its first connection cannot be
        # closed to make room (no protocol attached), so the newcomer is refused.
        again = listener.connect()
        again.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 5 2525\r\n")
        assert await _closed(again) == b"421 too many from your address\r\n"
        assert listener.limits.unauthenticated == 2
        for sock in (client, other, again, conn):
            sock.close()
    finally:
        listener.acceptor.close()


async def test_unknown_and_local_keep_the_balancers_own_address() -> None:
    listener = _Listener()
    try:
        for header in (b"PROXY UNKNOWN\r\n", v2(0, 0x00, b"")):
            listener.connect().sendall(header)
            _, admission = await listener.next()
            assert admission.address == "127.0.0.1"
    finally:
        listener.acceptor.close()


async def test_a_balancer_address_without_a_valid_header_is_closed_and_logged() -> None:
    listener = _Listener()
    try:
        direct = listener.connect()
        direct.sendall(b"EHLO client.example\r\n")  # a program connecting directly
        assert await _closed(direct) == b""
        silent = listener.connect()  # a client waiting for the greeting: the deadline
        await _until(lambda: listener.limits.unauthenticated == 1)
        listener.timers.fire_all()
        assert await _closed(silent) == b""
        refused = [f for event, f in listener.incidents.noted if event.endswith("header_refused")]
        assert [f["reason"] for f in refused] == [
            "not a PROXY protocol header",
            "no PROXY header within 30 s",
        ]
        assert all(f["peer"] == "127.0.0.1" for f in refused)
        assert listener.limits.unauthenticated == 0 and listener.handed.empty()
    finally:
        listener.acceptor.close()


async def test_other_peers_and_listeners_without_the_protocol_are_handed_over_as_they_are() -> None:
    """A header from an address not in the list is the client's own bytes: the protocol sees
    it (as a bad command), and it names nobody. The admin page never reads one."""
    for source, proxy_protocol in (("127.0.0.2", True), ("127.0.0.1", False)):
        listener = _Listener(proxy_protocol=proxy_protocol)
        try:
            client = listener.connect(source)
            client.sendall(V1_TCP4)
            conn, admission = await listener.next()
            assert admission.address == source
            assert conn.recv(len(V1_TCP4)) == V1_TCP4
            client.close()
            conn.close()
        finally:
            listener.acceptor.close()


async def test_closing_the_listener_closes_connections_still_awaiting_their_header() -> None:
    listener = _Listener()
    waiting = listener.connect()
    waiting.sendall(b"PROXY TCP4 ")
    await _until(lambda: listener.limits.unauthenticated == 1)
    listener.acceptor.close()
    assert await _closed(waiting) == b""
    assert listener.limits.unauthenticated == 0
