"""Admin sign-in: server-side sessions, CSRF tokens, and throttling of wrong passwords.

Sessions live in the state database (``admin_sessions``), so with several instances behind a
load balancer the admin's next request may reach any of them; they survive a restart, and end
after ``admin.session_minutes`` without a request or at sign-out. The cookie holds only a random
session id (HttpOnly, SameSite=Strict, Secure when the page is served over HTTPS); the database
holds its SHA-256 digest, never the id, so a copy of the database signs nobody in. Every
state-changing request must carry the session's CSRF token *and*, when the browser sends one,
an Origin of this very page; SameSite alone does not cover older browsers.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..store import Connection, SqlDatabase, epoch_text, text_epoch

SESSION_COOKIE = "gw_admin"
CSRF_FIELD = "csrf_token"


@dataclass
class AdminSession:
    id: str  # the cookie's value; only its digest is stored
    csrf_token: str
    last_seen: float  # wall-clock seconds: instances compare it
    signed_in: bool = False

    def csrf_matches(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.csrf_token)


class SessionStore:
    """Sessions by id, expiring after ``lifetime`` seconds without a request.

    A request touches its session at most every ``lifetime / 10`` seconds (one write per page
    view would cost SQLite an fsync each), so a session may end up to a tenth of its lifetime
    early; never late.
    """

    def __init__(
        self, db: SqlDatabase, lifetime: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.lifetime = lifetime
        self.clock = clock
        self._db = db

    async def new(self, signed_in: bool = False) -> AdminSession:
        now = self.clock()
        session = AdminSession(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, signed_in)

        def insert(conn: Connection) -> None:
            conn.execute("DELETE FROM admin_sessions WHERE last_seen <= ?", (self._cutoff(now),))
            _insert(conn, session)

        await self._db.transact(insert)
        return session

    async def get(self, session_id: str | None) -> AdminSession | None:
        """The live session for this id (touched), or None."""
        if not session_id:
            return None
        now = self.clock()

        def load(conn: Connection) -> AdminSession | None:
            digest = _digest(session_id)
            row = conn.execute(
                "SELECT csrf_token, signed_in, last_seen FROM admin_sessions "
                "WHERE id_digest = ? AND last_seen > ?",
                (digest, self._cutoff(now)),
            ).fetchone()
            if row is None:
                return None
            seen = text_epoch(row[2])
            if now - seen >= self.lifetime / 10:
                seen = now
                conn.execute(
                    "UPDATE admin_sessions SET last_seen = ? WHERE id_digest = ?",
                    (epoch_text(now), digest),
                )
            return AdminSession(session_id, row[0], seen, bool(row[1]))

        return await self._db.transact(load)

    async def sign_in(self, session: AdminSession) -> AdminSession:
        """Replace the session by a new signed-in one: a fixed pre-login id is never promoted."""
        await self.drop(session)
        return await self.new(signed_in=True)

    async def drop(self, session: AdminSession) -> None:
        """End the session on every instance."""
        await self._db.execute(
            "DELETE FROM admin_sessions WHERE id_digest = ?", (_digest(session.id),)
        )

    def _cutoff(self, now: float) -> str:
        return epoch_text(now - self.lifetime)


def _insert(conn: Connection, session: AdminSession) -> None:
    conn.execute(
        "INSERT INTO admin_sessions (id_digest, csrf_token, signed_in, last_seen) "
        "VALUES (?, ?, ?, ?)",
        (
            _digest(session.id),
            session.csrf_token,
            int(session.signed_in),
            epoch_text(session.last_seen),
        ),
    )


def _digest(session_id: str) -> str:
    """The id is 256 random bits: a plain hash suffices (nothing to guess, nothing to salt)."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()
