"""The few HTML pages a person sees at the fake Microsoft sign-in: consent, device login, errors.

Plain forms that work without JavaScript (the demo may be driven from a text browser). Pages
refuse to be framed, so another site cannot overlay them to trick a click on "Accept".
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape

from aiohttp import web

from .._directory import User

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",  # no-referrer makes Chromium post "Origin: null"
}

_STYLE = (
    "body{font-family:sans-serif;max-width:32em;margin:3em auto;padding:0 1em;color:#222}"
    "h1{font-size:1.3em}label{display:block;margin:.4em 0}button{margin:.8em .5em 0 0;"
    "padding:.4em 1.2em}code{font-size:1.1em}"
)


def _page(title: str, body: str, status: int = 200) -> web.Response:
    html = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}"
        f"</title><style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>{body}"
        "</body></html>"
    )
    return web.Response(
        text=html, status=status, content_type="text/html", headers=SECURITY_HEADERS
    )


def _user_choices(users: list[User], selected: str | None) -> str:
    """Radio buttons, the login_hint's account (else the first) chosen."""
    wanted = (selected or "").casefold()
    chosen = next((u for u in users if u.address.casefold() == wanted), users[0] if users else None)
    return "".join(
        f"<label><input type='radio' name='user' value='{escape(user.address)}'"
        f"{' checked' if user is chosen else ''}> {escape(user.display_name)} "
        f"&lt;{escape(user.address)}&gt;</label>"
        for user in users
    )


def consent(
    action: str, key: str, app_name: str, scopes: Iterable[str], users: list[User], hint: str | None
) -> web.Response:
    """Pick an account and accept or deny the permissions an app asks for."""
    wanted = "".join(f"<li><code>{escape(scope)}</code></li>" for scope in scopes)
    body = (
        f"<p><b>{escape(app_name)}</b> wants to:</p><ul>{wanted}</ul>"
        f"<form method='post' action='{escape(action)}'>"
        f"<input type='hidden' name='sandbox_request' value='{escape(key)}'>"
        f"<fieldset><legend>Sign in as</legend>{_user_choices(users, hint)}</fieldset>"
        "<button name='decision' value='accept'>Accept</button>"
        "<button name='decision' value='deny'>Deny</button></form>"
    )
    return _page("Permissions requested (Microsoft sandbox)", body)


def device_login(token: str, users: list[User], note: str = "") -> web.Response:
    """Enter the code a device shows, choose the account, approve or decline."""
    body = (
        (f"<p><b>{escape(note)}</b></p>" if note else "")
        + "<form method='post' action='/devicelogin'>"
        f"<input type='hidden' name='sandbox_form' value='{escape(token)}'>"
        "<label>Code <input name='user_code' autocomplete='off' autofocus required></label>"
        f"<fieldset><legend>Sign in as</legend>{_user_choices(users, None)}</fieldset>"
        "<button name='decision' value='accept'>Continue</button>"
        "<button name='decision' value='deny'>Decline</button></form>"
    )
    return _page("Enter code (Microsoft sandbox)", body)


def message(title: str, text: str, status: int = 200) -> web.Response:
    return _page(title, f"<p>{escape(text)}</p>", status)


def form_post(redirect_uri: str, fields: dict[str, str]) -> web.Response:
    """``response_mode=form_post``: the browser POSTs the result to the redirect URI."""
    inputs = "".join(
        f"<input type='hidden' name='{escape(name)}' value='{escape(value)}'>"
        for name, value in fields.items()
    )
    html = (
        "<!doctype html><html><head><title>Working...</title></head>"
        "<body onload='document.forms[0].submit()'>"
        f"<form method='post' action='{escape(redirect_uri)}'>{inputs}"
        "<noscript><button>Continue</button></noscript></form></body></html>"
    )
    headers = {**SECURITY_HEADERS, "Content-Security-Policy": "default-src 'none'; "
               "script-src 'unsafe-inline'; frame-ancestors 'none'"}  # fmt: skip
    return web.Response(text=html, content_type="text/html", headers=headers)
