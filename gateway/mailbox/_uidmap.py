"""Provider id → IMAP UID, per account, persisted in the store.

IMAP clients cache by (UIDVALIDITY, UID), so the rules are strict (RFC 3501 2.3.1.1): UIDs
ascend in arrival order and are never reused — ``uidnext`` only grows, and a message that
leaves and comes back gets a new UID — and UIDVALIDITY changes only when the map is rebuilt
from scratch (ids that cannot be matched). Arrival order within one batch is the provider's
arrival time, then id (or the upstream server's own UID order); UIDs are never derived from dates
(imports can be back-dated).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from ..providers import RemoteMessage
from ..store import MailboxState, MailboxStore, MailboxUid

Entry = MailboxUid


@dataclass(frozen=True, slots=True)
class Applied:
    """What one change did to the map, in UIDs: for EXISTS / EXPUNGE / FETCH FLAGS."""

    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    flags_changed: list[int] = field(default_factory=list)
    rebuilt: bool = False


def _flags(flags: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted(flags))


def new_uidvalidity(previous: int | None = None) -> int:
    """Seconds since the epoch (a common server choice), and always above the previous one."""
    now = int(time.time()) & 0xFFFFFFFF or 1
    return max(now, (previous or 0) + 1)


class MapMoved(Exception):
    """Another instance changed the map since this copy was read: nothing was saved."""


class UidMap:
    """The in-memory copy of one account's map; every change is written before it is seen.

    ``version`` is the store's change counter for the map as this copy holds it: when it
    equals the store's, the copy is exact (every change counts itself there in the transaction
    that makes it), which is how instances sharing a database see each other's changes cheaply.
    """

    def __init__(self, store: MailboxStore, account: str) -> None:
        self.store = store
        self.account = account
        self.state = MailboxState(new_uidvalidity(), 1, None)
        self.by_uid: dict[int, Entry] = {}
        self.by_id: dict[str, Entry] = {}
        self.known = False  # whether a sync was ever saved
        self._writing = asyncio.Lock()  # one change at a time: sync results and local edits

    @classmethod
    async def load(cls, store: MailboxStore, account: str) -> UidMap:
        uids = cls(store, account)
        state, entries = await store.load_mailbox(account)
        if state is not None:
            uids._replace(state, entries)
        return uids

    @property
    def uidvalidity(self) -> int:
        return self.state.uidvalidity

    @property
    def uidnext(self) -> int:
        return self.state.uidnext

    @property
    def cursor(self) -> str | None:
        return self.state.cursor

    @property
    def version(self) -> int | None:
        return self.state.version if self.known else None

    def entries(self) -> list[Entry]:
        return [self.by_uid[uid] for uid in sorted(self.by_uid)]

    async def apply(
        self,
        added: Iterable[RemoteMessage],
        removed: Iterable[str],
        flags: Mapping[str, frozenset[str]],
        cursor: str,
        present: frozenset[str] | None = None,
    ) -> Applied:
        """Apply changes idempotently: known ids in ``added`` only update their flags, unknown
        ids in ``removed``/``flags`` are ignored, an id both removed and added is removed; with
        ``present``, every known id missing from it is removed too. MapMoved when another
        instance changed the map meanwhile (:meth:`reload`, then apply again)."""
        async with self._writing:
            return await self._apply(list(added), set(removed), dict(flags), cursor, present)

    async def _apply(
        self,
        added: list[RemoteMessage],
        gone_set: set[str],
        reads: dict[str, frozenset[str]],
        cursor: str,
        present: frozenset[str] | None,
    ) -> Applied:
        if present is not None:
            gone_set |= {pid for pid in self.by_id if pid not in present}
        gone = [pid for pid in gone_set if pid in self.by_id]
        fresh: dict[str, RemoteMessage] = {}
        for message in added:
            if message.id in gone_set:
                continue
            if message.id in self.by_id:
                reads[message.id] = message.flags
            else:
                fresh[message.id] = message
        updated = [
            _provider_flags(entry, now)
            for pid, now in reads.items()
            if (entry := self.by_id.get(pid)) is not None
            and pid not in gone_set
            and entry.flags != _flags(now)
        ]
        ordered = sorted(fresh.values(), key=_arrival)
        new = [
            Entry(self.uidnext + n, m.id, m.internal_date, _flags(m.flags), m.size)
            for n, m in enumerate(ordered)
        ]
        state = MailboxState(self.uidvalidity, self.uidnext + len(new), cursor)
        version = await self.store.save_mailbox_sync(
            self.account, self.version, state, new, gone, updated
        )
        if version is None:
            raise MapMoved(self.account)
        return self._commit(replace(state, version=version), new, gone, updated)

    async def update(
        self, pids: Iterable[str], change: Callable[[Entry], Entry]
    ) -> tuple[list[Entry], Applied]:
        """Save a client's change (the gateway's flags, a deletion) of known messages.

        ``change`` gets each entry as stored now, in the transaction that writes it, so
        concurrent changes to the same message (from this instance or another) never overwrite
        each other. Returns the entries that really changed, and what else changed in the map
        when the store showed this copy had missed another instance's change.
        """
        async with self._writing:
            done = await self.store.update_mailbox(self.account, self.version, list(pids), change)
            for entry in done.changed:
                self.by_uid[entry.uid] = self.by_id[entry.provider_id] = entry
            if done.snapshot is not None:
                return done.changed, self._replace(*done.snapshot)
            if done.version is not None:
                self.state = replace(self.state, version=done.version)
            return done.changed, Applied()

    async def save_sizes(self, sizes: Mapping[str, int]) -> None:
        """Exact sizes learnt from downloads (facts: no other instance needs telling)."""
        async with self._writing:
            await self.store.save_mailbox_sizes(self.account, sizes)
            for pid, size in sizes.items():
                entry = self.by_id.get(pid)
                if entry is not None and entry.size is None:
                    self.by_uid[entry.uid] = self.by_id[pid] = replace(entry, size=size)

    async def reload(self) -> Applied:
        """Read the map again if the store's version differs from this copy's (another
        instance changed it): what changed, in UIDs, as a sync reports it."""
        async with self._writing:
            if await self.store.mailbox_version(self.account) == self.version:
                return Applied()
            state, entries = await self.store.load_mailbox(self.account)
            if state is None:
                return Applied()
            return self._replace(state, entries)

    def _replace(self, state: MailboxState, entries: list[Entry]) -> Applied:
        """Take the stored map as it is; what changed for a session's eyes: messages that
        came or left (a local deletion counts as leaving) and effective flags."""
        old, rebuilt = self.by_uid, self.known and state.uidvalidity != self.uidvalidity
        self.by_uid = {e.uid: e for e in entries}
        self.by_id = {e.provider_id: e for e in entries}
        self.state, self.known = state, True
        if rebuilt:
            added = [e.uid for e in entries if not e.hidden]
            return Applied(added, [], [], rebuilt=True)
        applied = Applied()
        for uid, before in old.items():
            after = self.by_uid.get(uid)
            if before.hidden:
                continue
            if after is None or after.hidden:
                applied.removed.append(uid)
            elif effective_flags(after) != effective_flags(before):
                applied.flags_changed.append(uid)
        applied.added.extend(e.uid for e in entries if e.uid not in old and not e.hidden)
        applied.removed.sort()
        applied.flags_changed.sort()
        return applied

    async def reconcile(self, snapshot: Iterable[RemoteMessage], cursor: str) -> Applied:
        """A full listing, matched by id: survivors keep their UIDs, the rest come and go."""
        listed = list(snapshot)
        present = {m.id for m in listed}
        return await self.apply(listed, [p for p in self.by_id if p not in present], {}, cursor)

    async def rebuild(self, snapshot: Iterable[RemoteMessage], cursor: str) -> Applied:
        """Start over under a new UIDVALIDITY: for ids that cannot be matched to the old ones."""
        ordered = sorted(snapshot, key=_arrival)
        new = [
            Entry(n, m.id, m.internal_date, _flags(m.flags), m.size)
            for n, m in enumerate(ordered, 1)
        ]
        state = MailboxState(new_uidvalidity(self.uidvalidity), len(new) + 1, cursor)
        async with self._writing:
            version = await self.store.save_mailbox_sync(
                self.account, self.version, state, new, replace=True
            )
            if version is None:
                raise MapMoved(self.account)
            self.by_uid.clear()
            self.by_id.clear()
            applied = self._commit(replace(state, version=version), new, [], [])
        return Applied(applied.added, [], [], rebuilt=True)

    def _commit(
        self, state: MailboxState, new: list[Entry], gone: list[str], updated: list[Entry]
    ) -> Applied:
        applied = Applied()
        for pid in gone:
            entry = self.by_id.pop(pid)
            del self.by_uid[entry.uid]
            applied.removed.append(entry.uid)
        for entry in updated:
            self.by_uid[entry.uid] = self.by_id[entry.provider_id] = entry
            applied.flags_changed.append(entry.uid)
        for entry in new:
            self.by_uid[entry.uid] = self.by_id[entry.provider_id] = entry
            applied.added.append(entry.uid)
        self.state, self.known = state, True
        applied.removed.sort()
        applied.flags_changed.sort()
        return applied


def effective_flags(entry: Entry) -> tuple[str, ...]:
    """The flags a client sees: the gateway's own once a client set any, else the provider's."""
    return entry.local_flags if entry.local_flags is not None else entry.flags


def _provider_flags(entry: Entry, now: frozenset[str]) -> Entry:
    """The provider's flags changed (someone read, flagged or answered the mail elsewhere):
    each flag that changed there wins over the gateway's own state of it; the local state of
    every flag that did not change at the provider stays."""
    local = entry.local_flags
    if local is not None:
        before = set(entry.flags)
        local = _flags(frozenset((set(local) - (before - now)) | (now - before)))
    return replace(entry, flags=_flags(now), local_flags=local)


def _arrival(message: RemoteMessage) -> tuple[int, datetime, str]:
    """The order new messages get UIDs in: the source's own numbering where it has one (see
    :class:`RemoteMessage`), else arrival time, then id for a stable tie-break."""
    return (message.order or 0, message.internal_date, message.id)
