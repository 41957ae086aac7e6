"""English and Japanese for the admin page, chosen by Accept-Language or the admin's choice.

Many people who run the legacy systems this gateway serves read Japanese first, so both
languages are complete; a missing key is a bug caught by the tests, not a silent fallback.
"""

from __future__ import annotations

from collections.abc import Callable

LANGUAGES = ("en", "ja")
DEFAULT_LANGUAGE = "en"

MESSAGES: dict[str, dict[str, str]] = {
    "en": {
        "title": "Mail gateway",
        "sign_in": "Sign in",
        "sign_out": "Sign out",
        "password": "Admin password",
        "sign_in_failed": "Wrong password.",
        "sign_in_throttled": "Too many failed attempts. Try again in {seconds} seconds.",
        "sign_in_disabled": (
            "Sign-in is disabled: set admin.password_hash in the config file "
            "(gateway hash-password) and restart the gateway."
        ),
        "forbidden_form": (
            "This form expired or did not come from this page. Reload the page and try again."
        ),
        "status": "Status",
        "listeners": "Listeners",
        "listener": "Listener",
        "port": "Port",
        "accounts": "Accounts",
        "username": "Username",
        "mailbox": "Mailbox",
        "provider": "Provider",
        "state": "State",
        "not_connected": "not connected",
        "no_accounts": "No accounts are configured. Add them to the config file.",
        "language": "日本語",
        "version": "Version",
    },
    "ja": {
        "title": "メールゲートウェイ",
        "sign_in": "サインイン",
        "sign_out": "サインアウト",
        "password": "管理者パスワード",
        "sign_in_failed": "パスワードが違います。",
        "sign_in_throttled": "失敗が続いたため、{seconds} 秒後に再度お試しください。",
        "sign_in_disabled": (
            "サインインできません。設定ファイルに admin.password_hash を設定し"
            "（gateway hash-password）、ゲートウェイを再起動してください。"
        ),
        "forbidden_form": (
            "このフォームは期限切れか、このページから送信されたものではありません。"
            "ページを再読み込みしてやり直してください。"
        ),
        "status": "状態",
        "listeners": "待ち受けポート",
        "listener": "種類",
        "port": "ポート",
        "accounts": "アカウント",
        "username": "ユーザー名",
        "mailbox": "メールボックス",
        "provider": "プロバイダー",
        "state": "状態",
        "not_connected": "未接続",
        "no_accounts": "アカウントが設定されていません。設定ファイルに追加してください。",
        "language": "English",
        "version": "バージョン",
    },
}


def negotiate(accept_language: str | None, chosen: str | None) -> str:
    """The admin's explicit choice wins; otherwise the best Accept-Language match."""
    if chosen in LANGUAGES:
        return chosen  # type: ignore[return-value]
    ranked: list[tuple[float, str]] = []
    for part in (accept_language or "").split(","):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        ranked.append((quality, tag.strip().lower().split("-")[0]))
    for _, language in sorted(ranked, key=lambda item: -item[0]):
        if language in LANGUAGES:
            return language
    return DEFAULT_LANGUAGE


def translator(language: str) -> Callable[..., str]:
    messages = MESSAGES[language]

    def translate(key: str, **values: object) -> str:
        return messages[key].format(**values) if values else messages[key]

    return translate
