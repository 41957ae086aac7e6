"""Local accounts: password checks (async, constant-ish time) and who may send as whom."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import login_gate
from gateway.accounts import Accounts
from gateway.config import AccountSettings, SendingSettings, UpstreamServer, UpstreamSettings
from gateway.login_gate import WRONG, LoginGate, Refused
from gateway.passwords import ScryptHash, verify_password
from tests.helpers import PASSWORD, PASSWORD_HASH


def _account(username: str, address: str, allowed_from: tuple[str, ...] = ()) -> AccountSettings:
    return AccountSettings(
        username=username,
        password_hash=PASSWORD_HASH,
        provider="microsoft",
        address=address,
        sending=SendingSettings(allowed_from=allowed_from),
    )


CRM = _account("crm", "crm@contoso.example", ("Sales@Contoso.example",))
SCANNER = _account("Scanner", "scanner@example.com")


@pytest.fixture
def accounts() -> Accounts:
    return Accounts([CRM, SCANNER])


async def _login(accounts: Accounts, username: str, password: str) -> AccountSettings | Refused:
    return await accounts.login(LoginGate(), "192.0.2.1", username, password, "smtp")


async def test_right_password_in_any_username_case_returns_the_account(accounts: Accounts) -> None:
    assert await _login(accounts, "crm", PASSWORD) is CRM
    assert await _login(accounts, "SCANNER", PASSWORD) is SCANNER
    assert accounts.get("CrM") is CRM


@pytest.mark.parametrize(
    ("username", "password"),
    [("crm", "wrong"), ("crm", ""), ("crm", PASSWORD + " "), ("nobody", PASSWORD)],
)
async def test_wrong_password_or_unknown_user_is_refused(
    accounts: Accounts, username: str, password: str
) -> None:
    assert await _login(accounts, username, password) == WRONG


async def test_unknown_user_costs_a_check_as_strong_as_a_real_one(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[ScryptHash] = []

    def recording(password: str, stored: ScryptHash) -> bool:
        checked.append(stored)
        return verify_password(password, stored)

    monkeypatch.setattr(login_gate, "verify_password", recording)
    assert await _login(accounts, "nobody", PASSWORD) == WRONG
    [dummy] = checked
    real = accounts._hashes["crm"]
    assert (dummy.log2_n, dummy.r, dummy.p) == (real.log2_n, real.r, real.p)
    assert dummy.salt != real.salt


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("crm@contoso.example", True),
        ("CRM@CONTOSO.EXAMPLE", True),
        ("sales@contoso.example", True),
        ("ceo@contoso.example", False),
        ("crm@contoso.example.evil", False),
        ("scanner@example.com", False),
        ("", False),
    ],
)
def test_may_send_as_mailbox_and_allowed_from_only(
    accounts: Accounts, address: str, allowed: bool
) -> None:
    assert accounts.may_send_as(CRM, address) is allowed


def test_provider_aliases_extend_the_allowed_senders(accounts: Accounts) -> None:
    accounts.set_send_as_aliases("CRM", ["Info@Contoso.example"])
    assert accounts.may_send_as(CRM, "info@contoso.example")
    assert accounts.allowed_senders(CRM) == (
        "crm@contoso.example",
        "Sales@Contoso.example",
        "info@contoso.example",
    )
    assert not accounts.may_send_as(SCANNER, "info@contoso.example")


def test_no_accounts_still_has_a_dummy_hash() -> None:
    empty = Accounts([])
    assert empty.get("crm") is None
    assert empty._dummy.log2_n == 15


def test_allowed_senders_lists_the_mailbox_once() -> None:
    account: Any = _account("x", "x@example.com", ("X@example.com", "y@example.com"))
    assert Accounts([account]).allowed_senders(account) == ("x@example.com", "y@example.com")


SERVER = UpstreamServer(host="mail.example.org")


@pytest.mark.parametrize(
    ("provider", "upstream", "can_send"),
    [
        ("microsoft", None, True),
        ("google", None, True),
        ("upstream", UpstreamSettings(smtp=SERVER, imap=SERVER), True),
        ("upstream", UpstreamSettings(smtp=SERVER), True),
        ("upstream", UpstreamSettings(imap=SERVER), False),
        ("upstream", UpstreamSettings(pop3=SERVER), False),
    ],
)
def test_an_upstream_account_without_smtp_can_only_read(
    provider: str, upstream: UpstreamSettings | None, can_send: bool
) -> None:
    account = AccountSettings(
        username="legacy",
        password_hash=PASSWORD_HASH,
        provider=provider,  # type: ignore[arg-type]
        address="legacy@example.org",
        upstream=upstream,
    )
    assert account.can_send is can_send


async def test_a_read_only_account_still_logs_in() -> None:
    """Its IMAP/POP3 clients need the login; only sending is refused (at MAIL FROM)."""
    legacy = AccountSettings(
        username="legacy",
        password_hash=PASSWORD_HASH,
        provider="upstream",
        address="legacy@example.org",
        upstream=UpstreamSettings(imap=SERVER),
    )
    assert await _login(Accounts([legacy]), "legacy", PASSWORD) is legacy
