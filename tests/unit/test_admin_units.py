"""Admin building blocks that depend on time or language data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.admin import i18n
from gateway.admin.server import local_path, origin_of

TEMPLATES = Path(i18n.__file__).parent / "templates"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "en"),
        ("ja", "ja"),
        ("ja-JP,ja;q=0.9,en;q=0.8", "ja"),
        ("en-US,en;q=0.9,ja;q=0.8", "en"),
        ("fr,ja;q=0.5", "ja"),
        ("fr", "en"),
        ("ja;q=bogus,en", "en"),
    ],
)
def test_language_negotiation(header: str | None, expected: str) -> None:
    assert i18n.negotiate(header, None) == expected


def test_both_languages_have_every_message_used_by_the_templates() -> None:
    used = set()
    for template in TEMPLATES.glob("*.html"):
        used |= set(re.findall(r'_\("([a-z_]+)"', template.read_text()))
    for language in i18n.LANGUAGES:
        assert used <= set(i18n.MESSAGES[language]), language
    assert set(i18n.MESSAGES["en"]) == set(i18n.MESSAGES["ja"])


@pytest.mark.parametrize(
    ("code", "english", "japanese"),
    [
        (7000218, "Entra treats this app as a Web app", "Web アプリとして扱っており"),
        (700025, "Entra treats this app as a public client", "パブリック クライアントとして"),
        (50011, "Entra does not know this redirect URI", "リダイレクト URI が登録されていません"),
        (65001, "Nobody has consented to the permissions", "アクセス許可にまだ同意がありません"),
    ],
)
def test_each_entra_error_gets_one_sentence_in_both_languages(
    code: int, english: str, japanese: str
) -> None:
    error = f"invalid_client: AADSTS{code}: whatever Entra said"
    uri = "http://localhost:8025/oauth/callback"
    en = i18n.entra_advice("en", error, uri, web_platform=False)
    ja = i18n.entra_advice("ja", error, uri, web_platform=False)
    assert en is not None and en.startswith(english) and en.count(". ") == 0
    assert ja is not None and japanese in ja
    if code in (7000218, 700025, 50011):
        assert uri in en and uri in ja  # what exactly to register
    if code == 50011:
        assert "under Mobile and desktop applications" in en
        web = i18n.entra_advice("en", error, uri, web_platform=True)
        assert web is not None and "under Web." in web


def test_other_errors_get_no_entra_advice() -> None:
    for error in (None, "", "invalid_grant: AADSTS70008: expired", "Google answered x"):
        assert i18n.entra_advice("en", error, "http://x/oauth/callback", False) is None


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example",
        "///evil.example",
        "/\t/evil.example",
        "/\n/evil.example",
        "/\r/evil.example",
        "/\\evil.example",
        "/\\/evil.example",
        "\\\\evil.example",
        "https://evil.example/",
        "evil.example",
        " /login",
        "/login x",
        "/caf\u00e9",
        "/login\x7f",
        "",
        None,
    ],
)
def test_only_plain_local_paths_are_redirect_targets(target: str | None) -> None:
    assert local_path(target) == "/"


@pytest.mark.parametrize("target", ["/", "/login", "/queue?page=2&x=%2F%2Fevil", "/a/b/../c"])
def test_local_paths_are_kept_as_given(target: str) -> None:
    assert local_path(target) == target


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://Gateway.Example", ("https", "gateway.example", 443)),
        ("https://gateway.example:443/login", ("https", "gateway.example", 443)),
        ("http://127.0.0.1:8025", ("http", "127.0.0.1", 8025)),
        ("http://[::1]:8025/", ("http", "::1", 8025)),
        ("null", None),
        ("ftp://gateway.example", None),
        ("https://gateway.example:port", None),
    ],
)
def test_origins_compare_by_scheme_host_and_port(url: str, origin: tuple | None) -> None:
    assert origin_of(url) == origin
