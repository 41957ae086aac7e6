"""The connection pools: per-address and total caps, the move to the authenticated pool."""

from __future__ import annotations

from typing import Any

from gateway.admission import Admission, ConnectionLimits, size_caps


class _Timers:
    """A schedule that runs nothing until told: deadlines without a wall clock."""

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def __call__(self, seconds: float, callback: Any) -> Any:
        timer = _Timer(callback)
        self.pending.append(timer)
        return timer

    def fire_all(self) -> None:
        for timer in self.pending:
            if not timer.cancelled:
                timer.callback()


class _Timer:
    def __init__(self, callback: Any) -> None:
        self.callback, self.cancelled = callback, False

    def cancel(self) -> None:
        self.cancelled = True


def test_caps_are_sized_from_the_open_file_limit() -> None:
    caps = size_caps(1024, 20, 30)
    assert (caps.connections, caps.unauthenticated, caps.per_address) == (896, 224, 20)


def test_logged_in_connections_leave_the_per_address_and_unauthenticated_pools() -> None:
    limits = ConnectionLimits(size_caps(1024, 2, 30), schedule=_Timers())
    first, second = limits.admit("imap", "127.0.0.1"), limits.admit("imap", "127.0.0.1")
    assert isinstance(first, Admission) and isinstance(second, Admission)
    assert limits.admit("imap", "127.0.0.1") == "address"
    assert isinstance(limits.admit("imap", "127.0.0.2"), Admission)
    assert isinstance(limits.admit("smtp", "127.0.0.1"), Admission)  # per protocol
    first.authenticated()
    assert (limits.unauthenticated, limits.authenticated) == (3, 1)
    assert isinstance(limits.admit("imap", "127.0.0.1"), Admission)
    first.release()
    first.release()  # idempotent
    assert (limits.unauthenticated, limits.authenticated) == (4, 0)


def test_the_deadline_says_goodbye_only_before_login() -> None:
    timers = _Timers()
    limits = ConnectionLimits(size_caps(1024, 20, 30), schedule=timers)
    idle, logged_in = limits.admit("pop3", "a"), limits.admit("pop3", "b")
    assert isinstance(idle, Admission) and isinstance(logged_in, Admission)
    said: list[str] = []
    idle.on_expire = lambda: said.append("idle")
    logged_in.on_expire = lambda: said.append("logged in")
    logged_in.authenticated()
    timers.fire_all()
    assert said == ["idle"]


def test_the_total_unauthenticated_cap_leaves_room_for_logins() -> None:
    limits = ConnectionLimits(size_caps(80, 1000, 30), schedule=_Timers())
    admitted = [limits.admit("smtp", f"10.0.0.{n}") for n in range(limits.caps.unauthenticated)]
    assert all(isinstance(one, Admission) for one in admitted)
    assert limits.admit("smtp", "10.0.1.1") == "total"
    admitted[0].authenticated()  # a login frees an unauthenticated place
    assert isinstance(limits.admit("smtp", "10.0.1.1"), Admission)


def test_at_the_address_cap_the_oldest_idle_connection_makes_room() -> None:
    """Every local program is 127.0.0.1: a newcomer closes the address's oldest connection that
    has not logged in (told why), instead of being refused behind idle holders."""
    limits = ConnectionLimits(size_caps(1024, 2, 30), schedule=_Timers())
    closed: list[str] = []
    first, second = limits.admit("smtp", "127.0.0.1"), limits.admit("smtp", "127.0.0.1")
    assert isinstance(first, Admission) and isinstance(second, Admission)
    first.on_expire = lambda: closed.append("first")
    second.on_expire = lambda: closed.append("second")
    third = limits.admit("smtp", "127.0.0.1")
    assert isinstance(third, Admission)
    assert closed == ["first"] and first.evicted and not second.evicted
    assert limits.unauthenticated == 2
    first.release()  # the protocol's own release after the close changes nothing
    assert limits.unauthenticated == 2
    # A connection that cannot be closed yet (no protocol attached) is not evicted: refused.
    second.authenticated()
    fourth = limits.admit("smtp", "127.0.0.1")
    assert isinstance(fourth, Admission)
    assert limits.admit("smtp", "127.0.0.1") == "address"  # third has no closer: nothing to evict
