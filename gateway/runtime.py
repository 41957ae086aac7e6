"""One event loop for everything: asyncio first, Twisted's reactor riding on it.

aiosmtpd, httpx and our own services are asyncio code; the IMAP and POP3 servers are Twisted
protocols. Both must share one loop (see docs/protocol-servers.md), so the asyncio reactor has to
be installed on that loop *before* anything imports ``twisted.internet.reactor`` — importing
``twisted.mail.pop3`` alone would install the default epoll reactor and make this impossible.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

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


async def wait_deferred(deferred: Any) -> Any:
    """Await a Twisted Deferred from asyncio code (a bare ``await d`` fails inside a Task)."""
    return await deferred.asFuture(asyncio.get_running_loop())


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


async def listen_twisted(
    name: str, factory: Any, host: str, port: int, tls_context: Any = None
) -> RunningListener:
    """Listen with a Twisted factory (plain or implicit TLS) and wrap it as a RunningListener.

    ``factory.connections`` must be a :class:`ConnectionRegistry` kept by its protocols.
    """
    if tls_context is None:
        listening = reactor().listenTCP(port, factory, interface=host)
    else:
        listening = reactor().listenSSL(port, factory, tls_context, interface=host)

    async def close() -> None:
        await wait_deferred(listening.stopListening())
        factory.connections.close_all()

    bound = listening.getHost()
    return RunningListener(name, (bound.host, bound.port), close)
