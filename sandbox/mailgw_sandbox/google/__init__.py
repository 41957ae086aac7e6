"""Google OAuth 2.0 + the Gmail API, emulated (provider-apis.md C, D and F).

One object per sandbox: :class:`GoogleSandbox` owns the mail store and registers the sign-in
routes (``/o/oauth2/...``, ``/token``, ``/device/code``, ``/revoke``) and the Gmail routes
(``/gmail/v1/...``, ``/upload/...``, ``/resumable/upload/...``) on the sandbox's application.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from .._directory import Provider, User
from .._provider import Context
from .api import Gate
from .batch import GmailBatch
from .gmail import GmailApi
from .mailstore import GmailOps, GmailStore, Mailbox
from .oauth import TOKEN_PATH, GoogleOAuth
from .upload import Uploads

__all__ = ["GoogleSandbox"]


class GoogleSandbox:
    provider: Provider = "google"

    def __init__(self, context: Context) -> None:
        self.context = context
        self.store = GmailStore(context.directory)
        self.ops = GmailOps(self.store)
        self.oauth = GoogleOAuth(context)
        gate = Gate(context.directory, self.store)
        self._gmail = GmailApi(gate, self.store)
        self._uploads = Uploads(gate, self.store)

    def add_routes(self, app: web.Application) -> None:
        self.oauth.add_routes(app)
        self._gmail.add_routes(app)
        GmailBatch().add_routes(app)
        self._uploads.add_routes(app)

    def mailbox(self, user: User) -> Mailbox:
        """The user's messages and history, for assertions that the API cannot make."""
        return self.store.mailbox(user)

    def add_service_account(self, domain_wide_scopes: Iterable[str], origin: str) -> dict[str, Any]:
        """A service account whose key may act for any sandbox Google user within
        ``domain_wide_scopes`` (domain-wide delegation). Returns its JSON key file contents;
        ``origin`` is the sandbox URL, so the key's ``token_uri`` points at it."""
        return self.oauth.service_accounts.create(domain_wide_scopes, origin + TOKEN_PATH)

    def expire_history(self, user: User) -> None:
        """Forget the user's history, so any older startHistoryId gets 404 (full resync)."""
        self.store.mailbox(user).forget_history()
