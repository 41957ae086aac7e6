"""What the SMTP listeners share: accounts, spool, limits, the login throttle, the session count.

Both listeners (STARTTLS and implicit TLS) use one :class:`SmtpFront`, so a password guesser
cannot double its budget by alternating ports, and ``max_connections`` counts both. It counts
logged-in sessions only: connections that have not logged in are capped per client address by
:mod:`gateway.admission`, so idle sockets cannot shut everyone else out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..accounts import Accounts
from ..config import Settings
from ..login_gate import LoginGate
from ..spool import Spool

# account_state(username) -> a sentence when the mailbox needs re-consent, else None.
AccountState = Callable[[str], Awaitable[str | None]]


class SmtpFront:
    """Policy and shared state of the SMTP submission front."""

    def __init__(
        self,
        settings: Settings,
        accounts: Accounts,
        spool: Spool,
        account_state: AccountState | None = None,
        gate: LoginGate | None = None,
    ) -> None:
        self.smtp = settings.smtp
        self.accounts = accounts
        self.spool = spool
        self.account_state = account_state
        self.gate = gate or LoginGate()
        self._sessions = 0

    @property
    def size_limit(self) -> int:
        """The largest message in bytes (advertised as SIZE; larger DATA gets 552 5.3.4)."""
        return self.smtp.max_message_mb * 2**20

    def has_room(self) -> bool:
        """Whether a new connection may start: fewer than ``max_connections`` logged-in sessions
        (a connection that cannot log in into a free session would only wait)."""
        return self._sessions < self.smtp.max_connections

    def session_started(self) -> None:
        self._sessions += 1

    def session_ended(self) -> None:
        self._sessions -= 1
