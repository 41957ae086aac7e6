"""Durable outbound queue: smtp_in submits, a worker delivers through the providers.

Public API: :class:`FileSpool` (``submit``, ``start``/``stop``, ``release``, ``retry``,
``delete``, ``messages``, ``recent_deliveries``), the interface types of ``_types`` and
:func:`queue_main` for ``gateway queue``.
"""

from ._files import Record
from ._incoming import HEAD_LIMIT, IncomingMessage
from ._queue import queue_main
from ._spool import FileSpool
from ._types import Spool, SpoolError, SubmitResult

__all__ = [
    "HEAD_LIMIT",
    "FileSpool",
    "IncomingMessage",
    "Record",
    "Spool",
    "SpoolError",
    "SubmitResult",
    "queue_main",
]
