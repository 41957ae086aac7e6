"""Durable gateway state: settings, encrypted secrets, audit events (SQLite, WAL).

All state goes through :class:`Store` so that another backend (PostgreSQL, for several
gateway instances sharing one spool and token set) can replace SQLite behind the same API.
"""

from ._crypto import KEY_ENV_VAR, SecretBox, StoreError, load_or_create_key
from ._sqlite import AccountAuth, Event, Store

__all__ = [
    "KEY_ENV_VAR",
    "AccountAuth",
    "Event",
    "SecretBox",
    "Store",
    "StoreError",
    "load_or_create_key",
]
