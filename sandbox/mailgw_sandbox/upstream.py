"""Private Dovecot and Postfix instances: the "upstream" provider of the tests and the demo.

The gateway talks to real upstream IMAP/POP3/SMTP servers in production, so the integration tests
run real ones too: Debian's Dovecot and Postfix, started as *private* instances on 127.0.0.1 high
ports with every file (config, certificates, mail, queue, pid files, logs) under one short temp
directory. Nothing here reads ``/etc/dovecot`` or ``/etc/postfix/main.cf``, binds a default port, or
can send mail off the machine.

Why the details look the way they do (see docs/test-servers.md):

* The temp dir lives in ``/tmp`` with mode 755 because Dovecot's unprivileged ``mail``/``dovenull``
  users and Postfix's ``postfix`` user must be able to search every directory above their files, and
  it is short because unix socket paths are limited to ~107 bytes.
* Dovecot delays every login from an IP for seconds after one failed login and all test clients
  share 127.0.0.1; the ``anvil-auth-penalty`` socket is removed after start and
  ``auth_failure_delay`` is 0 so negative tests do not slow down the rest of the session.
* Postfix's ``postfix start`` reports nothing useful on failure unless stderr is a terminal, so
  every error raised here carries the tail of the server's own log file.

Install the binaries with ``scripts/install-test-deps.sh`` (as root).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from gateway.tls import create_ca_signed_pair

HOST = "127.0.0.1"
"""The only address the private servers bind."""

INSTALL_HINT = (
    "run `scripts/install-test-deps.sh` as root (installs Dovecot, Postfix, mail clients)"
)

DOVECOT_BIN = "/usr/sbin/dovecot"
DOVEADM_BIN = "/usr/bin/doveadm"
POSTFIX_BIN = "/usr/sbin/postfix"

# Keep in step with scripts/install-test-deps.sh: what the harness and the smoke test execute.
REQUIRED_BINARIES = ("dovecot", "doveadm", "postfix", "postconf", "curl", "swaks", "openssl")


class UpstreamError(RuntimeError):
    """A private test server could not be started or stopped; the message includes its log tail."""


# Servers still running when the interpreter exits (a test run aborted between start() and stop())
# are stopped here, so they never outlive pytest holding ports and temp dirs.
_running: set[Dovecot | Postfix] = set()


@atexit.register
def _stop_leftovers() -> None:
    # Postfix first: it delivers into Dovecot.
    for server in sorted(_running, key=lambda s: not isinstance(s, Postfix)):
        with contextlib.suppress(Exception):
            server.stop()


def missing_binaries(names: tuple[str, ...] = REQUIRED_BINARIES) -> list[str]:
    """Return which of ``names`` are not executable on this machine (``/usr/sbin`` included).

    ``/usr/sbin`` is searched explicitly because a non-login root shell or CI environment may not
    have it on ``PATH``, and a false "missing" would send people to reinstall installed packages.
    """
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    return [name for name in names if shutil.which(name, path=path) is None]


def free_ports(count: int) -> list[int]:
    """Reserve ``count`` distinct free TCP ports on 127.0.0.1.

    All sockets are held open until every port is chosen so the kernel cannot hand out the same port
    twice; they are closed before returning, leaving a small race window that is acceptable on a
    test machine.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_tempdir(prefix: str = "gw") -> Path:
    """Create a short, world-searchable temp dir under /tmp (see the module docstring for why)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def tail(path: Path, lines: int = 40) -> str:
    """Return the last ``lines`` lines of a log file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def wait_for_greeting(
    port: int, expect: bytes, timeout: float, alive: Callable[[], bool] | None = None
) -> bytes:
    """Connect to ``HOST:port`` until the server sends a greeting starting with ``expect``.

    Accepting the TCP connection is not enough: Dovecot and Postfix bind their listeners in the
    master process before the login/smtpd children can answer, so a test that connects right after
    the port opens can still hang or be refused. ``alive`` lets the caller abort early when the
    server process died.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise UpstreamError(f"server process exited while waiting for port {port}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as conn:
                greeting = conn.recv(512)
            if greeting.startswith(expect):
                return greeting
            last_error = UpstreamError(f"unexpected greeting {greeting!r}")
        except OSError as exc:
            last_error = exc
        time.sleep(0.05)
    raise UpstreamError(
        f"port {port} did not greet with {expect!r} within {timeout}s: {last_error}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _wait_pid_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return not _pid_alive(pid)


@dataclass(frozen=True)
class MailUser:
    """A Dovecot test user: log in with ``name``/``password`` over IMAP, POP3 or Postfix AUTH."""

    name: str
    password: str


_user_serial = itertools.count(1)


# RFC 7919 ffdhe2048 group. Dovecot 2.3 wants ssl_dh for DHE ciphers; generating fresh parameters
# takes seconds, and a published safe group is exactly as good for tests.
FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBDAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAgICB/8=
-----END DH PARAMETERS-----
"""


