"""The forms and texts of POP3 replies (RFC 1939, response codes of RFC 2449/3206)."""

from __future__ import annotations

INTERNAL_ERROR = b"-ERR [SYS/TEMP] Internal error, please retry\r\n"
GREETING = b"mail gateway POP3 ready"  # no <timestamp>: we offer no APOP, clients try it then
READ_FAILED = b"[SYS/TEMP] The mailbox could not be read just now, please retry"
WRONG_PASSWORD = b"[AUTH] Wrong username or password"


def ok(text: bytes = b"") -> bytes:
    return b"+OK " + text + b"\r\n" if text else b"+OK\r\n"


def err(text: bytes) -> bytes:
    return b"-ERR " + text + b"\r\n"


def multiline(first: bytes, body: bytes) -> bytes:
    """A multi-line reply: ``body`` dot-stuffed and terminated (RFC 1939 section 3)."""
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\r\n.", b"\r\n..")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return ok(first) + body + b".\r\n"


REFUSALS = {
    "address": err(b"[SYS/TEMP] Too many connections from your address that have not logged in"),
    "total": err(b"[SYS/TEMP] Too many connections, try later"),
}
"""What the listener answers a connection over the caps (gateway.runtime.listen_twisted)."""
