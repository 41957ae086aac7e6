"""Upstream SMTP sender for ``upstream`` accounts: the original envelope, the stored password.

smtplib runs in a worker thread (it blocks); each delivery is one connection, which is what a
submission server expects from an occasional client. The upstream server's own reply is passed
on: 4xx → Temporary, 5xx → Permanent with its code and text, refused credentials → the mail is
held (the admin must fix the stored password) rather than bounced.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import ssl
from pathlib import Path

from ..config import AccountSettings, UpstreamServer
from ..outbound import upstream_context
from ..spool._types import Envelope
from ._base import DeliveryResult
from ._errors import Permanent, ReauthRequired, Temporary

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s")


def _reply(code: int, text: bytes | str) -> tuple[str, str]:
    """(enhanced status, text) of an upstream reply, for our own reply and the dead letter."""
    message = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    message = " ".join(message.split())
    found = _ENHANCED.match(message)
    status = found.group(1) if found else f"{str(code)[0]}.0.0"
    return status, message


def _failure(code: int, text: bytes | str, host: str) -> Exception:
    status, message = _reply(code, text)
    reason = f"upstream {host} answered {code} {message}"
    if 400 <= code < 500:
        return Temporary(reason)
    return Permanent(reason, code, status)


class UpstreamSender:
    def __init__(self, system_ca_file: Path, timeout: float = 60.0) -> None:
        self.system_ca_file = system_ca_file
        self.timeout = timeout

    async def send(
        self, account: AccountSettings, envelope: Envelope, message: bytes
    ) -> DeliveryResult:
        server = account.upstream.smtp if account.upstream else None
        if server is None:
            raise Permanent(f"account {account.username} has no upstream.smtp server configured")
        return await asyncio.to_thread(self._send, server, envelope, message)

    async def already_sent(self, account: AccountSettings, message_id: str) -> bool | None:
        return None  # SMTP has no "sent mail" to look in

    def _context(self, server: UpstreamServer) -> ssl.SSLContext:
        return upstream_context(server, self.system_ca_file)

    def _connect(self, server: UpstreamServer) -> smtplib.SMTP:
        port = server.port_for("smtp")
        if server.security == "tls":
            return smtplib.SMTP_SSL(
                server.host, port, timeout=self.timeout, context=self._context(server)
            )
        client = smtplib.SMTP(server.host, port, timeout=self.timeout)
        if server.security == "starttls":
            client.starttls(context=self._context(server))
        return client

    def _send(self, server: UpstreamServer, envelope: Envelope, message: bytes) -> DeliveryResult:
        host = server.host
        try:
            with self._connect(server) as client:
                client.ehlo()
                if server.username and server.password is not None:
                    client.login(server.username, server.password.value)
                options = ["SMTPUTF8"] if envelope.smtputf8 else []
                if client.has_extn("8bitmime") and not message.isascii():
                    options.append("BODY=8BITMIME")
                refused = client.sendmail(
                    envelope.mail_from, list(envelope.rcpt_tos), message, mail_options=options
                )
        except smtplib.SMTPAuthenticationError as error:
            _, text = _reply(error.smtp_code, error.smtp_error)
            raise ReauthRequired(
                f"upstream {host} refused the stored credentials ({error.smtp_code} {text}); "
                "fix upstream.smtp username/password"
            ) from error
        except smtplib.SMTPRecipientsRefused as error:
            replies = list(error.recipients.values())
            code, text = next(((c, t) for c, t in replies if 400 <= c < 500), replies[0])
            raise _failure(code, text, host) from error
        except smtplib.SMTPResponseException as error:
            raise _failure(error.smtp_code, error.smtp_error, host) from error
        except smtplib.SMTPNotSupportedError as error:
            raise Permanent(f"upstream {host}: {error}", 553, "5.6.7") from error
        except (OSError, smtplib.SMTPException) as error:
            raise Temporary(f"upstream {host}: {type(error).__name__}: {error}") from error
        detail = f"upstream {host} accepted {len(envelope.rcpt_tos) - len(refused)} recipient(s)"
        if refused:
            detail += "; refused: " + ", ".join(
                f"{rcpt} ({code} {_reply(code, text)[1]})" for rcpt, (code, text) in refused.items()
            )
        return DeliveryResult(detail)
