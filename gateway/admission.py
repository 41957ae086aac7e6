"""Connection caps that an idle holder cannot turn against others.

Every client connection, on every listener, is admitted here before a protocol sees it. Until it
logs in it sits in the *unauthenticated* pool: capped per client address and listener kind, capped
in total, and closed with the protocol's goodbye when its pre-authentication deadline passes (a
total deadline, so a client dribbling one byte a second cannot keep extending it).

At the per-address cap the *oldest* not-logged-in connection of that address is closed to make
room (with the protocol's goodbye saying why), not the newcomer refused: every program on this
machine connects from 127.0.0.1, so refusing newcomers would let one program that holds idle
sockets (broken or hostile) lock every other local program out, while an honest program logs in
within milliseconds of connecting and is not the oldest for long. A login moves
it to the *authenticated* pool, which unauthenticated connections can never eat into: they can
hold at most ``unauthenticated`` of the process's ``connections`` file descriptors.

Refusals and timeouts are logged through :class:`IncidentLog`, one line per kind per minute, so a
flood costs a few log lines, not one per socket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import metrics
from .logs import get_logger

log = get_logger(__name__)

# File descriptors kept back for what is not a client connection: the store, spool files, the
# outbound HTTPS pool, upstream IMAP/POP3/SMTP connections, listening sockets, log files.
RESERVED_FILES = 64
Schedule = Callable[[float, Callable[[], None]], Any]


@dataclass(frozen=True)
class Caps:
    """The numbers the caps were sized to (logged once at start)."""

    open_files: int  # the process's open-file limit after raising it
    connections: int  # client connections of all listeners together (both pools)
    unauthenticated: int  # of which at most this many before login
    per_address: int  # unauthenticated per client address and listener kind
    preauth_timeout: float  # seconds from accept to a successful login


def size_caps(open_files: int, per_address: int, preauth_timeout: float) -> Caps:
    """Share ``open_files`` out: a reserve for the gateway itself, a quarter of the rest at most
    for connections that have not logged in, the remainder for those that have."""
    connections = max(8, open_files - max(RESERVED_FILES, open_files // 8))
    unauthenticated = max(4, connections // 4)
    return Caps(
        open_files,
        connections,
        unauthenticated,
        min(per_address, unauthenticated),
        preauth_timeout,
    )


class IncidentLog:
    """One warning per (event, key) per ``window`` seconds, carrying how many it stood for."""

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._clock = clock
        self._open: dict[tuple[str, str], list[float]] = {}  # -> [logged at, events since]

    def note(self, event: str, key: str, **fields: Any) -> None:
        now = self._clock()
        entry = self._open.get((event, key))
        if entry is not None and now - entry[0] < self._window:
            entry[1] += 1
            return
        log.warning(event, **fields, **({"since_last_line": int(entry[1])} if entry else {}))
        self._open[(event, key)] = [now, 0]


class Admission:
    """One admitted connection's place in the pools; the protocol tells it when the client
    logged in (:meth:`authenticated`) and the connection ends (:meth:`release`)."""

    def __init__(self, limits: ConnectionLimits, kind: str, address: str) -> None:
        self.kind = kind
        self.address = address
        self._limits = limits
        self.is_authenticated = False
        self.evicted = False  # closed to make room for a newer connection from its address
        self._released = False
        # The protocol's goodbye ("421 4.4.2 ...", "* BYE ...", "-ERR ...") and close; until a
        # protocol sets it, expiry just closes whatever close_now names.
        self.on_expire: Callable[[], None] | None = None
        self.close_now: Callable[[], None] | None = None
        self._timer: Any = None

    @property
    def deadline_seconds(self) -> float:
        """How long a client has from connecting to logging in (for the goodbye's wording)."""
        return self._limits.caps.preauth_timeout

    def start_deadline(self, schedule: Schedule, seconds: float) -> None:
        self._timer = schedule(seconds, self._expire)

    def authenticated(self) -> None:
        """The client logged in: leave the unauthenticated pool, stop the deadline."""
        if self.is_authenticated or self._released:
            return
        self.is_authenticated = True
        self._cancel_timer()
        self._limits._moved_to_authenticated(self)

    def release(self) -> None:
        """The connection is gone (idempotent)."""
        if self._released:
            return
        self._released = True
        self._cancel_timer()
        self._limits._released(self)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def closable(self) -> bool:
        """Whether the connection can still be closed early (a protocol or acceptor said how)."""
        return not (self.is_authenticated or self._released) and (
            self.on_expire is not None or self.close_now is not None
        )

    def evict(self) -> None:
        """Close it to make room for a newer connection from its address, and free its place
        at once; the protocol's goodbye reads :attr:`evicted` to say why."""
        if not self.closable:
            return
        self.evicted = True
        self._limits.incidents.note(
            "connections.evicted",
            self.kind,
            listener=self.kind,
            client=self.address,
            reason="the oldest of too many connections from this address that have not logged in",
        )
        self._close()
        self.release()

    def _expire(self) -> None:
        self._timer = None
        if self.is_authenticated or self._released:
            return
        self._limits.incidents.note(
            "connections.preauth_timeout",
            self.kind,
            listener=self.kind,
            client=self.address,
            seconds=self._limits.caps.preauth_timeout,
        )
        self._close()

    def _close(self) -> None:
        closer = self.on_expire or self.close_now
        if closer is not None:
            closer()


class ConnectionLimits:
    """The pools of every listener of one gateway process (file descriptors are per process)."""

    def __init__(
        self, caps: Caps, schedule: Schedule | None = None, incidents: IncidentLog | None = None
    ) -> None:
        self.caps = caps
        self.incidents = incidents or IncidentLog()
        self._schedule = schedule
        self.unauthenticated = 0
        self.authenticated = 0
        # Per (kind, address): its not-logged-in connections, oldest first.
        self._waiting: dict[tuple[str, str], dict[Admission, None]] = {}

    def admit(self, kind: str, address: str) -> Admission | str:
        """An :class:`Admission` with its deadline running, or why not: ``"address"`` (this
        address holds its share of unauthenticated connections, none of which can be closed
        to make room) or ``"total"``. At the per-address cap the address's oldest connection
        that has not logged in is evicted for the newcomer."""
        key = (kind, address)
        caps = self.caps
        waiting = self._waiting.get(key, {})
        if len(waiting) >= caps.per_address:
            oldest = next((one for one in waiting if one.closable), None)
            if oldest is not None:
                oldest.evict()
        if len(self._waiting.get(key, {})) >= caps.per_address:
            reason = "address"
        elif min(caps.unauthenticated, caps.connections - self.authenticated) <= (
            self.unauthenticated
        ):
            reason = "total"
        else:
            self.unauthenticated += 1
            admission = Admission(self, kind, address)
            self._waiting.setdefault(key, {})[admission] = None
            schedule = self._schedule or asyncio.get_running_loop().call_later
            admission.start_deadline(schedule, caps.preauth_timeout)
            metrics.connection_opened(kind)
            return admission
        self.incidents.note(
            "connections.refused",
            f"{kind}:{reason}",
            listener=kind,
            client=address,
            reason="too many unauthenticated connections from this address"
            if reason == "address"
            else "too many connections in total",
            unauthenticated=self.unauthenticated,
            authenticated=self.authenticated,
        )
        return reason

    def _moved_to_authenticated(self, admission: Admission) -> None:
        self._leave_unauthenticated(admission)
        self.authenticated += 1

    def _released(self, admission: Admission) -> None:
        metrics.connection_closed(admission.kind)
        if admission.is_authenticated:
            self.authenticated -= 1
        else:
            self._leave_unauthenticated(admission)

    def _leave_unauthenticated(self, admission: Admission) -> None:
        key = (admission.kind, admission.address)
        self.unauthenticated -= 1
        waiting = self._waiting[key]
        del waiting[admission]
        if not waiting:
            del self._waiting[key]
