"""Durable outbound queue: smtp_in submits, a worker delivers through the providers.

Public API: :class:`SpoolWorker` (``submit``, ``start``/``stop``, ``release``, ``retry``,
``delete``, ``messages``, ``recent_deliveries``) over a :class:`SpoolStore`: files
(:class:`FileSpool`, one instance) or the shared database (:class:`DatabaseSpool`); the
interface types of ``_types``, :func:`queue_main` for ``gateway queue`` and :func:`options`
(the worker's settings from the config, at start and on reload).
"""

from ._database import DatabaseSpool, DatabaseStore
from ._files import Record
from ._incoming import HEAD_LIMIT, IncomingMessage
from ._queue import queue_main
from ._spool import FileSpool, SpoolWorker, options
from ._store import FileStore, SpoolStore
from ._types import Spool, SpoolError, SubmitResult

__all__ = [
    "HEAD_LIMIT",
    "DatabaseSpool",
    "DatabaseStore",
    "FileSpool",
    "FileStore",
    "IncomingMessage",
    "Record",
    "Spool",
    "SpoolError",
    "SpoolStore",
    "SpoolWorker",
    "SubmitResult",
    "options",
    "queue_main",
]
