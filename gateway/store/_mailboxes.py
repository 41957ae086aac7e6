"""INBOX views' durable state: each account's UID map, its sync cursor, exact sizes, local
flags and deletions, and the stored message headers (the SQLite ``MailboxStore``).

A map changes one sync (or one local edit) at a time, each in a single transaction with the
cursor, so a crash never leaves a map that disagrees with the cursor it was synced to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from ._crypto import SecretBox
from ._db import now_text, time_text
from ._sql import Connection, SqlDatabase
from ._types import MailboxState, MailboxUid

_SQL_PARAMETER_CHUNK = 500  # under SQLite's bound-parameter limit


class SqlMailboxStore:
    """UID maps and stored headers in the state database."""

    def __init__(self, db: SqlDatabase, box: SecretBox) -> None:
        self._db = db
        self._box = box

    async def load_mailbox(self, account: str) -> tuple[MailboxState | None, list[MailboxUid]]:
        """The account's view state and its UID map in UID order; (None, []) before a sync."""
        return await self._db.run(lambda conn: _load_mailbox(conn, account))

    async def save_mailbox_changes(
        self,
        account: str,
        state: MailboxState | None,
        added: Sequence[MailboxUid] = (),
        removed: Sequence[str] = (),
        updated: Sequence[MailboxUid] = (),
        *,
        replace: bool = False,
    ) -> None:
        """Apply one change to the UID map in a single transaction, cursor included.

        The map and the cursor move together, so a crash leaves either the old map with the old
        cursor (the sync is replayed, idempotently) or both new. ``updated`` rows replace the
        mutable columns (flags, size, local flags, hidden) of rows with the same provider id;
        ``state`` None leaves the state row alone (a local change, not a sync). ``replace``
        drops every row first: a rebuild under a new UIDVALIDITY.
        """
        await self._db.transact(
            lambda conn: _save_mailbox(conn, account, state, added, removed, updated, replace)
        )

    async def save_mailbox_headers(self, account: str, headers: Mapping[str, bytes]) -> None:
        """Keep the header of messages of the account's map (a row per provider id).

        Headers name people and subjects, so they are encrypted at rest like tokens, each
        bound to its account and message id.
        """
        box = self._box

        def save(conn: Connection) -> None:
            rows = [  # sealed on the worker thread: a warm-up saves thousands at once
                (account, pid, box.encrypt(header, _header_context(account, pid)), account, pid)
                for pid, header in headers.items()
            ]
            conn.executemany(
                "INSERT INTO mailbox_headers (account, provider_id, header) "
                "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM mailbox_uids "
                "WHERE account = ? AND provider_id = ?) "
                "ON CONFLICT (account, provider_id) DO UPDATE SET header = excluded.header",
                rows,
            )

        await self._db.transact(save)

    async def load_mailbox_headers(
        self, account: str, provider_ids: Sequence[str]
    ) -> dict[str, bytes]:
        """The stored headers of these messages; ids without one are left out."""
        box = self._box

        def load(conn: Connection) -> dict[str, bytes]:
            found = _load_headers(conn, account, list(provider_ids))
            return {
                pid: box.decrypt(sealed, _header_context(account, pid))
                for pid, sealed in found.items()
            }

        return await self._db.run(load)


def _header_context(account: str, provider_id: str) -> str:
    return f"mailbox-header:{account}:{provider_id}"


def _load_mailbox(conn: Connection, account: str) -> tuple[MailboxState | None, list[MailboxUid]]:
    row = conn.execute(
        "SELECT uidvalidity, uidnext, sync_cursor FROM mailbox_state WHERE account = ?",
        (account,),
    ).fetchone()
    if row is None:
        return None, []
    rows = conn.execute(
        "SELECT uid, provider_id, internal_date, flags, size, local_flags, hidden "
        "FROM mailbox_uids WHERE account = ? ORDER BY uid",
        (account,),
    ).fetchall()
    entries = [
        MailboxUid(
            uid,
            pid,
            datetime.fromisoformat(date),
            tuple(flags.split()),
            size,
            None if local is None else tuple(local.split()),
            bool(hidden),
        )
        for uid, pid, date, flags, size, local, hidden in rows
    ]
    return MailboxState(row[0], row[1], row[2]), entries


def _load_headers(conn: Connection, account: str, provider_ids: Sequence[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for start in range(0, len(provider_ids), _SQL_PARAMETER_CHUNK):
        chunk = provider_ids[start : start + _SQL_PARAMETER_CHUNK]
        marks = ", ".join("?" * len(chunk))
        found.update(
            conn.execute(
                "SELECT provider_id, header FROM mailbox_headers "  # noqa: S608
                f"WHERE account = ? AND provider_id IN ({marks})",
                (account, *chunk),
            ).fetchall()
        )
    return found


def _save_mailbox(
    conn: Connection,
    account: str,
    state: MailboxState | None,
    added: Sequence[MailboxUid],
    removed: Sequence[str],
    updated: Sequence[MailboxUid],
    replace: bool,
) -> None:
    if replace:
        conn.execute("DELETE FROM mailbox_uids WHERE account = ?", (account,))
        conn.execute("DELETE FROM mailbox_headers WHERE account = ?", (account,))
    for table in ("mailbox_uids", "mailbox_headers"):
        conn.executemany(
            f"DELETE FROM {table} WHERE account = ? AND provider_id = ?",  # noqa: S608
            [(account, pid) for pid in removed],
        )
    conn.executemany(
        "INSERT INTO mailbox_uids (account, uid, provider_id, internal_date, flags, size, "
        "local_flags, hidden) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(account, e.uid, e.provider_id, time_text(e.internal_date), *_mutable(e)) for e in added],
    )
    conn.executemany(
        "UPDATE mailbox_uids SET flags = ?, size = ?, local_flags = ?, hidden = ? "
        "WHERE account = ? AND provider_id = ?",
        [(*_mutable(e), account, e.provider_id) for e in updated],
    )
    if state is not None:
        conn.execute(
            "INSERT INTO mailbox_state (account, uidvalidity, uidnext, sync_cursor, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (account) DO UPDATE SET "
            "uidvalidity = excluded.uidvalidity, uidnext = excluded.uidnext, "
            "sync_cursor = excluded.sync_cursor, updated_at = excluded.updated_at",
            (account, state.uidvalidity, state.uidnext, state.cursor, now_text()),
        )


def _mutable(entry: MailboxUid) -> tuple[str, int | None, str | None, int]:
    local = None if entry.local_flags is None else " ".join(entry.local_flags)
    return " ".join(entry.flags), entry.size, local, int(entry.hidden)
