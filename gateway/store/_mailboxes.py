"""INBOX views' durable state: each account's UID map, its sync cursor, exact sizes, local
flags and deletions, and the stored message headers (the SQLite ``MailboxStore``).

A map changes one sync (or one local edit) at a time, each in a single transaction with the
cursor, so a crash never leaves a map that disagrees with the cursor it was synced to. Every
change takes the map's state row first (its lock across instances sharing a PostgreSQL) and
counts itself in ``mailbox_state.version``: an instance compares that counter with its own copy's
to know whether another instance changed the map, and a sync saves only over the version it
started from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from ._crypto import SecretBox
from ._db import now_text, time_text
from ._sql import Connection, SqlDatabase
from ._types import MailboxState, MailboxUid, MailboxUpdate

_SQL_PARAMETER_CHUNK = 500  # under SQLite's bound-parameter limit


class SqlMailboxStore:
    """UID maps and stored headers in the state database."""

    def __init__(self, db: SqlDatabase, box: SecretBox) -> None:
        self._db = db
        self._box = box

    async def load_mailbox(self, account: str) -> tuple[MailboxState | None, list[MailboxUid]]:
        """The account's view state and its UID map in UID order; (None, []) before a sync."""
        return await self._db.run(lambda conn: _load_mailbox(conn, account))

    async def mailbox_version(self, account: str) -> int | None:
        """The map's change counter (None before the first sync): one row, for comparing."""
        row = await self._db.fetch_one(
            "SELECT version FROM mailbox_state WHERE account = ?", (account,)
        )
        return None if row is None else row[0]

    async def save_mailbox_sync(
        self,
        account: str,
        base: int | None,
        state: MailboxState,
        added: Sequence[MailboxUid] = (),
        removed: Sequence[str] = (),
        updated: Sequence[MailboxUid] = (),
        *,
        replace: bool = False,
    ) -> int | None:
        """Save one sync's result in a single transaction, cursor included; the new version,
        or None (nothing saved) when the map is no longer at version ``base`` (None: no map).

        The map and the cursor move together, so a crash leaves either the old map with the old
        cursor (the sync is replayed, idempotently) or both new. The version check makes it a
        compare-and-set: a poller that lost its leadership mid-sync cannot overwrite what the
        next leader or a client on another instance saved. ``updated`` rows replace the
        mutable columns (flags, size, local flags, hidden) of rows with the same provider id;
        ``replace`` drops every row first: a rebuild under a new UIDVALIDITY.
        """
        changes = bool(added or removed or updated or replace)

        def save(conn: Connection) -> int | None:
            version = _claim_state(conn, account, base, state, changes)
            if version is not None:
                _save_rows(conn, account, added, removed, updated, replace)
            return version

        return await self._db.transact(save)

    async def update_mailbox(
        self,
        account: str,
        base: int | None,
        provider_ids: Sequence[str],
        change: Callable[[MailboxUid], MailboxUid],
    ) -> MailboxUpdate:
        """A client's change (flags, deletion) as one read-modify-write: ``change`` gets each
        row as stored now, under the map's row lock, so two instances changing the same
        message at once both count. When the map moved past ``base`` meanwhile, the result
        carries the whole map read in the same transaction."""
        return await self._db.transact(
            lambda conn: _update(conn, account, base, list(dict.fromkeys(provider_ids)), change)
        )

    async def save_mailbox_sizes(self, account: str, sizes: Mapping[str, int]) -> None:
        """Exact sizes learnt from downloads: facts that never change, so they are written
        column-only, beside any concurrent change of the same rows, and counted as no change."""
        await self._db.transact(
            lambda conn: conn.executemany(
                "UPDATE mailbox_uids SET size = ? "
                "WHERE account = ? AND provider_id = ? AND size IS NULL",
                [(size, account, pid) for pid, size in sizes.items()],
            )
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
    """One statement, so one snapshot on PostgreSQL too (READ COMMITTED gives each statement
    its own): the state and the rows always belong to the same version."""
    rows = conn.execute(
        "SELECT s.uidvalidity, s.uidnext, s.sync_cursor, s.version, "
        "u.uid, u.provider_id, u.internal_date, u.flags, u.size, u.local_flags, u.hidden "
        "FROM mailbox_state s LEFT JOIN mailbox_uids u ON u.account = s.account "
        "WHERE s.account = ? ORDER BY u.uid",
        (account,),
    ).fetchall()
    if not rows:
        return None, []
    first = rows[0]
    state = MailboxState(first[0], first[1], first[2], first[3])
    return state, [_entry(row[4:]) for row in rows if row[4] is not None]


def _entry(row: Sequence[Any]) -> MailboxUid:
    uid, pid, date, flags, size, local, hidden = row
    return MailboxUid(
        uid,
        pid,
        datetime.fromisoformat(date),
        tuple(flags.split()),
        size,
        None if local is None else tuple(local.split()),
        bool(hidden),
    )


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


def _claim_state(
    conn: Connection, account: str, base: int | None, state: MailboxState, changes: bool
) -> int | None:
    """The state row first: it is the map's lock, and its version the compare-and-set; the
    version counts only changes of the map (a new cursor alone is no news to the others)."""
    values = (state.uidvalidity, state.uidnext, state.cursor, now_text())
    if base is None:
        row = conn.execute(
            "INSERT INTO mailbox_state (uidvalidity, uidnext, sync_cursor, updated_at, version, "
            "account) VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT (account) DO NOTHING "
            "RETURNING version",
            (*values, account),
        ).fetchone()
    else:
        row = conn.execute(
            "UPDATE mailbox_state SET uidvalidity = ?, uidnext = ?, sync_cursor = ?, "
            "updated_at = ?, version = version + ? WHERE account = ? AND version = ? "
            "RETURNING version",
            (*values, int(changes), account, base),
        ).fetchone()
    return None if row is None else int(row[0])


def _save_rows(
    conn: Connection,
    account: str,
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


def _update(
    conn: Connection,
    account: str,
    base: int | None,
    provider_ids: list[str],
    change: Callable[[MailboxUid], MailboxUid],
) -> MailboxUpdate:
    # Updating the state row (to itself) takes its row lock on PostgreSQL, so the rows read
    # next are the latest and stay so until commit; SQLite's BEGIN IMMEDIATE already did.
    locked = conn.execute(
        "UPDATE mailbox_state SET version = version WHERE account = ? RETURNING version",
        (account,),
    ).fetchone()
    if locked is None:
        return MailboxUpdate([], None)
    version = int(locked[0])
    current = _load_rows(conn, account, provider_ids)
    changed = [
        new
        for pid in provider_ids
        if (old := current.get(pid)) is not None and (new := change(old)) != old
    ]
    if changed:
        version += 1
        _save_rows(conn, account, (), (), changed, False)
        conn.execute(
            "UPDATE mailbox_state SET version = ?, updated_at = ? WHERE account = ?",
            (version, now_text(), account),
        )
    if base is not None and version == base + bool(changed):
        return MailboxUpdate(changed, version)  # nobody else changed the map since ``base``
    state, entries = _load_mailbox(conn, account)
    assert state is not None, "locked above"
    return MailboxUpdate(changed, version, (state, entries))


def _load_rows(
    conn: Connection, account: str, provider_ids: Sequence[str]
) -> dict[str, MailboxUid]:
    found: dict[str, MailboxUid] = {}
    for start in range(0, len(provider_ids), _SQL_PARAMETER_CHUNK):
        chunk = provider_ids[start : start + _SQL_PARAMETER_CHUNK]
        marks = ", ".join("?" * len(chunk))
        rows = conn.execute(
            "SELECT uid, provider_id, internal_date, flags, size, local_flags, hidden "  # noqa: S608
            f"FROM mailbox_uids WHERE account = ? AND provider_id IN ({marks})",
            (account, *chunk),
        ).fetchall()
        found.update((row[1], _entry(row)) for row in rows)
    return found


def _mutable(entry: MailboxUid) -> tuple[str, int | None, str | None, int]:
    local = None if entry.local_flags is None else " ".join(entry.local_flags)
    return " ".join(entry.flags), entry.size, local, int(entry.hidden)
