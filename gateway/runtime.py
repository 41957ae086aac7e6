"""One event loop for everything: asyncio first, Twisted's reactor riding on it.

aiosmtpd, httpx and our own services are asyncio code; the IMAP and POP3 servers are Twisted
protocols. Both must share one loop (see docs/protocol-servers.md), so the asyncio reactor has to
be installed on that loop *before* anything imports ``twisted.internet.reactor`` — importing
``twisted.mail.pop3`` alone would install the default epoll reactor and make this impossible.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from twisted.internet.interfaces import IProtocolFactory  # no reactor: safe before install()
from twisted.internet.protocol import Factory  # no reactor either
from zope.interface import implementer

from .acceptor import Acceptor, HandOver, listening_socket, raise_open_file_limit
from .admission import Admission, ConnectionLimits, LoadBalancers, size_caps
from .logs import get_logger

if TYPE_CHECKING:
    from .config import ListenerSettings

log = get_logger(__name__)

T = TypeVar("T")


def new_loop_with_reactor() -> asyncio.AbstractEventLoop:
    """Create the process's event loop and install Twisted's asyncio reactor on it.

    Call this exactly once, before importing any Twisted protocol module. Tests use the same
    function as the loop factory of their session-wide loop, so production and tests run on the
    same kind of loop.
    """
    from twisted.internet import asyncioreactor

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
    return loop


def freeze_startup_objects() -> None:
    """Move everything alive after start-up out of the garbage collector's reach.

    Why: the modules, settings, TLS contexts and caches that start-up leaves behind are a few
    hundred thousand objects that live as long as the process, and every full collection
    walked them all: 17-45 ms with the loop stopped, several times in an 800-message burst,
    which was the gateway's p99 latency (issue 13, ``bench/smtp_throughput.py``). Frozen,
    they are never collected (they are never garbage) and collections only walk what came
    later. Only the ``gateway run`` process does this, once it is serving: not the tests'
    processes, whose earlier garbage would be frozen too.
    """
    gc.collect()
    gc.freeze()


def reactor() -> Any:
    """Return the installed reactor; importing it lazily keeps module imports side-effect free."""
    from twisted.internet import reactor as installed

    return installed


def as_deferred(coro: Coroutine[Any, Any, T]) -> Any:
    """Run an asyncio coroutine and hand Twisted a Deferred for its result.

    ``defer.ensureDeferred`` cannot drive coroutines that await asyncio futures (httpx, our
    store), so every Twisted-facing method that does async work goes through here. Cancelling
    the Deferred cancels the task.
    """
    from twisted.internet.defer import Deferred

    return Deferred.fromFuture(asyncio.ensure_future(coro))


class RunningListener:
    """A bound listening socket and how to close it; every frontend returns one of these."""

    def __init__(
        self, name: str, address: tuple[str, int], close: Callable[[], Awaitable[None]]
    ) -> None:
        self.name = name
        self.host, self.port = address[0], address[1]
        self._close = close

    async def close(self) -> None:
        await self._close()


class ConnectionRegistry:
    """The open connections of one listener, so shutdown can close them.

    Neither asyncio's ``Server.close()`` (before 3.12) nor Twisted's ``stopListening()`` touch
    connections that are already open; without this a stopping gateway would hang on them.
    """

    def __init__(self) -> None:
        self._closers: dict[int, Callable[[], None]] = {}

    def add(self, key: object, close: Callable[[], None]) -> None:
        self._closers[id(key)] = close

    def discard(self, key: object) -> None:
        self._closers.pop(id(key), None)

    def __len__(self) -> int:
        return len(self._closers)

    def close_all(self) -> None:
        for close in list(self._closers.values()):
            close()
        self._closers.clear()


def default_limits() -> ConnectionLimits:
    """Caps for a listener started on its own (tests, tools): the defaults of the config."""
    from .config import ListenerSettings

    return limits_from(ListenerSettings(), log_numbers=False)


def limits_from(settings: ListenerSettings, log_numbers: bool = True) -> ConnectionLimits:
    """Raise the open-file limit to its hard limit and size the connection caps from it."""
    before, open_files = raise_open_file_limit()
    caps = size_caps(
        open_files, settings.max_unauthenticated_per_address, settings.preauth_timeout_seconds
    )
    if log_numbers:
        log.info(
            "connections.limits",
            open_files=open_files,
            open_files_before=before,
            connections=caps.connections,
            unauthenticated=caps.unauthenticated,
            unauthenticated_per_address=caps.per_address,
            preauth_timeout_seconds=caps.preauth_timeout,
        )
    return ConnectionLimits(caps, load_balancers=LoadBalancers(settings.proxy_protocol_from))


async def listen(
    name: str,
    kind: str,
    host: str,
    port: int,
    limits: ConnectionLimits,
    refusals: dict[str, bytes],
    hand_over: HandOver,
    close_connections: Callable[[], Awaitable[None]],
    proxy_protocol: bool = False,
) -> RunningListener:
    """Listen through our accept loop (admission, EMFILE pauses); every frontend uses this.

    ``refusals`` maps an admission refusal ("address", "total") to the protocol's one line;
    ``close_connections`` closes what is open when the listener stops; ``proxy_protocol``: the
    mail protocols' listeners read a PROXY header from ``listeners.proxy_protocol_from``.
    """
    sock = listening_socket(host, port)
    acceptor = Acceptor(kind, sock, limits, refusals, hand_over, proxy_protocol)
    address = acceptor.address
    acceptor.start()

    async def close() -> None:
        acceptor.close()
        await close_connections()

    return RunningListener(name, address, close)


class AdmittedProtocol(asyncio.Protocol):
    """Wraps an asyncio protocol that knows nothing of admissions (aiohttp's request handler):
    frees the connection's place when it is lost, and at the pre-login deadline asks the
    protocol to ``close()`` (aiohttp: finish the request in hand, then close)."""

    def __init__(self, inner: Any, admission: Admission) -> None:
        self._inner = inner
        self._admission = admission
        admission.on_expire = inner.close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._admission.release()
        self._inner.connection_lost(exc)


async def listen_asyncio(
    name: str,
    kind: str,
    host: str,
    port: int,
    limits: ConnectionLimits,
    refusals: dict[str, bytes],
    protocol_factory: Callable[[], Any],
    close_connections: Callable[[], Awaitable[None]],
) -> RunningListener:
    """Listen for a plain asyncio protocol through our accept loop (:class:`AdmittedProtocol`)."""
    loop = asyncio.get_running_loop()

    def hand_over(conn: socket.socket, admission: Admission) -> None:
        connecting = loop.create_task(
            loop.connect_accepted_socket(
                lambda: AdmittedProtocol(protocol_factory(), admission), conn
            )
        )
        connecting.add_done_callback(lambda task: release_if_failed(task, admission))

    return await listen(name, kind, host, port, limits, refusals, hand_over, close_connections)


def release_if_failed(task: asyncio.Task[Any], admission: Admission) -> None:
    """A connection whose setup failed (a TLS handshake) never reached its protocol: free its
    place."""
    if task.cancelled() or task.exception() is not None:
        admission.release()


@implementer(IProtocolFactory)
class _AdmittedFactory:
    """Builds one connection's protocol with its :class:`Admission` attached as ``admission``."""

    noisy = False

    def __init__(self, factory: Any, admission: Admission) -> None:
        self._factory = factory
        self._admission = admission

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self._factory.buildProtocol(addr)
        if protocol is not None:
            protocol.admission = self._admission
        return protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


async def listen_twisted(
    name: str,
    factory: Any,
    host: str,
    port: int,
    tls_context: Any = None,
    limits: ConnectionLimits | None = None,
    kind: str = "",
    refusals: dict[str, bytes] | None = None,
) -> RunningListener:
    """Listen for a Twisted factory (plain or implicit TLS) through our accept loop.

    Each admitted socket is adopted by the reactor with ``protocol.admission`` set; the protocol
    calls ``admission.authenticated()`` on login and ``admission.release()`` when it is lost.
    ``factory.connections`` must be a :class:`ConnectionRegistry` kept by its protocols.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    def hand_over(conn: socket.socket, admission: Admission) -> None:
        per_connection = _AdmittedFactory(factory, admission)
        wrapped: Any = per_connection
        if tls_context is not None:
            wrapped = TLSMemoryBIOFactory(tls_context, False, per_connection)
        try:
            reactor().adoptStreamConnection(conn.fileno(), conn.family, wrapped)
        finally:
            conn.close()  # the reactor holds its own duplicate of the descriptor

    async def close_connections() -> None:
        factory.connections.close_all()

    return await listen(
        name,
        kind or name,
        host,
        port,
        limits or default_limits(),
        {} if tls_context is not None else (refusals or {}),
        hand_over,
        close_connections,
        proxy_protocol=True,
    )


class TwistedListenerFactory(Factory):
    """The settings every connection of an IMAP or POP3 listener reads as ``self.factory``,
    and the one way both listeners start (:meth:`listen`).

    ``connections`` are the listener's open connections (closed at shutdown); ``starttls`` is
    the context a STARTTLS/STLS upgrade uses, None on an implicit-TLS port (there every
    connection is wrapped in ``tls_context`` before the protocol sees it); ``plaintext_auth``
    (never, loopback, always) says where a password may come before TLS. A subclass names its
    ``kind`` (the accept loop's name in the log) and ``refusals`` (its line for a connection
    over the caps) and adds what its protocol needs.
    """

    noisy = False  # one log line per listener comes from the app, not two per factory
    kind: ClassVar[str]
    refusals: ClassVar[dict[str, bytes]]

    def __init__(self, tls_context: Any, implicit_tls: bool, plaintext_auth: str) -> None:
        self.connections = ConnectionRegistry()
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.plaintext_auth = plaintext_auth

    @property
    def starttls(self) -> Any:
        return None if self.implicit_tls else self.tls_context

    async def listen(
        self, name: str, host: str, port: int, limits: ConnectionLimits | None
    ) -> RunningListener:
        """Start listening; ``limits`` are the process's connection caps (None: the defaults)."""
        implicit = self.tls_context if self.implicit_tls else None
        return await listen_twisted(
            name, self, host, port, implicit, limits, self.kind, self.refusals
        )
