"""What the token broker keeps: accounts' provider authorisations, one-time consent links,
sign-ins waiting for the provider's answer, settings and encrypted secrets (``AuthStore`` over
either SQL backend).

Token material, secrets and a pending sign-in's PKCE verifier are sealed with the
:class:`SecretBox` before they reach SQL, each bound to its row's name, so a ciphertext copied
onto another row does not decrypt.
"""

from __future__ import annotations

from datetime import datetime

from ._crypto import SecretBox
from ._db import Row, now_text, parse_time, time_text
from ._sql import Connection, SqlDatabase
from ._types import AccountAuth

_AUTH_SELECT = (
    "SELECT account, provider, state, principal, scopes, token_ciphertext, updated_at, "
    "reconsent_since, last_error, admin_notified FROM account_auth"
)


class SqlAuthStore:
    """Authorisations, consent links, pending sign-ins, settings and secrets in the state
    database."""

    def __init__(self, db: SqlDatabase, box: SecretBox) -> None:
        self._db = db
        self._box = box

    async def get_setting(self, key: str) -> str | None:
        row = await self._db.fetch_one("SELECT value FROM settings WHERE key = ?", (key,))
        return None if row is None else row[0]

    async def set_setting(self, key: str, value: str) -> None:
        await self._db.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def put_secret(self, name: str, plaintext: bytes) -> None:
        """Store *plaintext* encrypted, bound to *name* so it cannot be moved to another name."""
        ciphertext = self._box.encrypt(plaintext, name)
        await self._db.execute(
            "INSERT INTO secrets (name, ciphertext, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET "
            "ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
            (name, ciphertext, now_text()),
        )

    async def get_secret(self, name: str) -> bytes | None:
        """Return the decrypted secret, None if absent; StoreError if the key does not fit."""
        row = await self._db.fetch_one("SELECT ciphertext FROM secrets WHERE name = ?", (name,))
        return None if row is None else self._box.decrypt(row[0], name)

    async def put_account_auth(self, auth: AccountAuth) -> None:
        """Insert or replace the authorisation of ``auth.account`` in one atomic write."""
        context = _auth_context(auth.account)
        ciphertext = None if auth.token is None else self._box.encrypt(auth.token, context)
        await self._db.execute(
            "INSERT INTO account_auth (account, provider, state, principal, scopes, "
            "token_ciphertext, updated_at, reconsent_since, last_error, admin_notified) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (account) DO UPDATE SET provider = excluded.provider, "
            "state = excluded.state, principal = excluded.principal, scopes = excluded.scopes, "
            "token_ciphertext = excluded.token_ciphertext, updated_at = excluded.updated_at, "
            "reconsent_since = excluded.reconsent_since, last_error = excluded.last_error, "
            "admin_notified = excluded.admin_notified",
            (
                auth.account,
                auth.provider,
                auth.state,
                auth.principal,
                " ".join(auth.scopes),
                ciphertext,
                now_text(),
                time_text(auth.reconsent_since),
                auth.last_error,
                int(auth.admin_notified),
            ),
        )

    async def get_account_auth(self, account: str) -> AccountAuth | None:
        row = await self._db.fetch_one(f"{_AUTH_SELECT} WHERE account = ?", (account,))
        return None if row is None else self._auth_from_row(row)

    async def delete_account_auth(self, account: str) -> None:
        await self._db.execute("DELETE FROM account_auth WHERE account = ?", (account,))

    def _auth_from_row(self, row: Row) -> AccountAuth:
        account, provider, state, principal, scopes, ciphertext = row[:6]
        updated_at, reconsent_since, last_error, notified = row[6:]
        token = (
            None if ciphertext is None else self._box.decrypt(ciphertext, _auth_context(account))
        )
        return AccountAuth(
            account=account,
            provider=provider,
            state=state,
            principal=principal,
            scopes=tuple(scopes.split()),
            token=token,
            updated_at=parse_time(updated_at),
            reconsent_since=parse_time(reconsent_since),
            last_error=last_error,
            admin_notified=bool(notified),
        )

    async def add_consent_link(self, token_hash: str, account: str, expires_at: datetime) -> None:
        """Remember a consent link by the hash of its token (the token itself is never stored)."""
        await self._db.execute(
            "INSERT INTO consent_links (token_hash, account, expires_at) VALUES (?, ?, ?)",
            (token_hash, account, time_text(expires_at)),
        )

    async def peek_consent_link(self, token_hash: str, now: datetime) -> str | None:
        """The account of an unused, unexpired consent link, without spending it."""
        return await self._db.run(lambda conn: _live_link(conn, token_hash, now))

    async def use_consent_link(self, token_hash: str, now: datetime) -> str | None:
        """Spend a consent link: return its account once, if unused and unexpired; else None."""

        def spend(conn: Connection) -> str | None:
            account = _live_link(conn, token_hash, now)
            if account is None:
                return None
            cursor = conn.execute(
                "UPDATE consent_links SET used_at = ? WHERE token_hash = ? AND used_at IS NULL",
                (time_text(now), token_hash),
            )
            return account if cursor.rowcount == 1 else None

        return await self._db.run(spend)

    async def put_pending_sign_in(
        self, state_hash: str, account: str, payload: bytes, expires_at: datetime
    ) -> None:
        """Keep a sign-in until the provider sends the browser back, by the hash of its state
        (the state itself travels only through the browser); *payload* is sealed, bound to
        the row's state hash and account."""
        sealed = self._box.encrypt(payload, _pending_context(state_hash, account))
        await self._db.execute(
            "INSERT INTO pending_sign_ins (state_hash, account, sealed, expires_at) "
            "VALUES (?, ?, ?, ?)",
            (state_hash, account, sealed, time_text(expires_at)),
        )

    async def take_pending_sign_in(
        self, state_hash: str, now: datetime
    ) -> tuple[str, bytes] | None:
        """(account, payload) of the sign-in, once: the row is deleted in the same statement
        that reads it, so of two callbacks with one state (two instances, a replay) only one
        gets it. An expired sign-in is deleted too and gives None."""
        rows = await self._db.fetch_all(
            "DELETE FROM pending_sign_ins WHERE state_hash = ? "
            "RETURNING account, sealed, expires_at",
            (state_hash,),
        )  # fetch_all: SQLite applies a DELETE ... RETURNING when its rows are all read
        if not rows:
            return None
        account, sealed, expires_at = rows[0]
        if datetime.fromisoformat(expires_at) <= now:
            return None
        return account, self._box.decrypt(bytes(sealed), _pending_context(state_hash, account))

    async def prune_pending_sign_ins(self, now: datetime) -> None:
        """Forget the sign-ins whose browser never came back before they expired."""
        await self._db.execute(
            "DELETE FROM pending_sign_ins WHERE expires_at <= ?", (time_text(now),)
        )


def _live_link(conn: Connection, token_hash: str, now: datetime) -> str | None:
    """The account of the link if it is unused and unexpired at *now*."""
    row = conn.execute(
        "SELECT account, expires_at FROM consent_links WHERE token_hash = ? AND used_at IS NULL",
        (token_hash,),
    ).fetchone()
    if row is None or datetime.fromisoformat(row[1]) <= now:
        return None
    return row[0]


def _auth_context(account: str) -> str:
    return f"account-auth:{account}"


def _pending_context(state_hash: str, account: str) -> str:
    return f"pending-sign-in:{state_hash}:{account}"
