"""Admin sign-in: server-side sessions, CSRF tokens, and throttling of wrong passwords.

Sessions live in memory: a restart signs the admin out, which is the safe direction. The cookie
holds only a random session id (HttpOnly, SameSite=Strict, Secure when the page is served over
HTTPS). Every state-changing request must carry the session's CSRF token *and*, when the browser
sends one, an Origin of this very page; SameSite alone does not cover older browsers.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

SESSION_COOKIE = "gw_admin"
CSRF_FIELD = "csrf_token"


@dataclass
class AdminSession:
    id: str
    csrf_token: str
    last_seen: float
    signed_in: bool = False

    def csrf_matches(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.csrf_token)


class SessionStore:
    """Sessions by id, expiring after ``lifetime`` seconds without a request."""

    def __init__(self, lifetime: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime = lifetime
        self.clock = clock
        self._sessions: dict[str, AdminSession] = {}

    def new(self) -> AdminSession:
        self._expire()
        session = AdminSession(secrets.token_urlsafe(32), secrets.token_urlsafe(32), self.clock())
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> AdminSession | None:
        """The live session for this id (touched), or None."""
        session = self._sessions.get(session_id or "")
        if session is None:
            return None
        if self.clock() - session.last_seen > self.lifetime:
            del self._sessions[session.id]
            return None
        session.last_seen = self.clock()
        return session

    def sign_in(self, session: AdminSession) -> AdminSession:
        """Replace the session by a new signed-in one: a fixed pre-login id is never promoted."""
        self.drop(session)
        fresh = self.new()
        fresh.signed_in = True
        return fresh

    def drop(self, session: AdminSession) -> None:
        self._sessions.pop(session.id, None)

    def _expire(self) -> None:
        now = self.clock()
        for stale in [s for s in self._sessions.values() if now - s.last_seen > self.lifetime]:
            del self._sessions[stale.id]
