"""Session-wide private upstream mail servers (Dovecot, Postfix) for the integration tests.

They are started once per session because starting and stopping both costs a few seconds; tests
share them safely by using their own users (``upstream_user``) and, for mail through Postfix (which
all lands in one catch-all mailbox), by looking for a unique header rather than counting messages.

A missing server binary is a broken test machine, not a reason to skip: the fixtures FAIL and say
how to fix it, so a green run always means the real servers were exercised.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from mailgw_sandbox.upstream import (
    INSTALL_HINT,
    REQUIRED_BINARIES,
    Dovecot,
    MailUser,
    Postfix,
    missing_binaries,
)


def _require_binaries() -> None:
    missing = missing_binaries(REQUIRED_BINARIES)
    if missing:
        pytest.fail(
            f"integration test dependencies missing ({', '.join(missing)}): {INSTALL_HINT}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """A running private Dovecot (IMAP/IMAPS/POP3/POP3S/LMTP) on 127.0.0.1 high ports."""
    _require_binaries()
    with Dovecot() as server:
        yield server


@pytest.fixture(scope="session")
def postfix(dovecot: Dovecot) -> Iterator[Postfix]:
    """A running private Postfix (submission, smtps; AUTH via Dovecot) delivering to ``dovecot``."""
    _require_binaries()
    if os.geteuid() != 0:
        pytest.fail(
            "the private Postfix must be started as root (run the integration tests as root, "
            f"as CI does); to install its packages: {INSTALL_HINT}",
            pytrace=False,
        )
    with Postfix(dovecot) as server:
        yield server


@pytest.fixture
def upstream_user(dovecot: Dovecot, request: pytest.FixtureRequest) -> MailUser:
    """A fresh Dovecot user with an empty INBOX, named after the test, for this test only."""
    return dovecot.new_user(request.node.name)
