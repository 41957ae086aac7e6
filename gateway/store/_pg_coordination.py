"""Cluster-wide locks and notices on PostgreSQL: advisory locks and LISTEN/NOTIFY.

No protocol of our own: the database every instance already trusts arbitrates. A lock is held
by a database session, so an instance that dies (or loses its connection) loses its locks at
once, and nobody is left waiting for a lease to run out.

* :meth:`PgCoordination.exclusive` is a transaction-level advisory lock
  (``pg_advisory_xact_lock``) taken after a local lock of the same name, so one instance uses
  one connection per name however many of its tasks wait. It ends with the block's
  transaction whatever happens; a task cancelled while it waits gives its connection back
  mid-query, and the pool closes such a connection, which ends the wait on the server.
* :meth:`PgCoordination.try_lead` is a session-level ``pg_try_advisory_lock`` on the instance's
  one leader connection (``_LeaderSession``), held until released or until that connection is
  gone (``holding`` then says False).
* Notices go out with ``pg_notify`` and come in on one listening connection. A channel is
  listened to within ``LISTEN_POLL_SECONDS`` of its first subscriber, which is then called
  with ``None`` (a notice sent in between was missed); after a lost connection every channel
  is listened to again and every subscriber called with ``None``.

Lock names are hashed with ``hashtextextended`` into the 64-bit advisory key space.
Failures of the database itself are raised as StoreError, with the URL's password left out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Self

from ..logs import get_logger
from ._coordination import Leadership, Listener, _Fanout, check_channel, check_payload
from ._crypto import StoreError
from ._pg import CONNECT_TIMEOUT_SECONDS, _driver, _reason, _unreachable, describe

log = get_logger(__name__)
_KEY = "hashtextextended(%s, 0)"
LISTEN_POLL_SECONDS = 0.5  # how soon a channel subscribed later is listened to
RECONNECT_SECONDS = 1.0
LISTEN_APPLICATION = "gateway-listen"
LEAD_APPLICATION = "gateway-lead"


class _LeaderSession:
    """The one connection on which this instance holds every lock it leads.

    Session-level advisory locks live as long as their connection: one connection per
    instance, whatever the number of mailboxes it polls, instead of one per lock; and an
    instance that is not leading tries on the same connection at each poll interval instead of
    connecting anew. When the connection is lost, every lock on it is gone at once: each
    leadership knows the connection (its generation) it was taken on, and ``holding`` fails.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: Any = None
        self._generation = 0
        self._names: set[str] = set()
        self._lock = asyncio.Lock()  # one statement at a time on the connection

    async def try_lock(self, name: str) -> int | None:
        """The generation the lock was taken on, or None if it is held (here included)."""
        async with self._lock:
            if name in self._names and await self._alive():
                return None  # advisory locks nest in a session: refuse a second holder here
            for attempt in (1, 2):  # a connection found dead is replaced once
                conn = await self._connection()
                try:
                    cursor = await conn.execute(f"SELECT pg_try_advisory_lock({_KEY})", (name,))
                    row = await cursor.fetchone()
                except Exception:
                    await self._drop()
                    if attempt == 2:
                        raise
                    continue
                if not (row and row[0]):
                    return None
                self._names.add(name)
                return self._generation
            return None

    async def holds(self, name: str, generation: int) -> bool:
        async with self._lock:
            if generation != self._generation or name not in self._names:
                return False
            return await self._alive()

    async def unlock(self, name: str, generation: int) -> None:
        async with self._lock:
            if generation != self._generation or name not in self._names:
                return
            self._names.discard(name)
            try:
                await self._conn.execute(f"SELECT pg_advisory_unlock({_KEY})", (name,))
            except Exception:  # the connection went with the lock
                await self._drop()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            psycopg, _pool = _driver()
            self._conn = await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=int(CONNECT_TIMEOUT_SECONDS),
                application_name=LEAD_APPLICATION,
            )
            self._generation += 1
            self._names = set()
        return self._conn

    async def _alive(self) -> bool:
        if self._conn is None or self._conn.closed:
            await self._drop()
            return False
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                await self._conn.execute("SELECT 1")
        except Exception:  # any failure means the session, and its locks, may be gone
            await self._drop()
            return False
        return True

    async def _drop(self) -> None:
        conn, self._conn, self._names = self._conn, None, set()
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()  # ends the session: its locks go with it


class _PgLeadership:
    def __init__(self, session: _LeaderSession, name: str, generation: int) -> None:
        self._session, self._name, self._generation = session, name, generation

    async def holding(self) -> bool:
        return await self._session.holds(self._name, self._generation)

    async def release(self) -> None:
        await self._session.unlock(self._name, self._generation)


