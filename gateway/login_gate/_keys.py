"""What the login gate counts failures by: typed keys, so a username is never taken for an
address (a client may log in with the username "127.0.0.1")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Realm:
    """A namespace of usernames with its own pair budget: mailbox accounts, or the admin page."""

    name: str
    pair_limit: int


MAILBOX = Realm("mailbox", pair_limit=10)
ADMIN = Realm("admin", pair_limit=5)


@dataclass(frozen=True)
class UserKey:
    realm: Realm
    name: str  # casefolded: logins ignore case

    @classmethod
    def of(cls, realm: Realm, username: str) -> UserKey:
        return cls(realm, username.casefold())


@dataclass(frozen=True)
class PairKey:
    client: str
    user: UserKey
