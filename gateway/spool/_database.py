"""The spool in the shared database: any of several instances may deliver any message (issue 16).

Each message is one ``spool_messages`` row, body included, written in the transaction that
commits its batch (group commit, as the file spool's fsyncs): on PostgreSQL with the default
``synchronous_commit = on`` the row is on the server's disk before the client gets its 250.
Other instances hear of it at once (``notify("spool", ...)``), and every instance also rescans.

Delivery *claims* a row first: ``SELECT ... FOR UPDATE SKIP LOCKED`` picks the rows due and not
leased (two instances never wait for or take the same row), and the lease (``lease_owner``,
``lease_until_ms``) keeps it this instance's while the attempt runs; a background task renews
the leases of attempts still in flight. An instance that dies loses its claims when their
leases run out; the next claimer sees ``attempt_started`` and, as after a crash of the file
spool, looks the message up in the provider's sent mail before sending it again. A result that
cannot be written (the database gone meanwhile) leaves the row as it was: started, so looked up.

Providers' pauses are rows of ``spool_pauses`` (announced with ``notify("spool_pause", ...)``),
the delivery log is ``spool_deliveries``. Times are integer epoch milliseconds.

The same SQL runs on SQLite (one process: ``BEGIN IMMEDIATE`` already serialises claims, so the
row lock clause is left out there), which the unit tests use beside PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import AccountSettings, Settings
from ..logs import get_logger
from ..store import Connection, Coordination, SqlDatabase, StoreError, Stores
from ._files import Record, envelope_data, envelope_from, log_line
from ._incoming import IncomingMessage
from ._spool import SpoolWorker, options
from ._store import Arrivals, Claim, PausesSeen
from ._types import SpoolError

if TYPE_CHECKING:
    from ..providers import Sender

log = get_logger(__name__)
_T = TypeVar("_T")

LEASE_SECONDS = 60.0  # a claim lasts this long unless renewed (every third of it)
LOG_DAYS = 30  # delivery log rows older than this are dropped
NOTICE_BYTES = 7000  # PostgreSQL's NOTIFY payload limit is 8000 bytes
# Statements are formatted with constant column lists and "?" placeholders only (S608).
_COLUMNS = (
    "id, envelope, message_id, size, state, created_ms, retry_since_ms, attempts, "
    "attempt_started, next_attempt_ms, reason, lease_owner, lease_until_ms"
)


def _ms(epoch: float) -> int:
    return round(epoch * 1000)


def _marks(count: int) -> str:
    return ", ".join("?" * count)


class DatabaseStore:
    """A :class:`~._store.SpoolStore` over ``db`` (see the module docstring)."""

    def __init__(
        self,
        db: SqlDatabase,
        coordination: Coordination,
        backend: str,
        tmp: Path,
        *,
        lease_seconds: float = LEASE_SECONDS,
        owner: str | None = None,
    ) -> None:
        self.db = db
        self.coordination = coordination
        self.tmp = tmp
        self.lease_seconds = lease_seconds
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # Row locks are PostgreSQL's; SQLite's BEGIN IMMEDIATE admits one writer at a time.
        self._lock_rows = " FOR UPDATE SKIP LOCKED" if backend == "postgresql" else ""
        self._claimed: set[str] = set()  # ids leased to this instance
        self._unsubscribe: list[Callable[[], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def prepare(self) -> None:
        """Messages are received into files here before their commit; leftovers are debris."""
        self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)

    async def start(self, arrivals: Arrivals, pauses: PausesSeen) -> None:
        async def arrived(payload: str | None) -> None:
            if payload is None:  # the listening connection was lost: anything may have come
                arrivals(None)
                pauses(await self.load_pauses(time.time()))
                return
            sender, _, ids = payload.partition(" ")
            if sender != self.owner and ids:
                arrivals(await self._load_many(ids.split(",")))

        async def paused(payload: str | None) -> None:
            pauses(await self.load_pauses(time.time()))

        self._unsubscribe = [
            self.coordination.subscribe("spool", lambda p: self._spawn(arrived(p))),
            self.coordination.subscribe("spool_pause", lambda p: self._spawn(paused(p))),
        ]
        self._spawn(self._renew_leases(), quiet=True)

    async def stop(self) -> None:
        """Stop listening and renewing; hand back the claims still held (their attempts were
        cancelled: marked started, so the next claimer looks them up in sent mail)."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        claimed, self._claimed = list(self._claimed), set()
        if claimed:
            with contextlib.suppress(SpoolError):
                await self._run(lambda conn: self._unlease(conn, claimed))

    # -- intake ----------------------------------------------------------------------------

    async def commit_batch(
        self, batch: list[tuple[Record, IncomingMessage]]
    ) -> list[Exception | None]:
        """One transaction for the batch's rows; the temporary files go either way."""
        bodies = await asyncio.to_thread(_take_bodies, [incoming for _, incoming in batch])
        rows = [
            (*_state_row(record), record.envelope.account, body)
            for (record, _), body in zip(batch, bodies, strict=True)
            if not isinstance(body, OSError)
        ]
        insert = (
            "INSERT INTO spool_messages (id, envelope, message_id, size, state, created_ms, "  # noqa: S608
            "retry_since_ms, attempts, attempt_started, next_attempt_ms, reason, account, body) "
            f"VALUES ({_marks(13)})"
        )
        try:
            await self._run(lambda conn: conn.executemany(insert, rows))
        except SpoolError as error:
            return [error] * len(batch)
        results: list[Exception | None] = [
            body if isinstance(body, OSError) else None for body in bodies
        ]
        stored = [
            record.id for (record, _), result in zip(batch, results, strict=True) if result is None
        ]
        self._spawn(self._announce(stored), quiet=True)  # no reply waits for the notice
        return results

    async def _announce(self, ids: list[str]) -> None:
        """Tell every instance (the notice's first word says who sent it)."""
        chunk: list[str] = []
        for queue_id in ids:
            chunk.append(queue_id)
            if sum(len(i) + 1 for i in chunk) > NOTICE_BYTES - 200:
                await self.coordination.notify("spool", f"{self.owner} {','.join(chunk)}")
                chunk = []
        if chunk:
            await self.coordination.notify("spool", f"{self.owner} {','.join(chunk)}")

    # -- claims and state ------------------------------------------------------------------

    async def claim_batch(self, records: list[Record]) -> list[Claim]:
        ids = [record.id for record in records]
        now = _ms(time.time())
        lease_until = _ms(time.time() + self.lease_seconds)

        def claim(conn: Connection) -> tuple[set[str], list[Any]]:
            free = conn.execute(
                f"SELECT id FROM spool_messages WHERE id IN ({_marks(len(ids))}) "  # noqa: S608
                "AND state IN ('queued', 'held') AND next_attempt_ms <= ? "
                "AND (lease_until_ms IS NULL OR lease_until_ms < ? OR lease_owner = ?)"
                f"{self._lock_rows}",
                (*ids, now, now, self.owner),
            ).fetchall()
            taken = {row[0] for row in free}
            if taken:
                conn.execute(
                    "UPDATE spool_messages SET lease_owner = ?, lease_until_ms = ? "  # noqa: S608
                    f"WHERE id IN ({_marks(len(taken))})",
                    (self.owner, lease_until, *taken),
                )
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM spool_messages WHERE id IN ({_marks(len(ids))})",  # noqa: S608
                ids,
            ).fetchall()
            return taken, rows

        taken, rows = await self._run(claim)
        self._claimed |= taken
        stored = {record.id: record for record in self._records(rows, now)}
        return [(queue_id in taken, stored.get(queue_id)) for queue_id in ids]

    async def release_claim(self, record: Record) -> None:
        """Never raises: a claim not handed back runs out with its lease."""
        if record.id not in self._claimed:
            return
        self._claimed.discard(record.id)
        with contextlib.suppress(SpoolError):
            await self._run(lambda conn: self._unlease(conn, [record.id]))

    def _unlease(self, conn: Connection, ids: list[str]) -> None:
        conn.execute(
            "UPDATE spool_messages SET lease_owner = NULL, lease_until_ms = NULL "  # noqa: S608
            f"WHERE lease_owner = ? AND id IN ({_marks(len(ids))})",
            (self.owner, *ids),
        )

    async def mark_batch(self, records: list[Record]) -> list[bool]:
        lease_until = _ms(time.time() + self.lease_seconds)

        def mark(conn: Connection) -> list[bool]:
            return [
                conn.execute(
                    "UPDATE spool_messages SET attempts = ?, attempt_started = ?, "
                    "lease_until_ms = ? WHERE id = ? AND lease_owner = ?",
                    (r.attempts, int(r.attempt_started), lease_until, r.id, self.owner),
                ).rowcount
                == 1
                for r in records
            ]

        marked = await self._run(mark)
        for record, ours in zip(records, marked, strict=True):
            if not ours:
                self._claimed.discard(record.id)
        return marked

    async def save_batch(self, records: list[Record]) -> list[bool]:
        now = _ms(time.time())

        def save(conn: Connection) -> list[bool]:
            return [
                conn.execute(
                    "UPDATE spool_messages SET state = ?, retry_since_ms = ?, attempts = ?, "
                    "attempt_started = ?, next_attempt_ms = ?, reason = ?, "
                    "lease_owner = NULL, lease_until_ms = NULL WHERE id = ? "
                    "AND (lease_owner IS NULL OR lease_owner = ? OR lease_until_ms < ?)",
                    (*_changes(r), r.id, self.owner, now),
                ).rowcount
                == 1
                for r in records
            ]

        saved = await self._run(save)
        self._claimed.difference_update(record.id for record in records)
        return saved

    async def forget_batch(self, done: list[tuple[Record, str, str]]) -> list[None]:
        ids = [(record.id,) for record, _, _ in done]

        def forget(conn: Connection) -> None:
            conn.executemany("DELETE FROM spool_messages WHERE id = ?", ids)
            self._log(conn, [log_line(*item) for item in done])

        await self._run(forget)
        self._claimed.difference_update(record.id for record, _, _ in done)
        return [None] * len(done)

    async def log_delivery(self, record: Record, result: str, detail: str) -> None:
        await self._run(lambda conn: self._log(conn, [log_line(record, result, detail)]))

    def _log(self, conn: Connection, lines: list[dict[str, Any]]) -> None:
        conn.executemany(
            "INSERT INTO spool_deliveries (at, queue_id, message_id, account, recipients, "
            "result, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    line["time"],
                    line["queue_id"],
                    line["message_id"],
                    line["account"],
                    line["recipients"],
                    line["result"],
                    line["detail"],
                )
                for line in lines
            ],
        )

    async def _renew_leases(self) -> None:
        """Every third of a lease, push the leases of attempts in flight forward."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            claimed = list(self._claimed)
            if not claimed:
                continue
            with contextlib.suppress(SpoolError):  # the worker reports the outage
                await self._run(partial(self._renew, claimed, time.time() + self.lease_seconds))

    def _renew(self, ids: list[str], until: float, conn: Connection) -> None:
        conn.execute(
            "UPDATE spool_messages SET lease_until_ms = ? "  # noqa: S608
            f"WHERE lease_owner = ? AND id IN ({_marks(len(ids))})",
            (_ms(until), self.owner, *ids),
        )

    # -- reading ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def message(self, queue_id: str, mapped: bool) -> AsyncIterator[bytes | mmap.mmap]:
        """The body's bytes (a database row cannot be mapped)."""
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT body FROM spool_messages WHERE id = ?", (queue_id,)
            ).fetchone()
        )
        if row is None:
            raise FileNotFoundError(f"spool message {queue_id} is gone")
        yield bytes(row[0])

    async def tidy(self) -> None:
        return None  # rows need no compaction

    async def records(self) -> list[Record]:
        now = time.time()
        oldest = (datetime.now(UTC) - timedelta(days=LOG_DAYS)).isoformat(timespec="seconds")

        def read(conn: Connection) -> list[Any]:
            conn.execute("DELETE FROM spool_deliveries WHERE at < ?", (oldest,))
            return conn.execute(f"SELECT {_COLUMNS} FROM spool_messages ORDER BY id").fetchall()  # noqa: S608

        return self._records(await self._run(read), _ms(now))

    async def load(self, queue_id: str) -> Record | None:
        found = await self._load_many([queue_id])
        return found[0] if found else None

    async def _load_many(self, ids: Sequence[str]) -> list[Record]:
        rows = await self._run(
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS} FROM spool_messages WHERE id IN ({_marks(len(ids))}) "  # noqa: S608
                "ORDER BY id",
                tuple(ids),
            ).fetchall()
        )
        return self._records(rows, _ms(time.time()))

    def _records(self, rows: Iterable[Any], now_ms: int) -> list[Record]:
        """Records from rows; one leased by another instance is due when its lease ends."""
        found = []
        for row in rows:
            record = _record(row)
            owner, lease_until = row[11], row[12]
            if owner not in (None, self.owner) and lease_until is not None and lease_until > now_ms:
                record.next_attempt = max(record.next_attempt, lease_until / 1000)
            found.append(record)
        return found

    # -- pauses, queue tools, the log --------------------------------------------------------

    async def load_pauses(self, now: float) -> dict[str, float]:
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT account, until_ms FROM spool_pauses WHERE until_ms > ?", (_ms(now),)
            ).fetchall()
        )
        return {account: until / 1000 for account, until in rows}

    async def save_pause(self, account: str, until: float, current: dict[str, float]) -> None:
        """Kept if later than the stored pause; every instance hears of it at once."""
        await self._run(
            lambda conn: conn.execute(
                "INSERT INTO spool_pauses (account, until_ms) VALUES (?, ?) "
                "ON CONFLICT (account) DO UPDATE SET until_ms = CASE "
                "WHEN excluded.until_ms > spool_pauses.until_ms THEN excluded.until_ms "
                "ELSE spool_pauses.until_ms END",
                (account, _ms(until)),
            )
        )
        with contextlib.suppress(StoreError):  # the rescan and the provider's answers remain
            await self.coordination.notify("spool_pause", account)

    async def retry(self, queue_id: str | None, held_for: str | None = None) -> int:
        """Due now, with a new retry window; a message in flight is left to its attempt."""
        now = _ms(time.time())
        where, params = _retry_filter(queue_id, held_for)
        ids = await self._run(
            lambda conn: [
                row[0]
                for row in conn.execute(
                    "UPDATE spool_messages SET state = 'queued', next_attempt_ms = 0, "  # noqa: S608
                    "retry_since_ms = ? WHERE (lease_until_ms IS NULL OR lease_until_ms < ?)"
                    f"{where} RETURNING id",
                    (now, now, *params),
                ).fetchall()
            ]
        )
        if ids:
            with contextlib.suppress(StoreError):
                await self._announce(ids)
        return len(ids)

    async def recent_deliveries(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT at, queue_id, message_id, account, recipients, result, detail "
                "FROM spool_deliveries ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        )
        keys = ("time", "queue_id", "message_id", "account", "recipients", "result", "detail")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # -- plumbing --------------------------------------------------------------------------

    async def _run(self, job: Callable[[Connection], _T]) -> _T:
        """One transaction; the database's failure as the spool's error (SMTP says 451)."""
        try:
            return await self.db.transact(job)
        except StoreError as error:
            raise SpoolError(f"the spool's database cannot be used: {error}") from error

    def _spawn(self, work: Coroutine[Any, Any, None], quiet: bool = False) -> None:
        """Background work held until it ends; a failure is logged (``quiet``: only at debug,
        as the worker reports the database's outages itself)."""

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                error = task.exception()
                (log.debug if quiet else log.warning)("spool.notice_failed", error=str(error))

        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(done)


def _retry_filter(queue_id: str | None, held_for: str | None) -> tuple[str, tuple[str, ...]]:
    """The extra condition of a retry: one message, an account's held mail, or none (all)."""
    if queue_id is not None:
        return " AND id = ?", (queue_id,)
    if held_for is not None:
        return " AND account = ? AND state = 'held'", (held_for,)
    return "", ()


def _take_bodies(incomings: list[IncomingMessage]) -> list[bytes | OSError]:
    """Each received message's bytes; its temporary file is removed either way."""
    bodies: list[bytes | OSError] = []
    for incoming in incomings:
        try:
            bodies.append(incoming.content())
        except OSError as error:
            bodies.append(error)
        finally:
            incoming.discard()
    return bodies


def _changes(record: Record) -> tuple[Any, ...]:
    return (
        record.state,
        _ms(record.retry_since),
        record.attempts,
        int(record.attempt_started),
        _ms(record.next_attempt),
        record.reason,
    )


def _state_row(record: Record) -> tuple[Any, ...]:
    """id, envelope, message_id, size, state, created, retry_since, attempts, attempt_started,
    next_attempt, reason: the columns of a new row but its account and body."""
    return (
        record.id,
        json.dumps(envelope_data(record.envelope), ensure_ascii=False),
        record.message_id,
        record.size,
        record.state,
        _ms(record.created),
        _ms(record.retry_since),
        record.attempts,
        int(record.attempt_started),
        _ms(record.next_attempt),
        record.reason,
    )


def _record(row: Sequence[Any]) -> Record:
    return Record(
        id=row[0],
        envelope=envelope_from(json.loads(row[1])),
        message_id=row[2],
        size=row[3],
        state=row[4],
        created=row[5] / 1000,
        retry_since=row[6] / 1000,
        attempts=row[7],
        attempt_started=bool(row[8]),
        next_attempt=row[9] / 1000,
        reason=row[10],
    )


RESCAN_SECONDS = 30.0


class DatabaseSpool(SpoolWorker):
    """The spool of an instance sharing its database with others (``store.url``)."""

    def __init__(
        self,
        db: SqlDatabase,
        coordination: Coordination,
        backend: str,
        directory: Path,
        accounts: Iterable[AccountSettings],
        senders: Mapping[str, Sender],
        *,
        lease_seconds: float = LEASE_SECONDS,
        owner: str | None = None,
        **worker_options: Any,
    ) -> None:
        self.database = DatabaseStore(
            db, coordination, backend, directory / "tmp", lease_seconds=lease_seconds, owner=owner
        )
        super().__init__(self.database, accounts, senders, **worker_options)

    @classmethod
    def from_settings(
        cls, settings: Settings, senders: Mapping[str, Sender], stores: Stores
    ) -> DatabaseSpool:
        return cls(
            stores.db,
            stores.coordination,
            stores.backend,
            settings.state_dir / "spool",
            settings.accounts,
            senders,
            lease_seconds=float(settings.spool.lease_seconds),
            # A dead instance's claims are free once their lease ends; a rescan then finds them
            # (nothing announces an expiry), so look at least twice per lease.
            rescan_interval=min(RESCAN_SECONDS, settings.spool.lease_seconds / 2),
            **options(settings),
        )