class PgCoordination:
    """Create with :meth:`open`; :meth:`close` ends the listener, leaderships and connections."""

    def __init__(self, url: str, pool: Any) -> None:
        self._url = url
        self._pool = pool
        self._fanout = _Fanout()
        self._listening: set[str] = set()
        self._listener: asyncio.Task[None] | None = None
        self._local: dict[str, asyncio.Lock] = {}  # kept: see LocalCoordination.exclusive
        self._leader_session = _LeaderSession(url)
        self._closed = False

    @classmethod
    async def open(cls, url: str, size: int = 4) -> Self:
        """Connect (*size* connections at most, for locks and notices) and start listening."""
        psycopg, psycopg_pool = _driver()
        pool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=1,
            max_size=size,
            open=False,
            timeout=CONNECT_TIMEOUT_SECONDS,
            kwargs={"autocommit": True, "application_name": "gateway-coordination"},
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            name="gateway-coordination",
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_SECONDS)
        except psycopg.Error as error:
            await pool.close()
            raise _unreachable(url, error) from None
        coordination = cls(url, pool)
        coordination._listener = asyncio.create_task(coordination._listen(), name="pg-listen")
        return coordination

    def exclusive(self, name: str) -> AbstractAsyncContextManager[None]:
        return self._exclusive(name)

    @asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        psycopg, _pool = _driver()
        async with self._local.setdefault(name, asyncio.Lock()):
            try:
                conn = await self._pool.getconn()
            except psycopg.Error as error:
                raise self._problem(error) from error
            try:
                try:
                    await conn.execute("BEGIN")
                    await conn.execute(f"SELECT pg_advisory_xact_lock({_KEY})", (name,))
                except psycopg.Error as error:
                    raise self._problem(error) from error
                try:
                    yield
                finally:
                    await self._end_lock(conn, name)
            finally:
                await self._pool.putconn(conn)  # closed by the pool if still mid-query

    async def _end_lock(self, conn: Any, name: str) -> None:
        """End the lock's transaction (nothing was written in it). If the connection was lost
        meanwhile, the lock already ended with it: the block has run, so it is only logged."""
        psycopg, _pool = _driver()
        try:
            await conn.execute("ROLLBACK")
        except psycopg.Error as error:
            log.warning("store.lock_lost", lock=name, error=_reason(error, self._url))

    async def try_lead(self, name: str) -> Leadership | None:
        psycopg, _pool = _driver()
        try:
            generation = await self._leader_session.try_lock(name)
        except psycopg.Error as error:
            raise self._problem(error) from None
        if generation is None:
            return None
        return _PgLeadership(self._leader_session, name, generation)

    async def notify(self, channel: str, payload: str) -> None:
        check_channel(channel)
        check_payload(payload)
        psycopg, _pool = _driver()
        try:
            async with self._pool.connection() as conn:
                await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        except psycopg.Error as error:
            raise self._problem(error) from error

    def subscribe(self, channel: str, listener: Listener) -> Callable[[], None]:
        return self._fanout.add(channel, listener)

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._leader_session.close()
        await self._pool.close()

    def _problem(self, error: BaseException) -> StoreError:
        where, why = describe(self._url), _reason(error, self._url)
        return StoreError(f"cannot use the PostgreSQL database {where}: {why}")

    async def _listen(self) -> None:
        """Keep one listening connection; channels (re)listened to get a None (re-read)."""
        psycopg, _pool = _driver()
        lost = False
        while not self._closed:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=int(CONNECT_TIMEOUT_SECONDS),
                    application_name=LISTEN_APPLICATION,  # found in pg_stat_activity by it
                ) as conn:
                    self._listening = set()
                    if lost:
                        log.info("store.listen_restored", url=describe(self._url))
                        lost = False
                    while True:
                        await self._listen_to_new(conn)
                        async for notice in conn.notifies(timeout=LISTEN_POLL_SECONDS):
                            self._fanout.deliver(notice.channel, notice.payload)
            except psycopg.Error as error:
                if not lost:
                    log.warning(
                        "store.listen_lost",
                        url=describe(self._url),
                        error=_reason(error, self._url),
                    )
                lost = True
                await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen_to_new(self, conn: Any) -> None:
        psycopg, _pool = _driver()
        for channel in set(self._fanout.listeners) - self._listening:
            await conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
            self._listening.add(channel)
            self._fanout.deliver(channel, None)  # notices sent before the LISTEN were missed
