"""Values and builders shared by tests (importable, unlike conftest.py)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from gateway.passwords import hash_password

PASSWORD = "correct horse battery"
# A cheap hash (2**10) keeps the suite fast; production hashes use 2**15.
PASSWORD_HASH = hash_password(PASSWORD, log2_n=10)


def free_port() -> int:
    """A port that was free a moment ago, for subprocesses that cannot report port 0's choice."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_config(state_dir: Path, **overrides: Any) -> dict:
    """A valid config as a dict: every listener on port 0 (any free port), two accounts."""
    config: dict[str, Any] = {
        "state_dir": str(state_dir),
        "listeners": {
            f"{name}_port": 0
            for name in ("smtp", "smtps", "imap", "imaps", "pop3", "pop3s", "admin")
        },
        "microsoft": {"client_id": "11111111-2222-3333-4444-555555555555"},
        "admin": {"password_hash": PASSWORD_HASH},
        "logging": {"level": "debug"},
        "accounts": [
            {
                "username": "crm",
                "password_hash": PASSWORD_HASH,
                "provider": "microsoft",
                "address": "crm@contoso.example",
            },
            {
                "username": "scanner",
                "password_hash": PASSWORD_HASH,
                "provider": "google",
                "address": "scanner@example.com",
            },
        ],
    }
    config.update(overrides)
    return config
