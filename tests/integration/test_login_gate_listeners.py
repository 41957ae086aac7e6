"""The one login gate through a running gateway: smtplib, imaplib, poplib, raw sockets and httpx
against its real listeners, every client on loopback (as every local legacy program is).

Neither mailbox is connected here, so a right IMAP/POP3 password is answered "must be connected
again" ([UNAVAILABLE] / [SYS/TEMP]): that answer proves the password passed the gate, while a
throttled login is told "Too many failed logins". The tarpit's sleeps are recorded instead of
waited (``gate.sleep``): its growth is unit-tested on a fake clock.
"""

from __future__ import annotations

import asyncio
import base64
import imaplib
import logging
import poplib
import re
import smtplib
import socket
from collections.abc import Awaitable, Callable

import httpx
import pytest

from gateway.app import Gateway
from gateway.login_gate import ADMIN, MAILBOX
from tests.helpers import PASSWORD

HOST = "127.0.0.1"
OTHER_HOST = "127.0.0.2"  # another client address (all of 127/8 is loopback on Linux)
THROTTLED = "Too many failed logins for this username from your address; try again in 5 minute(s)"
CONNECT_AGAIN = "must be connected again"


@pytest.fixture
def tarpit(gateway: Gateway) -> list[float]:
    """The tarpit's delays, recorded and not waited."""
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    gateway.login_gate.sleep = record
    return slept


class _FromAddress:
    """Connect from ``source`` instead of the default address (imaplib/poplib have no option)."""

    source = HOST

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


class _Imap(_FromAddress, imaplib.IMAP4):
    pass


class _Pop3(_FromAddress, poplib.POP3):
    pass


def smtp_login(gateway: Gateway, user: str, password: str, source: str = HOST) -> str:
    with smtplib.SMTP(HOST, gateway.ports["smtp"], timeout=30, source_address=(source, 0)) as c:
        c.ehlo()
        c.user, c.password = user, password
        try:  # one AUTH PLAIN (smtplib's login() would try LOGIN too after a failure)
            code, text = c.auth("PLAIN", c.auth_plain)
        except smtplib.SMTPAuthenticationError as error:
            code, text = error.smtp_code, error.smtp_error
        return f"{code} {text.decode()}"


def imap_login(gateway: Gateway, user: str, password: str, source: str = HOST) -> str:
    client = type("Imap", (_Imap,), {"source": source})(HOST, gateway.ports["imap"], timeout=30)
    try:
        client.login(user, password)
        return "OK"
    except imaplib.IMAP4.error as error:
        return str(error)
    finally:
        client.shutdown()


def pop3_login(gateway: Gateway, user: str, password: str, source: str = HOST) -> str:
    client = type("Pop3", (_Pop3,), {"source": source})(HOST, gateway.ports["pop3"], timeout=30)
    try:
        client.user(user)
        return client.pass_(password).decode()
    except poplib.error_proto as error:
        return error.args[0].decode()
    finally:
        client.quit()


def _refused_wrong(answers: list[str]) -> bool:
    return all(
        a.startswith("535 ") or "[AUTHENTICATIONFAILED]" in a or "[AUTH]" in a for a in answers
    )


