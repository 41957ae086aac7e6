"""One account's INBOX as IMAP and POP3 see it: UIDs, flags, dates, bodies on demand.

There is one view per account, shared by every IMAP and POP3 session of it, so there is one UID
map, one body cache and one poller per mailbox however many clients are connected.

The view owns the sync policy: incremental from the stored cursor; a full listing matched by id
when there is no cursor or the provider forgot it (Gmail history 404, Graph delta 410), keeping
the UIDs of every message still there; a rebuild under a new UIDVALIDITY only for a source
whose ids are not stable. Every change — from a sync, or from a client (STORE, EXPUNGE, DELE) —
is saved in the store first and then told to the sessions watching the view, which turn it into
EXISTS / EXPUNGE / FETCH at their next safe point.

Local state is the default (least privilege): flags a client sets and messages a client deletes
are kept per account in the store, and the provider is untouched. With
:class:`ReadingPolicy` an admin opts in to mirroring \\Seen/\\Flagged, and to archiving or
trashing at the provider what a client deletes; those calls run in the background, after the
client's answer, and a failure is logged (the local state already holds).

Bodies are fetched only when asked for and kept in a byte-capped LRU cache; the exact size of
every body ever fetched is stored, so RFC822.SIZE never costs a download twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime

from ..config import OnDelete
from ..delivery import DeliveryError
from ..logs import get_logger
from ..oauth import OAuthError
from ..providers import (
    FLAGGED,
    SEEN,
    CursorExpired,
    MailboxSource,
    NotSupported,
    WarmUpQuota,
)
from ..store import MailboxStore, StoreError
from ._cluster import Cluster, PollLead
from ._uidmap import Applied, Entry, MapMoved, UidMap, effective_flags
from ._warmup import WarmUp

log = get_logger(__name__)

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
DEFAULT_POLL_SECONDS = 30.0
MAX_FRESH_SECONDS = 10.0  # see MailboxView.fresh_seconds
ANSWER_SECONDS = 5.0  # how long a view that does not poll waits for the poller's fresh state
_SYNC_ATTEMPTS = 3  # a sync saved over another instance's change is applied again this often
KNOWN_FLAGS = (SEEN, "\\Answered", FLAGGED, "\\Deleted", "\\Draft")
# RFC 3501 flag-keyword = atom: no atom-specials, no CTL, not empty; ``\\`` only in system flags.
_KEYWORD = re.compile(r"[^\x00-\x20\x7f-\U0010ffff(){%*\"\\\]]+")
_BARE_LF = re.compile(rb"(?<!\r)\n")


_PARALLEL_DOWNLOADS = 8  # bodies downloaded at once per view, whoever asks for them


def header_of(wire: bytes) -> bytes:
    """The header section of a message in CRLF form, through the blank line that ends it (the
    whole message when it has no body); the same split as the IMAP renderer's."""
    if wire.startswith(b"\r\n"):
        return b"\r\n"
    end = wire.find(b"\r\n\r\n")
    return wire if end < 0 else wire[: end + 4]


def crlf_form(raw: bytes) -> bytes:
    """Bare LF line ends as CRLF: IMAP and POP3 serve CRLF lines (as Dovecot does for LF-only
    mail). Sizes are always of this form, so RFC822.SIZE and LIST match the bytes served."""
    if raw.count(b"\n") == raw.count(b"\r\n"):
        return raw
    return _BARE_LF.sub(b"\r\n", raw)


class MailboxUnavailable(Exception):
    """The provider cannot be read now (down, throttled, the grant revoked, a wrong upstream
    password); ``str()`` is the provider layer's sentence, fit for the client and the admin."""


@contextlib.contextmanager
def _provider_call() -> Iterator[None]:
    """One error type out of this layer, whatever the provider raised."""
    try:
        yield
    except (DeliveryError, OAuthError) as error:
        raise MailboxUnavailable(str(error)) from error