class Dovecot:
    """A private Dovecot: IMAP(+STARTTLS), IMAPS, POP3(+STLS), POP3S, LMTP and a SASL auth socket.

    Users live in passwd-files (one per user) with PLAIN passwords (this is a test server; the
    gateway never sees the file) and mail in maildirs under :attr:`directory`. :meth:`add_user`
    works before and after :meth:`start`; a new user can log in at once.

    Attributes of interest: ``host``, ``imap_port``, ``imaps_port``, ``pop3_port``, ``pop3s_port``,
    ``lmtp_socket``, ``auth_socket`` (for Postfix SASL), ``ca_file`` (trust this in clients),
    ``cert_file``/``key_file``, ``log_file``, ``directory``.
    """

    def __init__(self, directory: Path | None = None, *, keep_directory: bool = False) -> None:
        """Prepare (but do not start) an instance; ``keep_directory`` keeps files after stop()."""
        self._owns_directory = directory is None
        self.directory = directory if directory is not None else make_tempdir("gwd")
        self.keep_directory = keep_directory or bool(os.environ.get("GW_KEEP_UPSTREAM"))
        self.host = HOST
        self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port = free_ports(4)
        self.base_dir = self.directory / "run"
        self.config_file = self.directory / "dovecot.conf"
        self.users_dir = self.directory / "users"
        self.mail_dir = self.directory / "mail"
        self.log_dir = self.directory / "log"
        self.log_file = self.log_dir / "dovecot.log"
        self.stderr_file = self.log_dir / "dovecot.stderr"
        self.lmtp_socket = self.base_dir / "lmtp"
        self.auth_socket = self.base_dir / "auth-client-postfix"
        self.users: dict[str, str] = {}
        self._proc: subprocess.Popen[bytes] | None = None

        # One throwaway CA and a leaf it signed, made by the same code as the gateway's own pair.
        certs = create_ca_signed_pair(self.directory / "tls", "dovecot", "localhost")
        (self.directory / "tls").chmod(0o755)
        self.ca_file = certs.ca
        self.cert_file = certs.cert
        self.key_file = certs.key
        self.dh_file = self.directory / "tls" / "dh.pem"
        self.dh_file.write_bytes(FFDHE2048_PEM)

        if os.geteuid() == 0:
            # Mail processes must not run as root; the Debian `mail` user owns the maildirs.
            mail_user = pwd.getpwnam("mail")
            self._mail_uid, self._mail_gid = mail_user.pw_uid, mail_user.pw_gid
            self._login_user, self._internal_user = "dovenull", "dovecot"
        else:
            # Unprivileged Dovecot runs every process as the invoking user.
            me = pwd.getpwuid(os.getuid())
            self._mail_uid, self._mail_gid = me.pw_uid, me.pw_gid
            self._login_user = self._internal_user = me.pw_name

        self.log_dir.mkdir(exist_ok=True)
        self.mail_dir.mkdir(mode=0o750, exist_ok=True)
        os.chown(self.mail_dir, self._mail_uid, self._mail_gid)
        self.users_dir.mkdir(mode=0o755, exist_ok=True)
        self.config_file.write_text(self._config())

    # -- configuration -----------------------------------------------------------------------------

    def _config(self) -> str:
        d = self.directory
        return f"""\
# Private test instance generated by tests/integration/upstream.py. Nothing here is for production.
base_dir = {self.base_dir}
state_dir = {d}/state
instance_name = dovecot-{d.name}
hostname = upstream.test
listen = {HOST}
protocols = imap pop3 lmtp
log_path = {self.log_file}
info_log_path = {self.log_file}
auth_verbose = yes
auth_mechanisms = plain login
disable_plaintext_auth = no
auth_failure_delay = 0
default_login_user = {self._login_user}
default_internal_user = {self._internal_user}
first_valid_uid = {min(self._mail_uid, 500)}
first_valid_gid = {min(self._mail_gid, 1)}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 200
ssl = yes
ssl_cert = <{self.cert_file}
ssl_key = <{self.key_file}
ssl_dh = <{self.dh_file}
login_greeting = Dovecot test upstream ready.
shutdown_clients = yes

# One file per user: Dovecot stats a passwd-file at most once per second and reloads it only if
# mtime/size changed, so users added to one shared file could stay invisible for a second. A new
# file per user is read fresh on its first lookup.
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_dir}/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.users_dir}/%u
  default_fields = uid={self._mail_uid} gid={self._mail_gid} home={self.mail_dir}/%u
}}

service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {HOST}
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    address = {HOST}
    port = {self.pop3s_port}
    ssl = yes
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service anvil {{
  # mode 0 = not created: without this socket the auth process applies no failed-login penalty.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  unix_listener auth-client-postfix {{
    mode = 0666
  }}
}}
protocol lmtp {{
  # Postfix hands over catchall@upstream.test; the passwd-file knows only the local part.
  auth_username_format = %Ln
}}
protocol pop3 {{
  pop3_uidl_format = %08Xu%08Xv
}}
"""

    def add_user(self, user: str, password: str) -> None:
        """Create (or change the password of) a mailbox user; works while the server is running.

        The password is stored base64-encoded (``{PLAIN.b64}``) so any character, including the
        passwd-file's ``:`` separator, round-trips. The file is replaced atomically so Dovecot never
        reads half of it.
        """
        if not user or any(c in user for c in ":\n\r/ ") or user.startswith("."):
            raise ValueError(f"unusable test user name {user!r}")
        path = self.users_dir / user
        tmp = self.users_dir / f".{user}.tmp"
        encoded = base64.b64encode(password.encode()).decode()
        tmp.write_text(f"{user}:{{PLAIN.b64}}{encoded}::::::\n")
        # The auth process reads the file as default_internal_user, not as root.
        os.chown(tmp, os.geteuid(), pwd.getpwnam(self._internal_user).pw_gid)
        tmp.chmod(0o640)
        if user in self.users:
            # A changed password must change mtime or size, or Dovecot keeps the cached file; it
            # also re-checks at most once a second, so the new password may take up to 1 s.
            old_mtime = int(path.stat().st_mtime)
            new_mtime = max(int(time.time()), old_mtime + 1)
            os.utime(tmp, (new_mtime, new_mtime))
        tmp.replace(path)
        self.users[user] = password

    def new_user(self, hint: str = "user") -> MailUser:
        """Add a user with a unique name derived from ``hint`` and a random password.

        Tests sharing one session-wide server each get an empty INBOX this way, so none depends on
        what another test delivered.
        """
        base = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:24] or "user"
        user = MailUser(f"{base}-{next(_user_serial)}", secrets.token_urlsafe(12))
        self.add_user(user.name, user.password)
        return user

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the Dovecot master process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _failure(self, what: str) -> UpstreamError:
        return UpstreamError(
            f"Dovecot {what} (dir {self.directory}).\n"
            f"--- {self.stderr_file} ---\n{tail(self.stderr_file)}\n"
            f"--- {self.log_file} ---\n{tail(self.log_file)}"
        )

    def start(self, timeout: float = 15.0) -> Self:
        """Start Dovecot in the foreground (as our child) and wait until IMAP greets.

        Foreground mode (``-F``) keeps the master as our child, so an early crash is seen at once
        and stop() can wait on the process instead of polling a pid file.
        """
        if self.running:
            return self
        missing = missing_binaries(("dovecot", "doveadm"))
        if missing:
            raise UpstreamError(f"{', '.join(missing)} not installed: {INSTALL_HINT}")
        with self.stderr_file.open("ab") as err:
            self._proc = subprocess.Popen(
                [DOVECOT_BIN, "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,  # a terminal's Ctrl-C must not kill it before teardown
            )
        try:
            wait_for_greeting(self.imap_port, b"* OK", timeout, alive=lambda: self.running)
        except UpstreamError as exc:
            self._kill()
            raise self._failure(f"did not start: {exc}") from None
        # No 2-15 s login delay after a failed login (all test clients share 127.0.0.1).
        (self.base_dir / "anvil-auth-penalty").unlink(missing_ok=True)
        _running.add(self)
        return self

    def _kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
        self._proc = None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Dovecot and wait for it and its children to exit, then remove the directory.

        SIGTERM to the master makes it stop every child (``shutdown_clients = yes``); the whole
        process group is SIGKILLed if that takes longer than ``timeout``.
        """
        _running.discard(self)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self._proc = None
        # Children detached from the master (none expected) would keep ports open: kill them too.
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._owns_directory and not self.keep_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- mail --------------------------------------------------------------------------------------

    def doveadm(self, *args: str, input: bytes | None = None, timeout: float = 30) -> str:
        """Run ``doveadm -c <our config> ARGS`` and return stdout; raise with stderr on failure."""
        result = subprocess.run(
            [DOVEADM_BIN, "-c", str(self.config_file), *args],
            input=input,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise UpstreamError(
                f"doveadm {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout.decode(errors="replace")

    def deliver(self, user: str, raw: bytes, mailbox: str = "INBOX") -> None:
        """Store ``raw`` byte-for-byte in ``user``'s mailbox through Dovecot's own storage code.

        ``doveadm save`` (unlike LMTP) adds no Return-Path/Delivered-To headers, so tests can
        compare what the gateway serves with exactly what was stored; and unlike writing into
        ``maildir/new`` it updates Dovecot's index at once, so an IMAP session sees the message
        immediately (IDLE/NOOP).
        """
        if user not in self.users:
            raise ValueError(f"no such test user {user!r}; call add_user() first")
        self.doveadm("save", "-u", user, "-m", mailbox, input=raw)

    def search(self, user: str, *query: str, mailbox: str = "INBOX") -> list[int]:
        """UIDs of messages in ``user``'s mailbox matching a doveadm search query.

        Example: ``search("catchall", "header", "Subject", token)`` (substring, case-insensitive).
        """
        out = self.doveadm("search", "-u", user, "mailbox", mailbox, *query)
        return [int(line.split()[1]) for line in out.splitlines() if line.strip()]

    def wait_for_search(
        self, user: str, *query: str, timeout: float = 10.0, mailbox: str = "INBOX"
    ) -> list[int]:
        """Poll :meth:`search` until something matches; raise with the log tail after ``timeout``.

        Mail through Postfix is asynchronous (queue, then LMTP), so tests poll with a bound instead
        of sleeping a fixed time.
        """
        deadline = time.monotonic() + timeout
        while True:
            uids = self.search(user, *query, mailbox=mailbox)
            if uids or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not uids:
            raise self._failure(f"no message matching {query} in {user}/{mailbox} after {timeout}s")
        return uids

    def message_count(self, user: str, mailbox: str = "INBOX") -> int:
        """Number of messages in ``user``'s mailbox, as Dovecot sees it."""
        out = self.doveadm("-f", "flow", "mailbox", "status", "-u", user, "messages", mailbox)
        return int(out.strip().split("=", 1)[1])

    def wait_for_messages(
        self, user: str, count: int, timeout: float = 10.0, mailbox: str = "INBOX"
    ) -> int:
        """Poll until ``user``'s mailbox holds at least ``count`` messages; return the count.

        Bounded: raise with the Dovecot log tail after ``timeout`` seconds, never hang a test.
        """
        deadline = time.monotonic() + timeout
        while True:
            have = self.message_count(user, mailbox)
            if have >= count or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if have < count:
            raise self._failure(f"mailbox {user}/{mailbox} has {have} < {count} messages")
        return have


class Postfix:
    """A private Postfix: authenticated submission, delivery into a :class:`Dovecot` over LMTP.

    Ports: ``submission_port`` (STARTTLS required before AUTH, like port 587) and ``smtps_port``
    (implicit TLS, like 465). AUTH is checked by Dovecot through its auth socket, so any Dovecot
    user can submit. Every recipient, in any domain, is rewritten by a virtual alias regexp to
    ``catchall_user`` in the Dovecot instance and delivered over LMTP; relay and default transports
    are ``error:`` so nothing can ever leave the machine. Bounces go to the catch-all too.
    """

    CATCHALL_DOMAIN = "upstream.test"

    def __init__(
        self,
        dovecot: Dovecot,
        directory: Path | None = None,
        *,
        catchall_user: str = "catchall",
        catchall_password: str | None = None,
        message_size_limit: int = 64 * 1024 * 1024,
        keep_directory: bool = False,
    ) -> None:
        """Prepare (but do not start) an instance; the catch-all user is added to ``dovecot``."""
        self.dovecot = dovecot
        self._owns_directory = directory is None
        self.directory = directory if directory is not None else make_tempdir("gwp")
        self.keep_directory = keep_directory or bool(os.environ.get("GW_KEEP_UPSTREAM"))
        self.host = HOST
        self.submission_port, self.smtps_port = free_ports(2)
        self.config_dir = self.directory / "etc"
        self.queue_dir = self.directory / "spool"
        self.data_dir = self.directory / "data"
        self.log_dir = self.directory / "log"
        self.log_file = self.log_dir / "postfix.log"
        self.ca_file = dovecot.ca_file
        self.catchall_user = catchall_user
        self.catchall_password = catchall_password or secrets.token_urlsafe(12)
        self.catchall_address = f"{catchall_user}@{self.CATCHALL_DOMAIN}"
        self.message_size_limit = message_size_limit
        self._started = False

        dovecot.add_user(catchall_user, self.catchall_password)
        # `postfix` chdirs into the queue directory before anything else; its subdirectories (and
        # data_directory) are created with the right owners by `postfix start` (post-install).
        for sub in (self.config_dir, self.log_dir, self.queue_dir):
            sub.mkdir(mode=0o755, exist_ok=True)
        (self.config_dir / "main.cf").write_text(self._main_cf())
        (self.config_dir / "master.cf").write_text(self._master_cf())
        # Self-mapping stops Postfix's alias recursion, so /.*/ -> catchall terminates.
        (self.config_dir / "virtual_alias.regexp").write_text(f"/.*/ {self.catchall_address}\n")
        # Postfix re-reads a config file in 0.3 s steps until its mtime is in the past (guarding
        # against half-written files): backdating them saves ~1.5 s per start.
        past = time.time() - 10
        for path in self.config_dir.iterdir():
            os.utime(path, (past, past))

    # -- configuration -----------------------------------------------------------------------------

    def _main_cf(self) -> str:
        dv = self.dovecot
        return f"""\
# Private test instance generated by tests/integration/upstream.py. Nothing here is for production.
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
maillog_file = {self.log_file}
maillog_file_prefixes = /var, /dev/stdout, {self.directory}
myhostname = smtp.{self.CATCHALL_DOMAIN}
mydomain = {self.CATCHALL_DOMAIN}
myorigin = $mydomain
inet_interfaces = {HOST}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
biff = no
append_dot_mydomain = no
smtpd_peername_lookup = no
smtp_host_lookup = native
lmtp_host_lookup = native
message_size_limit = {self.message_size_limit}
mailbox_size_limit = 0
smtpd_banner = $myhostname ESMTP Postfix test upstream

# Everything goes to one Dovecot mailbox; nothing may leave the machine.
virtual_alias_maps = regexp:{self.config_dir}/virtual_alias.regexp
virtual_alias_domains =
virtual_mailbox_domains = {self.CATCHALL_DOMAIN}
virtual_transport = lmtp:unix:{dv.lmtp_socket}
default_transport = error:test upstream never relays
relay_transport = error:test upstream never relays
smtpd_reject_unlisted_recipient = no

smtpd_tls_cert_file = {dv.cert_file}
smtpd_tls_key_file = {dv.key_file}
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {dv.auth_socket}
smtpd_sasl_auth_enable = no
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
"""

    def _master_cf(self) -> str:
        auth = (
            "  -o smtpd_sasl_auth_enable=yes\n"
            "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
            "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n"
        )
        return f"""\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{HOST}:{self.submission_port} inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
{auth}{HOST}:{self.smtps_port} inet n - n - - smtpd
  -o syslog_name=postfix/smtps
  -o smtpd_tls_wrappermode=yes
{auth}pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

    def wait_for_delivery(self, *query: str, timeout: float = 10.0) -> list[int]:
        """Wait until a message matching a doveadm search query is in the catch-all INBOX.

        Returns its UIDs; on timeout the error shows both Postfix's and Dovecot's log tails, since
        either side (queue, LMTP, storage) may be where the message got stuck.
        """
        try:
            return self.dovecot.wait_for_search(self.catchall_user, *query, timeout=timeout)
        except UpstreamError as exc:
            raise self._failure(f"did not deliver: {exc}") from None

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def pid_file(self) -> Path:
        """Where the Postfix master writes its pid."""
        return self.queue_dir / "pid" / "master.pid"

    def master_pid(self) -> int | None:
        """The running master's pid, or None."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def _failure(self, what: str, output: str = "") -> UpstreamError:
        extra = f"--- postfix command output ---\n{output.strip()}\n" if output.strip() else ""
        return UpstreamError(
            f"Postfix {what} (dir {self.directory}).\n{extra}"
            f"--- {self.log_file} ---\n{tail(self.log_file)}"
        )

    def _postfix(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX_BIN, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def start(self, timeout: float = 15.0) -> Self:
        """Start the Postfix master (it daemonizes) and wait until the submission port greets.

        The master must start as root: it binds the ports and drops privileges per service.
        """
        if self._started and self.master_pid() is not None:
            return self
        missing = missing_binaries(("postfix", "postconf"))
        if missing:
            raise UpstreamError(f"{', '.join(missing)} not installed: {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise UpstreamError(
                "a private Postfix must be started as root (its master binds/drops)"
            )
        if not self.dovecot.running:
            raise UpstreamError(
                "start the Dovecot instance before Postfix (SASL and LMTP go to it)"
            )
        self._started = True
        _running.add(self)
        result = self._postfix("start")
        output = result.stdout + result.stderr
        try:
            if result.returncode != 0:
                raise UpstreamError(f"`postfix start` exited {result.returncode}")
            wait_for_greeting(self.submission_port, b"220 ", timeout)
        except UpstreamError as exc:
            error = self._failure(f"did not start: {exc}", output)
            self._halt(timeout)  # the directory stays for inspection; the error names it
            raise error from None
        return self

    def _halt(self, timeout: float) -> None:
        _running.discard(self)
        if not self._started:
            return
        pid = self.master_pid()
        self._postfix("stop")
        if pid is not None and not _wait_pid_exit(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # the master leads its own process group
            _wait_pid_exit(pid, 5)
        self._started = False

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Postfix, wait for the master to exit, then remove the directory.

        ``postfix stop`` only signals the master; waiting on its pid makes sure the ports are free
        before the next test session (or a second instance) needs them.
        """
        self._halt(timeout)
        if self._owns_directory and not self.keep_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
