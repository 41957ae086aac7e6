"""Smoke test of the upstream test harness itself, with real clients.

If these fail, every integration test built on the ``dovecot``/``postfix`` fixtures is suspect, so
each protocol and TLS mode the harness promises is exercised once here with a client other people
use: Python's imaplib/poplib, curl and swaks.
"""

from __future__ import annotations

import imaplib
import poplib
import ssl
import subprocess
import time
import uuid

from mailgw_sandbox.upstream import Dovecot, MailUser, Postfix


def _message(subject: str, to: str = "someone@example.org") -> bytes:
    return (
        f"From: Sender <sender@example.org>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n\r\nHello from the harness.\r\n"
    ).encode()


def _tls(dovecot: Dovecot) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=dovecot.ca_file)


def test_imap_sees_delivered_message(dovecot: Dovecot, upstream_user: MailUser) -> None:
    dovecot.deliver(upstream_user.name, _message("imap smoke"))

    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10) as imap:
        imap.login(upstream_user.name, upstream_user.password)
        status, data = imap.select("INBOX")
        assert status == "OK" and data == [b"1"]
        _, fetched = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"imap smoke" in fetched[0][1]

    # The plain port also upgrades with STARTTLS; "localhost" checks the certificate's DNS SAN.
    with imaplib.IMAP4("localhost", dovecot.imap_port, timeout=10) as imap:
        imap.starttls(_tls(dovecot))
        imap.login(upstream_user.name, upstream_user.password)
        assert imap.select("INBOX", readonly=True) == ("OK", [b"1"])


def test_pop3_stat_sees_delivered_message(dovecot: Dovecot, upstream_user: MailUser) -> None:
    raw = _message("pop3 smoke")
    dovecot.deliver(upstream_user.name, raw)

    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        pop.user(upstream_user.name)
        pop.pass_(upstream_user.password)
        count, size = pop.stat()
        assert count == 1 and size > 0
    finally:
        pop.quit()

    pops = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=_tls(dovecot), timeout=10)
    try:
        pops.user(upstream_user.name)
        pops.pass_(upstream_user.password)
        lines = pops.retr(1)[1]
        # POP3 serves the stored bytes: deliver() adds no headers.
        assert b"\r\n".join(lines) + b"\r\n" == raw
    finally:
        pops.quit()


def test_curl_lists_message_over_imaps(dovecot: Dovecot, upstream_user: MailUser) -> None:
    dovecot.deliver(upstream_user.name, _message("curl smoke"))
    url = f"imaps://{dovecot.host}:{dovecot.imaps_port}/INBOX"
    common = ["curl", "-sS", "--max-time", "10", "--cacert", str(dovecot.ca_file)]
    creds = ["--user", f"{upstream_user.name}:{upstream_user.password}"]

    search = subprocess.run([*common, *creds, f"{url}?ALL"], capture_output=True, text=True)
    assert search.returncode == 0, search.stderr
    assert search.stdout.split() == ["*", "SEARCH", "1"]

    fetch = subprocess.run([*common, *creds, f"{url};MAILINDEX=1"], capture_output=True, text=True)
    assert fetch.returncode == 0, fetch.stderr
    assert "Subject: curl smoke" in fetch.stdout

    # A wrong password is refused (curl exit 67), and the next good login is not delayed by
    # Dovecot's failed-login penalty (the harness disables it).
    bad = subprocess.run([*common, "--user", f"{upstream_user.name}:wrong", f"{url}?ALL"])
    assert bad.returncode == 67
    started = time.monotonic()
    again = subprocess.run([*common, *creds, f"{url}?ALL"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - started < 1.5


def test_swaks_submits_through_postfix_into_dovecot(
    postfix: Postfix, upstream_user: MailUser
) -> None:
    def swaks(port: int, tls: str, subject: str, *extra: str) -> subprocess.CompletedProcess[str]:
        command = [
            "swaks",
            "--server", postfix.host,
            "--port", str(port),
            tls,
            "--from", "sender@example.org",
            "--to", "anyone@elsewhere.example",
            "--header", f"Subject: {subject}",
            "--timeout", "10",
            *extra,
        ]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    auth = ["--auth", "PLAIN", "--auth-user", upstream_user.name]
    auth += ["--auth-password", upstream_user.password]
    starttls, implicit = f"starttls {uuid.uuid4().hex}", f"implicit {uuid.uuid4().hex}"

    sent = swaks(postfix.submission_port, "--tls", starttls, *auth)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    sent = swaks(postfix.smtps_port, "--tlsc", implicit, *auth)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    # Any recipient domain lands in the catch-all Dovecot INBOX; nothing leaves the machine.
    assert len(postfix.wait_for_delivery("header", "Subject", starttls, timeout=10)) == 1
    assert len(postfix.wait_for_delivery("header", "Subject", implicit, timeout=10)) == 1

    # Without AUTH the submission port relays nothing (swaks exit 24: RCPT rejected).
    refused = swaks(postfix.submission_port, "--tls", "no auth")
    assert refused.returncode == 24, refused.stdout
