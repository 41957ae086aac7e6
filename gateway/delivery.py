"""The delivery vocabulary: what the SMTP front, the spool and the providers say to each other.

An accepted message travels as an :class:`Envelope` plus its bytes; a provider answers with a
:class:`DeliveryResult` or raises one of the three failures, classified once by the provider
that saw it, so the spool acts on the class alone:

* :class:`Temporary`: retry later (or pause the whole account when it is throttled);
* :class:`Permanent`: the provider refused the message for good: dead-letter it, or answer the
  SMTP client at DATA when delivery is inline;
* :class:`ReauthRequired`: a person must fix the account's credentials (connect the mailbox
  again, or correct an upstream password): hold its mail until then.

This is the bottom layer of the package: it imports nothing from ``gateway``, so every layer
(smtp_in, spool, mailbox, providers, oauth) may import it without forming a cycle. Callers
above the providers never look at HTTP statuses or SMTP codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope of one accepted message."""

    account: str  # the local username that authenticated (accounts[].username)
    mail_from: str  # MAIL FROM, possibly "" (null reverse-path)
    rcpt_tos: tuple[str, ...]  # RCPT TO, in order, as given
    smtputf8: bool
    received_at: datetime  # UTC
    client: str  # the peer's address, for logs and the Received header


@dataclass(frozen=True)
class DeliveryResult:
    """What the provider said when it took the message (for the delivery log)."""

    detail: str  # e.g. "graph sendMail 202", "gmail id 18c...", "upstream 250 2.0.0 Ok: ..."


class DeliveryError(Exception):
    """Base of the provider layer's failures; ``str()`` is a sentence for the admin."""


class Temporary(DeliveryError):
    """Try again later; ``retry_after`` is the provider's wish in seconds (may be fractional).

    ``throttled``: the provider limits the whole mailbox (429, 503, Google's quota 403), so every
    request for it would fail alike: the spool pauses the account, not just this message.
    ``outcome_unknown``: the request went out but no answer came back (a timeout or a reset
    after sending), so the provider may have acted on it: before a message is sent again, the
    spool looks for it in sent mail. Any answer, and a connection that never opened, is a known
    outcome: nothing was done.
    """

    def __init__(
        self,
        reason: str,
        retry_after: float | None = None,
        *,
        throttled: bool = False,
        outcome_unknown: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.throttled = throttled
        self.outcome_unknown = outcome_unknown


class Permanent(DeliveryError):
    """The provider refused the message for good; retrying the same bytes cannot help.

    ``smtp_code``/``status`` are what an SMTP client should see when the refusal is reported
    inline (at DATA), e.g. 554 5.7.1 for a forbidden From, or the upstream server's own reply.
    """

    def __init__(self, reason: str, smtp_code: int = 554, status: str = "5.0.0") -> None:
        super().__init__(reason)
        self.reason = reason
        self.smtp_code = smtp_code
        self.status = status


class ReauthRequired(DeliveryError):
    """The account's owner or admin must act: connect the mailbox (again), grant a missing
    permission, or fix a stored upstream password; until then its mail is held.

    The OAuth layer raises its subclass :class:`gateway.oauth.ReauthRequired`, which is also an
    ``OAuthError`` for the admin page and the CLI; the providers raise this class for what they
    see themselves (a 403 for a missing scope, an upstream server refusing the password).
    """
