"""Every listener speaks TLS under one policy, and STARTTLS inside TLS is refused, not obeyed.

The cipher and protocol checks use ``openssl s_client`` offering exactly one thing: the server
must refuse it (the client wrote its ClientHello, no cipher was agreed), while the same client
offering a policy cipher connects, so a refusal is the server's and not the client's own limit.
The STARTTLS checks use the Python clients programs are written with; they refuse to send a second
STARTTLS themselves, so the raw command goes through their generic command call.
"""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import re
import smtplib
import ssl

import pytest

from gateway.app import Gateway

HOST = "127.0.0.1"
# listener -> the s_client -starttls protocol on a STARTTLS port, None on an implicit-TLS port
LISTENERS = {
    "smtp": "smtp",
    "smtps": None,
    "imap": "imap",
    "imaps": None,
    "pop3": "pop3",
    "pop3s": None,
}
# SHA-1 CBC suites for either key type of the certificate (ours is ECDSA; an admin's may be RSA).
SHA1_CBC = "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA"
# OpenSSL 3's default security level keeps TLS 1.0/1.1 from even being offered; level 0 lets
# the client offer them, so that the server is the one refusing.
OLD_PROTOCOL = ["-cipher", "DEFAULT:@SECLEVEL=0"]


def _client_tls(gateway: Gateway) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.settings.state_dir / "tls" / "ca.crt")


async def _s_client(gateway: Gateway, listener: str, *offer: str) -> tuple[str | None, int]:
    """The cipher agreed (None if the handshake failed) and the bytes the client wrote."""
    command = ["openssl", "s_client", "-connect", f"{HOST}:{gateway.ports[listener]}", *offer]
    if LISTENERS[listener]:
        command += ["-starttls", LISTENERS[listener]]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(process.communicate(), 20))[0].decode(errors="replace")
    agreed = re.search(r"^New, \S+, Cipher is (\S+)", output, re.MULTILINE)
    written = re.search(r"handshake has read \d+ bytes and written (\d+) bytes", output)
    assert agreed and written, output
    cipher = None if agreed.group(1) == "(NONE)" else agreed.group(1)
    return cipher, int(written.group(1))


@pytest.mark.parametrize("listener", sorted(LISTENERS))
async def test_one_tls_policy_on_every_listener(gateway: Gateway, listener: str) -> None:
    policy_cipher, _ = await _s_client(
        gateway, listener, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"
    )
    assert policy_cipher == "ECDHE-ECDSA-AES128-GCM-SHA256"
    for offer in (
        ["-tls1_2", "-cipher", SHA1_CBC],
        ["-tls1", *OLD_PROTOCOL],
        ["-tls1_1", *OLD_PROTOCOL],
    ):
        cipher, written = await _s_client(gateway, listener, *offer)
        assert cipher is None and written > 0, (listener, offer, cipher)


async def test_smtp_starttls_inside_tls_is_503(gateway: Gateway) -> None:
    context = _client_tls(gateway)

    def sessions() -> list[tuple]:
        answers = []
        with smtplib.SMTP(HOST, gateway.ports["smtp"], timeout=10) as client:
            client.starttls(context=context)
            client.ehlo()
            answers.append((client.has_extn("starttls"), client.docmd("STARTTLS"), client.noop()))
        with smtplib.SMTP_SSL(HOST, gateway.ports["smtps"], context=context, timeout=10) as client:
            client.ehlo()
            answers.append((client.has_extn("starttls"), client.docmd("STARTTLS"), client.noop()))
        return answers

    for advertised, again, after in await asyncio.to_thread(sessions):
        assert not advertised
        assert again == (503, b"5.5.1 TLS is already active on this connection")
        assert after[0] == 250  # the connection carries on under the same TLS


async def test_imap_starttls_inside_tls_is_bad(gateway: Gateway) -> None:
    context = _client_tls(gateway)

    def sessions() -> list[tuple]:
        answers = []
        upgraded = imaplib.IMAP4(HOST, gateway.ports["imap"], timeout=10)
        upgraded.starttls(ssl_context=context)
        implicit = imaplib.IMAP4_SSL(HOST, gateway.ports["imaps"], ssl_context=context, timeout=10)
        for client in (upgraded, implicit):
            try:
                capabilities = client.capability()[1][0].split()
                with pytest.raises(imaplib.IMAP4.error) as refused:
                    client.xatom("STARTTLS")
                answers.append((capabilities, str(refused.value), client.noop()[0]))
            finally:
                client.shutdown()
        return answers

    for capabilities, refused, after in await asyncio.to_thread(sessions):
        assert b"STARTTLS" not in capabilities
        assert "BAD" in refused and "TLS is already active" in refused
        assert after == "OK"


async def test_pop3_stls_inside_tls_is_err(gateway: Gateway) -> None:
    context = _client_tls(gateway)

    def sessions() -> list[tuple]:
        answers = []
        upgraded = poplib.POP3(HOST, gateway.ports["pop3"], timeout=10)
        upgraded.stls(context=context)
        implicit = poplib.POP3_SSL(HOST, gateway.ports["pop3s"], context=context, timeout=10)
        for client in (upgraded, implicit):
            try:
                with pytest.raises(poplib.error_proto) as refused:
                    client._shortcmd("STLS")  # poplib itself will not send STLS twice
                answers.append((refused.value.args[0], client.capa()))
            finally:
                client.quit()
        return answers

    for refused, capabilities in await asyncio.to_thread(sessions):
        assert refused == b"-ERR Already using TLS"
        assert "STLS" not in capabilities and "USER" in capabilities  # still answering
