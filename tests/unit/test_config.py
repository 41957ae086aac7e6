"""Config loading: good files give typed settings; bad files list every problem usefully."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gateway import tls
from gateway.config import (
    ConfigError,
    Secret,
    SecretUnavailable,
    config_notes,
    load_settings,
)
from gateway.config._checks import PUBLISHED_PASSWORD_HASHES
from gateway.passwords import parse_hash, verify_password
from tests.helpers import PASSWORD_HASH, base_config

REPO = Path(__file__).resolve().parents[2]


def _problems(path: Path, environ: dict | None = None) -> list:
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ=environ or {})
    return raised.value.problems


def test_example_config_is_valid_once_its_hashes_are_replaced(tmp_path: Path) -> None:
    example = tmp_path / "config.example.yaml"
    text = (REPO / "config.example.yaml").read_text()
    for published in PUBLISHED_PASSWORD_HASHES:
        text = text.replace(published, PASSWORD_HASH)
    example.write_text(text)
    settings = load_settings(example, environ={})
    assert settings.listeners.host == "127.0.0.1"
    assert settings.state_dir == tmp_path / "state"  # relative to the config file
    assert [a.provider for a in settings.accounts] == ["microsoft", "google", "upstream"]
    smtp = settings.accounts[2].upstream.smtp
    assert smtp.port_for("smtp") == 587 and smtp.security == "starttls"
    assert isinstance(smtp.password, Secret) and "upstream-password-here" not in repr(smtp)
    assert config_notes(settings) == []


def test_defaults_fill_everything_optional(write_config, tmp_path: Path) -> None:
    path = write_config({"state_dir": "state"})
    settings = load_settings(path, environ={})
    assert settings.listeners.ports() == {
        "smtp": 2525,
        "smtps": 2465,
        "imap": 2143,
        "imaps": 2993,
        "pop3": 2110,
        "pop3s": 2995,
        "admin": 8025,
    }
    assert settings.microsoft.authority_host == "https://login.microsoftonline.com"
    assert settings.google.token_uri == "https://oauth2.googleapis.com/token"
    assert settings.accounts == () and settings.source == path.resolve()


def test_five_different_mistakes_are_all_reported(write_config, tmp_path: Path) -> None:
    config = base_config(tmp_path / "state")
    config["listeners"]["smtp_port"] = 2525
    config["listeners"]["imap_port"] = 2525  # 1. port collision
    config["listeners"]["pop3_port"] = "one hundred"  # 2. wrong type
    config["listners"] = {}  # 3. unknown key
    del config["accounts"][0]["address"]  # 4. missing required value
    config["accounts"][1]["password_hash"] = "hunter2"  # 5. malformed password hash
    config["tls"] = {"cert": str(tmp_path / "missing.pem"), "key": str(tmp_path / "k.pem")}  # 6.
    problems = _problems(write_config(config))
    by_key = {p.key: p for p in problems}
    assert set(by_key) == {
        "listeners.imap_port",
        "listeners.pop3_port",
        "listners",
        "accounts[0].address",
        "accounts[1].password_hash",
        "tls",
    }
    assert "already used by listeners.smtp_port" in by_key["listeners.imap_port"].message
    assert "expected a whole number" in by_key["listeners.pop3_port"].message
    assert by_key["listners"].fix == "did you mean 'listeners'?"
    assert by_key["accounts[0].address"].message == "missing required value"
    assert "hash-password" in by_key["accounts[1].password_hash"].fix
    assert "cannot read certificate" in by_key["tls"].message
    assert all(p.fix and p.line for p in problems), problems


def test_report_names_file_line_key_and_fix(write_config, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("state_dir: s\nlisteners:\n  smtp_port: yes\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={})
    report = str(raised.value)
    assert f"{path}:3: listeners.smtp_port: expected a whole number" in report
    assert "fix: use a free TCP port number" in report


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("state_dir: s\nlisteners:\n  smtp_port: [2525\n  imap_port: 2143\n")
    (problem,) = _problems(path)
    assert problem.message.startswith("YAML syntax error")
    assert problem.line == 4


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("state_dir: s\nstate_dir: t\n")
    (problem,) = _problems(path)
    assert "duplicate key 'state_dir'" in problem.message and problem.line == 2


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    (missing,) = _problems(tmp_path / "nope.yaml")
    assert "cannot read file" in missing.message and "-c" in missing.fix
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    (problem,) = _problems(path)
    assert "expected a section of keys" in problem.message


def test_secrets_from_environment(write_config, tmp_path: Path) -> None:
    config = base_config(tmp_path / "state")
    config["microsoft"]["client_secret"] = {"env": "GW_TEST_MS_SECRET"}
    path = write_config(config)
    settings = load_settings(path, environ={"GW_TEST_MS_SECRET": "s3cr3t-value"})
    assert settings.microsoft.client_secret.value == "s3cr3t-value"
    assert "s3cr3t" not in repr(settings)
    (problem,) = _problems(path, environ={})
    assert problem.key == "microsoft.client_secret"
    assert "GW_TEST_MS_SECRET is not set" in problem.message
    assert problem.fix.startswith("export GW_TEST_MS_SECRET=")


def test_upstream_account_rules(write_config, tmp_path: Path) -> None:
    server = {"host": "mail.example.org", "security": "tls", "username": "u", "password": "pw"}
    config = base_config(tmp_path / "state")
    config["accounts"] = [
        {
            "username": "a",
            "password_hash": PASSWORD_HASH,
            "provider": "upstream",
            "address": "a@example.org",
            "upstream": {"imap": server, "pop3": server},
        },
        {
            "username": "A",
            "password_hash": PASSWORD_HASH,
            "provider": "google",
            "address": "b@example.org",
            "upstream": {"smtp": server},
        },
    ]
    problems = {p.key: p.message for p in _problems(write_config(config))}
    assert "both upstream.imap and upstream.pop3" in problems["accounts[0].upstream"]
    assert "only used with provider upstream" in problems["accounts[1].upstream"]
    assert "used by another account" in problems["accounts[1].username"]


def test_an_upstream_account_without_smtp_is_valid_and_noted_as_read_only(
    write_config, tmp_path: Path
) -> None:
    server = {"host": "mail.example.org", "security": "tls", "username": "u", "password": "pw"}
    config = base_config(tmp_path / "state")
    for name, upstream in (
        ("reader", {"imap": server}),
        ("both", {"smtp": server, "pop3": server}),
    ):
        config["accounts"].append(
            {
                "username": name,
                "password_hash": PASSWORD_HASH,
                "provider": "upstream",
                "address": f"{name}@example.org",
                "upstream": upstream,
            }
        )
    settings = load_settings(write_config(config), environ={})
    assert config_notes(settings) == [
        "account 'reader' can only read mail: it has no upstream.smtp server, so the gateway "
        "refuses its SMTP submissions at MAIL FROM (550 5.7.1); add upstream.smtp if its "
        "programs also send"
    ]


def test_save_to_sent_false_is_refused_for_google_accounts(write_config, tmp_path: Path) -> None:
    config = base_config(tmp_path / "state")
    for account in config["accounts"]:  # crm (microsoft) may; scanner (google) may not
        account["sending"] = {"save_to_sent": False}
    (problem,) = _problems(write_config(config))
    assert problem.key == "accounts[1].sending.save_to_sent"
    assert "Gmail files every message sent through its API in Sent Mail" in problem.message
    assert "https://mail.google.com/" in problem.message and "gmail.modify" in problem.message
    assert problem.fix.startswith("remove save_to_sent")


def test_reading_policy_keys_and_pop3_upstream_writes(write_config, tmp_path: Path) -> None:
    server = {"host": "mail.example.org", "security": "tls", "username": "u", "password": "pw"}
    config = base_config(tmp_path / "state", reading={"poll_seconds": 0, "plaintext_auth": "yes"})
    config["accounts"][0]["reading"] = {"on_delete": "purge"}
    config["accounts"].append(
        {
            "username": "legacy",
            "password_hash": PASSWORD_HASH,
            "provider": "upstream",
            "address": "legacy@example.org",
            "upstream": {"pop3": server},
            "reading": {"mirror_flags": True},
        }
    )
    problems = {p.key: (p.message, p.fix) for p in _problems(write_config(config))}
    assert "1-3600" in problems["reading.poll_seconds"][1]
    assert "loopback" in problems["reading.plaintext_auth"][1]
    assert "archive" in problems["accounts[0].reading.on_delete"][1]
    message, fix = problems["accounts[2].reading"]
    assert "POP3 upstream has no flags or folders" in message and "upstream.imap" in fix


def test_microsoft_account_needs_client_id(write_config, tmp_path: Path) -> None:
    config = base_config(tmp_path / "state")
    del config["microsoft"]
    (problem,) = _problems(write_config(config))
    assert problem.key == "microsoft.client_id"
    assert "account 'crm' uses Microsoft" in problem.message


def test_endpoints_must_be_https_and_values_well_formed(write_config, tmp_path: Path) -> None:
    config = base_config(tmp_path / "state")
    config["google"] = {"token_uri": "http://oauth2.googleapis.com/token"}
    config["microsoft"]["client_id"] = "my-app"
    config["microsoft"]["tenant"] = "not a tenant"
    config["listeners"]["host"] = "local host"
    config["listeners"]["admin_port"] = 70000
    config["accounts"][0]["address"] = "crm-at-contoso"
    config["accounts"][0]["provider"] = "exchange"
    keys = {p.key for p in _problems(write_config(config))}
    assert keys == {
        "google.token_uri",
        "microsoft.client_id",
        "microsoft.tenant",
        "listeners.host",
        "listeners.admin_port",
        "accounts[0].address",
        "accounts[0].provider",
    }


def test_tls_pair_is_checked(write_config, tmp_path: Path) -> None:
    first = tls.ensure_certificate(tmp_path / "one", "localhost")
    second = tls.ensure_certificate(tmp_path / "two", "localhost")
    config = base_config(tmp_path / "state", tls={"cert": str(first.cert)})
    (problem,) = _problems(write_config(config))
    assert problem.key == "tls.key" and "both cert and key" in problem.fix
    config["tls"] = {"cert": str(first.cert), "key": str(second.key)}
    (problem,) = _problems(write_config(config))
    assert "does not belong to certificate" in problem.message
    config["tls"] = {"cert": str(first.cert), "key": str(first.key)}
    assert load_settings(write_config(config), environ={}).tls.cert == first.cert


def test_published_hashes_are_the_examples_and_of_change_me_now() -> None:
    """The list the check refuses is exactly what the example publishes (a new example hash
    must be added to it), and each entry really is a hash of the published password."""
    text = (REPO / "config.example.yaml").read_text()
    in_example = {word.strip('"') for word in text.split() if word.startswith('"$scrypt$')}
    assert in_example and in_example <= PUBLISHED_PASSWORD_HASHES
    for published in PUBLISHED_PASSWORD_HASHES:
        assert verify_password("change-me-now", parse_hash(published))


def test_published_hashes_are_refused_when_serving_only(tmp_path: Path) -> None:
    example = tmp_path / "config.yaml"
    shutil.copy(REPO / "config.example.yaml", example)
    problems = _problems(example)
    assert [p.key for p in problems] == [
        "admin.password_hash",
        "accounts[0].password_hash",
        "accounts[1].password_hash",
        "accounts[2].password_hash",
    ]
    for problem in problems:
        assert problem.line and '"change-me-now"' in problem.message
        assert "gateway hash-password" in problem.fix
    # queue, accounts and health read such a file: they log nobody in.
    settings = load_settings(example, environ={}, serving=False)
    assert settings.admin.password_hash in PUBLISHED_PASSWORD_HASHES


def test_unset_secrets_load_unresolved_for_the_operations_commands(
    write_config, tmp_path: Path
) -> None:
    config = base_config(tmp_path / "state")
    config["microsoft"]["client_secret"] = {"env": "GW_TEST_MS_SECRET"}
    path = write_config(config)
    settings = load_settings(path, environ={}, serving=False)
    secret = settings.microsoft.client_secret
    assert "GW_TEST_MS_SECRET" in repr(secret)
    with pytest.raises(SecretUnavailable, match="environment variable GW_TEST_MS_SECRET is not"):
        _ = secret.value
    assert secret == Secret(None, "environment variable GW_TEST_MS_SECRET")
    assert secret != Secret("x", "environment variable GW_TEST_MS_SECRET")
    set_too = load_settings(path, environ={"GW_TEST_MS_SECRET": "v"}, serving=False)
    assert set_too.microsoft.client_secret.value == "v"  # a set variable is read as always
    (problem,) = _problems(path, environ={})  # ... and serving still requires it
    assert problem.key == "microsoft.client_secret"


def test_state_dir_variable_overrides_the_file(write_config, tmp_path: Path) -> None:
    path = write_config(base_config(tmp_path / "from-file"))
    environ = {"GATEWAY_STATE_DIR": str(tmp_path / "from-env")}
    assert load_settings(path, environ=environ).state_dir == tmp_path / "from-env"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (problem,) = _problems(path, environ={"GATEWAY_STATE_DIR": str(blocker)})
    assert problem.key == "state_dir" and "is not a directory" in problem.message
    assert "from GATEWAY_STATE_DIR, which overrides the file" in problem.message
    assert problem.fix == "fix or unset GATEWAY_STATE_DIR" and problem.line is None


def test_state_dir_must_be_a_writable_directory(write_config, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (problem,) = _problems(write_config(base_config(blocker)))
    assert problem.key == "state_dir" and "is not a directory" in problem.message
    if os.geteuid() != 0:  # root may write anywhere; the check is for service users
        readonly = tmp_path / "ro"
        readonly.mkdir(mode=0o500)
        (problem,) = _problems(write_config(base_config(readonly / "state")))
        assert "not writable" in problem.message


def test_upstream_ca_file_must_be_readable(write_config, tmp_path: Path) -> None:
    ca = tls.ensure_certificate(tmp_path / "ca", "localhost").ca
    server = {"host": "mail.example.org", "ca_file": str(ca)}
    config = base_config(tmp_path / "state")
    config["accounts"][1] = {
        "username": "legacy",
        "password_hash": PASSWORD_HASH,
        "provider": "upstream",
        "address": "legacy@example.org",
        "upstream": {"imap": server},
    }
    settings = load_settings(write_config(config), environ={})
    assert settings.accounts[1].upstream.imap.ca_file == ca
    server["ca_file"] = str(tmp_path / "missing.pem")
    (problem,) = _problems(write_config(config))
    assert problem.key == "accounts[1].upstream.imap.ca_file" and "cannot read" in problem.message


def test_app_only_needs_a_client_secret(write_config, tmp_path: Path) -> None:
    config = base_config(tmp_path / "state")
    config["microsoft"]["app_only"] = True
    (problem,) = _problems(write_config(config))
    assert problem.key == "microsoft.app_only" and "client_secret" in problem.message
    config["microsoft"]["client_secret"] = "s3cret-value-1"
    assert load_settings(write_config(config), environ={}).microsoft.app_only


def test_admin_public_url_must_be_an_origin(write_config, tmp_path: Path) -> None:
    config = base_config(tmp_path / "state")
    config["admin"]["public_url"] = "http://gw.example:8025/admin"
    (problem,) = _problems(write_config(config))
    assert problem.key == "admin.public_url"
    config["admin"]["public_url"] = "https://gw.example:8443"
    assert load_settings(write_config(config), environ={}).admin.public_url.endswith(":8443")