@dataclass(frozen=True, slots=True)
class ReadingPolicy:
    """What client changes do at the provider; the defaults change nothing there."""

    mirror_flags: bool = False  # \\Seen and \\Flagged (Mail.ReadWrite / gmail.modify)
    on_delete: OnDelete = "keep"  # EXPUNGE / DELE: keep, archive or trash at the provider


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """What a listing needs without the body: UID order is sequence-number order."""

    uid: int
    provider_id: str
    internal_date: datetime
    flags: tuple[str, ...]  # at the time of the listing; ask :meth:`MailboxView.flags` for now
    size: int | None = None  # exact CRLF size, once known


Watcher = Callable[[Applied, object], None]
"""Told of every change: (what changed in UIDs, who caused it: a session, or None)."""


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

    def ids(self) -> list[str]:
        return list(self._items)

    def discard(self, key: str) -> None:
        raw = self._items.pop(key, None)
        if raw is not None:
            self.used -= len(raw)


class MailboxView:
    """Create with :meth:`open`; call :meth:`sync` to pull provider changes."""

    def __init__(
        self,
        uids: UidMap,
        source: MailboxSource,
        cache: BodyCache,
        policy: ReadingPolicy = ReadingPolicy(),
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        cluster: Cluster | None = None,
    ) -> None:
        self._uids = uids
        self.source = source
        self.cache = cache
        self.policy = policy
        self.poll_seconds = poll_seconds
        # A session opening the view (SELECT, EXAMINE, STATUS, POP3 login) uses a sync this
        # recent instead of asking the provider: a thousand logins cost one round.
        self.fresh_seconds = min(poll_seconds, MAX_FRESH_SECONDS)
        self._clock, self._sleep = clock, sleep  # the warm-up's pace; tests pass their own
        self._sync_lock = asyncio.Lock()
        self._last_sync_started = float("-inf")
        self._last_synced = float("-inf")  # when the last successful sync finished
        self._listing: tuple[MessageInfo, ...] | None = None
        self._keywords: tuple[str, ...] | None = None
        self._watchers: list[Watcher] = []
        self._watched = 0  # see watched
        self._poller: asyncio.Task[None] | None = None
        self._sizes: dict[str, int] = {}  # learnt, not yet saved
        self._headers: dict[str, bytes] = {}  # learnt, not yet saved
        self._saving: asyncio.Task[None] | None = None
        self._mirror = _Mirror(source, uids.account)
        self._caught_up = False  # see _catch_up
        self._downloads = asyncio.Semaphore(_PARALLEL_DOWNLOADS)
        self._client_downloads = 0  # a warm-up waits while any runs (clients first)
        self._clients_idle = asyncio.Event()
        self._clients_idle.set()
        self.warm_up = self._warm_up_for(source)
        self._cluster = cluster
        self.lead = PollLead(cluster, uids.account)
        self.answer_seconds = ANSWER_SECONDS
        self._noticed = asyncio.Event()  # a change notice came (see _ask_the_poller)
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False
        self._answering: asyncio.Task[None] | None = None
        self._stepping_down: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        store: MailboxStore,
        account: str,
        source: MailboxSource,
        cache: BodyCache | None = None,
        policy: ReadingPolicy = ReadingPolicy(),
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        cluster: Cluster | None = None,
    ) -> MailboxView:
        """Load the account's stored map; ``cluster`` when other instances may share it."""
        uids = await UidMap.load(store, account)
        return cls(uids, source, cache or BodyCache(), policy, poll_seconds, clock, sleep, cluster)

    @property
    def account(self) -> str:
        return self._uids.account

    @property
    def uidvalidity(self) -> int:
        return self._uids.uidvalidity

    @property
    def uidnext(self) -> int:
        return self._uids.uidnext

    def messages(self) -> tuple[MessageInfo, ...]:
        """The visible messages in UID order; one shared tuple until something changes."""
        if self._listing is None:
            self._listing = tuple(
                MessageInfo(e.uid, e.provider_id, e.internal_date, effective_flags(e), e.size)
                for e in self._uids.entries()
                if not e.hidden
            )
        return self._listing

    def keywords(self) -> tuple[str, ...]:
        """The keywords (flags that are not system flags, e.g. $Forwarded) on any visible
        message, from the provider or set by a client, in first-seen order: what SELECT's
        FLAGS and PERMANENTFLAGS list besides the system flags, as Dovecot does."""
        if self._keywords is None:
            found: dict[str, str] = {}
            for info in self.messages():
                for name in info.flags:
                    if not name.startswith("\\"):
                        found.setdefault(name.lower(), name)
            self._keywords = tuple(found.values())
        return self._keywords

    def flags(self, uid: int) -> frozenset[str]:
        """The message's flags now (the gateway's own if a client set any, else the
        provider's); KeyError when the message left the view."""
        entry = self._uids.by_uid[uid]
        if entry.hidden:
            raise KeyError(uid)
        return frozenset(effective_flags(entry))

    # -- syncing and watching ----------------------------------------------------------------

    async def sync(self) -> Applied:
        """Bring the map up to date with the provider now; safe to run concurrently: callers
        that queue behind a sync which started after they asked share its result (returned
        empty here; watchers were told). The poller calls this; sessions call
        :meth:`ensure_fresh`, and NOOP/CHECK/IDLE never reach the provider."""
        asked = self._clock()
        async with self._sync_lock:
            if self._last_sync_started > asked:
                return Applied()
            return await self._sync_locked()

    async def ensure_fresh(self) -> Applied:
        """Sync unless the view synced less than ``fresh_seconds`` ago (SELECT, EXAMINE,
        STATUS, POP3 login): logins arriving together share one provider round, and those
        arriving within the window use its state. When another instance polls the account,
        it is asked to sync instead, and this view reads what it saved."""
        if self._clock() - self._last_synced < self.fresh_seconds:
            return Applied()
        async with self._sync_lock:  # waiters behind a sync find it fresh once it is done
            if self._clock() - self._last_synced < self.fresh_seconds:
                return Applied()
            if not await self._take_lead():
                return await self._ask_the_poller()
            try:
                return await self._sync_locked()
            finally:
                if not self._polling:
                    await self.lead.give_up()  # an instance whose sessions watch may poll

    def stale(self) -> None:
        """The provider is known to have changed: the next session opening the view syncs
        even inside the freshness window."""
        self._last_synced = float("-inf")

    async def _sync_locked(self) -> Applied:
        self._last_sync_started = self._clock()
        with _provider_call():
            applied = await self._sync_saved()
        self._last_synced = self._clock()
        first = not self._caught_up
        if first:
            self._caught_up = True
            self._catch_up()
        self._changed(applied, None)
        if self.warm_up is not None and (first or applied.added or applied.rebuilt):
            self.warm_up.kick()
        return applied

    def _catch_up(self) -> None:
        """Once per start, after the first sync: ask the provider again for what the policy
        wants but a crash (or a policy turned on since) left undone. Both calls are idempotent
        at the provider: a deleted message still in the INBOX is archived or trashed, and a
        \\Seen or \\Flagged that differs from the provider's is sent again."""
        policy = self.policy
        for entry in self._uids.entries():
            local = entry.local_flags
            if entry.hidden and policy.on_delete != "keep":
                self._mirror.remove(entry.provider_id, policy.on_delete)
            elif (
                policy.mirror_flags
                and local is not None
                and any((flag in local) != (flag in entry.flags) for flag in (SEEN, FLAGGED))
            ):
                self._mirror.flags(entry.provider_id, local)

    async def _sync_saved(self) -> Applied:
        """One sync, saved over the map as stored: if another instance changed the map since
        this copy was read (a client's STORE there, a poller handing over), the copy is read
        again (its changes told) and the sync runs again from the stored cursor; then the
        other instances are told."""
        for _attempt in range(_SYNC_ATTEMPTS):
            try:
                applied = await self._sync_once()
            except MapMoved:
                self._changed(await self._uids.reload(), None)
            else:
                if applied.added or applied.removed or applied.flags_changed or applied.rebuilt:
                    await self._tell_others()
                return applied
        raise MailboxUnavailable(
            "the INBOX kept changing through other gateway instances while it was synced; try again"
        )

    async def _sync_once(self) -> Applied:
        uids = self._uids
        if uids.cursor is not None:
            try:
                changes = await self.source.changes_since(uids.cursor)
            except CursorExpired as expired:
                log.info("mailbox.resync", account=uids.account, reason=str(expired))
            else:
                return await uids.apply(
                    changes.added, changes.removed, changes.flags, changes.cursor, changes.present
                )
        snapshot = await self.source.list_inbox()
        if uids.known and not self.source.ids_stable:
            self.cache = BodyCache(self.cache.capacity)
            return await uids.rebuild(snapshot.messages, snapshot.cursor)
        return await uids.reconcile(snapshot.messages, snapshot.cursor)

    @property
    def watchers(self) -> int:
        """How many sessions watch the view now."""
        return len(self._watchers)

    @property
    def watched(self) -> int:
        """How many times a session began watching since the view opened. With
        :attr:`watchers` it tells a session that came and went from one that never came: what
        a test waits for instead of sleeping before it checks that nobody is left."""
        return self._watched

    def watch(self, watcher: Watcher) -> None:
        """Tell ``watcher`` of every change; while anyone watches, poll the provider every
        ``poll_seconds`` (one poller per view, whatever the number of watchers)."""
        self._watchers.append(watcher)
        self._watched += 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name=f"poll {self.account}")

    def unwatch(self, watcher: Watcher) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)
        if not self._watchers and self._poller is not None:
            self._poller.cancel()
            self._poller = None
            if self.lead.leading and self._cluster is not None:  # another instance may poll
                self._stepping_down = asyncio.create_task(
                    self._give_up_unless_polling(), name=f"unlead {self.account}"
                )

    @property
    def _polling(self) -> bool:
        return self._poller is not None and not self._poller.done()

    async def _give_up_unless_polling(self) -> None:
        async with self._sync_lock:  # not in the middle of a sync of ours
            if not self._polling:
                await self.lead.give_up()

    async def _poll(self) -> None:
        """Every ``poll_seconds``: sync if this instance polls the account (or can now take
        that over), else read the stored map again if its version moved (a notice missed).
        A failure is logged when it starts or changes, not every interval (an outage would
        otherwise log twice a minute per mailbox)."""
        failing = ""
        while self._watchers:
            await asyncio.sleep(self.poll_seconds)
            try:
                if await self._take_lead():
                    await self.sync()
                else:
                    self._changed(await self._uids.reload(), None)
            except Exception as error:  # the provider is down or the grant revoked: try later
                if str(error) != failing:
                    log.warning("mailbox.poll_failed", account=self.account, error=str(error))
                failing = str(error)
            else:
                if failing:
                    log.info("mailbox.poll_recovered", account=self.account)
                failing = ""

    def _changed(self, applied: Applied, origin: object) -> None:
        if applied.removed:
            live = self._uids.by_id
            for provider_id in [p for p in self.cache.ids() if p not in live]:
                self.cache.discard(provider_id)
        if applied.added or applied.removed or applied.flags_changed or applied.rebuilt:
            self._listing = self._keywords = None
            for watcher in list(self._watchers):
                try:
                    watcher(applied, origin)
                except Exception:
                    log.exception("mailbox.watcher_failed", account=self.account)

    # -- other instances (see _cluster) ------------------------------------------------------

    async def _take_lead(self) -> bool:
        """Whether this view asks the provider now (see :class:`PollLead`); a newly taken
        lead first reads the stored map, which the previous poller may have moved on."""
        was_leading = self.lead.leading
        try:
            leading = await self.lead.take()
        except StoreError as error:
            raise MailboxUnavailable(str(error)) from error
        if leading and not was_leading:
            self._changed(await self._uids.reload(), None)
        return leading

    async def _ask_the_poller(self) -> Applied:
        """Another instance polls the account: ask it to sync, wait (a bounded time) for its
        notice, and read what is stored."""
        self._noticed.clear()
        assert self._cluster is not None, "without a cluster the view always leads"
        await self._cluster.ask_poll(self.account)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.answer_seconds):
                await self._noticed.wait()
        try:
            applied = await self._uids.reload()
        except StoreError as error:
            raise MailboxUnavailable(str(error)) from error
        self._last_synced = self._clock()
        self._changed(applied, None)
        return applied

    async def _tell_others(self) -> None:
        if self._cluster is not None:
            await self._cluster.changed(self.account)

    def reload_soon(self) -> None:
        """A notice: the stored map may have changed. Read again (once for notices arriving
        while a read runs) and tell the watchers what changed."""
        self._noticed.set()
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.create_task(self._reload(), name=f"reload {self.account}")

    async def _reload(self) -> None:
        self._reload_again = True
        while self._reload_again:
            self._reload_again = False
            try:
                self._changed(await self._uids.reload(), None)
            except Exception as error:  # the store is unreachable: the next notice retries
                log.warning("mailbox.reload_failed", account=self.account, error=str(error))
                return

    def poll_requested(self) -> None:
        """Another instance's session wants the account fresh: if this view polls, sync
        (unless it just did) and answer with a notice, whatever the sync found."""
        if not self.lead.leading or self._cluster is None:
            return
        if self._answering is None or self._answering.done():
            self._answering = asyncio.create_task(self._answer(), name=f"answer {self.account}")

    async def _answer(self) -> None:
        try:
            await self.ensure_fresh()
        except Exception as error:
            log.warning("mailbox.poll_failed", account=self.account, error=str(error))
        await self._tell_others()

    # -- client changes ----------------------------------------------------------------------

    async def store_flags(
        self, uids: Iterable[int], names: Iterable[str], how: int, origin: object = None
    ) -> dict[int, frozenset[str]]:
        """STORE: ``how`` 1 adds, -1 removes, 0 replaces. System flags and keywords are kept
        (keywords in the case first seen in this mailbox, as IMAP compares them without case);
        unknown system flags (``\\Foo``, ``\\Recent``) and names that are not atoms are
        ignored. Returns the flags now of every UID still in the view."""
        wanted = {f for n in names if (f := self._canonical(n)) is not None}

        def change(entry: Entry) -> Entry:  # on the stored entry, in the saving transaction
            if entry.hidden:
                return entry
            current = set(effective_flags(entry))
            new = current | wanted if how > 0 else current - wanted if how < 0 else wanted
            return replace(entry, local_flags=tuple(sorted(new)))

        pids = [e.provider_id for e in self._entries(uids)]
        changed = await self._save_change(
            pids, change, lambda done: Applied(flags_changed=sorted(e.uid for e in done)), origin
        )
        if self.policy.mirror_flags:
            for entry in changed:
                self._mirror.flags(entry.provider_id, effective_flags(entry))
        return {e.uid: frozenset(effective_flags(e)) for e in self._entries(uids)}

    async def _save_change(
        self,
        pids: list[str],
        change: Callable[[Entry], Entry],
        told: Callable[[list[Entry]], Applied],
        origin: object,
    ) -> list[Entry]:
        """Save a client's change, tell the watchers (``told``: what it is for them) and the
        other instances; what else the store showed had changed is told as theirs."""
        if not pids:
            return []
        try:
            changed, also = await self._uids.update(pids, change)
        except StoreError as error:
            raise MailboxUnavailable(str(error)) from error
        self._changed(told(changed), origin)
        self._changed(also, None)
        if changed:
            await self._tell_others()
        return changed

    def _canonical(self, name: str) -> str | None:
        """A STORE flag name as kept: a system flag or keyword in its known case, else None."""
        lower = name.lower()
        if name.startswith("\\"):
            return next((f for f in KNOWN_FLAGS if f.lower() == lower), None)
        if not _is_keyword(name):
            return None
        return next((k for k in self.keywords() if k.lower() == lower), name)

    async def delete(self, uids: Iterable[int], origin: object = None) -> list[int]:
        """EXPUNGE / DELE: the messages leave the view for every session of this account, and
        at the provider they are kept, archived or trashed as the policy says."""
        pids = [e.provider_id for e in self._entries(uids)]
        changed = await self._save_change(
            pids,
            lambda e: replace(e, hidden=True),
            lambda done: Applied(removed=sorted(e.uid for e in done)),
            origin,
        )
        if self.policy.on_delete != "keep":
            for entry in changed:
                self._mirror.remove(entry.provider_id, self.policy.on_delete)
        return [e.uid for e in changed]

    def _entries(self, uids: Iterable[int]) -> list[Entry]:
        by_uid = self._uids.by_uid
        return [e for uid in uids if (e := by_uid.get(uid)) is not None and not e.hidden]

    # -- bodies ------------------------------------------------------------------------------

    async def fetch(self, uid: int) -> bytes:
        """The message as IMAP and POP3 serve it: the provider's bytes in :func:`crlf_form`
        (byte for byte when they already end lines with CRLF); KeyError for a UID not in the
        view. The cache keeps this form, so a message is converted (and measured) once; its
        size and header are kept in the store."""
        entry = self._uids.by_uid[uid]
        wire = self.cache.get(entry.provider_id)
        if wire is not None:
            return wire
        self._client_downloads += 1
        self._clients_idle.clear()
        try:
            async with self._downloads:  # however many sessions and FETCHes ask at once
                wire = self.cache.get(entry.provider_id)  # a waiter before us may have got it
                if wire is None:
                    with _provider_call():
                        wire = crlf_form(await self.source.fetch_raw(entry.provider_id))
                    self.cache.put(entry.provider_id, wire)
                    self._learn(entry, wire)
        finally:
            self._client_downloads -= 1
            if not self._client_downloads:
                self._clients_idle.set()
        return wire

    async def headers(self, uids: Iterable[int]) -> dict[int, bytes]:
        """The header section (through the blank line) of each message still in the view:
        from the body cache, else the store, else a download. A client's
        header fetch after a restart then costs no provider call."""
        entries = {uid: e for uid in uids if (e := self._uids.by_uid.get(uid)) is not None}
        found: dict[int, bytes] = {}
        for uid, entry in entries.items():
            wire = self.cache.get(entry.provider_id)
            header = header_of(wire) if wire is not None else self._headers.get(entry.provider_id)
            if header is not None:
                found[uid] = header
        missing = {entries[uid].provider_id: uid for uid in entries if uid not in found}
        if missing:
            stored = await self._uids.store.load_mailbox_headers(self.account, list(missing))
            found.update({missing.pop(pid): header for pid, header in stored.items()})

        async def download(uid: int) -> None:
            found[uid] = header_of(await self.fetch(uid))

        await asyncio.gather(*(download(uid) for uid in missing.values()))
        return found

    def known_size(self, uid: int) -> int | None:
        """The exact size if it is known without a download; KeyError for an unknown UID."""
        entry = self._uids.by_uid[uid]
        return entry.size if entry.size is not None else self._sizes.get(entry.provider_id)

    async def size(self, uid: int) -> int:
        """The exact size of what :meth:`fetch` serves (downloaded once if unknown)."""
        known = self.known_size(uid)
        return known if known is not None else len(await self.fetch(uid))

    def _learn(self, entry: Entry, wire: bytes) -> None:
        """Remember the size and header of a download and save them soon: what many
        downloads of one FETCH learn is one write."""
        if entry.size is None:
            self._sizes[entry.provider_id] = len(wire)
        self._headers[entry.provider_id] = header_of(wire)
        if self._saving is None or self._saving.done():
            self._saving = asyncio.create_task(self._save_learnt())

    async def _save_learnt(self) -> None:
        while self._sizes or self._headers:
            await asyncio.sleep(0)  # let the other downloads of this FETCH add theirs
            sizes, headers = dict(self._sizes), dict(self._headers)  # known while saved
            try:
                await self._uids.save_sizes(sizes)
                await self._uids.store.save_mailbox_headers(self.account, headers)
            except Exception as error:  # only a cost: they are learnt again next time
                log.warning("mailbox.learnt_not_saved", account=self.account, error=str(error))
            for pid in sizes:
                self._sizes.pop(pid, None)
            for pid in headers:
                self._headers.pop(pid, None)
            self._listing = None

    # -- warm-up (see _warmup) ---------------------------------------------------------------

    def _warm_up_for(self, source: MailboxSource) -> WarmUp | None:
        quota = getattr(source, "warm_up", None)
        fetch_batch = getattr(source, "fetch_batch", None)
        if not isinstance(quota, WarmUpQuota) or fetch_batch is None:
            return None  # upstream IMAP/POP3 give exact sizes in their listings
        return WarmUp(
            quota,
            fetch_batch,
            self._unsized,
            self._learn_batch,
            self._clients_idle.wait,
            self._clock,
            self._sleep,
            name=f"warm-up {self.account}",
        )

    def _unsized(self) -> list[str]:
        """Provider ids of visible messages whose size is not known, newest first (what a
        client looks at first)."""
        return [
            e.provider_id
            for e in reversed(self._uids.entries())
            if not e.hidden and e.size is None and e.provider_id not in self._sizes
        ]

    def _learn_batch(self, bodies: dict[str, bytes]) -> None:
        """Sizes and headers of a warm-up batch; the bodies are not cached (clients' are)."""
        by_id = self._uids.by_id
        for provider_id, raw in bodies.items():
            entry = by_id.get(provider_id)
            if entry is not None:
                self._learn(entry, crlf_form(raw))

    async def close(self) -> None:
        """Stop polling (another instance may take it over) and warming up, save learnt sizes
        and headers, let queued provider changes finish."""
        self._watchers.clear()
        if self.warm_up is not None:
            await self.warm_up.stop()
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        for task in (self._reloading, self._answering, self._stepping_down):
            if task is not None:
                task.cancel()
        with contextlib.suppress(Exception):  # a lost connection gave the lock up already
            await self.lead.give_up()
        if self._saving is not None:
            await self._saving
        await self._mirror.drain()
        close = getattr(self.source, "close", None)  # an upstream connection to log out of
        if close is not None:
            await close()


