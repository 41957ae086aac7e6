"""How a delivery attempt failed, classified once, here, for every provider.

The spool acts on the class alone: retry a :class:`Temporary` later, dead-letter a
:class:`Permanent`, hold the mail of an account that raised :class:`ReauthRequired` until it is
reconnected. Callers above the providers never look at HTTP statuses or SMTP codes.
"""

from __future__ import annotations

from ..oauth import ReauthRequired


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


__all__ = ["DeliveryError", "Permanent", "ReauthRequired", "Temporary"]
