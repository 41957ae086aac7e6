"""What a config reload (SIGHUP) may change in a running gateway, and what needs a restart.

Applied at once: ``accounts`` (added, removed, changed: passwords, upstream servers and their
passwords, sending and reading options), ``smtp``, ``spool``, ``microsoft`` and ``google``,
and ``reading.poll_seconds``/``reading.cache_mb`` for mailboxes opened afterwards. Open
connections keep working; new ones use the new config.

Needs a restart (:data:`RESTART_ONLY`): whatever the listeners were built with (their ports,
host, TLS certificate, limits, the clear-text login policy of IMAP/POP3 and the SMTP
banner's hostname), the state directory, the outbound CA bundle, the admin page's settings and
logging. A reload that changes one of them applies the rest and logs each of these keys as
``gateway.reload_needs_restart``.

The pid file (:func:`pid_file`) lets ``gateway reload -c FILE`` find the process to signal.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import AccountSettings, Settings

# Settings fixed when the gateway starts, as (section, field or None for the whole section).
RESTART_ONLY: tuple[tuple[str, str | None], ...] = (
    ("state_dir", None),
    ("hostname", None),
    ("listeners", None),
    ("tls", None),
    ("ca_bundle", None),
    ("admin", None),
    ("logging", None),
    ("reading", "plaintext_auth"),
)

PID_FILE = "gateway.pid"


def pid_file(state_dir: Path) -> Path:
    """Where ``gateway run`` writes its process ID (removed when it stops)."""
    return state_dir / PID_FILE


def needing_restart(old: Settings, new: Settings) -> list[str]:
    """The config keys that changed but only take effect after a restart."""
    changed = []
    for section, name in RESTART_ONLY:
        before, after = getattr(old, section), getattr(new, section)
        if name is not None:
            before, after = getattr(before, name), getattr(after, name)
        if before != after:
            changed.append(section if name is None else f"{section}.{name}")
    return changed


def keep_restart_only(old: Settings, new: Settings) -> Settings:
    """``new`` with the running values of every :data:`RESTART_ONLY` key, so the settings the
    gateway holds are the ones in force."""
    kept = new
    for section, name in RESTART_ONLY:
        value = getattr(old, section)
        if name is not None:
            value = dataclasses.replace(getattr(kept, section), **{name: getattr(value, name)})
        kept = dataclasses.replace(kept, **{section: value})
    return kept


def changed_accounts(old: Settings, new: Settings) -> set[str]:
    """Usernames whose delivery may work now: the account is new or changed, or its provider's
    settings changed. Their held mail is released at once."""
    before = {a.username: a for a in old.accounts}
    return {
        account.username
        for account in new.accounts
        if before.get(account.username) != account or _provider_changed(old, new, account)
    }


def mailbox_changed(old: AccountSettings | None, new: AccountSettings | None) -> bool:
    """Whether an open INBOX view of the account must be replaced (it was built from these)."""
    if old is None or new is None:
        return True
    return (old.provider, old.address, old.upstream, old.reading) != (
        new.provider,
        new.address,
        new.upstream,
        new.reading,
    )


def _provider_changed(old: Settings, new: Settings, account: AccountSettings) -> bool:
    section = account.provider
    return section in ("microsoft", "google") and getattr(old, section) != getattr(new, section)
