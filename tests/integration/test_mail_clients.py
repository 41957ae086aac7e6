"""Real mail clients against the whole gateway, for Graph, Gmail and upstream accounts.

The upstream accounts read a real Dovecot: ``legacy`` over upstream IMAP, ``legacypop`` over
upstream POP3; the clients see the same INBOX either way.

* mutt (IMAPS, verifying the gateway's CA) loads the INBOX index (every message's headers) and
  pipes one message out: the bytes are the provider's message;
* fetchmail over IMAP in keep mode delivers each message once to an MDA, and a second run finds
  nothing new (it marked them \\Seen, which the gateway remembers);
* curl reads POP3 (STLS with ``--ssl-reqd``: LIST and RETR) and IMAP over STARTTLS.

A missing client is a broken test machine, not a reason to skip: the test FAILS with the fix.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailgw_sandbox.upstream import Dovecot
from tests.gateway_accounts import Gateway, two_account_gateway
from tests.helpers import PASSWORD

INSTALL_HINT = "run scripts/install-test-deps.sh (as root) to install the mail clients"
ACCOUNTS = pytest.mark.parametrize(
    "account",
    ["crm", "scanner", "legacy", "legacypop"],
    ids=["graph", "gmail", "upstream-imap", "upstream-pop3"],
)


def _require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is not installed: {INSTALL_HINT}", pytrace=False)
    return found


def _message(account: str, n: int) -> bytes:
    return (
        f"From: Client Test <client@example.org>\r\nTo: {account}@example.com\r\n"
        f"Subject: client {account} {n}\r\nMessage-ID: <client-{account}-{n}@example.org>\r\n"
        f"Date: Mon, 2 Mar 2026 10:0{n}:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        f"Body {n}: gr\u00fc\u00dfe, \u65e5\u672c.\r\n.leading dot\r\n"
    ).encode()


@pytest.fixture(scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory, dovecot: Dovecot) -> AsyncIterator[Gateway]:
    async with two_account_gateway(tmp_path_factory.mktemp("clients"), dovecot) as running:
        running.raws = {}  # type: ignore[attr-defined]
        for account in ("crm", "scanner", "legacy", "legacypop"):
            running.raws[account] = [_message(account, n) for n in range(3)]  # type: ignore[attr-defined]
            for raw in running.raws[account]:  # type: ignore[attr-defined]
                running.seed(account, raw)
        yield running


def _run(argv: list[str], home: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "TERM": "xterm", "LANG": "C.UTF-8"}
    return subprocess.run(argv, capture_output=True, timeout=timeout, env=env, check=False)


def _lf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


# -- mutt --------------------------------------------------------------------------------------


@ACCOUNTS
async def test_mutt_reads_the_index_and_pipes_a_message(
    gw: Gateway, account: str, tmp_path: Path
) -> None:
    _require("mutt")
    script = _require("script")
    raws = gw.raws[account]  # type: ignore[attr-defined]
    piped = tmp_path / "piped.eml"
    index = tmp_path / "index.txt"
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(
        f'set imap_user="{account}"\nset imap_pass="{PASSWORD}"\n'
        f'set ssl_ca_certificates_file="{gw.cafile}"\nset ssl_force_tls=yes\n'
        "set ssl_starttls=yes\nset imap_passive=no\nset mail_check=0\nset timeout=5\n"
        "set sort=date-sent\nset pipe_decode=no\nset wait_key=no\nset header_cache=\n"
        "set confirmappend=no\nset quit=yes\nset move=no\nset mbox_type=mbox\n"
        f'set folder="imaps://localhost:{gw.ports["imaps"]}/"\nset spoolfile="+INBOX"\n'
    )
    # The index (every message's headers, as mutt fetched them) is piped out through
    # <pipe-message> of all tagged messages; the first message is piped alone, raw.
    keys = (
        f"<tag-pattern>~A<enter><tag-prefix><pipe-message>cat >> {index}<enter>"
        f"<untag-pattern>~A<enter><first-entry><pipe-message>cat > {piped}<enter><quit>"
    )
    command = f"mutt -n -F {muttrc} -e 'set pipe_split=yes' -e 'push \"{keys}\"'"
    done = await asyncio.to_thread(
        _run, [script, "-qefc", command, str(tmp_path / "typescript")], tmp_path, 60
    )
    transcript = (
        (tmp_path / "typescript").read_bytes() if (tmp_path / "typescript").exists() else b""
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + transcript[-3000:]
    assert index.exists(), transcript[-3000:]
    # ("^" would be a control key in mutt's push, so the filtering happens here)
    subjects = re.findall(rb"^Subject: (.*?)\r?$", index.read_bytes(), re.MULTILINE)
    assert subjects == [f"client {account} {n}".encode() for n in range(3)]
    for n in range(3):  # the index mutt drew from the headers it fetched
        assert f"client {account} {n}".encode() in transcript
    assert _lf(piped.read_bytes()) == _lf(raws[0])


# -- fetchmail over IMAP ----------------------------------------------------------------------


async def _fetchmail_twice(
    gw: Gateway, account: str, tmp_path: Path, poll: str, security: str
) -> str:
    """Run fetchmail in keep mode twice with an MDA writing one file per message; check that
    the first run delivers each message of the account exactly once and the second nothing
    ("no mail", exit 1). Returns the first run's verbose log."""
    fetchmail = _require("fetchmail")
    raws = gw.raws[account]  # type: ignore[attr-defined]
    out = tmp_path / "mda"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"poll localhost {poll}\n"
        f'  user "{account}" password "{PASSWORD}" keep {security}\n'
        f"  sslcertck sslcertfile {gw.cafile}\n"
        f"  mda \"sh -c 'cat > {out}/$$.eml'\"\n"
    )
    rc.chmod(0o600)
    argv = [fetchmail, "-f", str(rc), "-i", str(tmp_path / "ids"), "--nosyslog", "-v"]
    first = await asyncio.to_thread(_run, argv, tmp_path, 60)
    log = (first.stdout + first.stderr).decode(errors="replace")
    assert first.returncode == 0, log
    got = [p.read_bytes() for p in out.iterdir()]
    assert len(got) == len(raws), log
    for raw in raws:  # fetchmail adds its Received: line and writes LF line ends
        assert sum(_lf(raw) in body for body in got) == 1, log
    second = await asyncio.to_thread(_run, argv, tmp_path, 60)
    assert second.returncode == 1, (second.stdout + second.stderr).decode(errors="replace")
    assert len(list(out.iterdir())) == len(raws)
    return log


