"""Google OAuth scopes the sandbox knows, and which Gmail methods each opens (``gmail.v1.json``).

An unknown scope is refused at sign-in as Google refuses it, so a typo in the gateway's scope list
fails here rather than in production.
"""

from __future__ import annotations

AUTH = "https://www.googleapis.com/auth/"
MAIL = "https://mail.google.com/"
SEND = AUTH + "gmail.send"
READONLY = AUTH + "gmail.readonly"
MODIFY = AUTH + "gmail.modify"
COMPOSE = AUTH + "gmail.compose"
METADATA = AUTH + "gmail.metadata"
SETTINGS_BASIC = AUTH + "gmail.settings.basic"

GMAIL = frozenset(
    {
        MAIL,
        SEND,
        READONLY,
        MODIFY,
        COMPOSE,
        METADATA,
        SETTINGS_BASIC,
        AUTH + "gmail.labels",
        AUTH + "gmail.insert",
        AUTH + "gmail.settings.sharing",
        AUTH + "gmail.addons.current.action.compose",
        AUTH + "gmail.addons.current.message.action",
        AUTH + "gmail.addons.current.message.metadata",
        AUTH + "gmail.addons.current.message.readonly",
    }
)
EMAIL = frozenset({"email", AUTH + "userinfo.email"})
PROFILE = frozenset({"profile", AUTH + "userinfo.profile"})
KNOWN = GMAIL | EMAIL | PROFILE | {"openid"}

# Which scopes allow each Gmail method (any one of them is enough).
_READ = frozenset({MAIL, MODIFY, READONLY, METADATA})
METHOD_SCOPES: dict[str, frozenset[str]] = {
    "getProfile": _READ | {COMPOSE},
    "messages.list": _READ,
    "messages.get": _READ
    | {
        AUTH + "gmail.addons.current.message.action",
        AUTH + "gmail.addons.current.message.metadata",
        AUTH + "gmail.addons.current.message.readonly",
    },
    "messages.send": frozenset(
        {MAIL, MODIFY, COMPOSE, SEND, AUTH + "gmail.addons.current.action.compose"}
    ),
    "messages.modify": frozenset({MAIL, MODIFY}),
    "messages.trash": frozenset({MAIL, MODIFY}),
    "messages.untrash": frozenset({MAIL, MODIFY}),
    "messages.delete": frozenset({MAIL}),
    "history.list": _READ,
    "settings.sendAs.list": frozenset({MAIL, MODIFY, READONLY, SETTINGS_BASIC}),
}


def metadata_only(granted: frozenset[str]) -> bool:
    """Google applies gmail.metadata's limits whenever that scope is in the token, even beside
    broader ones (google-api-python-client#582)."""
    return METADATA in granted
