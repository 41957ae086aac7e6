"""Local users of the gateway: who may log in, which mailbox they stand for, what they may send as.

A legacy program logs in with a local username and password (hashed in the config); the account
then decides which mailbox its mail goes through and which From/sender addresses it may use.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from .config import AccountSettings
from .login_gate import MAILBOX, WRONG, LoginGate, Refused, UserKey
from .passwords import ScryptHash, parse_hash


class Accounts:
    """The configured accounts, looked up by username without regard to case."""

    def __init__(self, accounts: Iterable[AccountSettings]) -> None:
        self._aliases: dict[str, frozenset[str]] = {}
        self.replace(accounts)

    def replace(self, accounts: Iterable[AccountSettings]) -> None:
        """Take the accounts of a reloaded config: the next login checks the new hashes (the
        login gate's cache of verified passwords is keyed to the hash, so an old password
        stops working at once). Learnt send-as aliases of kept accounts stay."""
        self._accounts = {account.username.casefold(): account for account in accounts}
        self._hashes = {name: parse_hash(a.password_hash) for name, a in self._accounts.items()}
        self._aliases = {k: v for k, v in self._aliases.items() if k in self._accounts}
        self._dummy = _dummy_hash(self._hashes.values())

    def get(self, username: str) -> AccountSettings | None:
        return self._accounts.get(username.casefold())

    async def login(
        self, gate: LoginGate, client: str, username: str, password: str, protocol: str
    ) -> AccountSettings | Refused:
        """The account if the password is right, else why not (through the one login gate).

        An unknown username is checked against a dummy hash of the same strength, so the
        answer time does not tell an attacker which usernames exist.
        """
        key = username.casefold()
        stored = self._hashes.get(key, self._dummy)
        user = UserKey.of(MAILBOX, username)
        verdict = await gate.check(client, user, password, stored, protocol=protocol)
        if isinstance(verdict, Refused):
            return verdict
        account = self._accounts.get(key)
        return WRONG if account is None else account  # the dummy matches nothing; be sure

    def set_send_as_aliases(self, username: str, aliases: Iterable[str]) -> None:
        """Record the provider's send-as aliases of a mailbox (Gmail sendAs, Exchange proxies)."""
        self._aliases[username.casefold()] = frozenset(a.casefold() for a in aliases)

    def allowed_senders(self, account: AccountSettings) -> tuple[str, ...]:
        """Every address the account may use as envelope sender, From or Sender, mailbox first."""
        aliases = self._aliases.get(account.username.casefold(), frozenset())
        extra = sorted(set(account.sending.allowed_from) | aliases)
        return (account.address, *(a for a in extra if a.casefold() != account.address.casefold()))

    def may_send_as(self, account: AccountSettings, address: str) -> bool:
        """Providers treat addresses case-insensitively, so the comparison does too."""
        wanted = address.casefold()
        return any(wanted == allowed.casefold() for allowed in self.allowed_senders(account))


def _dummy_hash(hashes: Iterable[ScryptHash]) -> ScryptHash:
    """A hash nothing matches (random digest), as costly as the strongest configured one."""
    strongest = max(hashes, key=lambda h: (h.log2_n, h.r, h.p), default=None)
    log2_n, r, p = (strongest.log2_n, strongest.r, strongest.p) if strongest else (15, 8, 1)
    return ScryptHash(log2_n, r, p, secrets.token_bytes(16), secrets.token_bytes(32))
