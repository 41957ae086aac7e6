"""The ``gateway`` command: run, reload, check-config, health, connect, queue, accounts, demo,
hash-password.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or a config that does not validate.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:  # imported where used at run time: ``gateway --help`` stays quick
    from .config import Settings
    from .logs import EventLogger

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

SANDBOX_PACKAGE = "mailgw_sandbox"
"""The demo's local clouds: a separate distribution (sandbox/ in the repository), so the product
never carries it; only ``gateway demo`` imports it."""
DEMO_NEEDS_SANDBOX = (
    "gateway: the demo needs the provider sandbox, which is installed separately: from the "
    "repository's root, run `pip install ./sandbox` (or `pip install . ./sandbox`)"
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_CONFIG
    return args.handler(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Lets legacy SMTP/IMAP/POP3 programs use Microsoft 365 and Gmail mailboxes "
        "after password logins are switched off.",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = _command(
        commands,
        "run",
        "Start every configured listener and serve until SIGTERM or SIGINT; SIGHUP reloads "
        "the config.",
        "The config must pass check-config, every {env: ...} secret must be set, and no "
        "password hash may be the example's.",
    )
    _add_config_option(run)
    run.set_defaults(handler=_run)

    reloader = _command(
        commands,
        "reload",
        "Tell the running gateway to re-read its config (the same as sending it SIGHUP).",
        "Finds the process by the pid file in state_dir; the gateway validates the file and "
        "applies it, or keeps running with the old config and logs every problem "
        "(gateway.reloaded / gateway.reload_refused). Needs no secrets.",
    )
    _add_config_option(reloader)
    reloader.set_defaults(handler=_reload)

    check = _command(
        commands,
        "check-config",
        "Validate a config file and list every problem with its line, key and fix.",
        "Exits 0 when `gateway run` would accept the file, 2 otherwise.",
    )
    check.add_argument(
        "file", nargs="?", type=Path, help="the config file to check (the same as -c FILE)"
    )
    _add_config_option(check)
    check.set_defaults(handler=_check_config)

    health = _command(
        commands,
        "health",
        "Exit 0 if the running gateway answers on its admin listener (for healthchecks).",
        "Asks http://<listeners.host>:<admin_port>/healthz directly, never through a proxy "
        "(HTTP_PROXY and friends are ignored); needs no secrets.",
    )
    _add_config_option(health)
    health.set_defaults(handler=_health)

    connect = _command(
        commands,
        "connect",
        "Connect a mailbox: print a one-time consent link for its owner, or sign in here with "
        "a device code (--device, Microsoft only).",
    )
    connect.add_argument("account", help="the account's username in the config")
    connect.add_argument(
        "--device",
        action="store_true",
        help="sign in with a code on another device (for machines without a browser)",
    )
    _add_config_option(connect)
    connect.set_defaults(handler=_connect)

    _add_migrate_command(commands)

    _add_queue_command(commands)

    accounts = _command(
        commands,
        "accounts",
        "List the accounts and whether each mailbox is connected or needs re-consent.",
        "Needs no secrets.",
    )
    _add_config_option(accounts)
    accounts.set_defaults(handler=_accounts)

    _add_demo_command(commands)

    hasher = _command(
        commands,
        "hash-password",
        "Hash a local password for accounts[].password_hash or admin.password_hash.",
        "Reads a password (prompted twice without echo, or one line from standard input) and "
        "prints a salted scrypt hash to paste into the config.",
    )
    hasher.set_defaults(handler=_hash_password)
    return parser


def _add_migrate_command(commands: Any) -> None:
    """``gateway migrate``."""
    migrate = _command(
        commands,
        "migrate",
        "Bring the state database's schema up to this version of the gateway.",
        "With store.url (PostgreSQL, shared by several instances) instances never change the "
        "schema themselves: run this once per upgrade, before starting the new version. "
        "SQLite databases are also migrated by `gateway run` itself.",
    )
    _add_config_option(migrate)
    migrate.set_defaults(handler=_migrate)


def _add_queue_command(commands: Any) -> None:
    """``gateway queue`` and its actions."""
    queue = _command(
        commands,
        "queue",
        "List, retry, delete or release outgoing mail.",
        "list: queued, held and dead messages with reasons, and which accounts the provider "
        "paused until when; retry [ID]: try again now (all when no ID; a paused account still "
        "waits for its pause to end); delete ID: drop a message; release ACCOUNT: send its held "
        "mail. Needs no secrets.",
    )
    queue.add_argument("action", choices=("list", "retry", "delete", "release"))
    queue.add_argument("target", nargs="?", help="a message ID, or for release an account")
    _add_config_option(queue)
    queue.set_defaults(handler=_queue)


def _add_demo_command(commands: Any) -> None:
    """``gateway demo`` and its options (the longest command; kept apart from _parser)."""
    demo = _command(
        commands,
        "demo",
        "Run the gateway against local sandbox clouds (no accounts needed) and print how to "
        "connect.",
        "The listeners get free ports (printed), or --first-port N and the six after it. A "
        "temporary state directory is removed on exit unless --keep is given.",
    )
    demo.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the demo keeps its config and state; kept on exit (default: a new "
        "temporary directory, removed on exit unless --keep)",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary state directory (tokens, key, config) on exit",
    )
    demo.add_argument(
        "--first-port",
        type=_first_port,
        default=None,
        metavar="N",
        help="listen on N (SMTP), N+1 (SMTPS), N+2 (IMAP), N+3 (IMAPS), N+4 (POP3), N+5 "
        "(POP3S) and N+6 (admin page) instead of free ports",
    )
    demo.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="log level on standard error (default: warning, to keep the instructions readable)",
    )
    demo.set_defaults(handler=_demo)


def _command(commands: Any, name: str, summary: str, details: str = "") -> argparse.ArgumentParser:
    """A subcommand whose one-sentence summary is both its line in ``gateway --help`` and the
    start of its own ``--help``."""
    help_line = summary[0].lower() + summary[1:].rstrip(".")
    return commands.add_parser(name, help=help_line, description=f"{summary} {details}".strip())


def _first_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535 - 6:
        raise argparse.ArgumentTypeError(f"must be 1-{65535 - 6} (seven ports from N): {port}")
    return port


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="config file (default: $GATEWAY_CONFIG or ./config.yaml)",
    )


def _config_path(args: argparse.Namespace) -> Path:
    return args.config or Path(os.environ.get("GATEWAY_CONFIG") or "config.yaml")


def _load(args: argparse.Namespace, *, serving: bool = True) -> Settings | None:
    """The settings, or None after printing every problem. ``serving=False`` for commands that
    need no secrets (see :func:`gateway.config.load_settings`)."""
    from .config import ConfigError, load_settings

    try:
        return load_settings(_config_path(args), serving=serving)
    except ConfigError as error:
        print(error.report(), file=sys.stderr)
        return None


def _check_config(args: argparse.Namespace) -> int:
    if args.file and args.config and args.file != args.config:
        print(
            f"gateway check-config: two files given ({args.file}, {args.config}); give one",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    args.config = args.file or args.config
    settings = _load(args)
    if settings is None:
        return EXIT_CONFIG
    ports = ", ".join(f"{name} {port}" for name, port in settings.listeners.ports().items())
    accounts = len(settings.accounts)
    print(f"{_config_path(args)}: OK ({accounts} account{'s' if accounts != 1 else ''}; {ports})")
    from .config import config_notes

    for note in config_notes(settings):
        print(f"note: {note}")
    if settings.store.url is not None:
        return _check_store(settings.store.url.value)
    return EXIT_OK


def _check_store(url: str) -> int:
    """Connect to the configured PostgreSQL and compare its schema with this version's."""
    from .store import PgDatabase, StoreError, describe

    async def check() -> None:
        await (await PgDatabase.open(url, size=2)).close()

    try:
        asyncio.run(check())
    except StoreError as error:
        print(f"store: {error}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"store: {describe(url)} reachable, schema current")
    return EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    settings = _load(args, serving=False)
    if settings is None:
        return EXIT_CONFIG
    from .config import SecretUnavailable
    from .store import StoreError, describe, migrate_postgresql

    if settings.store.url is None:
        return _with_broker(args, _sqlite_migrated, serving=False)
    try:
        url = settings.store.url.value
        before, after = asyncio.run(migrate_postgresql(url))
    except (StoreError, SecretUnavailable) as error:
        print(f"gateway: {error}", file=sys.stderr)
        return EXIT_FAILURE
    state = "already current" if before == after else f"upgraded from version {before}"
    print(f"gateway: {describe(url)} schema version {after} ({state})")
    return EXIT_OK


async def _sqlite_migrated(broker: Any) -> int:
    print("gateway: the SQLite state database is at the current schema (opening it migrates it)")
    return EXIT_OK


# A gateway listening on every address is asked over loopback.
_LOOPBACK_FOR_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104


def _health(args: argparse.Namespace) -> int:
    import httpx

    settings = _load(args, serving=False)
    if settings is None:
        return EXIT_CONFIG
    port = settings.listeners.admin_port
    if not port:
        print("gateway: the admin listener is off, so there is nothing to ask", file=sys.stderr)
        return EXIT_CONFIG
    host = _LOOPBACK_FOR_WILDCARD.get(settings.listeners.host, settings.listeners.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz"
    try:
        # A proxy from the environment (HTTP_PROXY, ALL_PROXY: exactly where outbound traffic
        # needs one) would be asked to reach our own loopback listener, and cannot.
        response = httpx.get(url, timeout=5, trust_env=False)
    except httpx.HTTPError as error:
        print(f"gateway: not healthy: {url}: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if response.status_code != 200:
        print(f"gateway: not healthy: {url} answered {response.status_code}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"gateway: healthy ({url})")
    return EXIT_OK


def _with_broker(
    args: argparse.Namespace, job: Callable[[Any], Awaitable[int]], *, serving: bool = True
) -> int:
    """Run ``job(broker)`` against the state directory, beside a running gateway or not."""
    settings = _load(args, serving=serving)
    if settings is None:
        return EXIT_CONFIG
    from .app import open_stores
    from .config import SecretUnavailable
    from .oauth import OAuthError, TokenBroker
    from .store import StoreError

    async def main() -> int:
        stores = await open_stores(settings)
        try:
            return await job(TokenBroker(settings, stores.auth, stores.events, stores.coordination))
        finally:
            await stores.close()

    try:
        return asyncio.run(main())
    except (OAuthError, StoreError) as error:
        print(f"gateway: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except SecretUnavailable as error:  # only with serving=False, and then never expected
        print(f"gateway: this command needs a secret: {error}", file=sys.stderr)
        return EXIT_CONFIG


def _unknown_account(settings: Any, username: str, command: str) -> bool:
    """Whether ``username`` is not configured (said on stderr: a usage error, exit 2)."""
    known = [account.username for account in settings.accounts]
    if username in known:
        return False
    listed = ", ".join(known) or "none"
    print(
        f"gateway {command}: there is no account {username!r} (accounts: {listed})", file=sys.stderr
    )
    return True


def _connect(args: argparse.Namespace) -> int:
    async def job(broker: Any) -> int:
        if _unknown_account(broker.settings, args.account, "connect"):
            return EXIT_CONFIG
        if args.device:
            status = await broker.connect_with_device_code(
                args.account, lambda message: print(message, flush=True)
            )
            print(f"{status.account.username}: connected as {status.principal}")
            # A running gateway sends the held mail shortly.
            await _queue_command(broker.settings, "release", args.account)
            return EXIT_OK
        url, expires = await broker.create_consent_link(args.account)
        address = broker.account(args.account).address
        print(
            f"Send this link to the owner of {address}; it works once, until "
            f"{expires:%Y-%m-%d %H:%M} UTC, and needs the gateway running:\n{url}"
        )
        return EXIT_OK

    return _with_broker(args, job)


def _queue(args: argparse.Namespace) -> int:
    settings = _load(args, serving=False)
    if settings is None:
        return EXIT_CONFIG
    if args.action in ("delete", "release") and not args.target:
        what = "message ID" if args.action == "delete" else "account"
        print(f"gateway queue {args.action}: say which {what}", file=sys.stderr)
        return EXIT_CONFIG
    if args.action == "release" and _unknown_account(settings, args.target, "queue release"):
        return EXIT_CONFIG
    from .spool import SpoolError
    from .store import StoreError

    try:
        return asyncio.run(_queue_command(settings, args.action, args.target))
    except (StoreError, SpoolError) as error:
        print(f"gateway: {error}", file=sys.stderr)
        return EXIT_FAILURE


async def _queue_command(settings: Any, action: str, target: str | None) -> int:
    """A queue command on the configured spool: the files in state_dir, or with store.url the
    database every instance shares."""
    from .spool import DatabaseStore, FileStore, queue_main

    spool_dir = settings.state_dir / "spool"
    if settings.store.url is None:
        if not (spool_dir / "queue").is_dir():
            print(f"no spool at {spool_dir} (the gateway has not run with this state_dir)")
            return 1 if action != "list" else 0
        return await queue_main(FileStore(spool_dir), action, target, sys.stdout)
    from .app import open_stores

    stores = await open_stores(settings)
    try:
        store = DatabaseStore(stores.db, stores.coordination, stores.backend, spool_dir / "tmp")
        return await queue_main(store, action, target, sys.stdout)
    finally:
        await stores.close()


def _accounts(args: argparse.Namespace) -> int:
    async def job(broker: Any) -> int:
        for status in await broker.statuses():
            detail = {
                "connected": f"connected as {status.principal}",
                "needs_reconsent": f"NEEDS RE-CONSENT since {status.since:%Y-%m-%d %H:%M} UTC"
                if status.since
                else "NEEDS RE-CONSENT",
                "app_only": "connected (application permission)",
                "upstream": "password server",
                "not_connected": "not connected",
            }[status.state]
            missing = ", ".join(need.scope for need in status.missing)
            if missing and status.state != "not_connected":
                detail += f"; missing scopes: {missing}"
            account = status.account
            print(f"{account.username:<16} {account.address:<32} {account.provider:<9} {detail}")
        return EXIT_OK

    return _with_broker(args, job, serving=False)


def _reload(args: argparse.Namespace) -> int:
    settings = _load(args, serving=False)
    if settings is None:
        return EXIT_CONFIG
    from .reload import pid_file

    path = pid_file(settings.state_dir)
    try:
        pid = int(path.read_text(encoding="ascii").strip())
        if "gateway" not in _command_line(pid):
            raise ProcessLookupError
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):  # no file, a stale pid, or not ours to signal
        print(
            f"gateway reload: no running gateway found through {path} (is it running with "
            f"state_dir {settings.state_dir}, and as this user?)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    print(
        f"gateway reload: sent SIGHUP to process {pid}; its log says gateway.reloaded, or "
        "gateway.reload_refused with each problem"
    )
    return EXIT_OK


def _command_line(pid: int) -> str:
    """The process's command line (Linux), or "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _hash_password(args: argparse.Namespace) -> int:
    from .passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Repeat password: "):
            print("The passwords differ; nothing was hashed.", file=sys.stderr)
            return EXIT_CONFIG
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("An empty password cannot be hashed.", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_password(password))
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    # The reactor must be installed before anything imports Twisted's protocol modules.
    from .runtime import freeze_startup_objects, new_loop_with_reactor

    loop = new_loop_with_reactor()
    settings = _load(args)
    if settings is None:
        return EXIT_CONFIG
    from .app import Gateway
    from .logs import configure_logging, get_logger

    configure_logging(settings.logging.level, settings.logging.format)
    gateway = Gateway(settings)
    reloads: set[asyncio.Task[bool]] = set()  # held until done (the loop keeps weak refs)

    def reload_on_hangup() -> None:
        get_logger("gateway.cli").info("gateway.reloading", signal="SIGHUP")
        task = loop.create_task(gateway.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_on_hangup)
    return _serve_until_signal(
        loop, lambda stop: gateway.run_until(stop, started=freeze_startup_objects)
    )


def _demo(args: argparse.Namespace) -> int:
    from .runtime import new_loop_with_reactor

    try:
        from .demo import run_demo
    except ModuleNotFoundError as error:
        if error.name != SANDBOX_PACKAGE:
            raise
        print(DEMO_NEEDS_SANDBOX, file=sys.stderr)
        return EXIT_FAILURE
    loop = new_loop_with_reactor()
    from .logs import configure_logging

    configure_logging(args.log_level, "text")
    return _serve_until_signal(
        loop,
        lambda stop: run_demo(stop, args.state_dir, keep=args.keep, first_port=args.first_port),
    )


def _serve_until_signal(
    loop: asyncio.AbstractEventLoop, main: Callable[[asyncio.Event], Awaitable[None]]
) -> int:
    """Run ``main`` until it returns; SIGINT/SIGTERM set the event it waits on."""
    from .app import StartError
    from .logs import get_logger

    log = get_logger("gateway.cli")
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _request_stop, stop, signum, log)
    try:
        loop.run_until_complete(main(stop))
    except StartError as error:
        log.error("gateway.start_failed", reason=str(error))
        print(f"gateway: {error}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        loop.close()
    return EXIT_OK


def _request_stop(stop: asyncio.Event, signum: int, log: EventLogger) -> None:
    log.info("gateway.stopping", signal=signal.Signals(signum).name)
    stop.set()
