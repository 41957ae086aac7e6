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

Behind a TCP load balancer (:class:`LoadBalancers`) a connection is admitted before its PROXY
header names the client (:meth:`ConnectionLimits.admit_unplaced`): it counts in the totals and
its deadline runs, and it joins its client's per-address share once placed
(:meth:`Admission.place`), so the balancer's own address never fills a share of its own.

Refusals and timeouts are logged through :class:`IncidentLog`, one line per kind per minute, so a
flood costs a few log lines, not one per socket.
"""

from __future__ import annotations

import asyncio
import ipaddress
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


class LoadBalancers:
    """The addresses (``listeners.proxy_protocol_from``) whose connections start with a PROXY
    header naming the real client; none by default. The config has validated the entries."""

    def __init__(self, networks: tuple[str, ...] = ()) -> None:
        self._networks = tuple(ipaddress.ip_network(one) for one in networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def include(self, address: str) -> bool:
        """Whether a connection from ``address`` must begin with a PROXY header."""
        if not self._networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
        return any(ip in network for network in self._networks)


EVICTED_SENTENCE = (
    "Too many connections from your address that have not logged in: closing the oldest, this one"
)


def timeout_sentence(seconds: float) -> str:
    return f"Timeout: no login within {seconds:g} seconds of connecting"


class Admission:
    """One admitted connection's place in the pools; the protocol tells it when the client
    logged in (:meth:`authenticated`) and the connection ends (:meth:`release`)."""

    def __init__(self, limits: ConnectionLimits, kind: str, address: str) -> None:
        self.kind = kind
        self.address = address
        self._limits = limits
        self.is_authenticated = False
        self.evicted = False  # closed to make room for a newer connection from its address
        self.placed = False  # in its address's share (from a load balancer: once the header came)
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

    @property
    def goodbye(self) -> str:
        """Why the connection is closed before a login, in the words every protocol uses
        (each adds its own status: ``421``, ``BYE``, ``-ERR``)."""
        return EVICTED_SENTENCE if self.evicted else timeout_sentence(self.deadline_seconds)

    def start_deadline(self, schedule: Schedule, seconds: float) -> None:
        self._timer = schedule(seconds, self._expire)

    def place(self, address: str) -> str | None:
        """A load balancer's header named the client: take its place in that address's share
        (evicting the address's oldest idle connection at the cap, as :meth:`ConnectionLimits.
        admit` does), or say why not (``"address"``); the caller then releases it."""
        return self._limits._place(self, address)

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
        if not self.placed:  # still reading a PROXY header: its closer logs why
            self._close()
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
        self,
        caps: Caps,
        schedule: Schedule | None = None,
        incidents: IncidentLog | None = None,
        load_balancers: LoadBalancers | None = None,
    ) -> None:
        self.caps = caps
        self.incidents = incidents or IncidentLog()
        self.load_balancers = load_balancers or LoadBalancers()
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
        reason = self._make_room(kind, address) or self._total_full()
        if reason:
            self._refused(kind, address, reason)
            return reason
        admission = self._open(kind, address)
        self._join(admission)
        return admission

    def admit_unplaced(self, kind: str, load_balancer: str) -> Admission | str:
        """A connection from a load balancer, before its PROXY header names the client: counted
        in the totals with its deadline running (the header must come before it passes), but in
        no address's share until :meth:`Admission.place`. Refused only with ``"total"``."""
        reason = self._total_full()
        if reason:
            self._refused(kind, load_balancer, reason)
            return reason
        return self._open(kind, load_balancer)

    def _make_room(self, kind: str, address: str) -> str | None:
        """At the cap, evict the address's oldest closable connection; "address" if still full."""
        waiting = self._waiting.get((kind, address), {})
        if len(waiting) >= self.caps.per_address:
            oldest = next((one for one in waiting if one.closable), None)
            if oldest is not None:
                oldest.evict()
        full = len(self._waiting.get((kind, address), {})) >= self.caps.per_address
        return "address" if full else None

    def _total_full(self) -> str | None:
        caps = self.caps
        room = min(caps.unauthenticated, caps.connections - self.authenticated)
        return "total" if self.unauthenticated >= room else None

    def _open(self, kind: str, address: str) -> Admission:
        self.unauthenticated += 1
        admission = Admission(self, kind, address)
        schedule = self._schedule or asyncio.get_running_loop().call_later
        admission.start_deadline(schedule, self.caps.preauth_timeout)
        metrics.connection_opened(kind)
        return admission

    def _join(self, admission: Admission) -> None:
        self._waiting.setdefault((admission.kind, admission.address), {})[admission] = None
        admission.placed = True

    def _place(self, admission: Admission, address: str) -> str | None:
        if admission.placed or admission.is_authenticated:
            raise RuntimeError("only a connection admitted unplaced is placed, once")
        reason = self._make_room(admission.kind, address)
        if reason:
            self._refused(admission.kind, address, reason)
            return reason
        admission.address = address
        self._join(admission)
        return None

    def _refused(self, kind: str, address: str, reason: str) -> None:
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
        self.unauthenticated -= 1
        if not admission.placed:
            return
        key = (admission.kind, admission.address)
        waiting = self._waiting[key]
        del waiting[admission]
        if not waiting:
            del self._waiting[key]
