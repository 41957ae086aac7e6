"""SMTP replies: ours, and aiosmtpd's built-in ones given enhanced status codes and clear words.

We advertise ENHANCEDSTATUSCODES (RFC 2034), which promises a code such as ``5.5.1`` in every
2xx/4xx/5xx reply except the greeting and the EHLO/HELO answer. aiosmtpd writes many replies
itself without one ("503 Error: need RCPT command"), so every reply passes through
:func:`standardize` on its way out.
"""

from __future__ import annotations

import re

from ..admission import EVICTED_SENTENCE, timeout_sentence
from ..login_gate import Refused

AUTH_REQUIRED = "530 5.7.0 Authentication required: log in with AUTH before MAIL FROM"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required: use STARTTLS (or the SMTPS port) before AUTH"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try later"
TOO_MANY_FROM_ADDRESS = (
    "421 4.7.0 Too many connections from your address that have not logged in, try later"
)
EVICTED = f"421 4.7.0 {EVICTED_SENTENCE}"
TLS_ALREADY_ACTIVE = "503 5.5.1 TLS is already active on this connection"
INTERNAL_ERROR = "451 4.3.0 Internal error, please retry"
SPOOL_UNAVAILABLE = "451 4.3.0 The gateway cannot queue the message right now, please retry later"
NULL_SENDER = (
    "550 5.7.1 The null sender <> is not allowed for submission; use the account's address"
)
VRFY_NOTHING = "252 2.5.0 Cannot verify addresses; send the message and delivery will be attempted"
EXPN_NOTHING = "502 5.5.1 EXPN is not available"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
UTF8_NEEDS_SMTPUTF8 = "553 5.6.7 A non-ASCII address needs the SMTPUTF8 parameter on MAIL FROM"


def preauth_timeout(seconds: float) -> str:
    """The goodbye to a client that did not log in within ``listeners.preauth_timeout_seconds``."""
    return f"421 4.4.2 {timeout_sentence(seconds)}, closing"


def too_many_recipients(limit: int) -> str:
    return f"452 4.5.3 Too many recipients: at most {limit} per message; send the rest separately"


def login_throttled(refusal: Refused) -> str:
    """454 4.7.0: "temporary authentication failure" (RFC 4954), so the client retries later."""
    return f"454 4.7.0 {refusal.sentence()}"


def sender_refused(username: str, address: str, allowed: tuple[str, ...]) -> str:
    return (
        f"550 5.7.1 Account {username} may not send as <{address}>; allowed: {', '.join(allowed)}"
    )


def read_only_account(username: str) -> str:
    """MAIL FROM of an account the gateway has no way to send for (an upstream account without
    upstream.smtp). 5.7.1, "delivery not authorized" (RFC 3463), because this login may not
    submit mail at all, like our other refusals of what an account may send; not 5.3.3, "system
    not capable of selected features", which is about features of a message the next system
    cannot carry. Permanent (5xx): retrying cannot help until the configuration changes."""
    return (
        f"550 5.7.1 Account {username} can only read mail: it has no upstream.smtp server in "
        "the gateway's configuration, so there is nowhere to send its mail"
    )


def header_refused(header: str, address: str, allowed: tuple[str, ...]) -> str:
    return (
        f"550 5.7.1 The {header} header <{address}> is not an address this account may use; "
        f"allowed: {', '.join(allowed)}"
    )


def header_unreadable(header: str) -> str:
    return f"550 5.7.1 The {header} header cannot be read; give one plain email address"


def too_big(limit_bytes: int | None) -> str:
    return f"552 5.3.4 Message too big: the limit is {(limit_bytes or 0) // 2**20} MB"


def header_block_too_large(limit_bytes: int) -> str:
    return (
        f"552 5.3.4 The header block is over {limit_bytes // 2**20} MB; a message needs a "
        "blank line between its headers and its body"
    )


LINE_TOO_LONG = (
    "500 5.5.2 Line too long: a message line may have at most 998 characters (RFC 5321); "
    "wrap long lines or use quoted-printable or base64"
)

# aiosmtpd's own texts, by prefix, and what the client sees instead.
_REWRITES: tuple[tuple[str, str], ...] = (
    ("500 Line too long", LINE_TOO_LONG),
    ("500 Command line too long", "500 5.5.2 Command line too long"),
    ('500 Error: command "', "500 5.5.1 Command not recognized"),
    ("500 Error: bad syntax", "500 5.5.2 Syntax error"),
)
# aiosmtpd's 2xx replies that lack an enhanced code (greeting and EHLO lines are not listed).
_PLAIN_2XX = ("220 Ready to start TLS", "221 Bye", "250 Syntax:", "250 Supported commands:")
_DEFAULT_DETAIL = {
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.7.0",
    "555": "5.5.4",
    "454": "4.7.0",
}
_HAS_DETAIL = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")


def standardize(reply: str, size_limit: int | None) -> str:
    """Give a reply its enhanced status code; replace aiosmtpd's terse texts with sentences."""
    if reply.startswith("552 Error:"):
        return too_big(size_limit)
    for prefix, replacement in _REWRITES:
        if reply.startswith(prefix):
            return replacement
    if reply == "250 OK" or reply.startswith(_PLAIN_2XX):
        return f"{reply[:3]} 2.0.0 {reply[4:]}"
    if reply[:1] not in ("4", "5") or _HAS_DETAIL.match(reply):
        return reply
    code = reply[:3]
    return f"{code} {_DEFAULT_DETAIL.get(code, reply[0] + '.0.0')} {reply[4:]}"
