"""One account's INBOX as IMAP and POP3 see it: UIDs, flags, dates, bodies on demand.

The view owns the sync policy: incremental from the stored cursor; a full listing matched by id
when there is no cursor or the provider forgot it (Gmail history 404, Graph delta 410), keeping
the UIDs of every message still there; a rebuild under a new UIDVALIDITY only for a source
whose ids are not stable. Syncs are serialised per view (one poller per mailbox). Bodies are
fetched only when asked for and kept in a byte-capped LRU cache; the size of every body ever
fetched is remembered, so RFC822.SIZE is always the length of the bytes served.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from ..logs import get_logger
from ..store import Store
from ._sources import CursorExpired, MailboxSource
from ._uidmap import Applied, UidMap

log = get_logger(__name__)

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """What a listing needs without the body: UID order is sequence-number order."""

    uid: int
    provider_id: str
    internal_date: datetime
    flags: tuple[str, ...]


class BodyCache:
    """Least-recently-used raw messages up to ``capacity`` bytes (a larger one is not kept)."""

    def __init__(self, capacity: int = DEFAULT_CACHE_BYTES) -> None:
        self.capacity = capacity
        self.used = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        raw = self._items.get(key)
        if raw is not None:
            self._items.move_to_end(key)
        return raw

    def put(self, key: str, raw: bytes) -> None:
        if len(raw) > self.capacity:
            return
        self.discard(key)
        self._items[key] = raw
        self.used += len(raw)
        while self.used > self.capacity:
            _, oldest = self._items.popitem(last=False)
            self.used -= len(oldest)

    def discard(self, key: str) -> None:
        raw = self._items.pop(key, None)
        if raw is not None:
            self.used -= len(raw)


class MailboxView:
    """Create with :meth:`open`; call :meth:`sync` to pull provider changes."""

    def __init__(self, uids: UidMap, source: MailboxSource, cache: BodyCache) -> None:
        self._uids = uids
        self.source = source
        self.cache = cache
        self._sizes: dict[str, int] = {}
        self._sync_lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        store: Store,
        account: str,
        source: MailboxSource,
        cache: BodyCache | None = None,
    ) -> MailboxView:
        return cls(await UidMap.load(store, account), source, cache or BodyCache())

    @property
    def uidvalidity(self) -> int:
        return self._uids.uidvalidity

    @property
    def uidnext(self) -> int:
        return self._uids.uidnext

    def messages(self) -> list[MessageInfo]:
        return [
            MessageInfo(e.uid, e.provider_id, e.internal_date, e.flags)
            for e in self._uids.entries()
        ]

    async def sync(self) -> Applied:
        """Bring the map up to date with the provider; safe to repeat and to run concurrently."""
        async with self._sync_lock:
            uids = self._uids
            if uids.cursor is not None:
                try:
                    changes = await self.source.changes_since(uids.cursor)
                except CursorExpired as expired:
                    log.info("mailbox.resync", account=uids.account, reason=str(expired))
                else:
                    applied = await uids.apply(
                        changes.added, changes.removed, changes.seen, changes.cursor
                    )
                    self._forget(applied)
                    return applied
            snapshot = await self.source.list_inbox()
            if uids.known and not self.source.ids_stable:
                applied = await uids.rebuild(snapshot.messages, snapshot.cursor)
                self.cache = BodyCache(self.cache.capacity)
                self._sizes.clear()
                return applied
            applied = await uids.reconcile(snapshot.messages, snapshot.cursor)
            self._forget(applied)
            return applied

    async def fetch(self, uid: int) -> bytes:
        """The raw message as the provider holds it; KeyError for a UID not in the view."""
        provider_id = self._uids.by_uid[uid].provider_id
        raw = self.cache.get(provider_id)
        if raw is None:
            raw = await self.source.fetch_raw(provider_id)
            self.cache.put(provider_id, raw)
            self._sizes[provider_id] = len(raw)
        return raw

    async def size(self, uid: int) -> int:
        """RFC822.SIZE: the length of the bytes :meth:`fetch` serves (fetched once if unknown)."""
        known = self._sizes.get(self._uids.by_uid[uid].provider_id)
        return known if known is not None else len(await self.fetch(uid))

    def _forget(self, applied: Applied) -> None:
        """Drop cached bodies of removed messages (their ids are not kept either)."""
        if applied.removed:
            live = self._uids.by_id
            for provider_id in [p for p in self._sizes if p not in live]:
                self._sizes.pop(provider_id, None)
                self.cache.discard(provider_id)
