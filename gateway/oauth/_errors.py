"""The OAuth layer's errors: what went wrong, said so that a person can act on it."""

from __future__ import annotations

from .. import delivery


class OAuthError(Exception):
    """Base of this layer's errors; ``str()`` is a sentence for the admin or the client."""


class ReauthRequired(OAuthError, delivery.ReauthRequired):
    """The mailbox must be connected (again) by its owner: no token, or the grant is gone.

    Also the delivery layer's :class:`gateway.delivery.ReauthRequired`, so the spool holds the
    account's mail and the mailbox view reports it, whichever layer raised it."""


class AuthUnavailable(OAuthError):
    """The identity provider could not be reached or answered with a temporary error."""


class ConsentError(OAuthError):
    """A consent attempt failed: forged or expired state, wrong user, denied, bad response."""
