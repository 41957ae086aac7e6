"""Scopes follow the features: reading only asks to read; a write policy asks for modify."""

from __future__ import annotations

from gateway.oauth import _scopes


def _short(needs: tuple[_scopes.ScopeNeed, ...]) -> set[str]:
    return {_scopes.short(need.scope) for need in needs}


def test_google_reads_with_readonly_and_writes_with_modify() -> None:
    assert _short(_scopes.google_user()) == {"openid", "email", "gmail.send", "gmail.readonly"}
    assert _short(_scopes.google_user(writes=True)) == {
        "openid",
        "email",
        "gmail.send",
        "gmail.modify",
    }
    assert _short(_scopes.google_service_account(writes=True)) == {"gmail.send", "gmail.modify"}


def test_turning_a_write_policy_on_shows_the_missing_scope() -> None:
    granted = ("openid", "email", f"{_scopes.GMAIL}gmail.send", f"{_scopes.GMAIL}gmail.readonly")
    assert _scopes.missing(_scopes.google_user(), granted) == []
    (lacking,) = _scopes.missing(_scopes.google_user(writes=True), granted)
    assert _scopes.short(lacking.scope) == "gmail.modify" and "reading policy" in lacking.reason


def test_microsoft_asks_for_readwrite_which_covers_the_policies() -> None:
    assert _short(_scopes.microsoft_delegated()) == {"Mail.Send", "Mail.ReadWrite"}


def test_google_identity_scopes_granted_in_their_url_form_are_not_missing() -> None:
    """Google answers ``email`` / ``profile`` as userinfo URLs: a healthy connection."""
    granted = (
        "openid",
        f"{_scopes.GMAIL}userinfo.email",
        f"{_scopes.GMAIL}userinfo.profile",
        f"{_scopes.GMAIL}gmail.send",
        f"{_scopes.GMAIL}gmail.readonly",
    )
    assert _scopes.missing(_scopes.google_user(), granted) == []
    needs = (_scopes.ScopeNeed(f"{_scopes.GMAIL}userinfo.profile", "a name"),)
    assert _scopes.missing(needs, ("profile",)) == []
    (lacking,) = _scopes.missing(_scopes.google_user(), granted[:1] + granted[2:])
    assert _scopes.short(lacking.scope) == "email"
