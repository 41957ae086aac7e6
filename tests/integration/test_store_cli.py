"""``gateway migrate``, ``gateway check-config`` and ``gateway run`` against the store, as an
admin runs them: real processes, a real PostgreSQL (tests/conftest.py ``postgres``)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from gateway.store import describe
from gateway.store._migrations import MIGRATIONS
from mailgw_sandbox.postgres import PASSWORD, PostgresServer
from tests.helpers import base_config, free_port

GATEWAY = [sys.executable, "-m", "gateway"]
NEWEST = len(MIGRATIONS)
KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()  # GATEWAY_SECRET_KEY


def _config(tmp_path: Path, url: str | None) -> Path:
    """A valid config; the store URL comes from the environment, as the README advises."""
    config = base_config(tmp_path / "state")
    if url is not None:
        config["store"] = {"url": {"env": "GATEWAY_STORE_URL"}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(
    *args: str, url: str | None = None, python: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_PROXY")}
    env["GATEWAY_SECRET_KEY"] = KEY
    if url is not None:
        env["GATEWAY_STORE_URL"] = url
    result = subprocess.run(
        [*(python or GATEWAY), *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env=env,
    )
    assert PASSWORD not in result.stdout + result.stderr  # never the URL's password
    assert "Traceback" not in result.stderr
    return result


def test_migrate_then_check_config_says_reachable_and_current(tmp_path: Path, pg_url: str) -> None:
    config = _config(tmp_path, pg_url)
    first = _cli("migrate", "-c", str(config), url=pg_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout == (
        f"gateway: {describe(pg_url)} schema version {NEWEST} (upgraded from version 0)\n"
    )
    again = _cli("migrate", "-c", str(config), url=pg_url)
    assert (
        again.stdout == f"gateway: {describe(pg_url)} schema version {NEWEST} (already current)\n"
    )
    checked = _cli("check-config", str(config), url=pg_url)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines()[-1] == f"store: {describe(pg_url)} reachable, schema current"


def test_check_config_refuses_an_unmigrated_database(tmp_path: Path, pg_url: str) -> None:
    checked = _cli("check-config", str(_config(tmp_path, pg_url)), url=pg_url)
    assert checked.returncode == 1
    assert checked.stderr == (
        f"store: {describe(pg_url)} has schema version 0, this gateway needs {NEWEST}: run "
        "`gateway migrate -c CONFIG` once (with every older instance stopped if one runs)\n"
    )


def test_check_config_refuses_an_unreachable_server(tmp_path: Path, pg_url: str) -> None:
    parts = urlsplit(pg_url)
    closed = free_port()
    url = pg_url.replace(f":{parts.port}/", f":{closed}/")
    checked = _cli("check-config", str(_config(tmp_path, url)), url=url)
    assert checked.returncode == 1
    assert checked.stderr.startswith(
        f"store: cannot connect to PostgreSQL at {describe(url)} (store.url): connection failed:"
    )
    assert checked.stderr.endswith(
        "; check that the server runs, the address and credentials, and pg_hba.conf\n"
    )


def test_run_refuses_an_unmigrated_database(tmp_path: Path, pg_url: str) -> None:
    ran = _cli("run", "-c", str(_config(tmp_path, pg_url)), url=pg_url)
    assert ran.returncode == 1
    assert ran.stderr.splitlines()[-1] == (
        f"gateway: {describe(pg_url)} has schema version 0, this gateway needs {NEWEST}: run "
        "`gateway migrate -c CONFIG` once (with every older instance stopped if one runs)"
    )


def test_run_with_another_key_is_refused(
    tmp_path: Path, pg_url: str, postgres: PostgresServer
) -> None:
    """The first instance's key check value is there; this instance's key differs."""
    config = _config(tmp_path, pg_url)
    assert _cli("migrate", "-c", str(config), url=pg_url).returncode == 0
    probe = (
        "import asyncio, sys\n"
        "from gateway.store import SecretBox, open_postgresql\n"
        "async def main():\n"
        "    await (await open_postgresql(sys.argv[1], SecretBox(bytes(32)))).close()\n"
        "asyncio.run(main())\n"
    )
    assert _cli(pg_url, python=[sys.executable, "-c", probe]).returncode == 0
    ran = _cli("run", "-c", str(config), url=pg_url)
    assert ran.returncode == 1
    assert "this instance's secret key does not match" in ran.stderr.splitlines()[-1]


def test_run_without_the_driver_gives_the_install_sentence(tmp_path: Path, pg_url: str) -> None:
    """psycopg is the optional ``postgresql`` extra: blocked here as if not installed."""
    config = _config(tmp_path, pg_url)
    without_driver = (
        "import sys\n"
        "sys.modules['psycopg'] = None\n"
        "sys.modules['psycopg_pool'] = None\n"
        "from gateway.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    python = [sys.executable, "-c", without_driver]
    for args in (("run", "-c", str(config)), ("migrate", "-c", str(config))):
        ran = _cli(*args, url=pg_url, python=python)
        assert ran.returncode == 1, args
        assert ran.stderr.splitlines()[-1].endswith(
            "install the PostgreSQL driver: pip install 'mail-oauth-gateway[postgresql]'"
        ), ran.stderr
        assert "store.url names PostgreSQL, but its driver" in ran.stderr


def test_sqlite_migrate(tmp_path: Path) -> None:
    config = _config(tmp_path, None)
    migrated = _cli("migrate", "-c", str(config))
    assert migrated.returncode == 0, migrated.stderr
    assert "SQLite state database is at the current schema" in migrated.stdout
    assert (tmp_path / "state" / "gateway.db").is_file()
    checked = _cli("check-config", str(config))
    assert checked.returncode == 0
    assert "store:" not in checked.stdout  # nothing to reach: the file is opened by run
