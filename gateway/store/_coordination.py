"""One of each thing per cluster: locks and change notices that span every instance.

With SQLite there is one instance, so an asyncio lock and an in-process fan-out are the whole
story (:class:`LocalCoordination`). With PostgreSQL (``_pg_coordination``) the same calls become
advisory locks and LISTEN/NOTIFY, so callers (the token broker's refresh, the INBOX poller, the
spool's wake-ups) are written once for both.

Names are free text ("refresh:alice@example.com"); channels are short identifiers
(``[a-z_]+``). A notice is also delivered to the instance that sent it, so a subscriber treats
every notice the same way, whoever caused it. A subscriber called with ``None`` may have missed
notices (on PostgreSQL: the listening connection was lost and is back, or the channel has only
just been listened to) and must re-read what it watches.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from ..logs import get_logger

log = get_logger(__name__)
Listener = Callable[[str | None], None]
_CHANNEL = re.compile(r"[a-z_]{1,40}")
# PostgreSQL's NOTIFY: "the payload string ... must be shorter than 8000 bytes". Enforced on
# both backends, so a notice that SQLite would carry but PostgreSQL refuses fails in every test.
MAX_PAYLOAD_BYTES = 7999


def check_channel(channel: str) -> str:
    if not _CHANNEL.fullmatch(channel):
        raise ValueError(f"channel names are 1-40 of [a-z_], got {channel!r}")
    return channel


def check_payload(payload: str) -> str:
    size = len(payload.encode())
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(f"a notice carries at most {MAX_PAYLOAD_BYTES} bytes, got {size}")
    return payload


class Leadership(Protocol):
    """A lock held until released (or until this instance's connection is lost)."""

    async def holding(self) -> bool:
        """Still held: False once the connection that held it is gone."""

    async def release(self) -> None: ...


class Coordination(Protocol):
    def exclusive(self, name: str) -> AbstractAsyncContextManager[None]:
        """Wait until no other holder of *name* exists in the cluster, hold it for the block."""

    async def try_lead(self, name: str) -> Leadership | None:
        """Take *name* for as long as wanted if nobody holds it; None if someone does."""

    async def notify(self, channel: str, payload: str) -> None:
        """Tell every instance's subscribers of *channel* (this one's included)."""

    def subscribe(self, channel: str, listener: Listener) -> Callable[[], None]:
        """Call *listener* with each notice's payload; returns the unsubscribe function."""

    async def close(self) -> None: ...


class _Fanout:
    """Subscribers by channel, shared by both implementations."""

    def __init__(self) -> None:
        self.listeners: dict[str, list[Listener]] = {}

    def add(self, channel: str, listener: Listener) -> Callable[[], None]:
        self.listeners.setdefault(check_channel(channel), []).append(listener)

        def remove() -> None:
            listeners = self.listeners.get(channel, [])
            if listener in listeners:
                listeners.remove(listener)

        return remove

    def deliver(self, channel: str, payload: str | None) -> None:
        """Call each listener; one that raises is logged and the others still hear it."""
        for listener in list(self.listeners.get(channel, ())):
            try:
                listener(payload)
            except Exception:
                log.exception("store.listener_failed", channel=channel)


class _LocalLeadership:
    def __init__(self, held: set[str], name: str) -> None:
        self._held, self._name = held, name

    async def holding(self) -> bool:
        return self._name in self._held

    async def release(self) -> None:
        self._held.discard(self._name)


class LocalCoordination:
    """One instance: the cluster is this process."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._led: set[str] = set()
        self._fanout = _Fanout()

    def exclusive(self, name: str) -> AbstractAsyncContextManager[None]:
        # Kept for the process's life: names are per account, and a lock dropped while a
        # waiter is being woken would let a newcomer in beside it.
        return self._locks.setdefault(name, asyncio.Lock())

    async def try_lead(self, name: str) -> Leadership | None:
        if name in self._led:
            return None
        self._led.add(name)
        return _LocalLeadership(self._led, name)

    async def notify(self, channel: str, payload: str) -> None:
        check_channel(channel)
        check_payload(payload)
        asyncio.get_running_loop().call_soon(self._fanout.deliver, channel, payload)

    def subscribe(self, channel: str, listener: Listener) -> Callable[[], None]:
        return self._fanout.add(channel, listener)

    async def close(self) -> None:
        self._led.clear()