async def test_a_stale_password_retrying_50_times_stops_no_other_account(
    gateway: Gateway, tarpit: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.login_gate")
    stale = [await asyncio.to_thread(smtp_login, gateway, "crm", "old password") for _ in range(50)]
    assert stale[:10] == ["535 5.7.8 Authentication credentials invalid"] * 10
    assert set(stale[10:]) == {f"454 4.7.0 {THROTTLED}"}
    # The other account's programs on the same address go on, over every protocol, at once.
    assert await asyncio.to_thread(smtp_login, gateway, "scanner", PASSWORD) == (
        "235 2.7.0 Authentication successful"
    )
    assert CONNECT_AGAIN in await asyncio.to_thread(imap_login, gateway, "scanner", PASSWORD)
    assert CONNECT_AGAIN in await asyncio.to_thread(pop3_login, gateway, "scanner", PASSWORD)
    # crm itself is slowed (tarpit), never locked, from another address.
    assert CONNECT_AGAIN in await asyncio.to_thread(
        imap_login, gateway, "crm", PASSWORD, OTHER_HOST
    )
    assert tarpit and max(tarpit) == 15
    # One line for the whole incident, with client, user and count; one per checked failure.
    lines = [(r.getMessage(), r.fields) for r in caplog.records]  # type: ignore[attr-defined]
    throttled = [fields for event, fields in lines if event == "login.throttled"]
    assert throttled == [
        {
            "protocol": "smtp",
            "client": HOST,
            "user": "crm",
            "failures": 10,
            "limit": 10,
            "retry_after": pytest.approx(300, abs=5),
        }
    ]
    assert [event for event, _ in lines].count("login.failed") == 10


async def test_a_username_that_is_an_address_locks_out_no_local_program(
    gateway: Gateway, tarpit: list[float]
) -> None:
    for _ in range(12):
        await asyncio.to_thread(imap_login, gateway, HOST, "guess", OTHER_HOST)
    assert THROTTLED in await asyncio.to_thread(imap_login, gateway, HOST, "guess", OTHER_HOST)
    for user in ("crm", "scanner"):
        assert CONNECT_AGAIN in await asyncio.to_thread(imap_login, gateway, user, PASSWORD)
        assert CONNECT_AGAIN in await asyncio.to_thread(pop3_login, gateway, user, PASSWORD)
        assert (await asyncio.to_thread(smtp_login, gateway, user, PASSWORD)).startswith("235 ")


async def test_smtp_imap_and_pop3_failures_count_in_one_budget(
    gateway: Gateway, tarpit: list[float]
) -> None:
    logins: list[Callable[[Gateway, str, str], str]] = [smtp_login, imap_login, pop3_login]
    wrong = [
        await asyncio.to_thread(logins[n % 3], gateway, "crm", f"guess {n}")
        for n in range(MAILBOX.pair_limit)
    ]
    assert _refused_wrong(wrong), wrong
    # The budget is spent: each protocol says so with its code for a temporary refusal.
    assert await asyncio.to_thread(smtp_login, gateway, "crm", PASSWORD) == f"454 4.7.0 {THROTTLED}"
    imap = await asyncio.to_thread(imap_login, gateway, "crm", PASSWORD)
    assert f"[UNAVAILABLE] {THROTTLED}" in imap
    assert await asyncio.to_thread(pop3_login, gateway, "crm", PASSWORD) == (
        f"-ERR [SYS/TEMP] {THROTTLED}"
    )


async def _raw_login(port: int, dialogue: list[bytes]) -> str:
    """Send each line after the server's answer to the previous one; the last answer, as text."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        answer = await asyncio.wait_for(reader.readline(), 60)
        for line in dialogue:
            writer.write(line + b"\r\n")
            answer = await asyncio.wait_for(reader.readline(), 60)
            while answer[3:4] == b"-":  # the rest of a multi-line SMTP reply (EHLO)
                answer = await asyncio.wait_for(reader.readline(), 60)
        return answer.decode().strip()
    finally:
        writer.close()


def _smtp_guess(gateway: Gateway, n: int) -> Awaitable[str]:
    token = base64.b64encode(f"\0crm\0guess {n}".encode())
    return _raw_login(gateway.ports["smtp"], [b"EHLO raw.test", b"AUTH PLAIN " + token])


def _imap_guess(gateway: Gateway, n: int) -> Awaitable[str]:
    return _raw_login(gateway.ports["imap"], [b'a LOGIN crm "guess %d"' % n])


def _pop3_guess(gateway: Gateway, n: int) -> Awaitable[str]:
    return _raw_login(gateway.ports["pop3"], [b"USER crm", b"PASS guess %d" % n])


async def test_40_concurrent_wrong_passwords_reach_no_more_checks_than_the_limit(
    gateway: Gateway, tarpit: list[float]
) -> None:
    """16 SMTP, 12 IMAP and 12 POP3 guesses at once (within the per-address connection cap)."""
    gate = gateway.login_gate
    guesses = [_smtp_guess] * 16 + [_imap_guess] * 12 + [_pop3_guess] * 12
    answers = await asyncio.gather(*(guess(gateway, n) for n, guess in enumerate(guesses)))
    assert gate.checks_started == MAILBOX.pair_limit
    wrong = [
        a for a in answers if a.startswith(("535 ", "a NO [AUTHENTICATIONFAILED]", "-ERR [AUTH]"))
    ]
    throttled = [
        a
        for a in answers
        if a
        in (
            f"454 4.7.0 {THROTTLED}",
            f"a NO [UNAVAILABLE] {THROTTLED}",
            f"-ERR [SYS/TEMP] {THROTTLED}",
        )
    ]
    assert (len(wrong), len(throttled)) == (MAILBOX.pair_limit, 40 - MAILBOX.pair_limit), answers
    # At most a few scrypt checks ran at once (each takes 32 MiB at production cost).
    assert 1 <= gate.peak_checks <= gate.concurrent_checks <= 4


async def test_30_concurrent_wrong_admin_passwords_reach_no_more_checks_than_the_limit(
    gateway: Gateway, tarpit: list[float]
) -> None:
    base = f"http://{HOST}:{gateway.ports['admin']}"
    # Ten connections at a time: more than that from one address would meet the cap on
    # connections that have not logged in (listeners.max_unauthenticated_per_address).
    limits = httpx.Limits(max_connections=10)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as browser:
        page = await browser.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        answers = await asyncio.gather(
            *(
                browser.post("/login", data={"csrf_token": token, "password": f"guess {n}"})
                for n in range(30)
            )
        )
    statuses = [answer.status_code for answer in answers]
    assert gateway.login_gate.checks_started == ADMIN.pair_limit
    assert statuses.count(401) == ADMIN.pair_limit and statuses.count(429) == 30 - ADMIN.pair_limit
    throttled = next(answer.text for answer in answers if answer.status_code == 429)
    assert "Too many failed attempts from your address. Try again in 300 seconds." in throttled


async def test_repeat_logins_skip_scrypt(gateway: Gateway) -> None:
    gate = gateway.login_gate
    for _ in range(3):
        assert CONNECT_AGAIN in await asyncio.to_thread(imap_login, gateway, "crm", PASSWORD)
        assert (await asyncio.to_thread(smtp_login, gateway, "crm", PASSWORD)).startswith("235 ")
    assert gate.checks_started == 1  # the first login only; the rest were recognised
    assert "[AUTHENTICATIONFAILED]" in await asyncio.to_thread(
        imap_login, gateway, "crm", PASSWORD + "!"
    )
    assert gate.checks_started == 2  # a wrong password always gets the full check
