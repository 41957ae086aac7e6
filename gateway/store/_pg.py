"""The PostgreSQL backend: the same stores and queries as SQLite, shared by several instances.

Jobs (see ``_sql``) run on worker threads over a psycopg 3 connection pool, each job in one
transaction committed with PostgreSQL's default ``synchronous_commit = on``: when the awaited
call returns, the write is on the server's disk, which the spool relies on before it answers 250.
The schema is the SQLite one (``_migrations.MIGRATIONS`` through ``for_postgresql``), one history
for both backends. Unlike SQLite, an instance never migrates on its own: with several instances
on one database, a new version's schema change would pull the floor from under older instances
still running, so ``gateway migrate`` does it and ``gateway run`` refuses a schema other than its
own, naming that command.

psycopg is an optional dependency (``pip install 'mail-oauth-gateway[postgresql]'``), imported
only when a ``store.url`` is configured.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import unquote, urlsplit

from ._crypto import StoreError
from ._migrations import MIGRATIONS, apply_migrations, current_version, for_postgresql
from ._sql import Connection, Cursor, Row

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

_T = TypeVar("_T")
CONNECT_TIMEOUT_SECONDS = 10.0
_MIGRATION_LOCK = 0x6D61696C677700  # advisory lock id: one migrating process at a time
_PLACEHOLDER = re.compile(r"\?")
INSTALL_HINT = "install the PostgreSQL driver: pip install 'mail-oauth-gateway[postgresql]'"


def describe(url: str) -> str:
    """The URL without its password, for every message an operator sees (a malformed one too:
    the error that reports it names the setting, not a traceback)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "store.url (not a valid postgresql:// URL)"
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    where = f"{host}:{port}" if port else host
    user = f"{parts.username}@" if parts.username else ""
    return f"postgresql://{user}{where}{parts.path}"


def _password(url: str) -> str | None:
    """The password in the URL's user part, found without a URL parser (which may refuse it)."""
    _scheme, separator, rest = url.partition("://")
    userinfo, at, _host = rest.rpartition("@")
    if not (separator and at) or ":" not in userinfo:
        return None
    return userinfo.split(":", 1)[1] or None


def _driver() -> tuple[Any, Any]:
    try:
        import psycopg
        import psycopg_pool
    except ImportError as error:
        raise StoreError(
            f"store.url names PostgreSQL, but its driver (psycopg 3 with psycopg_pool) cannot "
            f"be imported here ({error}); {INSTALL_HINT}"
        ) from None
    return psycopg, psycopg_pool


class _PgConnection:
    """A psycopg connection that takes the stores' ``?`` placeholders."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        return self._conn.execute(_translate(sql), parameters)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> None:
        rows = list(seq_of_parameters)
        if rows:
            with self._conn.cursor() as cursor:
                cursor.executemany(_translate(sql), rows)


@functools.lru_cache(maxsize=512)
def _translate(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s`` (and a literal ``%`` doubled). Our statements
    carry no ``?`` inside string literals (they are written for both backends). Cached: the
    same few statements run for every message and login."""
    return _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))


