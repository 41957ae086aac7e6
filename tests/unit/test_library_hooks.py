"""The private parts of Twisted, aiosmtpd and poplib that the gateway still relies on, pinned.

Every other override goes through a public hook. Each test here names the gateway module that
relies on a private part and why; when a release renames or changes one, the test fails with
that sentence instead of a client seeing a dropped connection. The tested versions are the range
pinned in pyproject.toml (checked by the last test): widen it only when this file passes.
"""

from __future__ import annotations

import inspect
import poplib
import re
import tomllib
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Session
from packaging.specifiers import SpecifierSet
from twisted.mail import imap4
from twisted.protocols.basic import LineReceiver

ROOT = Path(__file__).resolve().parents[2]


def _fail(who: str, what: str, why: str) -> str:
    return f"{who} relies on {what} ({why}); this release changed it: adapt {who}, then the pin"


def _assert_method(cls: type, name: str, params: list[str], who: str, why: str) -> None:
    function = inspect.getattr_static(cls, name, None)
    assert callable(function), _fail(who, f"{cls.__qualname__}.{name}", why)
    found = list(inspect.signature(function).parameters)
    assert found == params, _fail(who, f"{cls.__qualname__}.{name}{tuple(params)}", why)


# -- Twisted's LineReceiver (under IMAP4Server) ----------------------------------------------


def test_line_receiver_buffer_is_the_pending_bytes() -> None:
    """gateway/imap_out/_reading.py bounds the bytes pipelined behind a command in flight by
    the length of ``LineReceiver._buffer``; no public accessor tells the size."""
    receiver = LineReceiver()
    receiver.paused = True
    receiver.dataReceived(b"a NOOP\r\nb NOOP")
    buffered = getattr(receiver, "_buffer", None)
    assert buffered == b"a NOOP\r\nb NOOP", _fail(
        "gateway/imap_out/_reading.py",
        "LineReceiver._buffer holding the unread bytes while paused",
        "to cut off a client that pipelines more than 1 MiB",
    )


def test_line_receiver_busy_flag_exists() -> None:
    """gateway/imap_out/_reading.py resumes reading with ``dataReceived(b"")`` only when the
    loop of ``LineReceiver.dataReceived`` is not already running (``_busyReceiving``)."""
    seen: list[object] = []

    class Recorder(LineReceiver):
        def lineReceived(self, line: bytes) -> None:
            seen.append(getattr(self, "_busyReceiving", None))

    receiver = Recorder()
    receiver.dataReceived(b"a NOOP\r\n")
    seen.append(getattr(receiver, "_busyReceiving", None))
    assert seen == [True, False], _fail(
        "gateway/imap_out/_reading.py",
        "LineReceiver._busyReceiving",
        "to resume reading pipelined commands without re-entering the read loop",
    )


# -- Twisted's IMAP4Server: the public hooks the gateway overrides instead of private ones ------


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("dispatchCommand", ["self", "tag", "cmd", "rest", "uid"]),
        ("lookupCommand", ["self", "cmd"]),
        ("sendPositiveResponse", ["self", "tag", "message"]),
        ("sendNegativeResponse", ["self", "tag", "message"]),
        ("sendBadResponse", ["self", "tag", "message"]),
        ("clearLineBuffer", ["self"]),
    ],
)
def test_imap_public_hooks_keep_their_signature(name: str, params: list[str]) -> None:
    _assert_method(
        imap4.IMAP4Server,
        name,
        params,
        "gateway/imap_out/_reading.py",
        "every command is dispatched, and its tagged answer resumes reading, through it",
    )


def test_imap_calls_parse_state_methods_by_name() -> None:
    """gateway/imap_out/server.py reads a SASL answer in its own ``parse_sasl`` state, which
    relies on ``lineReceived`` calling ``parse_<parseState>``."""
    source = inspect.getsource(imap4.IMAP4Server.lineReceived)
    assert '"parse_" + self.parseState' in source, _fail(
        "gateway/imap_out/server.py",
        "IMAP4Server.lineReceived dispatching to parse_<parseState>",
        "AUTHENTICATE reads the client's answers in parse_sasl",
    )


def test_imap_fetch_item_flags_class() -> None:
    """gateway/imap_out/_mailbox.py adds FLAGS to a FETCH that set \\Seen (RFC 3501 6.4.5)
    with ``imap4._FetchParser.Flags``, the item type Twisted's FETCH parser produces."""
    flags = getattr(getattr(imap4, "_FetchParser", None), "Flags", None)
    assert flags is not None and flags().type == "flags", _fail(
        "gateway/imap_out/_mailbox.py",
        "imap4._FetchParser.Flags",
        "the FLAGS item added to a FETCH that marked messages \\Seen",
    )


