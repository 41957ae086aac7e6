"""Cluster-wide locks and notices on PostgreSQL: advisory locks and LISTEN/NOTIFY.

No protocol of our own: the database every instance already trusts arbitrates. A lock is held
by a database session, so an instance that dies (or loses its connection) loses its locks at
once, and nobody is left waiting for a lease to run out.

* :meth:`PgCoordination.exclusive` is a transaction-level advisory lock
  (``pg_advisory_xact_lock``): released at the end of the block's transaction whatever happens,
  even if the awaiting task is cancelled (the pool rolls the connection back or drops it).
* :meth:`PgCoordination.try_lead` is a session-level ``pg_try_advisory_lock`` on a connection of
  its own, held until released or until that connection is gone (``holding`` then says False).
* Notices go out with ``pg_notify`` and come in on one listening connection, reconnected
  (with every channel listened to again, and subscribers told ``None``) if it is lost.

Lock names are hashed with ``hashtextextended`` into the 64-bit advisory key space.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Self

from ..logs import get_logger
from ._coordination import Leadership, Listener, _Fanout, check_channel
from ._crypto import StoreError
from ._pg import CONNECT_TIMEOUT_SECONDS, _driver, describe

log = get_logger(__name__)
_KEY = "hashtextextended(%s, 0)"
LISTEN_POLL_SECONDS = 0.5  # how soon a channel subscribed later is listened to
RECONNECT_SECONDS = 1.0


class _PgLeadership:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def holding(self) -> bool:
        if self._conn.closed:
            return False
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                await self._conn.execute("SELECT 1")
        except Exception:  # any failure means the session, and the lock with it, may be gone
            await self.release()
            return False
        return True

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            await self._conn.close()  # ends the session: the lock goes with it


class PgCoordination:
    """Create with :meth:`open`; :meth:`close` ends the listener and every connection."""

    def __init__(self, url: str, pool: Any) -> None:
        self._url = url
        self._pool = pool
        self._fanout = _Fanout()
        self._listening: set[str] = set()
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, url: str, size: int = 4) -> Self:
        _psycopg, psycopg_pool = _driver()
        pool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=1,
            max_size=size,
            open=False,
            timeout=CONNECT_TIMEOUT_SECONDS,
            kwargs={"autocommit": True, "application_name": "gateway-coordination"},
            name="gateway-coordination",
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_SECONDS)
        except Exception as error:
            await pool.close()
            raise StoreError(f"cannot connect to PostgreSQL at {describe(url)}: {error}") from error
        coordination = cls(url, pool)
        coordination._listener = asyncio.create_task(coordination._listen(), name="pg-listen")
        return coordination

    @asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(f"SELECT pg_advisory_xact_lock({_KEY})", (name,))
            yield

    def exclusive(self, name: str) -> AbstractAsyncContextManager[None]:
        return self._exclusive(name)

    async def try_lead(self, name: str) -> Leadership | None:
        psycopg, _pool = _driver()
        conn = await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_SECONDS)
        )
        try:
            cursor = await conn.execute(f"SELECT pg_try_advisory_lock({_KEY})", (name,))
            row = await cursor.fetchone()
        except BaseException:
            await conn.close()
            raise
        if not (row and row[0]):
            await conn.close()
            return None
        return _PgLeadership(conn)

    async def notify(self, channel: str, payload: str) -> None:
        check_channel(channel)
        async with self._pool.connection() as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def subscribe(self, channel: str, listener: Listener) -> Callable[[], None]:
        return self._fanout.add(channel, listener)

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._pool.close()

    async def _listen(self) -> None:
        """Keep one listening connection; after a reconnection, subscribers re-read (None)."""
        psycopg, _pool = _driver()
        lost = False
        while not self._closed:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_SECONDS)
                ) as conn:
                    self._listening = set()
                    await self._listen_to_new(conn)
                    if lost:
                        log.info("store.listen_restored", url=describe(self._url))
                        self._fanout.deliver_all(None)
                        lost = False
                    while True:
                        async for notice in conn.notifies(timeout=LISTEN_POLL_SECONDS):
                            self._fanout.deliver(notice.channel, notice.payload)
                        await self._listen_to_new(conn)
            except psycopg.Error as error:
                if not lost:
                    log.warning("store.listen_lost", url=describe(self._url), error=str(error))
                lost = True
                await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen_to_new(self, conn: Any) -> None:
        psycopg, _pool = _driver()
        for channel in set(self._fanout.listeners) - self._listening:
            await conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
            self._listening.add(channel)
