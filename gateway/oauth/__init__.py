"""OAuth for the mailboxes: consent, encrypted token storage, refresh, and re-consent alerts.

The rest of the gateway uses :class:`TokenBroker` only: ``access_token(account)`` for API
calls, and the consent methods from the admin page and the CLI.
"""

from ._broker import AccountStatus, TokenBroker
from ._errors import AuthUnavailable, ConsentError, OAuthError, ReauthRequired
from ._scopes import ScopeNeed
from ._scopes import short as short_scope

__all__ = [
    "AccountStatus",
    "AuthUnavailable",
    "ConsentError",
    "OAuthError",
    "ReauthRequired",
    "ScopeNeed",
    "TokenBroker",
    "short_scope",
]
