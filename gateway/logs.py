"""Structured logs: one line per event, and never a secret in them.

Every log call names an *event* and passes fields (``log.info("listener.started", port=2525)``).
Lines are logfmt (``key=value``) for people reading a journal, or JSON for log shippers. Secrets
are kept out by construction (passwords and tokens are never passed as fields), and as a second
line of defence every secret value the process loads is registered here and masked in any line
that would otherwise contain it. Libraries log credentials we never saw: MSAL's debug log prints
each token request, the authorization code and the PKCE ``code_verifier`` included, as JSON. So
the values of OAuth credential parameters are masked by name too, in form bodies and URLs
(``code=...``), JSON and Python reprs (``"code": "..."``), and ``Bearer`` headers, from any
logger.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
_MASK = "[redacted]"
_MIN_SECRET_LENGTH = 6

_secrets: set[str] = set()
_secrets_longest_first: tuple[str, ...] = ()  # what ``redact`` replaces, in this order
_secrets_lock = threading.Lock()

# OAuth parameters whose values are credentials (RFC 6749, RFC 7636 PKCE, RFC 7523 assertions,
# RFC 8628 device codes). Values shorter than _MIN_SECRET_LENGTH are left alone (``code=250``).
_CREDENTIAL_NAMES = (
    "code",
    "code_verifier",
    "client_secret",
    "client_assertion",
    "assertion",
    "refresh_token",
    "access_token",
    "id_token",
    "device_code",
    "password",
)
_NAMES = "|".join(sorted(_CREDENTIAL_NAMES, key=len, reverse=True))
_VALUE = rf"[^\s\"'\\&,;]{{{_MIN_SECRET_LENGTH},}}"
# Each pattern's group 1 is what stays; the value after it is masked.
_PATTERNS = (
    # name=value in a form body, a query string or a logfmt field; not user_code=, error_code=
    re.compile(rf"(?<![\w.-])((?:{_NAMES})=){_VALUE}"),
    # "name": "value" in JSON or a Python repr, also inside a quoted (backslashed) JSON string
    re.compile(rf"""((?P<quote>\\*["'])(?:{_NAMES})(?P=quote)\s*:\s*\\*["']){_VALUE}"""),
    # Authorization: Bearer <token>
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/-]{16,}=*"),
)
# Every pattern above needs one of these words: a line without any (most lines, such as each
# message's spool.queued) is spared the three substitutions, which were most of a line's cost.
_PATTERN_WORDS = re.compile(rf"(?:{_NAMES})|(?i:bearer)")


def register_secret(value: str | bytes | None) -> None:
    """Mask this value wherever it would appear in a log line.

    Very short values are not registered: masking every "abc" in the log would hide more than it
    protects, and such values are not secrets worth the name.
    """
    if value is None:
        return
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if len(text) >= _MIN_SECRET_LENGTH:
        global _secrets_longest_first
        with _secrets_lock:
            _secrets.add(text)
            _secrets_longest_first = tuple(sorted(_secrets, key=len, reverse=True))


def redact(text: str) -> str:
    """Replace every registered secret, and every credential parameter's value, in ``text``."""
    for secret in _secrets_longest_first:
        if secret in text:
            text = text.replace(secret, _MASK)
    if _PATTERN_WORDS.search(text):
        for pattern in _PATTERNS:
            text = pattern.sub(rf"\1{_MASK}", text)
    return text


class EventLogger:
    """A logger whose calls are events with fields, not free-form messages."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Log an error with the current exception's type and message (no traceback to clients)."""
        self._logger.error(event, exc_info=True, extra={"fields": fields}, stacklevel=2)

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, stacklevel=3)


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


class _EventFormatter(logging.Formatter):
    def __init__(self, fmt: LogFormat) -> None:
        super().__init__()
        self._fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            fields["error"] = f"{type(error).__name__}: {error}"
            fields["traceback"] = self.formatException(record.exc_info)
        if self._fmt == "json":
            line = json.dumps(fields, ensure_ascii=False, default=str)
        else:
            line = " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields.items())
        return redact(line)


def configure_logging(level: str = "info", fmt: LogFormat = "text", stream: Any = None) -> None:
    """Send every logger (ours and the libraries') through one event formatter on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_EventFormatter(fmt))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet = max(root.level, logging.WARNING)
    # aiosmtpd logs every command at INFO, AUTH lines included; Twisted logs each port opening
    # and closing. Our own events already say what matters.
    logging.getLogger("mail.log").setLevel(quiet)
    logging.getLogger("twisted").setLevel(quiet)
    _route_twisted_logs()


_twisted_routed = False


def _route_twisted_logs() -> None:
    """Twisted logs through its own observer system; forward it into stdlib logging.

    Twisted accepts this once per process (a second call only logs a warning), hence the flag.
    Events Twisted buffered before this call are dropped, not replayed: they were logged while
    no log configuration existed, and replaying them would attribute them to whatever output
    was configured first.
    """
    global _twisted_routed
    if _twisted_routed:
        return
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo(
        [STDLibLogObserver(name="twisted")], discardBuffer=True, redirectStandardIO=False
    )
    _twisted_routed = True