@ACCOUNTS
async def test_fetchmail_imap_keep_mode_downloads_each_message_once(
    gw: Gateway, account: str, tmp_path: Path
) -> None:
    """IMAP keep mode: fetchmail marks what it fetched \\Seen, which the gateway remembers."""
    # Graph over IMAPS, the others over STARTTLS: both verify the gateway's certificate.
    if account == "crm":
        poll, security = f"service {gw.ports['imaps']} protocol IMAP", "ssl"
    else:
        poll, security = f"service {gw.ports['imap']} protocol IMAP", "sslproto TLS1.2+"
    log = await _fetchmail_twice(gw, account, tmp_path, poll, security)
    assert "SSL/TLS: using protocol TLSv1.3" in log, log  # and the certificate was checked
    if account != "crm":
        assert "upgrade to TLS succeeded" in log, log  # STARTTLS, before LOGIN


# -- curl --------------------------------------------------------------------------------------


@ACCOUNTS
async def test_curl_pop3_with_stls_lists_and_retrieves(
    gw: Gateway, account: str, tmp_path: Path
) -> None:
    curl = _require("curl")
    raws = gw.raws[account]  # type: ignore[attr-defined]
    base = [curl, "-sS", "--ssl-reqd", "--cacert", gw.cafile, "-u", f"{account}:{PASSWORD}"]
    url = f"pop3://localhost:{gw.ports['pop3']}"
    listing = await asyncio.to_thread(_run, [*base, f"{url}/"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split(b"\r\n")[:3] == [
        b"%d %d" % (n, len(raw)) for n, raw in enumerate(raws, 1)
    ]
    second = await asyncio.to_thread(_run, [*base, f"{url}/2"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == raws[1]  # curl undoes the dot-stuffing of ".leading dot"
    missing = await asyncio.to_thread(_run, [*base, f"{url}/99"], tmp_path)
    assert missing.returncode != 0 and missing.stdout == b""
    wrong = await asyncio.to_thread(
        _run,
        [curl, "-sS", "--ssl-reqd", "--cacert", gw.cafile, "-u", f"{account}:nope", f"{url}/"],
        tmp_path,
    )
    assert wrong.returncode == 67  # CURLE_LOGIN_DENIED


@ACCOUNTS
async def test_curl_imap_with_starttls_fetches_by_index_and_section(
    gw: Gateway, account: str, tmp_path: Path
) -> None:
    curl = _require("curl")
    raws = gw.raws[account]  # type: ignore[attr-defined]
    base = [curl, "-sS", "--ssl-reqd", "--cacert", gw.cafile, "-u", f"{account}:{PASSWORD}"]
    url = f"imap://localhost:{gw.ports['imap']}/INBOX"
    whole = await asyncio.to_thread(_run, [*base, f"{url}/;MAILINDEX=3"], tmp_path)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout == raws[2]
    header = await asyncio.to_thread(
        _run, [*base, f"{url}/;MAILINDEX=1/;SECTION=HEADER.FIELDS%20(SUBJECT)"], tmp_path
    )
    assert header.returncode == 0, header.stderr
    assert header.stdout == f"Subject: client {account} 0\r\n\r\n".encode()
    search = await asyncio.to_thread(_run, [*base, "-X", 'SEARCH SUBJECT "client"', url], tmp_path)
    assert search.returncode == 0, search.stderr
    assert re.search(rb"\* SEARCH 1 2 3\b", search.stdout), search.stdout


# -- fetchmail over POP3 ----------------------------------------------------------------------


@ACCOUNTS
async def test_fetchmail_pop3_keep_mode_downloads_each_message_once(
    gw: Gateway, account: str, tmp_path: Path
) -> None:
    """Keep mode remembers UIDLs: the second run finds nothing new, and the INBOX is intact."""
    poll = f"service {gw.ports['pop3']} protocol POP3 uidl"
    log = await _fetchmail_twice(gw, account, tmp_path, poll, "sslproto TLS1.2+")
    assert "upgrade to TLS succeeded" in log, log  # STLS before USER/PASS


# -- mbsync ------------------------------------------------------------------------------------

MBSYNC_MODES = pytest.mark.parametrize(
    ("port", "ssl_type"),
    [("imaps", "IMAPS"), ("imap", "STARTTLS"), ("imap", "None")],
    ids=["imaps", "starttls", "plain-loopback"],
)


@MBSYNC_MODES
@ACCOUNTS
async def test_mbsync_pulls_the_inbox_into_a_maildir(
    gw: Gateway, account: str, port: str, ssl_type: str, tmp_path: Path
) -> None:
    """mbsync logs in with AUTHENTICATE PLAIN (in clear text only on loopback, where
    reading.plaintext_auth allows it), pulls every message and exits 0: it waits for the server
    to close after LOGOUT, so a LOGOUT that left a TLS connection open hung it (its Timeout does
    not cover that wait) until the subprocess timeout failed the test."""
    mbsync = _require("mbsync")
    raws = gw.raws[account]  # type: ignore[attr-defined]
    maildir = tmp_path / "mail"
    maildir.mkdir()  # mbsync creates the mailbox (Create Near), not the store's directory
    rc = tmp_path / "mbsyncrc"
    rc.write_text(
        f"IMAPAccount gateway\nHost localhost\nPort {gw.ports[port]}\nUser {account}\n"
        f'Pass "{PASSWORD}"\nSSLType {ssl_type}\nCertificateFile {gw.cafile}\n'
        "AuthMechs PLAIN\nTimeout 20\n\n"
        "IMAPStore gateway-remote\nAccount gateway\n\n"
        f"MaildirStore local\nPath {maildir}/\nInbox {maildir}/INBOX\n\n"
        "Channel inbox\nFar :gateway-remote:\nNear :local:\nPatterns INBOX\n"
        "Sync Pull\nCreate Near\nSyncState *\n"
    )
    done = await asyncio.to_thread(_run, [mbsync, "-V", "-c", str(rc), "inbox"], tmp_path, 60)
    log = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, log
    pulled = [p.read_bytes() for d in ("new", "cur") for p in (maildir / "INBOX" / d).iterdir()]
    assert len(pulled) == len(raws), log
    # mbsync stores LF line ends and adds its X-TUID: line to the header
    pulled = [re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", body) for body in pulled]
    for raw in raws:
        assert sum(_lf(raw) == body for body in pulled) == 1, log
    assert "AUTHENTICATE PLAIN" in log or "Authenticating with SASL mechanism PLAIN" in log, log
