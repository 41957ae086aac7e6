"""The POP3 listeners (plain with STLS, and implicit TLS) over the account's INBOX view.

The protocol of one connection is :class:`~._protocol.GatewayPOP3` (every command is ours).

Login: ``login(username, password, client)`` checks the password through the login gate (a
wrong one is answered ``-ERR [AUTH]``, a throttled one ``-ERR [SYS/TEMP]`` with a sentence).
Without ``mailbox_for`` the string it returns is a sentence telling the client why it cannot
have the mailbox (``-ERR [SYS/TEMP] …``). With ``mailbox_for`` the string is the account name,
and ``mailbox_for(account)`` returns its :class:`MailboxView` — or a sentence, when the mailbox
cannot be served (e.g. it must be reconnected on the admin page).
The view is synced at PASS and the session works on that snapshot, as POP3 requires.

Cleartext passwords: on the plain port USER is advertised in CAPA only after STLS or to a
loopback client, so well-behaved clients upgrade first; USER/PASS are still accepted without TLS
(a legacy program on the LAN keeps working), which an admin can avoid by using POP3S.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..admission import ConnectionLimits
from ..login_gate import LoginCheck
from ..mailbox import MailboxView
from ..runtime import RunningListener, TwistedListenerFactory
from ._protocol import GatewayPOP3
from ._replies import REFUSALS

MailboxFor = Callable[[str], Awaitable[MailboxView | str]]
"""``mailbox_for(account)``: the account's view, or a sentence saying why it is unavailable."""


class _POP3Factory(TwistedListenerFactory):
    """The listener's settings, read by each :class:`GatewayPOP3` as ``self.factory``."""

    protocol = GatewayPOP3
    kind = "pop3"
    refusals = REFUSALS

    def __init__(
        self,
        tls_context: Any,
        implicit_tls: bool,
        plaintext_auth: str,
        login: LoginCheck,
        mailbox_for: MailboxFor | None,
    ) -> None:
        super().__init__(tls_context, implicit_tls, plaintext_auth)
        self.login = login
        self.mailbox_for = mailbox_for


async def serve(
    name: str,
    host: str,
    port: int,
    tls_context: Any,
    implicit_tls: bool,
    login: LoginCheck,
    mailbox_for: MailboxFor | None = None,
    plaintext_auth: str = "loopback",
    limits: ConnectionLimits | None = None,
) -> RunningListener:
    """Start one POP3 listener; ``implicit_tls`` selects POP3S, otherwise STLS is offered.
    ``plaintext_auth`` (never, loopback, always) says where USER/PASS may come before STLS;
    ``limits`` are the process's connection caps."""
    factory = _POP3Factory(tls_context, implicit_tls, plaintext_auth, login, mailbox_for)
    return await factory.listen(name, host, port, limits)
