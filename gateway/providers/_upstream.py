"""What the upstream IMAP and POP3 INBOX sources share (``imap_inbox``, ``pop3_inbox``).

Both run the standard library clients (imaplib, poplib) in worker threads, because they block,
with the same TLS trust as the upstream SMTP sender and the same sentences for the admin.
Failures are classified like every provider call (``_errors``): the network, timeouts and a
server going away are :class:`Temporary`; refused credentials, an untrusted certificate or a
server refusing a command are :class:`Permanent`.
"""

from __future__ import annotations

import abc
import asyncio
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar

from ..config import UpstreamServer
from ..delivery import DeliveryError, Permanent, Temporary
from ..outbound import upstream_context

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0


def tls_context(server: UpstreamServer, system_ca_file: Path) -> ssl.SSLContext:
    """The same trust as the upstream SMTP sender: system CAs plus the server's ``ca_file``;
    hostnames are verified (``create_default_context``)."""
    return upstream_context(server, system_ca_file)


def credentials(server: UpstreamServer, protocol: str) -> tuple[str, str]:
    if not server.username or server.password is None:
        raise Permanent(
            f"upstream.{protocol} of this account has no username/password configured; "
            "add them to the config"
        )
    return server.username, server.password.value


def wrong_password(protocol: str, server: UpstreamServer, detail: str) -> Permanent:
    return Permanent(
        f"upstream {protocol.upper()} server {server.host} refused the login of "
        f"{server.username} ({detail}): the upstream.{protocol} password (or username) in the "
        "config is wrong; fix it, then `gateway reload` (SIGHUP) applies it"
    )


def untrusted(
    protocol: str, server: UpstreamServer, error: ssl.SSLCertVerificationError
) -> Permanent:
    return Permanent(
        f"upstream {protocol.upper()} server {server.host}: its TLS certificate is not trusted "
        f"({error.verify_message}); set upstream.{protocol}.ca_file to the PEM file of its CA, "
        "or use the host name its certificate names"
    )


def reason(error: BaseException) -> str:
    """The server's own text of an imaplib/poplib error (they carry it as bytes)."""
    arg = error.args[0] if error.args else error
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


class ThreadedClient(abc.ABC):
    """The part both upstream sources share: a configured server and its blocking client.

    Work is serialised twice: an asyncio lock keeps waiting operations (the IMAP frontend
    fetches several bodies at once) from each holding a worker thread, and a
    ``threading.Lock`` held by the worker keeps a cancelled task's still-running thread alone
    on its connection. Subclasses implement ``_run(op, *args)``, which runs in the thread, and
    name their ``protocol`` ("imap", "pop3"), the response codes their server uses for a
    passing refusal (``temporary_codes``) and the client errors that mean the connection broke
    (``broken``) for the one classification of their failures, :meth:`_failure`.
    """

    protocol: ClassVar[str]
    temporary_codes: ClassVar[tuple[str, ...]]
    broken: ClassVar[tuple[type[BaseException], ...]] = (OSError,)

    def __init__(
        self, server: UpstreamServer, system_ca_file: Path, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.server = server
        self.system_ca_file = system_ca_file
        self.timeout = timeout
        self._queue = asyncio.Lock()
        self._lock = threading.Lock()

    async def _call(self, op: Callable[..., T], *args: object) -> T:
        async with self._queue:
            return await asyncio.to_thread(self._run, op, *args)

    @abc.abstractmethod
    def _run(self, op: Callable[..., T], *args: object) -> T:
        """Run ``op(client, *args)`` on a logged-in client, in the worker thread."""

    def _failure(self, error: BaseException) -> DeliveryError:
        """An untrusted certificate or a refusal without a temporary code is Permanent; a
        broken connection or a refusal with one is Temporary."""
        if isinstance(error, ssl.SSLCertVerificationError):
            return untrusted(self.protocol, self.server, error)
        where = f"upstream {self.protocol.upper()} {self.server.host}"
        if isinstance(error, self.broken):
            return Temporary(f"{where}: {type(error).__name__}: {error}")
        text = reason(error)
        if self._temporary(text):
            return Temporary(f"{where}: {text}")
        return Permanent(f"{where}: {text}")

    def _login_refused(self, error: BaseException) -> DeliveryError:
        """A refused login: a wrong password unless the server says it is passing."""
        text = reason(error)
        if self._temporary(text):
            return Temporary(f"upstream {self.protocol.upper()} {self.server.host}: login: {text}")
        return wrong_password(self.protocol, self.server, text)

    def _temporary(self, text: str) -> bool:
        return any(code in text for code in self.temporary_codes)
