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
:func:`reload_config` re-reads the file and :func:`apply` switches the running parts of a
gateway (:class:`RunningGateway`, built by ``gateway.app``) to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Protocol

import httpx

from . import metrics, providers
from .accounts import Accounts
from .config import AccountSettings, ConfigError, Settings, load_settings
from .logs import get_logger
from .mailbox import MailboxViews
from .oauth import TokenBroker
from .smtp_in import server as smtp_server
from .spool import SpoolWorker
from .spool import options as spool_options

log = get_logger(__name__)


class RunningGateway(Protocol):
    """The parts of a running gateway that a reload changes (``gateway.app.Gateway``)."""

    settings: Settings
    accounts: Accounts
    broker: TokenBroker | None
    spool: SpoolWorker | None
    smtp_front: smtp_server.SmtpFront | None
    http: httpx.AsyncClient | None
    trust: Path | None
    senders: dict[str, providers.Sender]
    views: MailboxViews | None

    @property
    def serving(self) -> bool:
        """Started and not stopping: only then may its settings change."""
        ...


# Settings fixed when the gateway starts, as (section, field or None for the whole section).
RESTART_ONLY: tuple[tuple[str, str | None], ...] = (
    ("state_dir", None),
    ("store", None),
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


def write_pid_file(state_dir: Path) -> Path:
    """For ``gateway reload``: which process reads this state directory. Returns the file."""
    path = pid_file(state_dir)
    path.write_text(f"{os.getpid()}\n", encoding="ascii")
    return path


async def reload_config(gateway: RunningGateway) -> bool:
    """Re-read the config file; apply it if it validates, else keep the running one.

    Every problem is logged as check-config reports it (file, line, key, fix).
    """
    source = gateway.settings.source
    if source is None or not gateway.serving:
        log.warning("gateway.reload_ignored", reason="not serving (starting or stopping)")
        return False
    try:
        new = await asyncio.to_thread(load_settings, source)
    except ConfigError as error:
        for problem in error.problems:
            log.error(
                "gateway.reload_problem",
                file=str(error.file),
                line=problem.line,
                key=problem.key,
                problem=problem.message,
                fix=problem.fix,
            )
        log.error(
            "gateway.reload_refused",
            config=str(source),
            problems=len(error.problems),
            detail="the running config stays in force; fix the file and reload again",
        )
        metrics.reloaded("refused")
        return False
    await apply(gateway, new)
    metrics.reloaded("applied")
    return True


async def apply(gateway: RunningGateway, new: Settings) -> None:
    """Switch ``gateway`` to ``new`` (validated) without closing a listener or a connection."""
    old = gateway.settings
    for key in needing_restart(old, new):
        log.warning("gateway.reload_needs_restart", key=key, detail="restart to apply it")
    released = changed_accounts(old, new)
    kept = keep_restart_only(old, new)
    gateway.settings = kept
    gateway.accounts.replace(kept.accounts)
    broker, spool, front, http = gateway.broker, gateway.spool, gateway.smtp_front, gateway.http
    assert broker is not None and spool is not None and front is not None and http is not None
    broker.reconfigure(kept)
    front.smtp = kept.smtp
    spool.accounts = {a.username: a for a in kept.accounts}
    for name, value in spool_options(kept).items():  # hostname: restart-only, so unchanged
        setattr(spool, name, value)
    fresh = providers.senders(kept, http, broker, gateway.trust or Path())
    gateway.senders.update(microsoft=fresh["microsoft"], google=fresh["google"])
    if gateway.views is not None:
        await _reopen_mailboxes(gateway.views, old, kept)
    for username in sorted(released):
        count = await spool.release(username)
        if count:
            log.info("gateway.reload_released", account=username, messages=count)
    log.info(
        "gateway.reloaded",
        config=str(kept.source),
        accounts=len(kept.accounts),
        changed_accounts=",".join(sorted(released)) or "-",
    )


async def _reopen_mailboxes(views: MailboxViews, old: Settings, new: Settings) -> None:
    """Close the INBOX view of an account whose mailbox settings changed (or which is
    gone): the next login opens one with the new settings. Its sessions open at the
    reload were reading the old mailbox and must log in again."""
    before = {a.username: a for a in old.accounts}
    after = {a.username: a for a in new.accounts}
    changed = [u for u in views if mailbox_changed(before.get(u), after.get(u))]
    for username in await views.reopen(changed):
        log.info("gateway.reload_mailbox_reopened", account=username)


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
