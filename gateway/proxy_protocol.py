"""The PROXY protocol (v1 text and v2 binary): which client a load balancer's connection is for.

Behind a TCP load balancer every connection comes from the balancer's address, so the login
gate, the per-address connection cap and the logs would all see one client. HAProxy with
``send-proxy`` / ``send-proxy-v2`` starts each connection with a header naming the client.
The format is HAProxy's "The PROXY protocol" (https://www.haproxy.org/download/2.9/doc/
proxy-protocol.txt; Debian ships it as /usr/share/doc/haproxy/proxy-protocol.txt.gz).

:func:`header_length` says how long the header at the start of a stream is as soon as that can
be told, so :class:`HeaderReader` never takes a byte past it: what follows is the client's own
(on SMTPS, IMAPS and POP3S the TLS ClientHello), left in the socket for the protocol. The spec
allows a receiver to be tolerant of a header split over several segments and recommends it; the
reader is.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

# The spec's worst case for v1, "PROXY UNKNOWN <IPv6> <IPv6> 65535 65535\r\n" (section 2.1).
V1_MAX_LENGTH = 107
# Both formats are designed to fit the smallest segment every TCP host must accept, 536 bytes
# (section 2): a longer v2 header (address block plus TLVs) is refused.
V2_MAX_LENGTH = 536
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version and command, family and transport, length
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")  # decimal without leading zeroes (section 2.1)
_V1_FAMILIES = {"TCP4": 4, "TCP6": 6}
_V2_FAMILY_SIZES = {1: 4, 2: 16}  # AF_INET, AF_INET6: bytes per address
_V2_LOCAL, _V2_PROXY = 0, 1
_V2_STREAM = 1


class ProxyHeaderError(ValueError):
    """Not a valid PROXY header (the sentence says why): the connection is to be closed."""


@dataclass(frozen=True)
class ProxyHeader:
    """A decoded header. ``client`` is the address of the client the balancer relays, or None
    when the header names none (v1 ``UNKNOWN``, v2 ``LOCAL`` such as a health check, or a
    family other than TCP over IPv4/IPv6): then the connection's own peer address stands."""

    version: int
    client: str | None


def header_length(data: bytes) -> int | None:
    """The length of the PROXY header at the start of ``data`` (a stream's first bytes), or
    None while that cannot be told yet: every byte of ``data`` then belongs to the header.

    Raises :class:`ProxyHeaderError` when ``data`` cannot start a header, or starts one longer
    than the spec allows."""
    if data[:1] == V2_SIGNATURE[:1]:
        if not V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
            raise ProxyHeaderError("not a PROXY protocol header (bad v2 signature)")
        if len(data) < _V2_FIXED:
            return None
        _check_v2_version(data[12])
        length = _V2_FIXED + int.from_bytes(data[14:16], "big")
        if length > V2_MAX_LENGTH:
            raise ProxyHeaderError(f"v2 header of {length} bytes; at most {V2_MAX_LENGTH}")
        return length
    if not V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
        raise ProxyHeaderError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end >= 0:
        return end + 2
    if len(data) >= V1_MAX_LENGTH:
        raise ProxyHeaderError(f"v1 header without CRLF in its first {V1_MAX_LENGTH} bytes")
    return None


def parse(header: bytes) -> ProxyHeader:
    """Decode one complete header (exactly the bytes :func:`header_length` measured)."""
    if header.startswith(V2_SIGNATURE):
        return _parse_v2(header)
    if header.startswith(V1_PREFIX):
        return _parse_v1(header)
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(header: bytes) -> ProxyHeader:
    line = header[:-2]
    if not header.endswith(b"\r\n") or b"\r" in line or b"\n" in line:
        raise ProxyHeaderError("v1 header must be one line ending in CRLF")
    if len(header) > V1_MAX_LENGTH:
        raise ProxyHeaderError(f"v1 header of {len(header)} bytes; at most {V1_MAX_LENGTH}")
    try:
        parts = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not US-ASCII") from None
    if parts[1:2] == ["UNKNOWN"]:  # the receiver must ignore the rest of the line
        return ProxyHeader(1, None)
    if len(parts) != 6 or parts[1] not in _V1_FAMILIES:
        raise ProxyHeaderError("v1 header is not 'PROXY TCP4|TCP6 source destination ports'")
    _, family, source, destination, source_port, destination_port = parts
    version = _V1_FAMILIES[family]
    client = _v1_address(source, version)
    _v1_address(destination, version)
    for port in (source_port, destination_port):
        if not _PORT.fullmatch(port) or int(port) > 65535:
            raise ProxyHeaderError(f"v1 header port {port!r} is not 0-65535 (no leading zeroes)")
    return ProxyHeader(1, _client_text(client))


