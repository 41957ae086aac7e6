"""What the SMTP listeners share: accounts, spool, limits, the login gate, the connection count.

Both listeners (STARTTLS and implicit TLS) use one :class:`SmtpFront`, so a password guesser
cannot double its budget by alternating ports, and ``max_connections`` counts both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..accounts import Accounts
from ..config import Settings
from ..login_gate import LoginGate
from ..spool._types import Spool

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
        self._connections = 0

    @property
    def size_limit(self) -> int:
        """The largest message in bytes (advertised as SIZE; larger DATA gets 552 5.3.4)."""
        return self.smtp.max_message_mb * 2**20

    def admit(self) -> bool:
        """Count a new connection in, unless ``max_connections`` are already open."""
        if self._connections >= self.smtp.max_connections:
            return False
        self._connections += 1
        return True

    def release(self) -> None:
        self._connections -= 1
