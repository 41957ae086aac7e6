"""The few HTML pages a person sees at the sandbox's Google sign-in: account chooser + consent,
and the error page Google shows instead of redirecting when the request itself is wrong.

Plain forms, no JavaScript, so they work in any browser and in a scripted test alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from aiohttp import web

from .._directory import User

CONSENT_PATH = "/o/oauth2/consent"

_STYLE = (
    "body{font-family:sans-serif;max-width:34em;margin:3em auto;padding:0 1em}"
    "li{margin:.4em 0}button{margin-right:1em;padding:.4em 1.2em}"
)


def _page(title: str, body: str, status: int = 200) -> web.Response:
    html = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )
    return web.Response(
        text=html,
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"},
    )


def error_page(status: int, error: str, description: str) -> web.Response:
    """Google's "Access blocked: Authorization Error" page, with the same error code."""
    return _page(
        f"Error {status}: {error}",
        "<h1>Access blocked: Authorization Error</h1>"
        f"<p>{escape(description)}</p><p><b>Error {status}: {escape(error)}</b></p>",
        status,
    )


def consent_page(
    request_id: str,
    app_name: str,
    scopes: Sequence[str],
    accounts: Sequence[User],
    selected: str | None,
) -> web.Response:
    """Choose an account and Allow or Deny. ``request_id`` is the one-time, unguessable handle on
    the pending request: a page elsewhere cannot forge the form without it."""
    chosen = selected or accounts[0].address
    choices = "".join(
        f'<li><label><input type=radio name=account value="{escape(user.address)}"'
        f"{' checked' if user.address == chosen else ''}> "
        f"{escape(user.display_name)} &lt;{escape(user.address)}&gt;</label></li>"
        for user in accounts
    )
    wanted = "".join(f"<li><code>{escape(scope)}</code></li>" for scope in scopes)
    return _page(
        "Sign in - Google Accounts (sandbox)",
        f"<h1>{escape(app_name)} wants to access your Google Account</h1>"
        f'<form method=post action="{CONSENT_PATH}">'
        f'<input type=hidden name=request value="{escape(request_id)}">'
        f"<p>Choose an account:</p><ul>{choices}</ul>"
        f"<p>This will allow it to:</p><ul>{wanted}</ul>"
        "<button type=submit name=decision value=allow>Allow</button>"
        "<button type=submit name=decision value=deny>Deny</button>"
        "</form>",
    )
