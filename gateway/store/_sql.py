"""What the purpose stores need from a SQL backend: one set of queries for SQLite and PostgreSQL.

The stores (``_auth``, ``_events``, ``_mailboxes``) and the database spool write their SQL once,
with ``?`` placeholders and portable statements (``INSERT ... ON CONFLICT``, no SQLite-only
functions). A *job* is a plain function run on a worker thread with a :class:`Connection`:
``sqlite3.Connection`` is one as it stands; the PostgreSQL backend hands an adapter that turns
``?`` into psycopg's ``%s``. Jobs block (fsync, network round trips), so the event loop only
awaits them through :class:`SqlDatabase`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

_T = TypeVar("_T")
Row = tuple[Any, ...]


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """The DB-API subset a job may use."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> Any: ...


class SqlDatabase(Protocol):
    """A backend the stores run their jobs on (``_db.Database``, ``_pg.PgDatabase``)."""

    @property
    def schema_version(self) -> int: ...

    async def execute(self, sql: str, params: tuple[Any, ...]) -> None: ...

    async def fetch_one(self, sql: str, params: tuple[Any, ...] = ()) -> Row | None: ...

    async def fetch_all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]: ...

    async def transact(self, job: Callable[[Connection], _T]) -> _T:
        """All of *job*'s statements apply, or none."""

    async def run(self, job: Callable[[Connection], _T]) -> _T:
        """*job* on a worker thread; on PostgreSQL one transaction, on SQLite autocommit."""

    async def close(self) -> None: ...
