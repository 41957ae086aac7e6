"""English and Japanese for the admin page, chosen by Accept-Language or the admin's choice.

Many people who run the legacy systems this gateway serves read Japanese first, so both
languages are complete; a missing key is a bug caught by the tests, not a silent fallback.
"""

from __future__ import annotations

import re
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
        "sign_in_throttled": (
            "Too many failed attempts from your address. Try again in {seconds} seconds."
        ),
        "sign_in_disabled": (
            "Sign-in is disabled: set admin.password_hash in the config file "
            "(gateway hash-password) and restart the gateway."
        ),
        "forbidden_form": (
            "This form expired or did not come from this page. Reload the page and try again."
        ),
        "store_unavailable": (
            "The gateway cannot reach its database right now. Try again in a few minutes."
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
        "connected_as": "connected as {principal}",
        "needs_reconsent": "needs re-consent since {since}",
        "app_only": "connected (application permission)",
        "upstream": "password server (no consent needed)",
        "scopes_granted": "Granted scopes",
        "scopes_missing": "Missing scopes",
        "why": "why",
        "reading_local": "IMAP/POP3: nothing changes at the provider "
        "(flags and deletions stay in the gateway)",
        "reading_mirror_flags": "IMAP flags are copied to the provider",
        "reading_on_delete_archive": "deleted mail is archived at the provider",
        "reading_on_delete_trash": "deleted mail goes to the provider's trash",
        "last_error": "Last error",
        "connect": "Connect",
        "reconnect": "Connect again",
        "disconnect": "Disconnect",
        "consent_link": "Create consent link",
        "consent_link_intro": (
            "Send this link to the owner of {address}. It works once, until {expires}, and "
            "needs no admin password:"
        ),
        "consent_link_invalid": (
            "This link was already used or has expired. Ask your administrator for a new one."
        ),
        "consent_done": "{address} is connected. You can close this page.",
        "consent_failed": "The mailbox could not be connected: {reason}",
        "back": "Back to the accounts",
        "google_client": "Google OAuth client",
        "google_client_intro": (
            "Create an OAuth client (type Web application, authorized redirect URI "
            "{redirect_uri}) in the Google Cloud console of your Workspace and enter it here. "
            "The secret is stored encrypted and never shown again."
        ),
        "google_client_from_config": "The Google client is set in the config file; edit it there.",
        "google_client_saved": "Saved. Google client ID: {client_id}",
        "google_client_missing": "Not set: Google accounts cannot be connected yet.",
        "client_id": "Client ID",
        "client_secret": "Client secret",
        "save": "Save",
        "close": "Close",
        "required": "Both fields are required.",
        "consent_intro": (
            "You were asked to connect the mailbox {address} to the mail gateway. Sign in with "
            "that mailbox's own account on the next page."
        ),
        "continue": "Continue to sign-in",
        "token_valid_until": "access token valid until {time}",
        "queue": "Outgoing mail",
        "queue_empty": "Nothing is waiting: every accepted message was delivered.",
        "queued_message": "Message",
        "attempts": "Attempts",
        "reason": "Reason",
        "retry": "Retry now",
        "delete": "Delete",
        "delivery_log": "Delivery log",
        "time": "Time",
        "recipients": "Recipients",
        "result": "Result",
        "no_deliveries": "No deliveries yet.",
        "queue_state_queued": "waiting",
        "queue_state_held": "held (mailbox must be reconnected)",
        "queue_state_dead": "failed permanently",
        "redirect_uri_microsoft": (
            "Redirect URI to register in Microsoft Entra: {uri} (platform: {platform})"
        ),
        "redirect_uri_google": (
            "Authorized redirect URI of the Google OAuth client (type Web application): {uri}"
        ),
        "platform_web": "Web",
        "platform_public": "Mobile and desktop applications, with Allow public client flows on",
        "sign_in_unavailable": (
            "The provider's sign-in service is not available right now. Try again in a few "
            "minutes; a consent link stays valid until the mailbox is connected."
        ),
        "sign_in_unavailable_link": (
            "The provider's sign-in service is not available right now. Open this same link "
            "again in a few minutes: it stays valid until the mailbox is connected."
        ),
        "entra_7000218": (
            "Entra treats this app as a Web app, which must prove itself: add its client secret "
            "to microsoft.client_secret (or a certificate to microsoft.client_certificate), or "
            "register {redirect_uri} under Mobile and desktop applications instead and turn on "
            "Allow public client flows."
        ),
        "entra_700025": (
            "Entra treats this app as a public client, which must not send a secret: remove "
            "microsoft.client_secret and microsoft.client_certificate from the config, or "
            "register {redirect_uri} under the Web platform instead."
        ),
        "entra_50011": (
            "Entra does not know this redirect URI: on the app registration's Authentication "
            "page, add {redirect_uri} under {platform}."
        ),
        "entra_65001": (
            "Nobody has consented to the permissions the gateway asks for: sign in again and "
            "accept, or have an administrator grant consent for Mail.Send, Mail.ReadWrite and "
            "offline_access under API permissions."
        ),
        "queue_paused": "paused by the provider until {until}",
    },
    "ja": {
        "title": "メールゲートウェイ",
        "sign_in": "サインイン",
        "sign_out": "サインアウト",
        "password": "管理者パスワード",
        "sign_in_failed": "パスワードが違います。",
        "sign_in_throttled": (
            "このアドレスからの失敗が続いたため、{seconds} 秒後に再度お試しください。"
        ),
        "sign_in_disabled": (
            "サインインできません。設定ファイルに admin.password_hash を設定し"
            "（gateway hash-password）、ゲートウェイを再起動してください。"
        ),
        "forbidden_form": (
            "このフォームは期限切れか、このページから送信されたものではありません。"
            "ページを再読み込みしてやり直してください。"
        ),
        "store_unavailable": (
            "ゲートウェイが現在データベースに接続できません。数分後にもう一度お試しください。"
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
        "connected_as": "{principal} として接続済み",
        "needs_reconsent": "{since} から再同意が必要",
        "app_only": "接続済み（アプリケーション権限）",
        "upstream": "パスワード認証サーバー（同意は不要）",
        "scopes_granted": "許可されたスコープ",
        "scopes_missing": "不足しているスコープ",
        "why": "理由",
        "reading_local": "IMAP/POP3: プロバイダー側は変更しません"
        "（フラグと削除はゲートウェイ内で保持）",
        "reading_mirror_flags": "IMAP のフラグをプロバイダーに反映します",
        "reading_on_delete_archive": "削除したメールはプロバイダーでアーカイブします",
        "reading_on_delete_trash": "削除したメールはプロバイダーのごみ箱に移動します",
        "last_error": "最後のエラー",
        "connect": "接続",
        "reconnect": "再接続",
        "disconnect": "切断",
        "consent_link": "同意用リンクを作成",
        "consent_link_intro": (
            "このリンクを {address} の利用者本人に送ってください。{expires} まで一度だけ使え、"
            "管理者パスワードは不要です:"
        ),
        "consent_link_invalid": (
            "このリンクは使用済みか期限切れです。管理者に新しいリンクを依頼してください。"
        ),
        "consent_done": "{address} を接続しました。このページは閉じてかまいません。",
        "consent_failed": "メールボックスを接続できませんでした: {reason}",
        "back": "アカウント一覧に戻る",
        "google_client": "Google OAuth 情報の入力",
        "google_client_intro": (
            "Google Cloud コンソールで OAuth クライアント（種類: ウェブ アプリケーション、"
            "承認済みのリダイレクト URI: {redirect_uri}）を作成し、ここに入力してください。"
            "シークレットは暗号化して保存され、二度と表示されません。"
        ),
        "google_client_from_config": (
            "Google クライアントは設定ファイルで指定されています。設定ファイルを編集してください。"
        ),
        "google_client_saved": "保存しました。Google クライアント ID: {client_id}",
        "google_client_missing": "未設定: Google アカウントはまだ接続できません。",
        "client_id": "クライアントID",
        "client_secret": "クライアントシークレット",
        "save": "保存",
        "close": "閉じる",
        "required": "両方の項目を入力してください。",
        "consent_intro": (
            "メールボックス {address} をメールゲートウェイに接続するよう依頼されています。"
            "次のページで、このメールボックス本人のアカウントでサインインしてください。"
        ),
        "continue": "サインインへ進む",
        "token_valid_until": "アクセストークンの有効期限 {time}",
        "queue": "送信待ちのメール",
        "queue_empty": "待機中のメールはありません。受け付けたメールはすべて配送済みです。",
        "queued_message": "メッセージ",
        "attempts": "試行回数",
        "reason": "理由",
        "retry": "今すぐ再試行",
        "delete": "削除",
        "delivery_log": "配送ログ",
        "time": "日時",
        "recipients": "宛先数",
        "result": "結果",
        "no_deliveries": "配送記録はまだありません。",
        "queue_state_queued": "待機中",
        "queue_state_held": "保留（メールボックスの再接続が必要）",
        "queue_state_dead": "配送不能",
        "redirect_uri_microsoft": (
            "Microsoft Entra に登録するリダイレクト URI: {uri}（プラットフォーム: {platform}）"
        ),
        "redirect_uri_google": (
            "Google OAuth クライアント（種類: ウェブ アプリケーション）の承認済みのリダイレクト "
            "URI: {uri}"
        ),
        "platform_web": "Web",
        "platform_public": (
            "モバイル アプリケーションとデスクトップ アプリケーション（パブリック クライアント "
            "フローを許可する: はい）"
        ),
        "sign_in_unavailable": (
            "プロバイダーのサインイン サービスが現在利用できません。数分後にもう一度お試し"
            "ください。同意用リンクはメールボックスが接続されるまで有効です。"
        ),
        "sign_in_unavailable_link": (
            "プロバイダーのサインイン サービスが現在利用できません。数分後にこの同じリンクを"
            "もう一度開いてください。メールボックスが接続されるまでリンクは有効です。"
        ),
        "entra_7000218": (
            "Entra はこのアプリを Web アプリとして扱っており、資格情報が必要です。クライアント "
            "シークレットを microsoft.client_secret に（または証明書を "
            "microsoft.client_certificate に）設定するか、{redirect_uri} を「モバイル "
            "アプリケーションとデスクトップ アプリケーション」に登録し直して「パブリック "
            "クライアント フローを許可する」をオンにしてください。"
        ),
        "entra_700025": (
            "Entra はこのアプリをパブリック クライアントとして扱っており、シークレットを送っては"
            "いけません。設定ファイルから microsoft.client_secret と "
            "microsoft.client_certificate を削除するか、{redirect_uri} を「Web」プラット"
            "フォームに登録し直してください。"
        ),
        "entra_50011": (
            "Entra にこのリダイレクト URI が登録されていません。アプリの登録の「認証」ページで、"
            "{redirect_uri} を「{platform}」に追加してください。"
        ),
        "entra_65001": (
            "ゲートウェイが求めるアクセス許可にまだ同意がありません。もう一度サインインして"
            "承諾するか、管理者に「API のアクセス許可」で Mail.Send、Mail.ReadWrite、"
            "offline_access への同意を付与してもらってください。"
        ),
        "queue_paused": "プロバイダーの要求により {until} まで一時停止中",
    },
}


def negotiate(accept_language: str | None, chosen: str | None) -> str:
    """The admin's explicit choice wins; otherwise the best Accept-Language match."""
    if chosen in LANGUAGES:
        return chosen
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


# What to change in Entra for each AADSTS error an admin can meet while connecting a mailbox
# ("Microsoft Entra authentication and authorization error codes").
_ENTRA_ADVICE = {
    7000218: "entra_7000218",
    700025: "entra_700025",
    50011: "entra_50011",
    65001: "entra_65001",
}


def entra_advice(
    language: str, error: str | None, redirect_uri: str, web_platform: bool
) -> str | None:
    """One sentence saying what to change in Entra for the AADSTS code in ``error``, or None.

    ``web_platform``: the config holds a client secret or certificate, so the redirect URI
    belongs under Web; otherwise under Mobile and desktop applications.
    """
    match = re.search(r"AADSTS(\d+)", error or "")
    key = _ENTRA_ADVICE.get(int(match.group(1))) if match else None
    if key is None:
        return None
    translate = translator(language)
    platform = translate("platform_web" if web_platform else "platform_public")
    return translate(key, redirect_uri=redirect_uri, platform=platform)
