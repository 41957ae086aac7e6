"""The :class:`MailboxSource` interface: what an INBOX view needs from a provider.

Like gluon's ``Connector``, a source hides the provider entirely: the view (``gateway.mailbox``)
sees provider ids, arrival dates, IMAP flags and a cursor, never HTTP, IMAP or POP3. The
implementations are ``graph_inbox``, ``gmail_inbox``, ``imap_inbox`` and ``pop3_inbox``; their
failures are this layer's ``Temporary`` / ``Permanent`` / ``ReauthRequired``, and the one
condition a view must act on, "your cursor is too old", is :class:`CursorExpired`.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol, TypeVar

from ._http import retry_after

SEEN = "\\Seen"
FLAGGED = "\\Flagged"
# What IMAP clients may never set: \Recent is the server's (RFC 3501 2.3.2), \* is not a flag.
_NOT_STORABLE = frozenset({"\\recent", "\\*"})


def flag_set(names: Iterable[str]) -> frozenset[str]:
    """Flags as a source reports them: system flags and keywords, \\Recent left out."""
    return frozenset(n for n in names if n and n.lower() not in _NOT_STORABLE)


@dataclass(frozen=True, slots=True)
class RemoteMessage:
    """A message in the provider's INBOX: its id, arrival time (UTC) and its IMAP flags.

    ``flags`` is every flag the provider keeps, in IMAP's names: \\Seen (Graph isRead, Gmail
    without UNREAD), \\Flagged (Graph flag.flagStatus "flagged", Gmail STARRED), and from an
    upstream IMAP server also \\Answered, \\Draft, \\Deleted and keywords such as $Forwarded.

    ``size`` is the exact length of the CRLF form of the bytes :meth:`MailboxSource.fetch_raw`
    returns, when the source knows it without downloading (upstream IMAP RFC822.SIZE, POP3
    LIST); the APIs only give estimates, so there it is None and the view learns it on the
    first download.

    ``order`` is the source's own numbering where it has one (an upstream IMAP server's UID):
    new messages get gateway UIDs in that order, so sequence numbers match the upstream
    server's even when messages share an arrival second. Without it, arrival time decides.
    """

    id: str
    internal_date: datetime
    flags: frozenset[str] = frozenset()
    size: int | None = None
    order: int | None = None

    @property
    def seen(self) -> bool:
        return SEEN in self.flags


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A full listing of the INBOX and the cursor to ask for changes after it."""

    messages: list[RemoteMessage]
    cursor: str


@dataclass(frozen=True, slots=True)
class Changes:
    """What happened since a cursor. ``added`` may repeat known ids (apply idempotently)."""

    added: list[RemoteMessage] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    flags: dict[str, frozenset[str]] = field(default_factory=dict)  # id → all its flags now
    cursor: str = ""
    # For sources without removal events (upstream IMAP/POP3): every id now in the INBOX; a
    # known id missing from it is removed. None: ``removed`` is complete.
    present: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """What one batched download brought: the raw bytes per id, the ids the provider no longer
    has (404), and, when some were refused for throttling, how long to wait (seconds) before
    asking again. Ids in none of these failed otherwise and may be asked again later."""

    bodies: dict[str, bytes] = field(default_factory=dict)
    gone: list[str] = field(default_factory=list)
    retry_after: float | None = None


Body = TypeVar("Body")


def sort_batch(
    ids: Sequence[str],
    answers: Iterable[tuple[str, object, Body, Mapping[str, str]]],
    decode: Callable[[Body], bytes | None],
    throttled: Container[int],
) -> Batch:
    """One :class:`Batch` from a batch request's inner answers, for every provider alike.

    Each answer is (its request's index in ``ids`` as text, status, body, headers); an index
    naming no request is ignored. 200 is a message (``decode`` gives its bytes, or None for a
    body that is not one), 404 is gone, a ``throttled`` status a wait (its Retry-After, else a
    second); anything else failed on its own and may be asked again."""
    batch = Batch()
    waits: list[float] = []
    for index, status, body, headers in answers:
        if not index.isdigit() or int(index) >= len(ids):
            continue
        provider_id = ids[int(index)]
        if status == 200 and (raw := decode(body)) is not None:
            batch.bodies[provider_id] = raw
        elif status == 404:
            batch.gone.append(provider_id)
        elif status in throttled:
            waits.append(retry_after(headers) or 1.0)
    return Batch(batch.bodies, batch.gone, max(waits) if waits else None)


@dataclass(frozen=True, slots=True)
class WarmUpQuota:
    """How a background warm-up may download: at most ``requests`` provider requests (each
    inner request of a batch counts) per ``seconds``, ``batch`` messages per round trip."""

    requests: int
    seconds: float
    batch: int


class CursorExpired(Exception):
    """The provider no longer knows the cursor: only a full listing can continue."""


class MailboxSource(Protocol):
    """One account's INBOX at its provider. ``ids_stable``: the same message keeps its id
    across a full resync, so the view can keep its UIDs (else it must change UIDVALIDITY)."""

    ids_stable: bool

    async def list_inbox(self) -> Snapshot: ...

    async def changes_since(self, cursor: str) -> Changes:
        """Changes after ``cursor``; raise :class:`CursorExpired` when it is too old."""

    async def fetch_raw(self, provider_id: str) -> bytes: ...

    # Optional, for sources a view may warm up in the background (see ``mailbox._warmup``):
    #   warm_up: WarmUpQuota
    #   async def fetch_batch(self, provider_ids: list[str]) -> Batch

    async def set_flags(self, provider_id: str, seen: bool | None, flagged: bool | None) -> None:
        """Mirror read/flagged state to the provider (opt-in; None leaves that flag alone).
        Raise :class:`NotSupported` where the provider cannot keep it (POP3)."""

    async def remove(self, provider_id: str, how: Removal) -> None:
        """Take the message out of the INBOX at the provider: ``archive`` or ``trash``, never
        a permanent deletion. Raise :class:`NotSupported` where neither exists (POP3)."""


Removal = Literal["archive", "trash"]


class NotSupported(Exception):
    """The provider cannot do this mirroring operation; str() says why, for the admin."""