def _v1_address(text: str, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(text)  # refuses IPv4 leading zeroes (octal confusion)
    except ValueError:
        address = None
    if address is None or address.version != version or "%" in text:
        raise ProxyHeaderError(f"v1 header address {text!r} is not an IPv{version} address")
    return address


def _check_v2_version(version_command: int) -> None:
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 header with version {version_command >> 4}; only 2 exists")


def _parse_v2(header: bytes) -> ProxyHeader:
    if len(header) < _V2_FIXED:
        raise ProxyHeaderError("v2 header shorter than its 16 fixed bytes")
    _check_v2_version(header[12])
    command = header[12] & 0x0F
    length = int.from_bytes(header[14:16], "big")
    if len(header) != _V2_FIXED + length:
        raise ProxyHeaderError(f"v2 header announces {length} bytes, carries {len(header) - 16}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(f"v2 header with unknown command {command}")
    family, transport = header[13] >> 4, header[13] & 0x0F
    if family > 3 or transport > 2:  # UNSPEC, INET, INET6, UNIX; UNSPEC, STREAM, DGRAM
        raise ProxyHeaderError(f"v2 header with unknown family/transport 0x{header[13]:02x}")
    size = _V2_FAMILY_SIZES.get(family)
    if command == _V2_LOCAL or size is None or transport != _V2_STREAM:
        # LOCAL (a health check): the real endpoints stand. UNSPEC, UNIX or DGRAM: the spec
        # lets a receiver fall back to the UNSPEC mode, which keeps the real endpoints too.
        return ProxyHeader(2, None)
    if length < 2 * size + 4:
        raise ProxyHeaderError(f"v2 address block of {length} bytes; needs {2 * size + 4}")
    source = ipaddress.ip_address(header[_V2_FIXED : _V2_FIXED + size])
    return ProxyHeader(2, _client_text(source))


def _client_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An IPv4 client relayed over IPv6 (``::ffff:192.0.2.1``) counts as its IPv4 address, as
    the direct connection of the same client would."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class HeaderReader:
    """Reads the PROXY header off a just-accepted non-blocking socket, taking no byte past it.

    Each time the socket is readable it peeks, then takes what certainly belongs to the header
    (everything seen, until the header's end is known), so a partial header never makes the
    loop spin. Calls ``done(header)`` once it is complete and valid, or ``failed(reason)`` (a
    bad or oversized header, or the peer closing first); after either the reader is stopped.
    The socket stays the caller's to close.
    """

    def __init__(
        self,
        sock: socket.socket,
        done: Callable[[ProxyHeader], None],
        failed: Callable[[str], None],
    ) -> None:
        self._sock = sock
        self._done = done
        self._failed = failed
        self._taken = b""
        self._loop = asyncio.get_running_loop()
        self._reading = False

    def start(self) -> None:
        self._reading = True
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def stop(self) -> None:
        """Stop watching the socket (idempotent)."""
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._sock.fileno())

    def _readable(self) -> None:
        try:
            seen = self._taken + self._sock.recv(V2_MAX_LENGTH - len(self._taken), socket.MSG_PEEK)
            if len(seen) == len(self._taken):
                raise ProxyHeaderError("connection closed before a complete PROXY header")
            end = header_length(seen)
            self._taken += self._sock.recv((len(seen) if end is None else end) - len(self._taken))
            if end is None or len(self._taken) < end:
                return
            header = parse(self._taken)
        except (BlockingIOError, InterruptedError):
            return
        except (ProxyHeaderError, OSError) as error:
            self.stop()
            self._failed(str(error))
            return
        self.stop()
        self._done(header)