def test_imap_fetch_parser_header_list_state() -> None:
    """gateway/imap_out/_syntax.py reads FETCH header names as astrings in ``FetchItems``, a
    ``imap4._FetchParser`` whose ``state_header_list(s)`` (called by name from ``parseString``)
    sets ``pending_body.header.fields``."""
    parser = getattr(imap4, "_FetchParser", None)
    why = "header names given as quoted strings or literals in BODY[HEADER.FIELDS (...)]"
    _assert_method(parser, "state_header_list", ["self", "s"], "gateway/imap_out/_syntax.py", why)
    assert '"state_" + state' in inspect.getsource(parser.parseString), _fail(
        "gateway/imap_out/_syntax.py", "_FetchParser.parseString calling state_<name>", why
    )
    assert "pending_body.header.fields" in inspect.getsource(parser.state_header_list), _fail(
        "gateway/imap_out/_syntax.py", "_FetchParser.pending_body.header.fields", why
    )


# -- aiosmtpd ----------------------------------------------------------------------------------


def test_aiosmtpd_session_factory() -> None:
    """gateway/smtp_in/protocol.py makes every session with ``SMTP._create_session`` (no
    public factory) to learn when a login succeeds and to silence login_data's warning."""
    _assert_method(
        SMTP,
        "_create_session",
        ["self"],
        "gateway/smtp_in/protocol.py",
        "its Session subclass reports the login to the connection caps",
    )
    source = inspect.getsource(SMTP.connection_made)
    assert "self._create_session()" in source, _fail(
        "gateway/smtp_in/protocol.py",
        "SMTP.connection_made calling self._create_session()",
        "its Session subclass reports the login to the connection caps",
    )


def test_aiosmtpd_session_sets_authenticated_and_ssl() -> None:
    """gateway/smtp_in/protocol.py learns of a login from ``Session.authenticated`` being set
    and of STARTTLS from ``Session.ssl``."""
    session = Session(loop=None)  # type: ignore[arg-type]
    found = [getattr(session, name, "missing") for name in ("authenticated", "ssl")]
    assert found == [None, None], _fail(
        "gateway/smtp_in/protocol.py",
        "Session.authenticated and Session.ssl starting as None",
        "the login and the negotiated TLS are read from them",
    )


def test_aiosmtpd_stream_reader_attribute() -> None:
    """gateway/smtp_in/protocol.py streams DATA into the spool from ``SMTP._reader`` (aiosmtpd
    would buffer the whole message)."""
    source = inspect.getsource(SMTP._handle_client)
    assert "self._reader.readuntil" in source, _fail(
        "gateway/smtp_in/protocol.py",
        "SMTP._reader, the connection's asyncio.StreamReader",
        "DATA is streamed to the spool instead of being held in memory",
    )


def test_aiosmtpd_command_size_limits_still_class_level() -> None:
    """gateway/smtp_in/protocol.py gives each connection its own ``command_size_limits``: the
    class-level dict is changed by every EHLO (``+= 26`` for SMTPUTF8...) and cleared by every
    connection. When aiosmtpd makes it per instance, the workaround can go."""
    limits = SMTP.__dict__.get("command_size_limits")
    assert isinstance(limits, defaultdict), _fail(
        "gateway/smtp_in/protocol.py",
        "SMTP.command_size_limits being a class-level defaultdict",
        "each connection replaces it by its own; check whether that is still needed",
    )
    assert "self.command_size_limits.clear()" in inspect.getsource(SMTP.__init__)


# -- poplib ------------------------------------------------------------------------------------


def test_poplib_line_limit_is_a_module_global() -> None:
    """gateway/providers/pop3_inbox.py raises ``poplib._MAXLINE`` (2,048 bytes) to imaplib's
    limit for the process: real mail has longer lines. poplib has no public setting."""
    limit = getattr(poplib, "_MAXLINE", None)
    assert isinstance(limit, int), _fail(
        "gateway/providers/pop3_inbox.py",
        "poplib._MAXLINE",
        "messages with lines over 2,048 bytes are read from upstream POP3 servers",
    )
    assert "_MAXLINE" in inspect.getsource(poplib.POP3._getline)


# -- the tested range ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("package", "requirement"), [("twisted", "twisted"), ("aiosmtpd", "aiosmtpd")]
)
def test_installed_version_is_in_the_pinned_range(package: str, requirement: str) -> None:
    """The range in pyproject.toml is the one this file was run against; one place for it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] if re.match(rf"{requirement}\b", d)]
    assert len(pins) == 1, f"pyproject.toml must pin {requirement} once: {pins}"
    spec = SpecifierSet(re.sub(r"^[\w.-]+(\[[^\]]*\])?", "", pins[0]))
    installed = version(package)
    assert installed in spec, (
        f"{package} {installed} is outside the tested range {spec} in pyproject.toml: run "
        "tests/unit/test_library_hooks.py and the protocol tests, then move the range"
    )
