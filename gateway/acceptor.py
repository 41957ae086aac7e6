"""Our own accept loop, used by every listener: admission first, and calm when out of files.

asyncio's loop (``selector_events._accept_connection``) reports EMFILE through the loop's
exception handler with a traceback per attempt and retries after a second, and Twisted's
``tcp.Port`` logs each connection it closes during its EMFILE recovery; with 1,100 idle sockets
that made 72 MB of log in 50 s. Here one accept loop serves asyncio and Twisted listeners alike:
it asks :class:`~gateway.admission.ConnectionLimits` before any protocol is built (over-cap
connections get the protocol's one-line refusal and are closed at once), and on EMFILE/ENFILE it
stops reading the listening socket for :data:`PAUSE_SECONDS`, logging one line per incident.
"""

from __future__ import annotations

import asyncio
import errno
import resource
import socket
from collections.abc import Callable

from .admission import Admission, ConnectionLimits, IncidentLog
from .logs import get_logger

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
    ) -> None:
        self.kind = kind
        self._sock = sock
        self._limits = limits
        self._refusals = refusals  # admission refusal reason -> bytes sent before closing
        self._hand_over = hand_over
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
        """Stop accepting and close the listening socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

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
            self._admit(conn, str(peer[0]))

    def _admit(self, conn: socket.socket, address: str) -> None:
        admission = self._limits.admit(self.kind, address)
        if isinstance(admission, str):
            _refuse(conn, self._refusals.get(admission, b""))
            return
        conn.setblocking(False)
        try:
            self._hand_over(conn, admission)
        except Exception:
            log.exception("connections.hand_over_failed", listener=self.kind, client=address)
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