class _Mirror:
    """The provider changes a policy asks for, sent one at a time in the background."""

    def __init__(self, source: MailboxSource, account: str) -> None:
        self.source = source
        self.account = account
        self._queue: asyncio.Queue[tuple[str, str, object]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def flags(self, provider_id: str, flags: Iterable[str]) -> None:
        self._put("flags", provider_id, frozenset(flags))

    def remove(self, provider_id: str, how: str) -> None:
        self._put("remove", provider_id, how)

    def _put(self, op: str, provider_id: str, arg: object) -> None:
        self._queue.put_nowait((op, provider_id, arg))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name=f"mirror {self.account}")

    async def _run(self) -> None:
        while not self._queue.empty():
            op, provider_id, arg = self._queue.get_nowait()
            try:
                if op == "flags":
                    flags = arg if isinstance(arg, frozenset) else frozenset()
                    await self.source.set_flags(provider_id, SEEN in flags, FLAGGED in flags)
                else:
                    await self.source.remove(provider_id, arg)  # type: ignore[arg-type]
                log.info("mailbox.mirrored", account=self.account, op=op)
            except NotSupported as error:
                log.warning("mailbox.mirror_unsupported", account=self.account, reason=str(error))
            except Exception as error:
                log.warning("mailbox.mirror_failed", account=self.account, op=op, error=str(error))

    async def drain(self) -> None:
        if self._worker is not None:
            await self._worker


def _is_keyword(name: str) -> bool:
    return _KEYWORD.fullmatch(name) is not None