class PgDatabase:
    """Async access to a PostgreSQL database; :meth:`open` refuses an unmigrated schema."""

    def __init__(self, url: str, pool: psycopg_pool.ConnectionPool, size: int) -> None:
        self._url = url
        self._pool = pool
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="gateway-pg")
        self._schema_version = len(MIGRATIONS)
        self._closed = False

    @property
    def url(self) -> str:
        return self._url

    @property
    def schema_version(self) -> int:
        return self._schema_version

    @classmethod
    async def open(cls, url: str, size: int = 8) -> Self:
        """Connect and check the schema version (``gateway migrate`` sets it)."""
        pool = await asyncio.to_thread(_open_pool, url, size)
        db = cls(url, pool, size)
        try:
            version = await db.run(installed_version)
        except BaseException:
            await db.close()
            raise
        if version != len(MIGRATIONS):
            await db.close()
            raise StoreError(_version_problem(url, version))
        return db

    @classmethod
    async def migrate(cls, url: str) -> tuple[int, int]:
        """Upgrade the schema; (version before, version after)."""
        pool = await asyncio.to_thread(_open_pool, url, 1)
        db = cls(url, pool, 1)
        try:
            before = await db.run(installed_version)
            after = await db._on_thread(lambda pool: _migrate(pool, url), url)
        finally:
            await db.close()
        return before, after

    async def close(self) -> None:
        """Close after the queued jobs ran (as SQLite's does); later calls are refused."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.to_thread(self._executor.shutdown, True)
        finally:
            await asyncio.to_thread(self._pool.close)

    async def execute(self, sql: str, params: tuple[Any, ...]) -> None:
        await self.run(lambda conn: conn.execute(sql, params))

    async def fetch_one(self, sql: str, params: tuple[Any, ...] = ()) -> Row | None:
        row = await self.run(lambda conn: conn.execute(sql, params).fetchone())
        return None if row is None else tuple(row)

    async def fetch_all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        return await self.run(lambda conn: [tuple(r) for r in conn.execute(sql, params).fetchall()])

    async def transact(self, job: Callable[[Connection], _T]) -> _T:
        return await self.run(job)  # every job is one transaction here

    async def run(self, job: Callable[[Connection], _T]) -> _T:
        if self._closed:
            raise StoreError("the state store is already closed")
        return await self._on_thread(lambda pool: _in_transaction(pool, job), self._url)

    async def _on_thread(self, work: Callable[[Any], _T], url: str) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _guarded, work, self._pool, url)


def _open_pool(url: str, size: int) -> psycopg_pool.ConnectionPool:
    """One direct connection first: a pool only says "initialization incomplete", the
    server's own refusal (wrong password, no such database) is what the operator needs."""
    psycopg, psycopg_pool = _driver()
    try:
        psycopg.connect(url, connect_timeout=int(CONNECT_TIMEOUT_SECONDS)).close()
    except psycopg.Error as error:
        raise _unreachable(url, error) from None
    pool = psycopg_pool.ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        open=False,
        timeout=CONNECT_TIMEOUT_SECONDS,
        kwargs={"connect_timeout": int(CONNECT_TIMEOUT_SECONDS), "application_name": "gateway"},
        # A connection is tried (one empty query) before a job gets it: after PostgreSQL
        # restarts, the pool's old connections are dead, and without the check each would
        # fail one job (a 4xx to a client) although the server is back.
        check=psycopg_pool.ConnectionPool.check_connection,
        name="gateway-store",
    )
    try:
        pool.open(wait=True, timeout=CONNECT_TIMEOUT_SECONDS)
    except psycopg.Error as error:  # PoolTimeout is one
        pool.close()
        raise _unreachable(url, error) from None
    return pool


def _unreachable(url: str, error: BaseException) -> StoreError:
    return StoreError(
        f"cannot connect to PostgreSQL at {describe(url)} (store.url): {_reason(error, url)}; "
        "check that the server runs, the address and credentials, and pg_hba.conf"
    )


def _guarded(work: Callable[[Any], _T], pool: Any, url: str) -> _T:
    psycopg, _psycopg_pool = _driver()
    try:
        return work(pool)
    except psycopg.Error as error:  # the pool's PoolTimeout and PoolClosed are ones too
        raise StoreError(
            f"cannot use the PostgreSQL database {describe(url)}: {_reason(error, url)}"
        ) from error


def _in_transaction(pool: psycopg_pool.ConnectionPool, job: Callable[[Connection], _T]) -> _T:
    with pool.connection() as conn:  # commits when the job returns, rolls back if it raises
        return job(_PgConnection(conn))


def _migrate(pool: psycopg_pool.ConnectionPool, url: str) -> int:
    with pool.connection() as conn:
        conn.autocommit = True
        adapted = _PgConnection(conn)

        @contextmanager
        def exclusive() -> Iterator[None]:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                yield

        return apply_migrations(adapted, exclusive, describe(url), MIGRATIONS, for_postgresql)


def _version_problem(url: str, version: int) -> str:
    newest = len(MIGRATIONS)
    where = describe(url)
    if version > newest:
        return (
            f"{where} has schema version {version} but this gateway only knows up to {newest}; "
            "upgrade this instance to the version the others run"
        )
    return (
        f"{where} has schema version {version}, this gateway needs {newest}: run "
        "`gateway migrate -c CONFIG` once (with every older instance stopped if one runs)"
    )


def _reason(error: BaseException, url: str) -> str:
    """The driver's message on one line, never with the URL's password: libpq's own messages
    leave it out, but one about a malformed URL may quote a part of it."""
    text = " ".join(str(error).split()) or type(error).__name__
    secret = _password(url)
    if secret:
        for form in {secret, unquote(secret)}:
            text = text.replace(form, "***")
    return text


def installed_version(conn: Connection) -> int:
    """The schema version, 0 for a database no ``gateway migrate`` has touched."""
    (exists,) = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    return current_version(conn) if exists else 0
