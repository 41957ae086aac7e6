"""Our own accept loop, used by every listener: admission first, and calm when out of files.

asyncio's loop (``selector_events._accept_connection``) reports EMFILE through the loop's
exception handler with a traceback per attempt and retries after a second, and Twisted's
``tcp.Port`` logs each connection it closes during its EMFILE recovery; with 1,100 idle sockets
that made 72 MB of log in 50 s. Here one accept loop serves asyncio and Twisted listeners alike:
it asks :class:`~gateway.admission.ConnectionLimits` before any protocol is built (over-cap
connections get the protocol's one-line refusal and are closed at once), and on EMFILE/ENFILE it
stops reading the listening socket for :data:`PAUSE_SECONDS`, logging one line per incident.

On a listener that speaks the PROXY protocol (SMTP, IMAP and POP3, plain and implicit TLS, not the
admin page), a connection from one of ``listeners.proxy_protocol_from`` must start with a PROXY
header: it is read here, under the pre-login deadline and before any greeting or TLS handshake,
and the client address it names is the connection's address from then on (the per-address cap,
the login gate, the logs, the Received header). A connection from any other address is handed
over as it is: a header it sends is then a bad command to the protocol, never trusted.
"""

from __future__ import annotations

import asyncio
import errno
import resource
import socket
from collections.abc import Callable

from .admission import Admission, ConnectionLimits, IncidentLog, LoadBalancers
from .logs import get_logger
from .proxy_protocol import HeaderReader, ProxyHeader

log = get_logger(__name__)

PAUSE_SECONDS = 1.0
BATCH = 64  # accepts per readiness event, so one busy listener cannot starve the loop
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_GONE_BEFORE_ACCEPT = {errno.ECONNABORTED, errno.EPERM, errno.EPROTO}

# hand_over(connected non-blocking socket, admission): give it to a protocol; the socket is the
# callee's to close from then on.
HandOver = Callable[[socket.socket, Admission], None]


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # an unlimited hard limit above the kernel's nr_open
            target = soft
    return soft, max(soft, target)


class Acceptor:
    """Accepts on one listening socket and hands admitted connections over."""

    def __init__(
        self,
        kind: str,
        sock: socket.socket,
        limits: ConnectionLimits,
        refusals: dict[str, bytes],
        hand_over: HandOver,
        proxy_protocol: bool = False,
    ) -> None:
        self.kind = kind
        self._sock = sock
        self._limits = limits
        self._refusals = refusals  # admission refusal reason -> bytes sent before closing
        self._hand_over = hand_over
        # Whose connections begin with a PROXY header: nobody's on a listener without it.
        self._load_balancers = limits.load_balancers if proxy_protocol else LoadBalancers()
        # Connections still reading their PROXY header -> how to close one.
        self._awaiting_header: dict[socket.socket, Callable[[], None]] = {}
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        sock.setblocking(False)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def incidents(self) -> IncidentLog:
        return self._limits.incidents

    def start(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._accept_ready)

    def close(self) -> None:
        """Stop accepting, close the listening socket and the connections still waiting for
        their PROXY header (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for abandon in list(self._awaiting_header.values()):
            abandon()

    def _accept_ready(self) -> None:
        for _ in range(BATCH):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _GONE_BEFORE_ACCEPT:
                    continue
                self._pause(error)
                return
            address = str(peer[0])
            if self._load_balancers.include(address):
                self._read_proxy_header(conn, address)
            else:
                self._admit(conn, address)

    def _admit(self, conn: socket.socket, address: str) -> None:
        admission = self._limits.admit(self.kind, address)
        if isinstance(admission, str):
            _refuse(conn, self._refusals.get(admission, b""))
            return
        self._start(conn, admission)

    def _read_proxy_header(self, conn: socket.socket, load_balancer: str) -> None:
        """Admit the connection unplaced and read its header; a bad header, or none by the
        pre-login deadline, closes it with a log line naming the peer."""
        admission = self._limits.admit_unplaced(self.kind, load_balancer)
        if isinstance(admission, str):
            _refuse(conn, self._refusals.get(admission, b""))
            return
        conn.setblocking(False)

        def done(header: ProxyHeader) -> None:
            self._header_read(conn, admission, header)

        def refuse(reason: str) -> None:
            self.incidents.note(
                "connections.proxy_header_refused",
                f"{self.kind}:{load_balancer}",
                listener=self.kind,
                peer=load_balancer,
                reason=reason,
                detail="a connection from listeners.proxy_protocol_from must start with a "
                "PROXY header (HAProxy: send-proxy or send-proxy-v2); closed",
            )
            abandon()

        reader = HeaderReader(conn, done, refuse)

        def abandon() -> None:
            reader.stop()
            self._awaiting_header.pop(conn, None)
            admission.release()
            conn.close()

        seconds = admission.deadline_seconds
        admission.close_now = lambda: refuse(f"no PROXY header within {seconds:g} s")
        self._awaiting_header[conn] = abandon
        reader.start()

    def _header_read(self, conn: socket.socket, admission: Admission, header: ProxyHeader) -> None:
        """The header named the client (or kept the balancer's address: UNKNOWN, LOCAL): place
        the connection in that address's share and hand it over."""
        self._awaiting_header.pop(conn, None)
        admission.close_now = None
        refusal = admission.place(header.client or admission.address)
        if refusal is not None:
            admission.release()
            _refuse(conn, self._refusals.get(refusal, b""))
            return
        self._start(conn, admission)

    def _start(self, conn: socket.socket, admission: Admission) -> None:
        conn.setblocking(False)
        try:
            self._hand_over(conn, admission)
        except Exception:
            log.exception(
                "connections.hand_over_failed", listener=self.kind, client=admission.address
            )
            admission.release()
            conn.close()

    def _pause(self, error: OSError) -> None:
        """Stop reading the listening socket for a moment; pending clients wait in the backlog."""
        self.incidents.note(
            "listener.accept_paused",
            "out of resources" if error.errno in _OUT_OF_RESOURCES else "accept failed",
            listener=self.kind,
            error=error.strerror or str(error),
            retry_seconds=PAUSE_SECONDS,
            open_files=self._limits.caps.open_files,
        )
        self._loop.remove_reader(self._sock.fileno())
        self._retry = self._loop.call_later(PAUSE_SECONDS, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self.start()


def _refuse(conn: socket.socket, line: bytes) -> None:
    """Best effort: one line if the socket buffer takes it, then close."""
    if line:
        try:
            conn.setblocking(False)
            conn.send(line)
        except OSError:
            pass
    conn.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (IPv4 or IPv6 by the address), as asyncio would make it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock
