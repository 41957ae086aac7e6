"""The audit log: what happened to which account, in order (the SQLite ``EventLog``)."""

from __future__ import annotations

from datetime import datetime

from ._db import now_text
from ._sql import SqlDatabase
from ._types import Event


class SqlEventLog:
    """Audit events in the state database's ``events`` table."""

    def __init__(self, db: SqlDatabase) -> None:
        self._db = db

    async def record_event(
        self, kind: str, account: str | None = None, detail: str | None = None
    ) -> None:
        """Append to the audit log; callers must not put secrets in *detail*."""
        await self._db.execute(
            "INSERT INTO events (at, kind, account, detail) VALUES (?, ?, ?, ?)",
            (now_text(), kind, account, detail),
        )

    async def recent_events(self, limit: int = 50) -> list[Event]:
        """The newest *limit* events, newest first.

        Ordered by id (insertion order), not by ``at``, so a wall-clock step backwards cannot
        reorder the log; the ``at`` index serves time-range queries and pruning.
        """
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        rows = await self._db.fetch_all(
            "SELECT id, at, kind, account, detail FROM events ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [
            Event(id_, datetime.fromisoformat(at), kind, account, detail)
            for id_, at, kind, account, detail in rows
        ]
