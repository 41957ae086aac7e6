"""Service accounts with domain-wide delegation: the Workspace admin's way to act as any user.

A service account signs a JWT (RS256, ``iss`` = its email, ``sub`` = the user, ``scope``) and
trades it at the token endpoint for an access token *for that user*. The admin console lists which
scopes the account may use that way; anything else is ``unauthorized_client``, as Google answers.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from . import jws

# google-auth always puts Google's own token URI in ``aud`` (it ignores a custom token_uri there),
# so the real audiences must be accepted besides the sandbox's own.
GOOGLE_TOKEN_AUDIENCES = frozenset(
    {"https://oauth2.googleapis.com/token", "https://accounts.google.com/o/oauth2/token"}
)
MAX_ASSERTION_LIFETIME = 3600  # "Token must be a short-lived token (60 minutes)"
CLOCK_SKEW = 300


class AssertionRejected(Exception):
    """Why the token endpoint refuses a JWT grant, as Google words it."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


@dataclass(frozen=True)
class ServiceAccount:
    client_email: str
    client_id: str
    key_id: str
    public_key: rsa.RSAPublicKey
    delegated_scopes: frozenset[str]


@dataclass(frozen=True)
class Assertion:
    """A verified JWT grant: who signed it, whom it impersonates, which scopes it wants."""

    account: ServiceAccount
    subject: str | None
    scopes: tuple[str, ...]


class ServiceAccounts:
    def __init__(self) -> None:
        self._by_email: dict[str, ServiceAccount] = {}

    def create(self, delegated_scopes: Iterable[str], token_uri: str) -> dict[str, Any]:
        """Make an account and return its JSON key file, as the Cloud console downloads it."""
        key = jws.new_key()
        project = f"sandbox-{secrets.token_hex(3)}"
        account = ServiceAccount(
            client_email=f"gateway-{secrets.token_hex(3)}@{project}.iam.gserviceaccount.com",
            client_id=str(10**20 + secrets.randbelow(9 * 10**20)),
            key_id=secrets.token_hex(20),
            public_key=key.public_key(),
            delegated_scopes=frozenset(delegated_scopes),
        )
        self._by_email[account.client_email] = account
        origin = token_uri.rsplit("/", 1)[0]
        return {
            "type": "service_account",
            "project_id": project,
            "private_key_id": account.key_id,
            "private_key": jws.private_pem(key),
            "client_email": account.client_email,
            "client_id": account.client_id,
            "auth_uri": f"{origin}/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": f"{origin}/oauth2/v1/certs",
            "client_x509_cert_url": f"{origin}/robot/v1/metadata/x509/{account.client_email}",
            "universe_domain": "googleapis.com",
        }

    def verify(self, assertion: str, token_uri: str, now: float) -> Assertion:
        """Check a JWT grant the way Google's token endpoint does, in the same order."""
        account = self._signer(assertion)
        try:
            claims = jws.verify(assertion, account.public_key)
        except jws.InvalidJws:
            raise AssertionRejected("invalid_grant", "Invalid JWT Signature.") from None
        _check_times(claims, now)
        if claims.get("aud") not in GOOGLE_TOKEN_AUDIENCES | {token_uri}:
            raise AssertionRejected(
                "invalid_grant", "Invalid JWT: Failed audience check. The audience is wrong."
            )
        scopes = tuple(str(claims.get("scope", "")).split())
        if not scopes:
            raise AssertionRejected(
                "invalid_scope", "Invalid OAuth scope or ID token audience provided."
            )
        subject = claims.get("sub")
        if subject is not None and not set(scopes) <= account.delegated_scopes:
            raise AssertionRejected(
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, "
                "or client not authorized for any of the scopes requested.",
                status=401,
            )
        return Assertion(account, subject, scopes)

    def _signer(self, assertion: str) -> ServiceAccount:
        """The account named by ``iss``, read before the signature: it says which key to check."""
        try:
            claims = jws.unverified_claims(assertion)
        except jws.InvalidJws:
            raise AssertionRejected("invalid_grant", "Invalid JWT Signature.") from None
        account = self._by_email.get(str(claims.get("iss", "")))
        if account is None:
            raise AssertionRejected("invalid_grant", "Invalid grant: account not found")
        return account


def _check_times(claims: dict[str, Any], now: float) -> None:
    iat, exp = claims.get("iat"), claims.get("exp")
    if (
        not isinstance(iat, int | float)
        or not isinstance(exp, int | float)
        or exp - iat > MAX_ASSERTION_LIFETIME
        or iat > now + CLOCK_SKEW
        or exp < now - CLOCK_SKEW
    ):
        raise AssertionRejected(
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
            "timeframe. Check your iat and exp values in the JWT claim.",
        )
