"""A faithful local Microsoft 365 and Google Workspace, for tests and ``gateway demo``.

Real msal, google-auth and httpx clients talk to it over HTTPS exactly as they would to the
clouds; see ``docs/provider-apis.md`` for the behaviour it reproduces.

It is its own distribution (``sandbox/pyproject.toml``), so the gateway's wheel and image never
carry it; only ``gateway demo`` and the tests import it
(``tests/integration/test_runtime_imports.py`` checks that ``gateway run`` does not).
"""

from ._directory import App, Directory, Grant, User
from ._faults import Fault, FaultPlan
from ._provider import Context, MailboxOps, SentMessage
from ._server import Sandbox

__all__ = [
    "App",
    "Context",
    "Directory",
    "Fault",
    "FaultPlan",
    "Grant",
    "MailboxOps",
    "Sandbox",
    "SentMessage",
    "User",
]
