"""A small pool of logged-in SMTP sessions to one upstream server, for one account.

Opening a session costs a TCP connect, a TLS handshake and AUTH; a burst that pays this per
message spends most of its time there (and fills the server's log with one session per
message). The pool keeps up to ``max_sessions`` sessions open, each carrying many messages, and
closes one that sat unused for ``idle_seconds`` (and all of them at :meth:`SessionPool.close`).

smtplib blocks, so each session is driven in one of the pool's own worker threads (not the
loop's default executor, which the spool's file work shares). The pool decides only what
happens to a session after use; the SMTP dialogue itself is the caller's
(:mod:`gateway.providers.smtp`):

* a transaction that raises :class:`SessionDropped` sent nothing (the server closed the session,
  or said 421, before the message's final dot): if the session had been used before, the server
  may simply have dropped it while idle, so the transaction runs once more on a new session;
* a session the transaction marked ``broken``, or any other exception, is discarded;
* otherwise (success, or a refusal the server answered) the session goes back to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from ..delivery import DeliveryError
from ..logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

_QUIT_TIMEOUT = 5.0  # seconds a closing session may take to say goodbye


class SessionDropped(Exception):
    """The session ended before the message's final dot went out: nothing was sent.

    ``reply`` is the server's (code, text) when it said so (421), None when it just closed.
    """

    def __init__(self, description: str, reply: tuple[int, bytes] | None = None) -> None:
        super().__init__(description)
        self.reply = reply


@dataclass
class Session:
    """One logged-in SMTP session; only ever used by one thread at a time."""

    client: smtplib.SMTP
    pipelining: bool
    transactions: int = 0  # transactions started on it (the first needs no RSET)
    idle_since: float = 0.0
    broken: bool = False  # set by a transaction that left it unusable


class SessionPool:
    """Up to ``max_sessions`` sessions opened by ``open_session`` (run in a worker thread).

    ``clock`` (monotonic seconds) decides which sessions count as idle; the timer that closes
    them runs on the event loop.
    """

    def __init__(
        self,
        open_session: Callable[[], Session],
        *,
        max_sessions: int,
        idle_seconds: float,
        name: str = "smtp",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open = open_session
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._slots = asyncio.Semaphore(max_sessions)
        self._idle: list[Session] = []  # most recently used last
        # One thread per session, plus one so a session can be closed while all others send.
        self._threads = ThreadPoolExecutor(max_sessions + 1, thread_name_prefix=f"{name}-pool")
        self._reaper: asyncio.TimerHandle | None = None
        self._closed = False
        self.opened = 0  # sessions opened so far
        self.in_use = 0

    @property
    def open_sessions(self) -> int:
        """Sessions open now: idle ones and those carrying a message."""
        return len(self._idle) + self.in_use

    async def run(self, transaction: Callable[[Session], T]) -> T:
        """``transaction(session)`` in a worker thread on a pooled (or else new) session.

        Raises what the transaction or ``open_session`` raised; :class:`SessionDropped` only
        when it happened on a new session.
        """
        if self._closed:
            raise RuntimeError("the session pool is closed")
        async with self._slots:
            session = self._take_idle()
            if session is not None:
                try:
                    return await self._use(session, transaction)
                except SessionDropped as dropped:
                    log.info("upstream.session_dropped", reason=str(dropped))
            session = await self._in_thread(self._open)
            self.opened += 1
            return await self._use(session, transaction)

    async def _use(self, session: Session, transaction: Callable[[Session], T]) -> T:
        self.in_use += 1
        keep = False
        try:
            result = await self._in_thread(transaction, session)
            keep = True
            return result
        except SessionDropped:
            raise
        except Exception as error:
            # A refusal the server answered leaves the session usable (the next transaction
            # starts with RSET); anything unexpected does not.
            keep = isinstance(error, DeliveryError)
            raise
        finally:
            self.in_use -= 1
            if keep and not session.broken and not self._closed:
                session.idle_since = self.clock()
                self._idle.append(session)
                self._schedule_reaper()
            else:
                # A cancelled caller's thread may still be using it: close, don't say QUIT.
                self._discard(session, polite=False)

    def _take_idle(self) -> Session | None:
        """The most recently used idle session that is not yet due to be closed."""
        self.close_idle()
        return self._idle.pop() if self._idle else None

    def close_idle(self) -> int:
        """Close the sessions unused for ``idle_seconds`` or more; returns how many."""
        now = self.clock()
        stale = [s for s in self._idle if now - s.idle_since >= self.idle_seconds]
        for session in stale:
            self._idle.remove(session)
            self._discard(session, polite=True)
        return len(stale)

    def _schedule_reaper(self) -> None:
        if self._reaper is not None or not self._idle:
            return
        oldest = min(s.idle_since for s in self._idle)
        delay = max(0.0, oldest + self.idle_seconds - self.clock())
        self._reaper = asyncio.get_running_loop().call_later(delay, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        self.close_idle()
        self._schedule_reaper()

    def _discard(self, session: Session, polite: bool) -> None:
        """Close ``session`` in a worker thread (QUIT first when ``polite``), not waiting."""
        if self._closed:
            _close(session, polite=False)  # no thread left to wait for a goodbye in
            return
        self._threads.submit(_close, session, polite)

    async def close(self) -> None:
        """Close every idle session (QUIT) and stop the worker threads; idempotent.

        Sessions still carrying a message are closed as their transaction ends.
        """
        if self._closed:
            return
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._threads, _close, s, True) for s in idle),
            return_exceptions=True,
        )
        self._closed = True
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _in_thread(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, function, *args)


def _close(session: Session, polite: bool) -> None:
    client = session.client
    with contextlib.suppress(OSError, smtplib.SMTPException):
        if polite and client.sock is not None:
            client.sock.settimeout(_QUIT_TIMEOUT)
            client.quit()
    client.close()
